"""Weight averaging of fine-tuned backbones: a uniform model soup.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time", ICML 2022: models fine-tuned from one pretrained start (here with other seeds) tend to lie in one
basin of the loss, where the mean of their weights, theta = (1/K) sum_k theta_k (the paper's uniform soup), is a model
itself, often as good as their ensemble, at the cost of one. Batch-norm running statistics are averaged like every
other tensor or, with `recalibrate_batch_norm`, recomputed on training images: the statistics of the averaged
network's own activations, which the mean of the members' statistics need not be.

The soup has no head: `radregion fit-head` fits one on its features, as after pretraining.
"""

from __future__ import annotations

import numpy as np
import torch

from radregion.networks import BATCH_NORMS


def check_members(bundles) -> None:
    """Refuse bundles that cannot be averaged: fewer than two, other architectures, cleaning or starts."""
    if len(bundles) < 2:
        raise ValueError("a soup needs at least two fine-tuned bundles (--model, repeated)")
    first = bundles[0]
    for bundle in bundles:
        if not start_of(bundle):
            raise ValueError(
                f"{bundle.path}: not a fine-tuned bundle (bundle.json names no start in training.backbone); a soup "
                "averages models fine-tuned from one start"
            )
    for other in bundles[1:]:
        if other.meta["architecture"] != first.meta["architecture"]:
            raise ValueError(f"{other.path}: another architecture than {first.path}; cannot average their weights")
        if other.settings != first.settings:
            raise ValueError(f"{other.path}: cleaning settings differ from {first.path}; cannot average their weights")
        if start_of(other) != start_of(first):
            raise ValueError(
                f"{other.path}: fine-tuned from another start than {first.path} (bundle.json training.backbone): "
                "only models fine-tuned from the same weights average into a working model"
            )


def start_of(bundle) -> dict:
    """The provenance of the weights a bundle was fine-tuned from (its "training" block's "backbone")."""
    return (bundle.meta.get("training") or {}).get("backbone") or {}


def average_backbones(bundles) -> dict[str, torch.Tensor]:
    """The uniform mean of the members' backbone tensors (fp32); integer tensors (batch-norm step counts) from the
    first member."""
    states = [bundle.backbone_state() for bundle in bundles]
    keys = set(states[0])
    for bundle, state in zip(bundles[1:], states[1:]):
        if set(state) != keys or any(state[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"{bundle.path}: its backbone tensors differ from {bundles[0].path}'s in name or shape")
    return {
        key: torch.stack([state[key] for state in states]).mean(0) if value.is_floating_point() else value
        for key, value in states[0].items()
    }


@torch.no_grad()
def recalibrate_batch_norm(net: torch.nn.Module, images_uint8: np.ndarray, batch_size: int = 64) -> None:
    """Replace every batch norm's running mean and variance by those of `net`'s activations on the images (cleaned,
    not augmented), averaged over all batches equally; the weights do not change."""
    from radregion.features import images_to_tensor

    norms = [m for m in net.modules() if isinstance(m, BATCH_NORMS)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative mean over the batches
    net.train()
    for start in range(0, len(images_uint8), batch_size):
        net(images_to_tensor(images_uint8[start : start + batch_size]))
    net.eval()
