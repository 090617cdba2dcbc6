"""Suspected label errors from out-of-fold probabilities (arrays in, arrays out, like cleanlab).

Issue score: 1 - self-confidence (cleanlab.rank.get_label_quality_scores); it ranked injected flips better
than the normalized margin on the bench. Which images are flagged:
"cleanlab": cleanlab.filter.find_label_issues with its defaults (prune_by_noise_rate, per class pair);
"ours": as many images as cleanlab flags with `filter_by="both"` (the pairs both its noise-rate and its per-class
pruning agree on: the more conservative count), taken from the top of the one global issue-score ranking.
bench/audit_quality.py measures both on the same probabilities.

`labels` are class indices with -1 for "no given label": such images are never label errors (they get a
suggestion instead) and are left out of the confident-learning statistics.
"""

import warnings

import numpy as np

METHODS = ("ours", "cleanlab")
DEFAULT_METHOD = "ours"


def primary_labels(label_sets, pred_probs) -> np.ndarray:
    """One given label per image: of a multi-region label (e.g. Hand|Wrist) the region the model finds likeliest."""
    pred_probs = np.asarray(pred_probs)
    out = np.full(len(label_sets), -1, dtype=np.int64)
    for i, labels in enumerate(label_sets):
        labels = list(labels)
        if labels:
            out[i] = labels[int(np.argmax(pred_probs[i, labels]))]
    return out


def issue_scores(labels, pred_probs) -> np.ndarray:
    """Higher = more likely a wrong label, in [0, 1]; NaN where there is no given label."""
    from cleanlab.rank import get_label_quality_scores

    labels, pred_probs = _check(labels, pred_probs)
    scores = np.full(len(labels), np.nan)
    has = labels >= 0
    given, probs = _compact(labels[has], pred_probs[has])
    if probs is None:  # fewer than two given classes: nothing to tell apart
        scores[has] = 0.0
    else:
        scores[has] = 1.0 - get_label_quality_scores(given, probs, method="self_confidence")
    return scores


def find_label_issues(labels, pred_probs, method=DEFAULT_METHOD, out_of_domain=None) -> np.ndarray:
    """Boolean mask of suspected label errors; out-of-domain images and images without a label are never flagged."""
    labels, pred_probs = _check(labels, pred_probs, method)
    mask = np.zeros(len(labels), dtype=bool)
    has = labels >= 0
    if out_of_domain is not None:
        has &= ~np.asarray(out_of_domain, dtype=bool)
    if has.sum() < 2:
        return mask
    if method == "cleanlab":
        mask[has] = _cleanlab_issues(labels[has], pred_probs[has])
    else:
        mask[has] = _our_issues(labels[has], pred_probs[has])
    return mask


def _our_issues(labels, pred_probs) -> np.ndarray:
    """As many issues as cleanlab finds with filter_by="both", taken from the top of one global ranking by issue
    score (cleanlab prunes per (given, true) class pair, which spends the count on pairs rather than on the worst).
    On bench/audit_quality.py its count beat the default's in precision at 5, 10 and 20% flips for 1-2 points of
    recall (docs/results.md)."""
    labels, probs = _compact(labels, pred_probs)
    mask = np.zeros(len(labels), dtype=bool)
    if probs is None:
        return mask
    n = int(_cleanlab_issues(labels, probs, filter_by="both").sum())
    mask[np.argsort(-issue_scores(labels, probs), kind="stable")[:n]] = True
    return mask


def _cleanlab_issues(labels, pred_probs, filter_by="prune_by_noise_rate") -> np.ndarray:
    import cleanlab.filter

    labels, probs = _compact(labels, pred_probs)
    if probs is None:
        return np.zeros(len(labels), dtype=bool)
    with warnings.catch_warnings():  # "too few examples in class k": expected for rare regions
        warnings.simplefilter("ignore", UserWarning)
        # n_jobs=1: its process pool forks, and a fork of a process that runs threads (the server) can hang
        return np.asarray(cleanlab.filter.find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1), dtype=bool)


def _compact(labels, pred_probs):
    """cleanlab wants every column to be a class that occurs: drop absent classes and renormalise.
    Returns (labels, probs), probs None with fewer than two given classes."""
    present = np.unique(labels)
    if len(present) < 2:
        return labels, None
    probs = pred_probs[:, present]
    probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
    return np.searchsorted(present, labels), probs


def _check(labels, pred_probs, method=DEFAULT_METHOD):
    if method not in METHODS:
        raise ValueError(f"unknown label-issue method {method!r}; choose one of {', '.join(METHODS)}")
    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    if pred_probs.ndim != 2 or len(labels) != len(pred_probs):
        raise ValueError(f"labels ({labels.shape}) and pred_probs ({pred_probs.shape}) do not match")
    if labels.max(initial=-1) >= pred_probs.shape[1] or labels.min(initial=0) < -1:
        raise ValueError("labels must be class indices in [0, C) or -1 for no given label")
    return labels, pred_probs
