"""`radregion apply-corrections`: the audit's accepted suggestions into a labels CSV and, optionally, into
relabelled DICOM copies (BodyPartExamined set, new SOPInstanceUID; the originals are never modified); or, with
`--drop`, the listed images left out of the labels CSV."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from radregion.errors import RadiographError


def register(subparsers):
    parser = subparsers.add_parser(
        "apply-corrections",
        help="write corrected labels (CSV, and optionally relabelled DICOM copies)",
        description="Apply corrections.csv (image,labels[,PatientID], as written by `radregion audit`) to a "
        "labels CSV, and optionally write DICOM copies with BodyPartExamined set.",
    )
    parser.add_argument("--corrections", required=True, metavar="CSV", help="corrections.csv of an audit")
    parser.add_argument("--labels", metavar="CSV", help="the labels CSV to correct (its other columns are kept)")
    parser.add_argument(
        "--images-root", metavar="DIR", help="folder the image paths of --labels are relative to (default: its folder)"
    )
    parser.add_argument("--output", required=True, metavar="CSV", help="the corrected labels CSV")
    parser.add_argument("--dicom-out", metavar="DIR", help="write relabelled copies of corrected DICOM files here")
    parser.add_argument(
        "--drop",
        action="store_true",
        help="leave the listed images out of --labels instead of relabelling them (confident learning's pruning: "
        "train on the rest without reviewing each suggestion)",
    )
    parser.add_argument("--taxonomy", default="unifesp22", help="taxonomy of the region names (default unifesp22)")
    return parser


def run(args) -> int:
    from radregion.datasets import read_labels_csv, write_labels_csv
    from radregion.taxonomy import load_taxonomy

    if args.drop and (not args.labels or args.dicom_out):
        raise RadiographError(args.corrections, "--drop needs --labels and no --dicom-out (nothing is relabelled)")
    taxonomy = load_taxonomy(args.taxonomy)
    fixes = read_labels_csv(args.corrections, taxonomy=taxonomy, check_files=bool(args.dicom_out), allow_empty=True)
    if not fixes:
        print(
            f"radregion apply-corrections: {args.corrections} lists no corrections (the audit found nothing to "
            f"correct): nothing to do, {args.output} not written"
        )
        return 0
    pending = {fix.path.resolve(): fix for fix in fixes}
    changed = dropped = 0
    rows = []
    if args.labels:
        items = read_labels_csv(args.labels, args.images_root, taxonomy=taxonomy, check_files=False)
        for item, row in zip(items, raw_rows(args.labels)):
            fix = pending.pop(item.path.resolve(), None)
            if fix is not None and args.drop:
                dropped += 1
                continue
            if fix is not None:
                changed += set(fix.labels) != set(item.labels)
                row["labels"] = fix.labels
            rows.append(dict(row, image=item.path.resolve()))  # written relative to the output CSV's folder
    if args.drop:
        write_labels_csv(rows, args.output)
        print(
            f"{args.output}: {len(rows)} images, {dropped} dropped ({len(pending)} listed images not in {args.labels})"
        )
        return 0
    added = list(pending.values())
    rows += [{"image": fix.path.resolve(), "labels": fix.labels, "PatientID": fix.patient_id} for fix in added]
    write_labels_csv(rows, args.output)
    print(f"{args.output}: {len(rows)} images, {changed} labels changed, {len(added)} added")

    if args.dicom_out:
        written, skipped = write_dicom_copies(fixes, taxonomy, Path(args.dicom_out))
        print(
            f"{args.dicom_out}: {written} relabelled DICOM copies"
            + (f" ({skipped} corrected images are not DICOM or have no BodyPartExamined term)" if skipped else "")
        )
    return 0


def raw_rows(csv_path) -> list[dict]:
    """Rows with every column, in file order (read_labels_csv has checked the file already)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        header = handle.readline()
        handle.seek(0)
        delimiter = next((d for d in (",", ";", "\t") if d in header), ",")
        return [{k: v for k, v in row.items() if k is not None} for row in csv.DictReader(handle, delimiter=delimiter)]


def write_dicom_copies(fixes, taxonomy, out: Path) -> tuple[int, int]:
    """A copy of every corrected DICOM file in `out` with BodyPartExamined of its (first) corrected region."""
    from radregion.dicomwrite import copy_with_body_part
    from radregion.io import is_dicom

    written = skipped = 0
    used = set()
    for fix in fixes:
        if not is_dicom(fix.path):
            skipped += 1
            continue
        term = taxonomy.body_part_term(fix.labels[0])
        if term is None:
            print(
                f"radregion apply-corrections: {fix.path}: DICOM has no BodyPartExamined term for "
                f"{fix.labels[0]}; no copy",
                file=sys.stderr,
            )
            skipped += 1
            continue
        target, n = out / fix.path.name, 1
        while target in used:
            target = out / f"{fix.path.stem}_{n}{fix.path.suffix}"
            n += 1
        used.add(target)
        if target.resolve() == fix.path.resolve():
            raise RadiographError(target, "--dicom-out would overwrite the original: choose another folder")
        copy_with_body_part(fix.path, target, term)
        written += 1
    return written, skipped
