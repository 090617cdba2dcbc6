"""The predictions CSV (`radregion predict`, `radregion evaluate`): one row per file, its region, confidence,
out-of-domain score and flag, the archive's own label, the error of an unreadable file, then one probability
column per region."""

from __future__ import annotations

import csv
import math

COLUMNS = ("path", "region", "confidence", "ood_score", "out_of_domain", "pacs_label", "agrees_with_pacs", "error")


def _number(value, digits=4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _flag(value) -> str:
    return "" if value is None else ("true" if value else "false")


def prediction_row(pred, regions) -> list[str]:
    return [
        pred.path,
        pred.region or "",
        _number(pred.confidence),
        _number(pred.ood_score),
        "" if pred.error else _flag(pred.out_of_domain),
        pred.pacs_label or "",
        _flag(pred.agrees_with_pacs),
        pred.error or "",
    ] + [_number(pred.probabilities.get(r)) if pred.probabilities else "" for r in regions]


def write_predictions(predictions, regions, handle) -> dict:
    """CSV rows to `handle`; returns {"total", "read", "out_of_domain", "errors"}, errors: ["path: reason", ...]."""
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(list(COLUMNS) + list(regions))
    counts = {"total": 0, "read": 0, "out_of_domain": 0, "errors": []}
    for pred in predictions:
        writer.writerow(prediction_row(pred, regions))
        counts["total"] += 1
        counts["read"] += pred.error is None
        counts["out_of_domain"] += bool(pred.error is None and pred.out_of_domain)
        if pred.error is not None:
            counts["errors"].append(f"{pred.path}: {pred.error}")
    return counts
