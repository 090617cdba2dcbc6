"""Labelled image lists (labels CSV or class folders), patient-grouped stratified splits, few-label sampling.

CSV format (../shared/data/unifesp/labels.csv): `image` (path, relative to the CSV's folder unless absolute),
`labels` (region names joined by '|', the first one counts for stratification and sampling), optional `PatientID`.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radregion.atomic import atomic_write
from radregion.errors import RadiographError

LABEL_SEPARATOR = "|"


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    labels: tuple[str, ...]
    patient_id: str | None = None

    @property
    def label(self) -> str:
        """The first label: the one used for stratification and per-class sampling."""
        return self.labels[0]

    @property
    def group(self) -> str:
        """Patient for grouping; an image without PatientID is its own group."""
        return f"patient:{self.patient_id}" if self.patient_id else f"image:{self.path}"


def read_labels_csv(
    csv_path, images_root=None, taxonomy=None, check_files: bool = True, allow_empty: bool = False
) -> list[LabelledImage]:
    """Read a labels CSV; RadiographError naming the CSV and row for any problem.

    `taxonomy` (name, path or Taxonomy): reject labels it does not know and spell them as it does.
    `allow_empty`: a header without rows is an empty list (else an error).
    """
    csv_path = Path(csv_path)
    root = Path(images_root) if images_root is not None else csv_path.parent
    known = _load(taxonomy)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            sample = handle.read(4096)
            handle.seek(0)
            delimiter = next((d for d in (",", ";", "\t") if d in sample.partition("\n")[0]), ",")
            reader = csv.DictReader(handle, delimiter=delimiter)
            missing = [c for c in ("image", "labels") if c not in (reader.fieldnames or [])]
            if missing:
                raise RadiographError(
                    csv_path,
                    f"missing column(s) {', '.join(missing)} "
                    f"(found: {', '.join(reader.fieldnames or []) or 'nothing'})",
                )
            items, first_row = [], {}
            for row_number, row in enumerate(reader, start=2):  # row 1 is the header
                items.append(_parse_row(row, row_number, csv_path, root, known, first_row))
    except OSError as error:
        raise RadiographError(csv_path, f"cannot read labels CSV ({error.strerror or error})") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise RadiographError(csv_path, f"not a readable CSV ({error})") from None
    if not items and not allow_empty:
        raise RadiographError(csv_path, "no rows below the header")
    if check_files:
        missing = [(n, it) for n, it in zip(first_row.values(), items) if not it.path.is_file()]
        if missing:
            n, item = missing[0]
            more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise RadiographError(csv_path, f"row {n}: image not found: {item.path}{more}")
    return items


def _parse_row(row, row_number, csv_path, root, known, first_row) -> LabelledImage:
    image = (row.get("image") or "").strip()
    if not image:
        raise RadiographError(csv_path, f"row {row_number}: empty image path")
    if image in first_row:
        raise RadiographError(csv_path, f"row {row_number}: image {image} already listed in row {first_row[image]}")
    first_row[image] = row_number
    labels = tuple(part.strip() for part in (row.get("labels") or "").split(LABEL_SEPARATOR) if part.strip())
    if not labels:
        raise RadiographError(csv_path, f"row {row_number} ({image}): empty labels")
    if known is not None:
        labels = known.check_names(labels, csv_path, f"row {row_number} ({image})")
    path = Path(image) if Path(image).is_absolute() else root / image
    patient = (row.get("PatientID") or "").strip() or None
    return LabelledImage(path, tuple(dict.fromkeys(labels)), patient)


def _load(taxonomy):
    if taxonomy is None:
        return None
    from radregion.taxonomy import load_taxonomy

    return load_taxonomy(taxonomy)


def scan_labelled_folder(folder, taxonomy=None) -> tuple[list[LabelledImage], list[RadiographError]]:
    """Images under class folders (`folder/Knee/**/x.dcm` -> Knee); no PatientID. Returns (items, errors)."""
    from radregion.io import find_radiographs

    folder = Path(folder)
    if not folder.is_dir():
        raise RadiographError(folder, "not a folder")
    known = _load(taxonomy)
    paths, errors = find_radiographs(folder)
    items = []
    for path in paths:
        relative = path.relative_to(folder)
        if len(relative.parts) < 2:
            errors.append(RadiographError(path, "not inside a class folder (folder/REGION/image)"))
            continue
        label = relative.parts[0]
        if known is not None:
            try:
                [label] = known.check_names([label], path, f"folder {label!r}")
            except RadiographError as error:
                errors.append(error)
                continue
        items.append(LabelledImage(path, (label,), None))
    return items, errors


def write_labels_csv(items_or_rows, path) -> Path:
    """Write LabelledImages or dict rows (image, labels as a list or "A|B", PatientID, extra columns) atomically.

    Image paths under the CSV's folder are written relative to it, so read_labels_csv finds them again.
    """
    path = Path(path)
    rows = [_row(entry, path.parent) for entry in items_or_rows]
    columns = ["image", "labels", "PatientID"]
    for row in rows:
        columns += [key for key in row if key not in columns]
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _row(entry, folder: Path) -> dict:
    if isinstance(entry, LabelledImage):
        row = {"image": entry.path, "labels": entry.labels, "PatientID": entry.patient_id}
    elif isinstance(entry, dict):
        row = dict(entry)
    else:
        raise TypeError(f"write_labels_csv takes LabelledImage or dict rows, not {type(entry).__name__}")
    if not row.get("image"):
        raise ValueError(f"row without an image: {entry!r}")
    labels = row.get("labels")
    labels = labels.split(LABEL_SEPARATOR) if isinstance(labels, str) else list(labels or [])  # "Hand|Wrist" as read
    labels = [str(lab).strip() for lab in labels]
    if not labels or any(not lab or LABEL_SEPARATOR in lab for lab in labels):
        raise ValueError(f"{row['image']}: labels must be non-empty region names without '|', got {labels!r}")
    image = Path(row["image"])
    try:
        image = image.resolve().relative_to(folder.resolve()) if image.is_absolute() else image
    except ValueError:
        pass  # outside the CSV's folder: keep it absolute
    row.update(
        image=image.as_posix(), labels=LABEL_SEPARATOR.join(map(str, labels)), PatientID=row.get("PatientID") or ""
    )
    return row


# --- splits and sampling -----------------------------------------------------------------------------------


def patient_split(items, test_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """(train, test): every patient on one side; first labels stratified as well as patients allow.

    Patients are placed rarest class first, each on the side that brings the per-class and overall test
    fractions closest to `test_fraction`, then moved while a move helps; a class too small to split (e.g. two
    patients with two images each at 0.2) stays in train.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    items = list(items)
    groups = _groups(items)
    classes = sorted({it.label for it in items})
    index = {c: i for i, c in enumerate(classes)}
    counts = {
        g: np.bincount([index[items[i].label] for i in members], minlength=len(classes))
        for g, members in groups.items()
    }
    totals = np.bincount([index[it.label] for it in items], minlength=len(classes)).astype(float)
    target = test_fraction * totals

    def error(test_counts):
        return (((test_counts - target) / totals) ** 2).sum() + ((test_counts.sum() - target.sum()) / totals.sum()) ** 2

    rng = np.random.default_rng(seed)
    order = [sorted(groups)[i] for i in rng.permutation(len(groups))]
    order.sort(key=lambda g: (totals[counts[g] > 0].min(), -counts[g].sum()))  # stable: ties stay shuffled
    test_counts, test_groups = np.zeros(len(classes)), set()
    for _ in range(20):  # greedy first pass, then single-patient moves while they help
        moved = False
        for g in order:
            sign = -1 if g in test_groups else 1
            if error(test_counts + sign * counts[g]) < error(test_counts) - 1e-12:
                test_counts += sign * counts[g]
                test_groups.symmetric_difference_update({g})
                moved = True
        if not moved:
            break
    train = [it for it in items if it.group not in test_groups]
    test = [it for it in items if it.group in test_groups]
    return train, test


