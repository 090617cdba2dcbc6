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


def read_predictions(csv_path, resolve_paths: bool = False) -> list[dict]:
    """The rows of a predictions CSV (`write_predictions`): {"path", "region", "confidence", "ood_score" (floats,
    nan when empty), "out_of_domain" (bool or None), "error", "row", "probabilities" ({region: float} of the
    region columns, empty for an unread file)}; RadiographError naming the CSV and row for a problem.
    `resolve_paths`: each path made absolute as `radregion predict` wrote it (relative to the current folder),
    and a read file that is no longer there is an error."""
    from pathlib import Path

    from radregion.errors import RadiographError

    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise RadiographError(
                    csv_path, f"not a `radregion predict` CSV: missing column(s) {', '.join(missing)}"
                )
            region_columns = [c for c in reader.fieldnames if c not in COLUMNS]
            rows = []
            for number, row in enumerate(reader, start=2):  # row 1 is the header
                values, probabilities = {}, {}
                for column in ("confidence", "ood_score", *region_columns):
                    text = (row.get(column) or "").strip()
                    try:
                        value = float(text) if text else math.nan
                    except ValueError:
                        raise RadiographError(csv_path, f"row {number}: {column} {text!r} is not a number") from None
                    if column in region_columns:
                        if text:
                            probabilities[column] = value
                    else:
                        values[column] = value
                flag = (row.get("out_of_domain") or "").strip().lower()
                if flag not in ("", "true", "false"):
                    raise RadiographError(csv_path, f"row {number}: out_of_domain {flag!r} is not true or false")
                rows.append(
                    {
                        "path": (row.get("path") or "").strip(),
                        "region": (row.get("region") or "").strip(),
                        **values,
                        "out_of_domain": None if not flag else flag == "true",
                        "error": (row.get("error") or "").strip(),
                        "row": number,
                        "probabilities": probabilities,
                    }
                )
                if resolve_paths and rows[-1]["path"]:
                    path = Path(rows[-1]["path"]).resolve()
                    rows[-1]["path"] = str(path)
                    if not rows[-1]["error"] and not path.is_file():
                        raise RadiographError(
                            csv_path,
                            f"row {number}: image not found: {path} (paths are read relative to the current "
                            "folder, as `radregion predict` wrote them)",
                        )
    except OSError as error:
        raise RadiographError(csv_path, f"cannot read predictions CSV ({error.strerror or error})") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise RadiographError(csv_path, f"not a readable CSV ({error})") from None
    return rows
