"""Grad-CAM overlays: where the backbone + linear head look when they vote for a region (monai.visualize)."""

import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn

from radregion.features import images_to_tensor


class Classifier(nn.Module):
    """Backbone features, standardised, through a linear head: the head as a torch module."""

    def __init__(self, backbone: nn.Module, weight, bias, mean=None, std=None):
        super().__init__()
        self.backbone = backbone
        dim = weight.shape[1]
        self.register_buffer("mean", torch.as_tensor(np.zeros(dim) if mean is None else mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.ones(dim) if std is None else std, dtype=torch.float32))
        self.linear = nn.Linear(dim, weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            self.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    @classmethod
    def from_head(cls, backbone: nn.Module, head) -> "Classifier":
        """A fitted `LinearHead` (its regions' order) on `backbone`."""
        return cls(backbone, head.weight, head.bias, head.feature_mean, head.feature_std)

    def forward(self, x):
        return self.linear((self.backbone(x) - self.mean) / self.std)


def last_conv_layer(backbone: nn.Module) -> str:
    """The backbone's `cam_layer` if it names one, else the last block holding a convolution (MONAI ResNet:
    "layer4")."""
    if getattr(backbone, "cam_layer", None):
        return backbone.cam_layer
    last = None
    for name, module in backbone.named_children():
        if any(isinstance(m, nn.Conv2d) for m in module.modules()):
            last = name
    if last is None:
        raise ValueError("backbone has no convolution layer for Grad-CAM")
    return last


def grad_cams(classifier: Classifier, images_uint8: np.ndarray, class_indices, batch_size: int = 32) -> np.ndarray:
    """(N, S, S) uint8 images and one class per image -> (N, S, S) float32 maps in [0, 1]."""
    classifier = classifier.float().eval()
    cam = GradCAM(
        nn_module=classifier,
        target_layers=f"backbone.{last_conv_layer(classifier.backbone)}",
        postprocessing=_scale_each,
    )
    class_indices = np.asarray(class_indices)
    out = np.zeros(images_uint8.shape, np.float32)
    for target in np.unique(class_indices):  # GradCAM takes one class per call: batch the images of each class
        rows = np.flatnonzero(class_indices == target)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            maps = cam(images_to_tensor(images_uint8[chunk]), class_idx=int(target))
            out[chunk] = maps[:, 0].detach().cpu().numpy()
    return np.nan_to_num(out)


def _scale_each(maps: torch.Tensor) -> torch.Tensor:
    """Each map to [0, 1], strongest evidence = 1 (MONAI's default normaliser maps max to 0)."""
    flat = maps.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    scaled = (flat - low[:, None]) / (high - low).clamp_min(1e-12)[:, None]
    return scaled.view_as(maps)


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grey image with a jet-coloured heat map blended in -> (S, S, 3) uint8."""
    from matplotlib import colormaps
    from PIL import Image

    if heatmap.shape != image_uint8.shape:  # the model may see a smaller image than the report shows
        heatmap = np.asarray(
            Image.fromarray(heatmap.astype(np.float32), mode="F").resize(image_uint8.shape[::-1], Image.BILINEAR)
        )
    grey = np.repeat(image_uint8[..., None].astype(np.float32) / 255.0, 3, axis=2)
    heat = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3]
    weight = alpha * np.clip(heatmap, 0, 1)[..., None] ** 0.5
    return (255 * ((1 - weight) * grey + weight * heat)).clip(0, 255).astype(np.uint8)