def patient_folds(items, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold id (0..k-1) per item: patient-grouped, stratified by first label (sklearn StratifiedGroupKFold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    items = list(items)
    groups = [it.group for it in items]
    if k < 2 or len(set(groups)) < k:
        raise ValueError(f"{k} folds need k >= 2 and at least k patients (have {len(set(groups))})")
    folds = np.full(len(items), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")  # rare classes: best effort
        for fold, (_, test) in enumerate(splitter.split(np.zeros(len(items)), [it.label for it in items], groups)):
            folds[test] = fold
    return folds


def sample_per_class(items, k: int, seed: int = 0) -> list:
    """k images per first label (all of a class with fewer); seeded, and nested: k=5 is inside k=10."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return _sample(items, lambda n: min(k, n), seed)


def sample_fraction(items, fraction: float, seed: int = 0) -> list:
    """round(fraction * n) images per first label, at least one; seeded and nested like sample_per_class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return _sample(items, lambda n: max(1, int(round(fraction * n))), seed)


def _sample(items, how_many, seed: int) -> list:
    items = list(items)
    by_class = defaultdict(list)
    for i, it in enumerate(items):
        by_class[it.label].append(i)
    chosen = set()
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda i: str(items[i].path))  # input order does not matter
        rng = np.random.default_rng([seed, _stable_hash(label)])  # a class's draw does not depend on the others
        chosen.update(members[j] for j in rng.permutation(len(members))[: how_many(len(members))])
    return [it for i, it in enumerate(items) if i in chosen]


def _groups(items) -> dict[str, list[int]]:
    groups = defaultdict(list)
    for i, it in enumerate(items):
        groups[it.group].append(i)
    return groups


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
