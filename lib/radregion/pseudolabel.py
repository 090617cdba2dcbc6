"""Pseudo-labels: a model's (or an ensemble's) confident predictions on unlabelled radiographs, as labels to
fine-tune a student on beside the labelled images (self-training: Lee, ICML 2013 workshop, "Pseudo-Label: the
simple and efficient semi-supervised learning method for deep neural networks"; Xie et al., CVPR 2020,
"Self-training with noisy student improves ImageNet classification": the teacher labels unlabelled images, keeps
the confident ones, and the student learns from labelled + pseudo-labelled images under augmentation).

An image is pseudo-labelled with its region when it was read, is not flagged out of domain and its confidence
reaches `min_confidence` (optionally also: its out-of-domain score stays below `in_domain_below`, a margin under
the threshold against out-of-domain images that pass as a region); optionally, an image flagged out of domain with
an out-of-domain score of at least `out_of_domain_above` is labelled with the out-of-domain region (`Others`),
more images for outlier exposure (Hendrycks et al., ICLR 2019). An image that already has a label keeps it. Arrays
in, arrays out (`confident`); the rows for a labels CSV (`pseudo_label_rows`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

DEFAULT_MIN_CONFIDENCE = 0.9


def confident(confidence, out_of_domain, min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> np.ndarray:
    """Boolean mask of the predictions to keep: confidence (nan for unread) >= `min_confidence` and not out of
    domain."""
    if not 0 < min_confidence <= 1:
        raise ValueError(f"the minimum confidence must be in (0, 1], not {min_confidence}")
    confidence = np.asarray(confidence, float)
    keep = np.nan_to_num(confidence, nan=-1.0) >= min_confidence
    return keep & ~np.asarray(out_of_domain, bool)


def pseudo_label_rows(
    predictions,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    labelled=(),
    source: str = "",
    out_of_domain_above: float | None = None,
    out_of_domain_label: str = "Others",
    in_domain_below: float | None = None,
):
    """Labels-CSV rows (image, labels, PatientID, label_source) for the confident `predictions` (rows of
    `prediction_csv.read_predictions`, their paths resolved) whose image is not among `labelled` (resolved paths),
    and, with `out_of_domain_above` (in the CSV's `ood_score` units), `out_of_domain_label` rows for the flagged
    images scored at least that; with `in_domain_below`, a region only where the score is below it. -> (rows,
    counts): counts {"predicted", "kept", "already_labelled", "out_of_domain", "near_out_of_domain", "unsure",
    "unread", "per_region": {region: n}}; "out_of_domain" counts the flagged images not labelled,
    "near_out_of_domain" the confident ones `in_domain_below` left out."""
    predictions = list(predictions)
    origin = f"pseudo-label {source} " if source else "pseudo-label "
    read = np.array([not p["error"] and bool(p["region"]) for p in predictions], bool)
    flagged = np.array([bool(p["out_of_domain"]) for p in predictions], bool)
    keep = confident([p["confidence"] if r else np.nan for p, r in zip(predictions, read)], flagged, min_confidence)
    labelled = {Path(p) for p in labelled}
    known = np.array([Path(p["path"]) in labelled for p in predictions], bool)
    score = np.array([p.get("ood_score", np.nan) for p in predictions], float)
    near = np.zeros(len(predictions), bool)
    if in_domain_below is not None:
        near = keep & ~(np.nan_to_num(score, nan=np.inf) < in_domain_below)
        keep &= ~near
    outside = read & flagged & (out_of_domain_above is not None)
    if out_of_domain_above is not None:
        outside &= np.nan_to_num(score, nan=-np.inf) >= out_of_domain_above
    rows = [
        {
            "image": p["path"],
            "labels": out_of_domain_label if o else p["region"],
            "PatientID": "",
            "label_source": f"{origin}(out-of-domain score {p['ood_score']:.4f})"
            if o
            else f"{origin}(confidence {p['confidence']:.4f})",
        }
        for p, k, o in zip(predictions, keep & ~known, outside & ~known)
        if k or o
    ]
    counts = {
        "predicted": int(read.sum()),
        "kept": len(rows),
        "already_labelled": int((read & known).sum()),
        "out_of_domain": int((read & flagged & ~outside & ~known).sum()),
        "near_out_of_domain": int((near & ~known).sum()),
        "unsure": int((read & ~flagged & ~keep & ~near & ~known).sum()),
        "unread": int((~read).sum()),
        "per_region": dict(Counter(row["labels"] for row in rows).most_common()),
    }
    return rows, counts
