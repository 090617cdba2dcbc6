"""`radregion audit`: suspected wrong and missing region labels, out-of-domain images, and a report."""

from __future__ import annotations

import sys


def register(subparsers):
    parser = subparsers.add_parser(
        "audit",
        help="find wrong and missing region labels and out-of-domain images; write a report",
        description="Out-of-fold probabilities from linear heads on frozen features (folds grouped by patient), "
        "suspected label errors by confident learning, out-of-domain images apart. Writes "
        "label_issues.csv, corrections.csv and index.html (self-contained) in --output.",
    )
    parser.add_argument(
        "--model",
        metavar="BUNDLE",
        action="append",
        help="model bundle (default: the shipped model); repeat to average an ensemble",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", metavar="CSV", help="labels CSV (image,labels[,PatientID,...])")
    source.add_argument(
        "--dicom-folder", metavar="DIR", help="audit DICOM files under DIR; the given label comes from their headers"
    )
    parser.add_argument(
        "--images-root", metavar="DIR", help="folder the CSV's image paths are relative to (default: the CSV's folder)"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the three output files")
    parser.add_argument(
        "--method",
        choices=("ours", "cleanlab"),
        default="ours",
        help="how suspected errors are chosen (default: ours; see bench/audit_quality.py)",
    )
    parser.add_argument("--folds", type=int, default=5, help="out-of-fold heads (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-report-rows",
        type=int,
        default=200,
        metavar="N",
        help="suspected errors shown with images in index.html (all are in the CSV)",
    )
    parser.add_argument("--no-gradcam", action="store_true", help="leave the Grad-CAM overlays out (faster)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    return parser


def run(args) -> int:
    from radregion.audit.pipeline import inputs_from_dicom_folder, inputs_from_labels_csv, run_audit, write_outputs
    from radregion.bundle import load_bundle, resolve_model

    if args.folds < 2:
        raise ValueError("--folds must be at least 2")
    if args.images_root and not args.labels:
        raise ValueError("--images-root goes with --labels")
    bundles = [load_bundle(resolve_model(path)) for path in (args.model or [None])]
    if args.labels:
        inputs = inputs_from_labels_csv(args.labels, args.images_root, bundles[0].taxonomy())
    else:
        inputs = inputs_from_dicom_folder(args.dicom_folder, bundles[0].taxonomy())
    result = run_audit(bundles, inputs, method=args.method, folds=args.folds, seed=args.seed, workers=args.workers)
    files = write_outputs(result, args.output, bundles[0], max_rows=args.max_report_rows, gradcam=not args.no_gradcam)
    for error in result.errors:
        print(f"radregion audit: skipped {error}", file=sys.stderr)
    if note := result.training_note():
        print(f"radregion audit: warning: {note}", file=sys.stderr)
    counts = result.counts()
    print(
        f"{counts['images']} images: {counts['issues']} suspected label errors, {counts['out_of_domain']} "
        f"out of domain, {counts['unlabelled']} without a label ({counts['suggestions']} suggested), "
        f"{counts['unreadable']} unreadable"
    )
    for path in files.values():
        print(path)
    return 0
