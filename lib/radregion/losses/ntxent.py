"""NT-Xent, the loss of SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning
of Visual Representations", ICML 2020, arXiv:2002.05709 (eq. 1)."""

import torch
import torch.nn.functional as F


def ntxent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Mean NT-Xent over the 2N anchors; z1[i] and z2[i] are the two views of image i, shape (N, D).

    For anchor i with positive j: -log(exp(s_ij / t) / sum_{k != i} exp(s_ik / t)), s = cosine similarity.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"ntxent_loss wants two (N, D) tensors of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # an anchor is never its own negative
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positives)
