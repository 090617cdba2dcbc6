"""Supervised contrastive loss: Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020,
arXiv:2004.11362 (eq. 2, L_out: the mean over positives is taken outside the log)."""

import torch
import torch.nn.functional as F


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean L_out over the anchors that have at least one positive.

    features: (M, D) embeddings of all views (views of one image are stacked as separate rows); labels: (M,)
    integer classes. Rows with equal labels are positives of each other. Give every unlabelled image a class of
    its own: its other view is then its only positive, which is NT-Xent for that anchor.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"supcon_loss wants (M, D) features and (M,) labels, got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not has_positive.any():
        raise ValueError("supcon_loss: no anchor has a positive; pass both views of each image")
    mean_log_prob = log_prob.masked_fill(~positives, 0).sum(dim=1)[has_positive] / counts[has_positive]
    return -mean_log_prob.mean()
