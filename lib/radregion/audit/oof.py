"""Out-of-fold probabilities: frozen features of every image once (cached), linear heads fitted on k
patient-grouped folds, so that no image's own label ever judges it."""

from __future__ import annotations

import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from radregion.atomic import atomic_write
from radregion.errors import RadiographError

MIN_LABELLED = 20  # fewer labelled images than this: the bundle's own head gives the probabilities


def feature_cache_dir(bundle) -> Path:
    from radregion.cache import default_root

    return default_root() / "features" / f"{bundle.version}-{bundle.settings.key()}"


def _feature_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()


def bundle_features(bundle, paths, *, workers: int = 2, batch_size: int = 32, progress: bool = True):
    """Features (N, D) of `paths` with the bundle's frozen backbone (cached per file), and the errors of
    unreadable files: returns (features, ok_mask, errors); rows of unreadable files are zero, ok_mask False."""
    from radregion.cache import load_clean
    from radregion.features import extract_features

    paths = [Path(p) for p in paths]
    cache = feature_cache_dir(bundle)
    dim = int(bundle.meta["architecture"].get("feature_dim") or 0)
    features: list = [None] * len(paths)
    errors: dict[int, RadiographError] = {}
    todo = []
    for i, path in enumerate(paths):
        try:
            cached = cache / f"{_feature_key(path)}.npy"
        except OSError as error:
            errors[i] = RadiographError(path, f"cannot read ({error.strerror or error})")
            continue
        if cached.is_file():
            features[i] = np.load(cached)
        else:
            todo.append(i)

    def load(i):
        try:
            return i, load_clean(paths[i], bundle.settings), None
        except RadiographError as error:
            return i, None, error
        except (OSError, ValueError) as error:
            return i, None, RadiographError(paths[i], f"cannot read ({error})")

    backbone = bundle.backbone() if todo else None
    bar = tqdm(total=len(todo), desc=f"features {bundle.path.name}", unit="img", file=sys.stderr,
               disable=not progress or not todo)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(todo), batch_size):
            batch = list(pool.map(load, todo[start:start + batch_size]))
            good = [(i, image) for i, image, error in batch if error is None]
            errors.update({i: error for i, _, error in batch if error is not None})
            if good:
                feats = extract_features(backbone, np.stack([image for _, image in good]), batch_size=batch_size)
                cache.mkdir(parents=True, exist_ok=True)
                for (i, _), feat in zip(good, feats):
                    features[i] = feat
                    with atomic_write(cache / f"{_feature_key(paths[i])}.npy") as handle:
                        np.save(handle, feat)
            bar.update(len(batch))
    bar.close()
    dim = next((len(f) for f in features if f is not None), dim)
    ok = np.array([f is not None for f in features], dtype=bool)
    out = np.zeros((len(paths), dim), np.float32)
    for i in np.flatnonzero(ok):
        out[i] = features[i]
    return out, ok, [errors[i] for i in sorted(errors)]


def out_of_fold_probabilities(features, label_sets, regions, folds, *, C=None, progress=False) -> np.ndarray:
    """(N, C) probabilities over `regions`; image i is predicted by a head that never saw fold folds[i].

    `label_sets`: tuple of region names per image (multi-region images train every region they carry);
    images with no label (or fold -1) are predicted by the average of all fold heads.
    """
    from radregion.head import DEFAULT_C, fit_head

    regions = list(regions)
    features = np.asarray(features, np.float32)
    folds = np.asarray(folds)
    probs = np.zeros((len(features), len(regions)), np.float64)
    labelled = np.array([bool(labels) for labels in label_sets]) & (folds >= 0)
    unlabelled = ~labelled
    fold_ids = np.unique(folds[labelled])
    for fold in tqdm(fold_ids, desc="out-of-fold heads", unit="fold", file=sys.stderr, disable=not progress):
        train = np.flatnonzero(labelled & (folds != fold))
        rows = [i for i in train for _ in label_sets[i]]
        names = [name for i in train for name in label_sets[i]]
        present = [r for r in regions if r in set(names)]
        if len(present) < 2:
            raise ValueError("too few labelled regions outside one fold to fit out-of-fold heads")
        head = fit_head(features[rows], names, present, C=DEFAULT_C if C is None else C)
        columns = [regions.index(r) for r in present]
        test = np.flatnonzero(labelled & (folds == fold))
        probs[np.ix_(test, columns)] = head.probabilities(features[test])
        if unlabelled.any():
            probs[np.ix_(np.flatnonzero(unlabelled), columns)] += (
                head.probabilities(features[unlabelled]) / len(fold_ids))
    return probs / np.clip(probs.sum(1, keepdims=True), 1e-12, None)


def patient_fold_ids(label_sets, patient_ids, paths, k=5, seed=0) -> np.ndarray:
    """Fold id per image (-1 without a label): datasets.patient_folds (grouped by patient, stratified)."""
    from radregion.datasets import LabelledImage, patient_folds

    folds = np.full(len(label_sets), -1, dtype=np.int64)
    labelled = np.flatnonzero([bool(labels) for labels in label_sets])
    items = [LabelledImage(Path(paths[i]), tuple(label_sets[i]), patient_ids[i]) for i in labelled]
    if items:
        folds[labelled] = patient_folds(items, k=max(2, min(k, len({it.group for it in items}))), seed=seed)
    return folds


def can_fit_out_of_fold(label_sets) -> bool:
    counts = {}
    for labels in label_sets:
        if labels:
            counts[labels[0]] = counts.get(labels[0], 0) + 1
    return sum(counts.values()) >= MIN_LABELLED and sum(n >= 2 for n in counts.values()) >= 2
