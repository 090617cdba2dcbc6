"""Content-addressed caches: cleaned images (epochs and repeated predictions decode each file once), where a
bundle's frozen-backbone features are kept (`features.bundle_features`: the audit computes them once per model) and
where its backbone exported to ONNX is kept (`runtime.OnnxBackbone`: exported once per model version).

One key rule for images and features: the sha256 of the file's bytes (a renamed or touched file is a hit, a changed
one a miss), under a folder named by what else decides the result (the cleaning settings; for features also the
model version); an export is named by the model version, its input size and the exporter's and runtime's versions.
"""

import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from radregion.atomic import atomic_write
from radregion.cleaning import CleaningSettings, clean
from radregion.io import read_radiograph

READ_OVERSAMPLE = 3  # decode at up to 3x the cleaned size: room for the crop, area-shrunk afterwards
_hash_memo: dict[tuple, str] = {}
_hash_lock = threading.Lock()


def default_root() -> Path:
    return Path(os.environ.get("RADREGION_CACHE") or Path.home() / ".cache" / "radregion")


def file_sha256(path) -> str:
    """sha256 of the file bytes, streamed; remembered per (path, mtime, size) within this process."""
    path = Path(path)
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _hash_lock:
        if memo_key in _hash_memo:
            return _hash_memo[memo_key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    with _hash_lock:
        _hash_memo[memo_key] = digest.hexdigest()
    return digest.hexdigest()


def decode_clean(path, settings: CleaningSettings) -> np.ndarray:
    """Decode and clean without any cache: uint8 (size, size)."""
    image = read_radiograph(path, max_size=READ_OVERSAMPLE * settings.size).image
    return np.rint(clean(image, settings) * 255.0).astype(np.uint8)


class ImageCache:
    """Cleaned uint8 images stored as <root>/<settings key>x<oversample>/<hash[:2]>/<file sha256>.npy."""

    def __init__(self, root=None):
        self.root = Path(root) if root is not None else default_root()

    def entry(self, path, settings: CleaningSettings) -> Path:
        digest = file_sha256(path)
        return self.root / f"{settings.key()}x{READ_OVERSAMPLE}" / digest[:2] / f"{digest}.npy"

    def load(self, path, settings: CleaningSettings) -> np.ndarray:
        """uint8 (size, size); decodes and cleans on a miss (RadiographError for bad files, never cached)."""
        entry = self.entry(path, settings)
        cached = self._read(entry, settings.size)
        if cached is not None:
            return cached
        image = decode_clean(path, settings)
        with atomic_write(entry) as handle:
            np.save(handle, image, allow_pickle=False)
        return image

    @staticmethod
    def _read(entry: Path, size: int) -> np.ndarray | None:
        try:
            image = np.load(entry, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None  # missing or damaged: rebuilt and replaced by the caller
        return image if image.dtype == np.uint8 and image.shape == (size, size) else None


_default_caches: dict[Path, ImageCache] = {}


def load_clean(path, settings: CleaningSettings, cache: ImageCache | None = None) -> np.ndarray:
    """uint8 (size, size) cleaned image through `cache` (None: the default cache at default_root())."""
    if cache is None:
        root = default_root()
        cache = _default_caches.setdefault(root, ImageCache(root))
    return cache.load(path, settings)


def feature_cache_dir(bundle, precision: str, root=None) -> Path:
    """Where the features of `bundle` (its version and cleaning settings) computed in `precision` ("fp32", "bf16",
    "fp16": `radregion.device.precision_name`) are cached."""
    root = Path(root) if root is not None else default_root()
    return root / "features" / f"{bundle.version}-{bundle.settings.key()}-{precision}"


def feature_entry(bundle, path, precision: str) -> Path:
    """The cache file of `path`'s features with `bundle` in `precision` (features.bundle_features fills it)."""
    digest = file_sha256(path)
    return feature_cache_dir(bundle, precision) / digest[:2] / f"{digest}.npy"


def onnx_entry(version: str, size: int, root=None) -> Path:
    """Where the ONNX export of the backbone of bundle `version` for `size` px inputs is kept; the exporter's and
    the runtime's versions are part of the name (an upgrade exports again)."""
    from importlib.metadata import version as installed  # not `import onnxruntime`: a small request never needs it

    import torch

    root = Path(root) if root is not None else default_root()
    return root / "onnx" / f"{version}-{size}px-torch{torch.__version__}-ort{installed('onnxruntime')}.onnx"
