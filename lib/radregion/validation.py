"""Out-of-fold validation, always grouped by patient: no image is judged by a head that saw its patient.

The one place for folds and out-of-fold heads. Head fitting (`fitting.train_head`: cross-validated figures and the
OOD threshold), the audit (out-of-fold probabilities that judge each given label) and the server's trainer (is a
new head better than the current one?) all fold with `fold_ids` and fit with `out_of_fold_probabilities`.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

MIN_LABELLED = 20  # the audit: fewer labelled images than this, and the bundle's own head gives the probabilities


def fold_ids(items, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold id (0..k-1) per `LabelledImage`: a patient's images share a fold; stratified by first label where
    sklearn's StratifiedGroupKFold can, else GroupKFold. k is capped at the number of patients (at least 2)."""
    from sklearn.model_selection import GroupKFold

    from radregion.datasets import patient_folds

    items = list(items)
    groups = [it.group for it in items]
    if len(set(groups)) < 2:
        raise ValueError(f"folds need at least two patients (have {len(set(groups))})")
    k = max(2, min(k, len(set(groups))))
    try:
        with warnings.catch_warnings():  # few labels per region: sklearn's "regression?" hint is noise here
            warnings.filterwarnings("ignore", message="The number of unique classes")
            return np.asarray(patient_folds(items, k=k, seed=seed))
    except ValueError:
        folds = np.zeros(len(items), int)
        for fold, (_, test) in enumerate(GroupKFold(n_splits=k).split(np.zeros(len(items)), groups=groups)):
            folds[test] = fold
        return folds


def label_set_fold_ids(label_sets, patient_ids, paths, k: int = 5, seed: int = 0) -> np.ndarray:
    """`fold_ids` of the images that carry a label; -1 for those without (they are never held out)."""
    from radregion.datasets import LabelledImage

    folds = np.full(len(label_sets), -1, dtype=np.int64)
    labelled = np.flatnonzero([bool(labels) for labels in label_sets])
    items = [LabelledImage(Path(paths[i]), tuple(label_sets[i]), patient_ids[i]) for i in labelled]
    if items:
        folds[labelled] = fold_ids(items, k=k, seed=seed)
    return folds


def fold_masks(folds):
    """(fold, train mask, test mask) per fold; rows with fold -1 are in no test part and no training part."""
    folds = np.asarray(folds)
    for fold in np.unique(folds[folds >= 0]):
        yield fold, (folds >= 0) & (folds != fold), folds == fold


def out_of_fold_probabilities(
    features,
    label_sets,
    regions,
    folds,
    *,
    C=None,
    class_balanced: bool = True,
    extra_features=None,
    extra_label_sets=(),
    skip_small_folds: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """(N, R) probabilities over `regions`: row i from a linear head fitted on every other fold (plus the
    `extra_*` rows, which are never predicted themselves).

    `label_sets`: a tuple of region names per row (a multi-region image trains every region it carries); rows
    without a label (or fold -1) get the average of all fold heads. A fold whose training part has fewer than two
    regions is an error, or with `skip_small_folds` leaves its rows at zero (no prediction).
    """
    from radregion.head import DEFAULT_C, fit_head

    regions = list(regions)
    features = np.asarray(features, np.float32)
    folds = np.asarray(folds)
    extra_features = (
        np.zeros((0, features.shape[1]), np.float32)
        if extra_features is None
        else np.asarray(extra_features, np.float32)
    )
    extra_label_sets = list(extra_label_sets)
    probs = np.zeros((len(features), len(regions)), np.float64)
    labelled = np.array([bool(labels) for labels in label_sets]) & (folds >= 0)
    unlabelled = np.flatnonzero(~labelled)
    splits = list(fold_masks(np.where(labelled, folds, -1)))
    n_heads = len(splits)
    if progress:
        from tqdm import tqdm

        splits = tqdm(splits, desc="out-of-fold heads", unit="fold", file=sys.stderr)
    for _, train, test in splits:
        fitted = [label_sets[i] for i in np.flatnonzero(train)] + extra_label_sets
        present = [r for r in regions if r in {name for labels in fitted for name in labels}]
        if len(present) < 2:
            if skip_small_folds:
                continue
            raise ValueError("too few labelled regions outside one fold to fit out-of-fold heads")
        head = fit_head(  # an image of several regions trains each of them
            np.concatenate([features[train], extra_features]),
            fitted,
            present,
            class_balanced=class_balanced,
            C=DEFAULT_C if C is None else C,
            all_labels=True,
        )
        columns = [regions.index(r) for r in present]
        probs[np.ix_(np.flatnonzero(test), columns)] = head.probabilities(features[test])
        if len(unlabelled):
            probs[np.ix_(unlabelled, columns)] += head.probabilities(features[unlabelled]) / n_heads
    return probs / np.clip(probs.sum(1, keepdims=True), 1e-12, None)


def out_of_fold_predictions(features, labels, regions, folds, **options) -> list:
    """The region each row's out-of-fold head predicts (None where no head could be fitted): the argmax of
    `out_of_fold_probabilities` with `skip_small_folds`. `labels`: a region name, or a tuple of them, per row."""
    label_sets = [(lab,) if isinstance(lab, str) else tuple(lab) for lab in labels]
    probs = out_of_fold_probabilities(features, label_sets, regions, folds, skip_small_folds=True, **options)
    return [regions[j] if probs[i, j] > 0 else None for i, j in enumerate(probs.argmax(1))]


def can_fit_out_of_fold(label_sets) -> bool:
    """Enough labels for out-of-fold heads: MIN_LABELLED labelled images, two regions with two or more each."""
    counts = {}
    for labels in label_sets:
        if labels:
            counts[labels[0]] = counts.get(labels[0], 0) + 1
    return sum(counts.values()) >= MIN_LABELLED and sum(n >= 2 for n in counts.values()) >= 2
