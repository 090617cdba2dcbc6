"""The study's targeted image cleaning: crop borders and shutters, normalise, resize, pad to a square."""

import dataclasses
import hashlib
import json

import numpy as np

from radregion.pixels import block_mean, shrink_factors

CLEANING_VERSION = 1  # bump when clean() changes its output, so cached images are rebuilt
FIELD_SEARCH_SIZE = 256  # the exposed field is searched on a copy shrunk to this long side
FLAT_SPREAD = 0.08  # a line is uniform when its 10th..90th percentile range is below this
LEVEL_TOLERANCE = 0.12  # ... and its median stays this close to the outermost line's
EDGE_STEP = 0.01  # a shutter's blurred edge changes level by more than this per line
EDGE_SPREAD = 0.15  # ... and is less uniform along its length than the shutter itself
MAX_CROP_PER_SIDE = 0.45
MIN_FIELD_FRACTION = 0.2
LINE_PERCENTILES = (10, 50, 90)  # a line's spread (10th..90th) and level (median)


@dataclasses.dataclass(frozen=True)
class CleaningSettings:
    size: int = 224
    crop_borders: bool = True
    low_percentile: float = 0.5
    high_percentile: float = 99.5

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"cleaning size must be an integer >= 8, got {self.size!r}")
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise ValueError(
                f"cleaning percentiles need 0 <= low < high <= 100, got {self.low_percentile}, {self.high_percentile}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "CleaningSettings":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown cleaning settings {unknown}; known: {sorted(known)}")
        return cls(**d)

    def key(self) -> str:
        """Stable short hash of the settings and the cleaning version (part of the cache key)."""
        text = json.dumps({**self.to_dict(), "version": CLEANING_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def find_field(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), half-open: the image without uniform borders and collimator shutters.

    From each edge, lines (rows or columns) are dropped while they are near-constant and at the level of
    the outermost line: a shutter or padding band, not the exposed field next to it.
    """
    height, width = image.shape
    factors = shrink_factors(image.shape, FIELD_SEARCH_SIZE)
    small = block_mean(np.asarray(image, dtype=np.float32), factors)
    low, high = np.percentile(small, [1, 99])
    if high - low < 1e-6:
        return 0, height, 0, width
    small = np.clip((small - low) / (high - low), 0.0, 1.0)
    top, bottom, left, right = 0, small.shape[0], 0, small.shape[1]
    for _ in range(4):  # nested bands (padding around shutters): peel one layer per round
        region = small[top:bottom, left:right]
        row_stats = line_percentiles(region, LINE_PERCENTILES, axis=1)
        col_stats = line_percentiles(region, LINE_PERCENTILES, axis=0)
        peel = (_uniform_run(row_stats), _uniform_run(row_stats[:, ::-1]),
                _uniform_run(col_stats), _uniform_run(col_stats[:, ::-1]))  # fmt: skip
        if not any(peel):
            break
        top, bottom, left, right = top + peel[0], bottom - peel[1], left + peel[2], right - peel[3]
    fy, fx = factors
    top, bottom = _to_full(top, bottom, small.shape[0], fy, height)
    left, right = _to_full(left, right, small.shape[1], fx, width)
    return top, bottom, left, right


def line_percentiles(image: np.ndarray, q, axis: int) -> np.ndarray:
    """`np.percentile(image, q, axis=axis)` of a 2-D image, equal to it bit for bit (numpy's "linear" method and its
    interpolation arithmetic), from one sort instead of numpy's partition per line: about 6 times as fast on the
    field search's 256 px images, where those partitions were a third of decoding and cleaning. Held equal to numpy
    by tests/test_cleaning.py."""
    ordered = np.moveaxis(np.sort(image, axis=axis), axis, -1)  # (lines, values per line)
    position = (ordered.shape[-1] - 1) * (np.asarray(q, dtype=np.float64) / 100)
    below = np.floor(position).astype(np.intp)
    above = np.minimum(below + 1, ordered.shape[-1] - 1)
    gamma = (position - below)[:, None]
    low, high = ordered[:, below].T, ordered[:, above].T  # (len(q), lines)
    step = high - low
    out = low + step * gamma
    np.subtract(high, step * (1 - gamma), out=out, where=np.broadcast_to(gamma >= 0.5, out.shape))
    return out


def _uniform_run(stats: np.ndarray) -> int:
    """How many lines from the start belong to a band: uniform at the outermost line's level, then the
    shutter's blurred edge (uniform lines whose level still changes steadily)."""
    p10, median, p90 = stats
    limit = int(len(median) * MAX_CROP_PER_SIDE)  # of the current region; _to_full rejects a too-small field
    flat = p90 - p10 < FLAT_SPREAD
    count = 0
    while count < limit and flat[count] and abs(median[count] - median[0]) < LEVEL_TOLERANCE:
        count += 1
    if count == 0:
        return 0
    direction = np.sign(median[min(count, limit - 1)] - median[count - 1])
    edge_flat = p90 - p10 < EDGE_SPREAD
    while count < limit and edge_flat[count] and (median[count] - median[count - 1]) * direction > EDGE_STEP:
        count += 1
    return count


def _to_full(start: int, stop: int, small_length: int, factor: int, full_length: int) -> tuple[int, int]:
    full_start = start * factor
    full_stop = full_length if stop >= small_length else stop * factor
    if full_stop - full_start < MIN_FIELD_FRACTION * full_length:
        return 0, full_length
    return full_start, full_stop


def clean(image: np.ndarray, settings: CleaningSettings = CleaningSettings()) -> np.ndarray:
    """float32 (size, size) in [0, 1]: field cropped, long side resized to `size`, percentiles stretched, padded."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"clean needs a non-empty 2-D image, got shape {image.shape}")
    if settings.crop_borders:
        top, bottom, left, right = find_field(image)
        image = image[top:bottom, left:right]
    image = resize_longest(image, settings.size)
    low, high = np.percentile(image, [settings.low_percentile, settings.high_percentile])
    if high - low > 1e-6:
        image = np.clip((image - low) / (high - low), 0.0, 1.0)
    else:
        image = np.zeros_like(image)
    return _pad_square(image.astype(np.float32, copy=False), settings.size)


def resize_longest(image: np.ndarray, size: int) -> np.ndarray:
    """The long side to `size`: area averaging when shrinking, bilinear when enlarging, no anti-aliasing. It is
    MONAI's `Resize(size, size_mode="longest")` arithmetic on torch's `interpolate`, called directly because
    `import monai` costs `radregion predict` seconds of start-up; tests/test_cleaning.py holds the two equal."""
    if max(image.shape) == size:
        return image
    import torch

    scale = size / max(image.shape)
    shape = tuple(int(round(s * scale)) for s in image.shape)
    mode = "area" if max(image.shape) > size else "bilinear"
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(image))[None, None], shape, mode=mode
    )
    return resized[0, 0].numpy()


def _pad_square(image: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - image.shape[0]) // 2, (size - image.shape[1]) // 2
    out[top : top + image.shape[0], left : left + image.shape[1]] = image
    return out
