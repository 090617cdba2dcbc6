"""`Predictor`: the one inference engine of the CLI and the server.

The model loads once. Files are decoded and cleaned by DataLoader worker processes (threads in a process that
already runs threads, such as the server) while the model runs on the previous batch; errors of single files go
into `Prediction.error` and never stop the run.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset

from radregion.bundle import Bundle, load_bundle
from radregion.ensemble import Ensemble

SMALL_REQUEST = 4  # at most this many files: decode in-process (no worker start-up)


@dataclass
class Prediction:
    path: str
    region: str | None
    confidence: float
    probabilities: dict = field(default_factory=dict)
    ood_score: float = math.nan
    out_of_domain: bool = False
    pacs_label: str | None = None
    agrees_with_pacs: bool | None = None  # True when the archive names the region (also one of several)
    error: str | None = None
    features: np.ndarray | None = None
    pacs_labels: tuple = ()  # every region the archive's header names


def _error_text(path, error: Exception) -> str:
    from radregion.errors import RadiographError

    if isinstance(error, RadiographError):
        return error.problem
    return f"{type(error).__name__}: {error}"


class _Files(Dataset):
    """path -> (uint8 cleaned image or None, header metadata, error text or None)."""

    def __init__(self, paths, settings, cache: bool):
        self.paths = [str(p) for p in paths]
        self.settings = settings
        self.cache = cache

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from radregion.cache import decode_clean, load_clean
        from radregion.io import read_metadata

        path = self.paths[i]
        try:
            image = load_clean(path, self.settings) if self.cache else decode_clean(path, self.settings)
        except Exception as error:  # every failure of one file is that file's error, not the run's
            return None, {}, _error_text(path, error)
        try:
            meta = read_metadata(path)
        except Exception:
            meta = {}
        return image, meta, None


def _as_list(batch):
    return batch


def _thread_batches(dataset, batch_size, workers, ahead=2):
    """Batches of `dataset` decoded by `workers` threads, at most `ahead` batches ahead of the consumer."""
    starts = list(range(0, len(dataset), batch_size))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="radregion-decode") as pool:

        def submit(start):
            return [pool.submit(dataset.__getitem__, i) for i in range(start, min(start + batch_size, len(dataset)))]

        pending = [submit(s) for s in starts[:ahead]]
        for n in range(len(starts)):
            batch = [future.result() for future in pending.pop(0)]
            if n + ahead < len(starts):
                pending.append(submit(starts[n + ahead]))
            yield batch


def _warm_decoder_imports():
    """Import what decoding and cleaning use before the workers fork, so each does not import it again."""
    import radregion.cache  # noqa: F401
    import radregion.io  # noqa: F401


class Predictor:
    """Predict regions of files or arrays with one bundle or an ensemble (a list of bundles)."""

    def __init__(self, bundle_or_path, device="auto", workers=2, precision="auto", cache=False):
        """`cache`: go through the image cache (worth it for images seen again; an archive pass is not)."""
        sources = bundle_or_path if isinstance(bundle_or_path, (list, tuple)) else [bundle_or_path]
        self.device = device
        self.workers = workers
        self.precision = precision
        self.cache = cache
        bundles = [s if isinstance(s, Bundle) else load_bundle(s) for s in sources]
        self._paths = [b.path for b in bundles]
        self._load(bundles)

    def _load(self, bundles):
        model = Ensemble(bundles, self.device, self.precision)
        if not model.regions:
            raise ValueError(f"{bundles[0].path}: bundle has no head yet (run `radregion fit-head`)")
        self.model = model
        self.taxonomy = bundles[0].taxonomy()
        self._signature = self._stat()

    @property
    def regions(self) -> list[str]:
        return self.model.regions

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def settings(self):
        return self.model.settings

    @property
    def threshold(self) -> float:
        return self.model.threshold

    def _stat(self):
        out = []
        for path in self._paths:
            try:
                st = os.stat(path / "bundle.json")
                out.append((os.stat(path).st_ino, st.st_ino, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return out

    def reload_if_changed(self) -> bool:
        """Load the bundle(s) again if bundle.json changed on disk; keep the current model if that fails."""
        signature = self._stat()
        if signature == self._signature or None in signature:
            return False
        try:
            bundles = [load_bundle(p) for p in self._paths]
            if [b.version for b in bundles] == [b.version for b in self.model.bundles]:
                self._signature = signature
                return False
            self._load(bundles)
        except (ValueError, OSError):
            return False  # mid-replacement or broken: try again on the next call
        return True

    def predict_images(self, images_uint8: np.ndarray) -> dict:
        """Cleaned uint8 images (N, S, S) -> {"probabilities", "features", "ood_score", "out_of_domain"}."""
        self.model.expect(len(images_uint8))
        return self.model.run(images_uint8)

    def _batches(self, paths, batch_size):
        dataset = _Files(paths, self.settings, self.cache)
        if len(paths) <= SMALL_REQUEST or not self.workers:
            for start in range(0, len(paths), batch_size):
                yield [dataset[i] for i in range(start, min(start + batch_size, len(paths)))]
            return
        _warm_decoder_imports()
        if threading.active_count() > 1:
            # fork copies the locks other threads hold (logging's, for one) into the worker, which can hang forever
            yield from _thread_batches(dataset, batch_size, self.workers)
            return
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.workers,
            collate_fn=_as_list,
            prefetch_factor=2,
            persistent_workers=False,
        )
        yield from loader

    def predict(self, paths, batch_size: int = 32, progress: bool = False) -> Iterator[Prediction]:
        """One Prediction per path, in order; unreadable files carry `error` (this never raises for a file)."""
        paths = [str(p) for p in paths]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(paths), desc="predict", unit="img", dynamic_ncols=True)
        index = 0
        try:
            for batch in self._batches(paths, batch_size):
                if index == 0:  # the decoding workers have started: an export overlaps with their first batches
                    self.model.expect(len(paths))
                good = [i for i, (image, _, _) in enumerate(batch) if image is not None]
                out = self.model.run(np.stack([batch[i][0] for i in good])) if good else None
                row_of = {i: r for r, i in enumerate(good)}
                for i, (_, meta, error) in enumerate(batch):
                    path = paths[index + i]
                    yield self._prediction(path, meta, error, out, row_of.get(i))
                index += len(batch)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()

    def _prediction(self, path, meta, error, out, row) -> Prediction:
        if row is None:
            return Prediction(path, None, math.nan, error=error or "unreadable")
        probs = out["probabilities"][row]
        best = int(probs.argmax())
        region = self.regions[best]
        archive = self._archive_label(meta)
        pacs = archive.region if archive else None
        return Prediction(
            path=path,
            region=region,
            confidence=float(probs[best]),
            probabilities={r: float(p) for r, p in zip(self.regions, probs)},
            ood_score=float(out["ood_score"][row]),
            out_of_domain=bool(out["out_of_domain"][row]),
            pacs_label=pacs,
            agrees_with_pacs=None if pacs is None else region in (archive.regions or (pacs,)),
            pacs_labels=tuple(archive.regions) if pacs else (),
            error=None,
            features=out["features"][row],
        )

    def _archive_label(self, meta):
        """The taxonomy's ArchiveLabel of the header ("HAND WRIST" names Hand and Wrist), None without one."""
        if not meta or self.taxonomy is None:
            return None
        try:
            return self.taxonomy.archive_label(meta)
        except Exception:  # a header the taxonomy cannot read is "no PACS label", not a failed prediction
            return None
