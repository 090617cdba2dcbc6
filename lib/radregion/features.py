"""Features of a frozen backbone: the one place that turns cleaned uint8 images into model input."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from radregion.device import autocast, features_precision, inference_precision, memory_format, resolve_device
from radregion.runtime import InferenceBackbone, bundle_backbone


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
    """One batch (N, 1, S, S) through a prepared backbone -> (N, D) float32 (`inference_precision`)."""
    precision = inference_precision(device, precision)
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=memory_format(device, precision))
    with autocast(device, precision):
        out = backbone(batch)
    return out.float().cpu().numpy()


def extract_features(
    backbone, images_uint8: np.ndarray, batch_size: int = 64, device="auto", precision: str = "auto"
) -> np.ndarray:
    """(N, S, S) uint8 -> (N, D) float32 features of `backbone` (put in eval mode; run by `InferenceBackbone`:
    ONNX Runtime for many images on a CPU in fp32, else torch in channels_last)."""
    device = resolve_device(device)
    tensor = images_to_tensor(images_uint8)
    backbone = InferenceBackbone(backbone, device, precision, size=tensor.shape[-1])
    backbone.expect(len(tensor))
    parts = [
        forward_features(backbone, tensor[i : i + batch_size], device, precision)
        for i in range(0, len(tensor), batch_size)
    ]
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


def bundle_features(bundle, paths, *, workers: int = 2, batch_size: int = 32, progress: bool = True):
    """Features (N, D) of `paths` with the bundle's frozen backbone (cached per file content), and the errors of
    unreadable files: returns (features, ok_mask, errors); rows of unreadable files are zero, ok_mask False."""
    from tqdm import tqdm

    from radregion.atomic import atomic_write
    from radregion.cache import feature_entry, load_clean
    from radregion.errors import RadiographError

    paths = [Path(p) for p in paths]
    device = resolve_device()
    cached_as = features_precision(device)
    dim = int(bundle.meta["architecture"].get("feature_dim") or 0)
    features: list = [None] * len(paths)
    entries: dict[int, Path] = {}
    errors: dict = {}
    todo = []
    for i, path in enumerate(paths):
        try:
            entries[i] = feature_entry(bundle, path, cached_as)
        except OSError as error:
            errors[i] = RadiographError(path, f"cannot read ({error.strerror or error})")
            continue
        try:
            features[i] = np.load(entries[i], allow_pickle=False)
        except (OSError, ValueError, EOFError):
            todo.append(i)  # missing or damaged: computed and replaced below

    def load(i):
        try:
            return i, load_clean(paths[i], bundle.settings), None
        except RadiographError as error:
            return i, None, error
        except (OSError, ValueError) as error:
            return i, None, RadiographError(paths[i], f"cannot read ({error})")

    if todo:
        backbone = bundle_backbone(bundle, device)
        backbone.expect(len(todo))
    bar = tqdm(
        total=len(todo),
        desc=f"features {bundle.path.name}",
        unit="img",
        file=sys.stderr,
        disable=not progress or not todo,
    )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(todo), batch_size):
            batch = list(pool.map(load, todo[start : start + batch_size]))
            good = [(i, image) for i, image, error in batch if error is None]
            errors.update({i: error for i, _, error in batch if error is not None})
            if good:
                feats = forward_features(backbone, images_to_tensor(np.stack([image for _, image in good])), device)
                for (i, _), feat in zip(good, feats):
                    features[i] = feat
                    with atomic_write(entries[i]) as handle:
                        np.save(handle, feat)
            bar.update(len(batch))
    bar.close()
    dim = next((len(f) for f in features if f is not None), dim)
    ok = np.array([f is not None for f in features], dtype=bool)
    out = np.zeros((len(paths), dim), np.float32)
    for i in np.flatnonzero(ok):
        out[i] = features[i]
    return out, ok, [errors[i] for i in sorted(errors)]
