"""Pixel-array helpers shared by the readers: integer block-mean downscaling, [0, 1] scaling, and the checks
that a decoded array can be a radiograph at all (size, shape, content)."""

import math
import os

import numpy as np

from radregion.errors import RadiographError

CHUNK_PIXELS = 1 << 22  # work on ~4 M pixels at a time so big images never get a full-size float copy
MIN_SIDE = 32  # a radiograph smaller than this on a side holds nothing to classify (icons, 1x1 placeholders)
MAX_ASPECT = 10.0  # long side / short side; the longest stitched leg views are about 1:4
# decoding is refused above this many pixels (a 43 x 43 cm detector at 100 um is 18.5 MP); $RADREGION_MAX_PIXELS
MAX_PIXELS = int(os.environ.get("RADREGION_MAX_PIXELS", 100_000_000))


def check_dimensions(rows: int, columns: int, path) -> None:
    """Refuse, from the header alone, sizes no radiograph has: too small, degenerate aspect, too many pixels."""
    rows, columns = int(rows), int(columns)
    if rows * columns > MAX_PIXELS:
        raise RadiographError(
            path,
            f"image too large: {rows} x {columns} pixels ({rows * columns / 1e6:.0f} MP); "
            f"the limit is {MAX_PIXELS / 1e6:.0f} MP",
        )
    if min(rows, columns) < MIN_SIDE:
        raise RadiographError(
            path, f"image too small: {rows} x {columns} pixels (a radiograph needs at least {MIN_SIDE} on each side)"
        )
    if max(rows, columns) / min(rows, columns) > MAX_ASPECT:
        raise RadiographError(
            path, f"degenerate shape: {rows} x {columns} pixels (aspect ratio above {MAX_ASPECT:.0f}:1)"
        )


def check_content(array: np.ndarray, path, what: str = "pixel values") -> None:
    """Refuse an array with no image in it: non-finite values (a broken rescale), or one value everywhere."""
    finite = np.isfinite(array) if array.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        share = 1.0 - float(finite.mean())
        raise RadiographError(path, f"{what} are not numbers ({share:.0%} NaN or infinite)")
    low, high = array.min(), array.max()
    if low == high:
        raise RadiographError(path, f"blank image: every pixel has the value {low.item():g}")


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
