"""Backbones (MONAI ResNets, 1-channel 2-D input) and the small heads of self-supervised training."""

import copy

import torch
from monai.networks import nets
from torch import nn

# name -> (MONAI factory, feature dimension of the pooled output)
ARCHITECTURES = {
    "resnet10": (nets.resnet10, 512),
    "resnet18": (nets.resnet18, 512),
    "resnet34": (nets.resnet34, 512),
    "resnet50": (nets.resnet50, 2048),
}


def _check(name: str) -> None:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_backbone(name: str = "resnet18", in_channels: int = 1) -> nn.Module:
    """A MONAI ResNet mapping (N, in_channels, H, W) to pooled features (N, feature_dim(name))."""
    _check(name)
    factory, _ = ARCHITECTURES[name]
    return factory(spatial_dims=2, n_input_channels=in_channels, conv1_t_stride=2, feed_forward=False)


def feature_dim(name: str) -> int:
    _check(name)
    return ARCHITECTURES[name][1]


class ProjectionHead(nn.Sequential):
    """Linear-BN-ReLU-Linear, the projector of SimCLR/BYOL/SupCon (output is not normalised here)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128):
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class BYOLPredictor(ProjectionHead):
    """BYOL's predictor q: the same MLP shape, mapping projections to projections."""

    def __init__(self, dim: int = 256, hidden_dim: int = 4096):
        super().__init__(dim, hidden_dim, dim)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` to be used as a momentum (target) network."""
    target = copy.deepcopy(module)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    return target


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online for parameters; buffers (BN statistics) are copied."""
    online_params = list(online.parameters())
    target_params = list(target.parameters())
    torch._foreach_mul_(target_params, m)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - m)
    for online_buffer, target_buffer in zip(online.buffers(), target.buffers()):
        target_buffer.copy_(online_buffer)
