"""Cached per-image scores of one model version: probabilities, features, OOD score, archive (PACS) label.

One `.npz` per model version under <state_dir>/scores/, written atomically. The scoring method fills it after
each model change; strategies, training and the batch run read it instead of running the model again.
"""

import io
import logging
import os
from pathlib import Path

import numpy as np

from radregion.atomic import atomic_write

logger = logging.getLogger(__name__)


class ScoreTable:
    def __init__(
        self,
        version,
        regions,
        ids=(),
        probabilities=None,
        features=None,
        ood_score=None,
        out_of_domain=None,
        pacs_label=(),
        errors=None,
        pacs_labels=None,
    ):
        self.version = version
        self.regions = list(regions)
        self.ids = list(ids)
        n, c = len(self.ids), len(self.regions)
        self.probabilities = np.zeros((n, c), np.float32) if probabilities is None else np.asarray(probabilities)
        self.features = np.zeros((n, 0), np.float32) if features is None else np.asarray(features, np.float32)
        self.ood_score = np.zeros(n, np.float32) if ood_score is None else np.asarray(ood_score, np.float32)
        self.out_of_domain = np.zeros(n, bool) if out_of_domain is None else np.asarray(out_of_domain, bool)
        self.pacs_label = [p or None for p in pacs_label] or [None] * n
        # every region the archive names ("HAND WRIST": Hand and Wrist); tables saved before have the first only
        self.pacs_labels = (
            [tuple(r for r in regions if r) for regions in pacs_labels]
            if pacs_labels is not None
            else [(p,) if p else () for p in self.pacs_label]
        )
        self.errors = dict(errors or {})  # image id -> problem (unreadable image)
        self._index = {image_id: i for i, image_id in enumerate(self.ids)}

    def __contains__(self, image_id):
        return image_id in self._index or image_id in self.errors

    def __len__(self):
        return len(self.ids)

    def index(self, image_id) -> int | None:
        return self._index.get(image_id)

    def margin(self) -> np.ndarray:
        """Top-1 minus top-2 probability (small = uncertain)."""
        if self.probabilities.shape[1] < 2:
            return np.ones(len(self.ids), np.float32)
        top = np.sort(self.probabilities, axis=1)
        return top[:, -1] - top[:, -2]

    def agrees_with_archive(self, k: int) -> bool | None:
        """Row k's prediction is one of the regions its archive label names; None without an archive label."""
        if not self.pacs_label[k]:
            return None
        return self.regions[int(self.probabilities[k].argmax())] in (self.pacs_labels[k] or (self.pacs_label[k],))

    def predicted(self) -> list:
        return [self.regions[i] for i in self.probabilities.argmax(1)] if len(self.ids) else []

    def confidence(self) -> np.ndarray:
        return self.probabilities.max(1) if len(self.ids) else np.zeros(0, np.float32)

    def add(self, predictions, image_ids):
        """Append engine `Prediction`s (same order as image_ids); failed images go to `errors`."""
        rows = []
        for image_id, p in zip(image_ids, predictions):
            if p.error or p.features is None:
                self.errors[image_id] = p.error or "no features"
                continue
            rows.append((image_id, p))
        if not rows:
            return
        probs = np.array([[p.probabilities.get(r, 0.0) for r in self.regions] for _, p in rows], np.float32)
        feats = np.stack([np.asarray(p.features, np.float32) for _, p in rows])
        if len(self.ids) and self.features.shape[1] != feats.shape[1]:
            raise ValueError("feature dimension changed within one model version")
        self.features = feats if not len(self.ids) else np.concatenate([self.features, feats])
        self.probabilities = np.concatenate([self.probabilities, probs])
        self.ood_score = np.concatenate([self.ood_score, [p.ood_score for _, p in rows]]).astype(np.float32)
        self.out_of_domain = np.concatenate([self.out_of_domain, [bool(p.out_of_domain) for _, p in rows]])
        self.pacs_label += [p.pacs_label for _, p in rows]
        self.pacs_labels += [tuple(p.pacs_labels) or ((p.pacs_label,) if p.pacs_label else ()) for _, p in rows]
        for image_id, _ in rows:
            self._index[image_id] = len(self.ids)
            self.ids.append(image_id)
            self.errors.pop(image_id, None)

    # ---- files ----------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        buffer = io.BytesIO()
        err_ids = sorted(self.errors)
        np.savez(
            buffer,
            version=np.array(self.version),
            regions=np.array(self.regions, dtype=str),
            ids=np.array(self.ids, dtype=str),
            probabilities=self.probabilities,
            features=self.features,
            ood_score=self.ood_score,
            out_of_domain=self.out_of_domain,
            pacs_label=np.array([p or "" for p in self.pacs_label], dtype=str),
            pacs_labels=np.array(["|".join(regions) for regions in self.pacs_labels], dtype=str),
            error_ids=np.array(err_ids, dtype=str),
            error_messages=np.array([self.errors[i] for i in err_ids], dtype=str),
        )
        with atomic_write(path) as f:
            f.write(buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path) -> "ScoreTable":
        with np.load(path, allow_pickle=False) as z:
            return cls(
                str(z["version"]),
                z["regions"].tolist(),
                z["ids"].tolist(),
                z["probabilities"],
                z["features"],
                z["ood_score"],
                z["out_of_domain"],
                z["pacs_label"].tolist(),
                dict(zip(z["error_ids"].tolist(), z["error_messages"].tolist())),
                [s.split("|") if s else () for s in z["pacs_labels"].tolist()] if "pacs_labels" in z.files else None,
            )


class ScoreStore:
    """<state_dir>/scores/<model_version>.npz, with an in-memory copy reloaded when the file changes."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._cached = {}  # version -> (mtime_ns, table)

    def path(self, version) -> Path:
        return self.folder / f"{version}.npz"

    def load(self, version) -> ScoreTable | None:
        path = self.path(version)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        cached = self._cached.get(version)
        if cached and cached[0] == mtime:
            return cached[1]
        try:
            table = ScoreTable.load(path)
        except (OSError, ValueError, KeyError) as error:
            logger.warning(f"ignoring unreadable score table {path}: {error}")
            return None
        self._cached = {version: (mtime, table)}
        return table

    def save(self, table: ScoreTable):
        table.save(self.path(table.version))

    def latest(self) -> ScoreTable | None:
        """The newest table of any version (stale scores beat none while a refresh runs)."""
        files = sorted(self.folder.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        return self.load(files[0].stem) if files else None

    def prune(self, keep):
        """Delete tables of other versions than `keep` that are older than the kept ones."""
        kept = [self.path(v).stat().st_mtime_ns for v in keep if self.path(v).exists()]
        if not kept:
            return
        for path in self.folder.glob("*.npz"):
            if path.stem not in keep and path.stat().st_mtime_ns < min(kept):
                try:
                    os.unlink(path)
                except OSError:
                    pass
