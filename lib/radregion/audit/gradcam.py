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

    def forward(self, x):
        return self.linear((self.backbone(x) - self.mean) / self.std)


def last_conv_layer(backbone: nn.Module) -> str:
    """Name of the last block holding a convolution (MONAI ResNet: "layer4")."""
    last = None
    for name, module in backbone.named_children():
        if any(isinstance(m, nn.Conv2d) for m in module.modules()):
            last = name
    if last is None:
        raise ValueError("backbone has no convolution layer for Grad-CAM")
    return last


def grad_cams(classifier: Classifier, images_uint8: np.ndarray, class_indices, batch_size: int = 16) -> np.ndarray:
    """(N, S, S) uint8 images and one class per image -> (N, S, S) float32 maps in [0, 1]."""
    classifier = classifier.float().eval()
    cam = GradCAM(nn_module=classifier, target_layers=f"backbone.{last_conv_layer(classifier.backbone)}")
    class_indices = np.asarray(class_indices)
    out = []
    for start in range(0, len(images_uint8), batch_size):
        batch = images_to_tensor(images_uint8[start:start + batch_size])
        for i in range(len(batch)):  # one class per image: GradCAM takes a single class_idx per call
            maps = cam(batch[i:i + 1], class_idx=int(class_indices[start + i]))
            out.append(maps[0, 0].detach().cpu().numpy().astype(np.float32))
    if not out:
        return np.zeros((0,) + images_uint8.shape[1:], np.float32)
    return np.nan_to_num(np.stack(out))


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grey image with a jet-coloured heat map blended in -> (S, S, 3) uint8."""
    from matplotlib import colormaps

    grey = np.repeat(image_uint8[..., None].astype(np.float32) / 255.0, 3, axis=2)
    heat = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3]
    weight = alpha * np.clip(heatmap, 0, 1)[..., None] ** 0.5
    return (255 * ((1 - weight) * grey + weight * heat)).clip(0, 255).astype(np.uint8)
