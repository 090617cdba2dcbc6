"""Suspected label errors from out-of-fold probabilities (arrays in, arrays out, like cleanlab).

"cleanlab": cleanlab's defaults (find_label_issues, prune_by_noise_rate; self-confidence scores).
"ours": as many issues as confident learning estimates (the calibrated confident joint), taken from the top of
one global ranking by normalized margin (best other class minus the given class) instead of per class pair.
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


def issue_scores(labels, pred_probs, method=DEFAULT_METHOD) -> np.ndarray:
    """Higher = more likely a wrong label, in [0, 1]; NaN where there is no given label."""
    labels, pred_probs = _check(labels, pred_probs, method)
    scores = np.full(len(labels), np.nan)
    has = labels >= 0
    if not has.any():
        return scores
    given, probs = _compact(labels[has], pred_probs[has])
    if probs is None:  # one class only: nothing to tell apart
        scores[has] = 0.0
    elif method == "cleanlab":
        from cleanlab.rank import get_label_quality_scores

        scores[has] = 1.0 - get_label_quality_scores(given, probs, method="self_confidence")
    else:
        scores[has] = _margin_score(given, probs)
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


def _margin_score(labels, pred_probs) -> np.ndarray:
    """Normalized margin (best other class minus the given class), mapped from [-1, 1] to [0, 1]."""
    rows = np.arange(len(labels))
    given = pred_probs[rows, labels]
    others = pred_probs.copy()
    others[rows, labels] = -np.inf
    return (1.0 + others.max(axis=1) - given) / 2.0


def _our_issues(labels, pred_probs) -> np.ndarray:
    """The estimated number of label errors (confident joint, calibrated: cleanlab.count.num_label_issues),
    taken from the top of our margin ranking rather than per class."""
    from cleanlab.count import num_label_issues

    labels, probs = _compact(labels, pred_probs)
    mask = np.zeros(len(labels), dtype=bool)
    if probs is None:
        return mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        n = int(num_label_issues(labels, probs))
    mask[np.argsort(-_margin_score(labels, probs), kind="stable")[:n]] = True
    return mask


def _cleanlab_issues(labels, pred_probs) -> np.ndarray:
    import cleanlab.filter

    labels, probs = _compact(labels, pred_probs)
    if probs is None:
        return np.zeros(len(labels), dtype=bool)
    with warnings.catch_warnings():  # "too few examples in class k": expected for rare regions
        warnings.simplefilter("ignore", UserWarning)
        return np.asarray(cleanlab.filter.find_label_issues(labels, probs), dtype=bool)


def _compact(labels, pred_probs):
    """cleanlab wants every column to be a class that occurs: drop absent classes and renormalise.
    Returns (labels, probs), probs None with fewer than two given classes."""
    present = np.unique(labels)
    if len(present) < 2:
        return labels, None
    probs = pred_probs[:, present]
    probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
    return np.searchsorted(present, labels), probs


def _check(labels, pred_probs, method):
    if method not in METHODS:
        raise ValueError(f"unknown label-issue method {method!r}; choose one of {', '.join(METHODS)}")
    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    if pred_probs.ndim != 2 or len(labels) != len(pred_probs):
        raise ValueError(f"labels ({labels.shape}) and pred_probs ({pred_probs.shape}) do not match")
    if labels.max(initial=-1) >= pred_probs.shape[1] or labels.min(initial=0) < -1:
        raise ValueError("labels must be class indices in [0, C) or -1 for no given label")
    return labels, pred_probs
