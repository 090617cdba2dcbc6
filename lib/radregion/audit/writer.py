"""The audit's CSV files, written atomically (temp file in the same folder, then os.replace)."""

import csv
import math
from pathlib import Path

from radregion.atomic import atomic_write

AUDIT_COLUMNS = ("image", "given_label", "suggested_label", "issue_score", "is_issue", "ood_score", "out_of_domain")
CORRECTION_COLUMNS = ("image", "labels", "PatientID")


def write_audit_csv(rows, path) -> Path:
    """label_issues.csv: one row per image (dicts with AUDIT_COLUMNS), most suspicious first."""
    rows = sorted(rows, key=suspicion_order)
    return _write_csv(path, AUDIT_COLUMNS, [[_cell(row.get(c)) for c in AUDIT_COLUMNS] for row in rows])


def write_corrections_csv(rows, path) -> Path:
    """corrections.csv in the labels-CSV format (image,labels,PatientID): dicts with those keys."""
    from radregion.datasets import write_labels_csv

    return write_labels_csv([{c: row.get(c) for c in CORRECTION_COLUMNS} for row in rows], path)


def suspicion_order(row) -> tuple:
    """Flagged label errors first, then out-of-domain images, then by issue score (none last)."""
    score = row.get("issue_score")
    has_score = score is not None and not (isinstance(score, float) and math.isnan(score))
    return (not row.get("is_issue"), not row.get("out_of_domain"), not has_score, -(score if has_score else 0.0))


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "true" if value else "false"
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        return f"{float(value):.4f}"
    return str(value)


def _write_csv(path, columns, rows) -> Path:
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return Path(path)
