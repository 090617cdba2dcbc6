"""Augmentations from MONAI transforms: two strong views per image for pretraining, one mild view for heads.

Every pipeline is a MONAI `Randomizable`: `set_random_state(seed)` makes it reproducible.
"""

import math

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandRotate90,
    RandScaleCrop,
    RandScaleIntensity,
    RandShiftIntensity,
    RandCoarseDropout,
    Randomizable,
    Resize,
)
from monai.utils import convert_to_tensor

from radregion.gauge import GaugeAugment


def _as_channel_image(image) -> torch.Tensor:
    """uint8 (0..255) or float ([0, 1]) (H, W) or (1, H, W) -> float32 (1, H, W) in [0, 1]."""
    array = torch.as_tensor(np.array(image))
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] != 1:
        raise ValueError(f"augmentations want a (H, W) grayscale image, got shape {tuple(array.shape)}")
    return array.float() / 255 if array.dtype == torch.uint8 else array.float()


def _finish(image) -> torch.Tensor:
    return convert_to_tensor(image, track_meta=False, dtype=torch.float32).clamp_(0, 1).contiguous()


class _Pipeline(Randomizable):
    """Grayscale image -> float32 (1, size, size) in [0, 1] through a MONAI Compose."""

    def __init__(self, transforms):
        self.compose = Compose(transforms)

    def set_random_state(self, seed=None, state=None):
        self.compose.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, image) -> torch.Tensor:
        return _finish(self.compose(_as_channel_image(image)))


def strong_view(size: int, gauge: bool = True) -> _Pipeline:
    """SimCLR-style view: random resized crop, affine, flip, quarter turns, gamma/contrast/brightness jitter,
    blur, noise."""
    return _Pipeline(
        ([GaugeAugment(prob=0.5)] if gauge else [])
        + [
            RandScaleCrop(roi_scale=0.45, max_roi_scale=1.0, random_size=True),  # 20-100 % of the area
            Resize((size, size), mode="area"),
            RandAffine(prob=0.5, rotate_range=math.radians(15), scale_range=0.1, padding_mode="zeros"),
            RandFlip(prob=0.5, spatial_axis=1),  # mirrors the side marker too; the region stays the same
            RandRotate90(prob=0.5, max_k=3),  # archives hold radiographs turned by 90 degrees
            RandAdjustContrast(prob=0.8, gamma=(0.6, 1.7)),
            RandScaleIntensity(factors=0.15, prob=0.8),
            RandShiftIntensity(offsets=0.08, prob=0.8),
            RandGaussianSmooth(sigma_x=(0.1, 1.5), sigma_y=(0.1, 1.5), prob=0.4),
            RandGaussianNoise(prob=0.4, std=0.03),
        ]
    )


class _TwoViews(Randomizable):
    def __init__(self, view: _Pipeline):
        self.view = view

    def set_random_state(self, seed=None, state=None):
        self.view.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(image), self.view(image)


def pretrain_views(size: int, gauge: bool = True) -> _TwoViews:
    """A callable: (H, W) uint8/float image -> two float32 (1, size, size) views in [0, 1]."""
    return _TwoViews(strong_view(size, gauge))


def head_transform(size: int, gauge: bool = True) -> _Pipeline:
    """The mild augmentation for training heads: a slight crop, small affine, quarter turns, a little intensity
    jitter."""
    return _Pipeline(
        ([GaugeAugment(prob=0.3)] if gauge else [])
        + [
            RandScaleCrop(roi_scale=0.85, max_roi_scale=1.0, random_size=True),
            Resize((size, size), mode="area"),
            RandAffine(prob=0.5, rotate_range=math.radians(5), scale_range=0.05, padding_mode="zeros"),
            RandRotate90(prob=0.3, max_k=3),
            RandAdjustContrast(prob=0.3, gamma=(0.85, 1.2)),
            RandScaleIntensity(factors=0.1, prob=0.3),
        ]
    )


FINE_TUNE_AUGMENTATIONS = ("standard", "strong")


def fine_tune_view(size: int, gauge: bool = True, strength: str = "standard") -> _Pipeline:
    """The augmentation of full fine-tuning. `standard`: random resized crop (70-100 % of each side), quarter
    turns, mirror, mild contrast and brightness jitter. `strong`: a wider crop range (60-100 %), stronger gamma
    jitter, blur, noise, and up to four black rectangles (cutout: DeVries & Taylor 2017,
    "Improved Regularization of Convolutional Neural Networks with Cutout"), so that no single cue, a marker or
    one joint, decides the region. No free rotation in either: MONAI's resampling cost 127 ms an image at 160 px
    on the 2-core development CPU (3 times a training step's compute), the rest of `standard` together 40 ms."""
    if strength not in FINE_TUNE_AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(FINE_TUNE_AUGMENTATIONS)}, not {strength!r}")
    strong = strength == "strong"
    return _Pipeline(
        ([GaugeAugment(prob=0.3)] if gauge else [])
        + [
            RandScaleCrop(roi_scale=0.6 if strong else 0.7, max_roi_scale=1.0, random_size=True),
            Resize((size, size), mode="area"),
            RandFlip(prob=0.5, spatial_axis=1),
            RandRotate90(prob=0.5, max_k=3),
            RandAdjustContrast(prob=0.8 if strong else 0.5, gamma=(0.7, 1.5) if strong else (0.8, 1.25)),
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandShiftIntensity(offsets=0.05, prob=0.5),
        ]
        + (
            [
                RandGaussianSmooth(sigma_x=(0.1, 1.0), sigma_y=(0.1, 1.0), prob=0.3),
                RandGaussianNoise(prob=0.3, std=0.03),
                RandCoarseDropout(
                    holes=1, max_holes=4, spatial_size=size // 8, max_spatial_size=size // 4, fill_value=0, prob=0.5
                ),
            ]
            if strong
            else []
        )
    )
