"""Energy-bounded outlier exposure: Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS
2020, arXiv:2010.03759 (the energy-bounded learning objective; official code github.com/wetliu/energy_ood,
CIFAR/train.py). pytorch-ood's `EnergyRegularizedLoss` computes the same term but cannot be imported here: its
package imports torchvision."""

import torch
import torch.nn.functional as F

MARGIN_IN = -25.0  # the paper's margins m_in and m_out for CIFAR-10
MARGIN_OUT = -7.0


def energy(logits: torch.Tensor) -> torch.Tensor:
    """E(x) = -log sum_i exp f_i(x) (the free energy at temperature 1): low for images the classifier knows."""
    return -torch.logsumexp(logits.float(), dim=1)


def energy_margin_loss(
    in_logits: torch.Tensor, out_logits: torch.Tensor, margin_in: float = MARGIN_IN, margin_out: float = MARGIN_OUT
) -> torch.Tensor:
    """The regulariser L_energy: E_in[max(0, E(x) - m_in)^2] + E_out[max(0, m_out - E(x))^2], each mean
    over its own images: in-domain energies are pushed below `margin_in`, out-of-domain ones above `margin_out`.
    `in_logits` (N, C), `out_logits` (M, C) with the same C."""
    if in_logits.ndim != 2 or out_logits.ndim != 2 or in_logits.shape[1] != out_logits.shape[1]:
        raise ValueError(
            f"energy_margin_loss wants (N, C) and (M, C) logits, got {tuple(in_logits.shape)} and "
            f"{tuple(out_logits.shape)}"
        )
    if not margin_in < margin_out:
        raise ValueError(f"the in-domain margin must be below the out-of-domain one, not {margin_in} >= {margin_out}")
    inside = F.relu(energy(in_logits) - margin_in).pow(2).mean()
    outside = F.relu(margin_out - energy(out_logits)).pow(2).mean()
    return inside + outside
