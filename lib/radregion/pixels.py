"""Pixel-array helpers shared by the readers: integer block-mean downscaling, [0, 1] scaling, and the checks
that a decoded array can be a radiograph at all (size, shape, content)."""

import math
import os

import numpy as np

from radregion.errors import RadiographError

CHUNK_PIXELS = 1 << 22  # work on ~4 M pixels at a time so big images never get a full-size float copy
MIN_SIDE = 32  # a radiograph smaller than this on a side holds nothing to classify (icons, 1x1 placeholders)
MAX_ASPECT = 10.0  # long side / short side; the longest stitched leg views are about 1:4
# Decoding is refused above this many bytes of decoded pixels, as the decoder holds them (1 byte a pixel for 8-bit
# grey, 2 for 16-bit, 4 for Pillow's colour and 32-bit modes; after JPEG's and JPEG 2000's reduced decoding). The
# biggest radiographs (a stitched 43 x 129 cm leg at 100 um: 55 MP, 111 MB at 16 bits) are a fifth of it; a
# 169 MP 16-bit image (338 MB) still decodes. A Pillow decode holds at most this much plus ~50 MiB of strips;
# uncompressed DICOM is read from the file a strip at a time (bench/huge_image_memory.py). $RADREGION_MAX_DECODED_MB
MAX_DECODED_BYTES = int(float(os.environ.get("RADREGION_MAX_DECODED_MB", 512)) * 2**20)


def check_dimensions(rows: int, columns: int, path, decoded: int) -> None:
    """Refuse, from the header alone, sizes no radiograph has: too small, degenerate aspect, too many bytes to
    decode (`decoded`: the bytes the decoder will hold for these rows x columns)."""
    rows, columns = int(rows), int(columns)
    if decoded > MAX_DECODED_BYTES:
        raise RadiographError(
            path,
            f"image too large: {rows} x {columns} pixels ({rows * columns / 1e6:.0f} MP) decode to "
            f"{decoded / 2**20:.0f} MiB; the limit is {MAX_DECODED_BYTES / 2**20:.0f} MiB of decoded pixels",
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
    if tuple(factors) == (1, 1):
        return array
    return block_mean_rows(lambda start, stop: array[start:stop], array.shape, array.dtype, factors)


def block_mean_rows(read_rows, shape, dtype, factors: tuple[int, int]) -> np.ndarray:
    """block_mean of an image read one strip of rows at a time: `read_rows(start, stop)` gives rows start..stop
    as an array of `dtype`, so only a strip of ~CHUNK_PIXELS is in memory besides the result."""
    fy, fx = factors
    rows, cols = shape[0] // fy, shape[1] // fx
    dtype = np.dtype(dtype)
    out_dtype = dtype if dtype.kind in "iub" else np.dtype(np.float32)
    out = np.empty((rows, cols), dtype=out_dtype)
    step = max(1, CHUNK_PIXELS // max(1, cols * fx * fy))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = read_rows(start * fy, stop * fy)[:, : cols * fx]
        if (fy, fx) == (1, 1):
            out[start:stop] = block
            continue
        mean = block.astype(np.float32).reshape(stop - start, fy, cols, fx).mean(axis=(1, 3))
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
