"""Pixel-array helpers shared by the readers: integer block-mean downscaling and [0, 1] scaling."""

import math

import numpy as np

CHUNK_PIXELS = 1 << 22  # work on ~4 M pixels at a time so big images never get a full-size float copy


def shrink_factors(shape, max_size: int | None) -> tuple[int, int]:
    """Integer (row, column) block sizes that bring the long side to at most `max_size`."""
    if not max_size or max(shape) <= max_size:
        return 1, 1
    factor = math.ceil(max(shape) / max_size)
    return min(factor, shape[0]), min(factor, shape[1])


def block_mean(array: np.ndarray, factors: tuple[int, int]) -> np.ndarray:
    """Average non-overlapping blocks, chunk by chunk; integer input stays integer (rounded)."""
    fy, fx = factors
    if (fy, fx) == (1, 1):
        return array
    rows, cols = array.shape[0] // fy, array.shape[1] // fx
    out_dtype = array.dtype if array.dtype.kind in "iub" else np.dtype(np.float32)
    out = np.empty((rows, cols), dtype=out_dtype)
    step = max(1, CHUNK_PIXELS // max(1, cols * fx * fy))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = array[start * fy : stop * fy, : cols * fx].astype(np.float32)
        mean = block.reshape(stop - start, fy, cols, fx).mean(axis=(1, 3))
        out[start:stop] = np.rint(mean) if out_dtype.kind in "iub" else mean
    return out


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Min-max scale to float32 [0, 1] in place where possible; a constant image becomes all zeros."""
    image = image.astype(np.float32, copy=False)
    low, high = float(np.min(image)), float(np.max(image))
    if not math.isfinite(low) or not math.isfinite(high):
        image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(np.min(image)), float(np.max(image))
    image -= low
    if high > low:
        image /= high - low
    return image
