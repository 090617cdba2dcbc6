"""`radregion pseudo-label`: a labels CSV from the confident predictions of `radregion predict` on unlabelled
radiographs (with the labelled images first, when given), to fine-tune a student on (`radregion.pseudolabel`)."""

from __future__ import annotations

import math
import sys
from pathlib import Path


def register(subparsers):
    from radregion.pseudolabel import DEFAULT_MIN_CONFIDENCE

    parser = subparsers.add_parser(
        "pseudo-label",
        help="turn confident predictions on unlabelled images into a labels CSV (self-training)",
        description="Write a labels CSV of the images a `radregion predict` CSV (one model or an ensemble, "
        "repeat --model there) predicted with at least --min-confidence and did not flag out of domain: the "
        "teacher's pseudo-labels for fine-tuning a student (`fit-head --fine-tune --labels` the output, then "
        "refit the head on the real labels alone). Paths are read as `predict` wrote them: relative to the "
        "current folder.",
    )
    parser.add_argument("predictions", metavar="PREDICTIONS", help="CSV written by `radregion predict --output`")
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=DEFAULT_MIN_CONFIDENCE,
        metavar="P",
        help=f"keep predictions at least this confident (default {DEFAULT_MIN_CONFIDENCE})",
    )
    parser.add_argument(
        "--out-of-domain-above",
        type=float,
        metavar="SCORE",
        help="also label the images flagged out of domain with an ood_score of at least SCORE (the CSV's units: "
        "an ensemble's is its margin over the threshold in score spreads, 0 = flagged) as --out-of-domain-label, "
        "for outlier exposure (default: such images get no label)",
    )
    parser.add_argument(
        "--in-domain-below",
        type=float,
        metavar="SCORE",
        help="label a region only where the ood_score is below SCORE (the CSV's units; e.g. -1: one score spread "
        "under an ensemble's threshold), a margin against out-of-domain images that pass as a region "
        "(default: every image not flagged)",
    )
    parser.add_argument(
        "--out-of-domain-label",
        default="Others",
        metavar="REGION",
        help="the out-of-domain region's name in the labels (default Others, that of unifesp22)",
    )
    parser.add_argument(
        "--labels",
        metavar="CSV",
        help="labelled images to write first (their labels win over a prediction for the same image)",
    )
    parser.add_argument("--output", "-o", required=True, metavar="CSV", help="the labels CSV (written atomically)")
    return parser


def run(args) -> int:
    from radregion.datasets import read_labels_csv, write_labels_csv
    from radregion.errors import RadiographError
    from radregion.prediction_csv import read_predictions
    from radregion.pseudolabel import confident, pseudo_label_rows

    confident([], [], args.min_confidence)  # refuse bad thresholds before reading anything
    margins = (("--out-of-domain-above", args.out_of_domain_above), ("--in-domain-below", args.in_domain_below))
    for flag, value in margins:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{flag} must be a number, not {value}")
    predictions = read_predictions(args.predictions, resolve_paths=True)
    labelled = read_labels_csv(args.labels) if args.labels else []
    rows, counts = pseudo_label_rows(
        predictions,
        args.min_confidence,
        labelled=[str(item.path.resolve()) for item in labelled],
        source=f"from {Path(args.predictions).name}",
        out_of_domain_above=args.out_of_domain_above,
        out_of_domain_label=args.out_of_domain_label,
        in_domain_below=args.in_domain_below,
    )
    first = [
        {
            "image": str(item.path.resolve()),
            "labels": list(item.labels),
            "PatientID": item.patient_id or "",
            "label_source": Path(args.labels).name,
        }
        for item in labelled
    ]
    if not rows and not first:
        raise RadiographError(
            args.predictions, f"no prediction reaches confidence {args.min_confidence}: nothing to write"
        )
    write_labels_csv(first + rows, args.output)
    regions = ", ".join(f"{region} {n}" for region, n in counts["per_region"].items()) or "none"
    print(
        f"radregion pseudo-label: {counts['kept']} of {counts['predicted']} predicted images pseudo-labelled "
        f"(confidence >= {args.min_confidence}; {counts['unsure']} less sure, {counts['out_of_domain']} out of domain, "
        f"{counts['near_out_of_domain']} near out of domain, "
        f"{counts['already_labelled']} already labelled, {counts['unread']} unread): {regions}"
        + (f"; with the {len(first)} labelled images of {args.labels}" if first else "")
        + f" -> {args.output}",
        file=sys.stderr,
    )
    return 0
