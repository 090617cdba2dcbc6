"""Features of a frozen backbone: the one place that turns cleaned uint8 images into model input."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from radregion.device import autocast, memory_format, prepare_backbone, resolve_device


def images_to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """(N, S, S) uint8 -> (N, 1, S, S) float32 in [0, 1], the input every backbone is trained on."""
    images = np.asarray(images_uint8)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, S, S), got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)


@torch.inference_mode()
def forward_features(backbone, batch: torch.Tensor, device: torch.device, precision: str = "auto") -> np.ndarray:
    """One batch (N, 1, S, S) through a prepared backbone -> (N, D) float32."""
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=memory_format(device, precision))
    with autocast(device, precision):
        out = backbone(batch)
    return out.float().cpu().numpy()


def extract_features(backbone, images_uint8: np.ndarray, batch_size: int = 64, device="auto",
                     precision: str = "auto") -> np.ndarray:
    """(N, S, S) uint8 -> (N, D) float32 features of `backbone` (put in eval mode, channels_last)."""
    device = resolve_device(device)
    backbone = prepare_backbone(backbone, device, precision)
    tensor = images_to_tensor(images_uint8)
    parts = [forward_features(backbone, tensor[i:i + batch_size], device, precision)
             for i in range(0, len(tensor), batch_size)]
    if not parts:
        raise ValueError("no images to extract features from")
    return np.concatenate(parts).astype(np.float32, copy=False)


def load_clean_images(paths, settings, workers: int = 2) -> np.ndarray:
    """Decode + clean files into (N, S, S) uint8 (through the image cache); raises RadiographError on a bad file."""
    from radregion.cache import load_clean

    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        images = list(pool.map(lambda p: load_clean(p, settings), paths))
    if not images:
        return np.zeros((0, settings.size, settings.size), np.uint8)
    return np.stack(images)
