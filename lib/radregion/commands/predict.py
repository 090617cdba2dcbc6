"""`radregion predict`: a region, confidence and out-of-domain flag for every radiograph given."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from radregion.atomic import atomic_write
from radregion.prediction_csv import COLUMNS, write_predictions  # noqa: F401  (COLUMNS: the CSV's, for callers)


def register(subparsers):
    parser = subparsers.add_parser(
        "predict",
        help="predict the anatomical region of radiographs",
        description="Predict the region of each radiograph (files or folders, recursive; DICOM, PNG, JPEG, "
        "ITK formats). Unreadable files get their reason in the error column; the exit status is "
        "non-zero only when nothing could be read.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    parser.add_argument(
        "--model",
        action="append",
        metavar="BUNDLE",
        help="model bundle (default: $RADREGION_MODEL or the shipped model); repeat to ensemble",
    )
    parser.add_argument("--output", "-o", metavar="CSV", help="write the CSV here (atomically); default stdout")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="decoding processes (0: in-process)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32"),
        default="auto",
        help="auto: fp32 on a CPU (ONNX Runtime: the same answers on every CPU), bf16 on a GPU (fp16 without "
        "bf16); fp32: full precision everywhere",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def collect_inputs(inputs) -> tuple[list[str], dict[str, str]]:
    """Files to predict (folders searched recursively) and {path: error} for inputs that are not usable."""
    from radregion.io import find_radiographs

    paths, errors = [], {}
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found, problems = find_radiographs(path)
            paths += [str(p) for p in found]
            for problem in problems:
                errors[str(getattr(problem, "path", path))] = getattr(problem, "problem", str(problem))
        elif path.exists():
            paths.append(str(path))
        else:
            errors[str(path)] = "no such file or folder"
    return paths, errors


def run(args) -> int:
    from radregion.startup import skip_unused_imports

    if getattr(args, "fresh_process", False):
        skip_unused_imports()
    from radregion.bundle import resolve_model
    from radregion.cli import print_problems
    from radregion.inference import Prediction, Predictor

    models = [resolve_model(m) for m in args.model] if args.model else [resolve_model()]
    paths, input_errors = collect_inputs(args.inputs)
    predictor = Predictor(
        models if len(models) > 1 else models[0], device=args.device, workers=args.workers, precision=args.precision
    )

    def predictions():
        for path, problem in input_errors.items():
            yield Prediction(path, None, math.nan, error=problem)
        yield from predictor.predict(paths, batch_size=args.batch_size, progress=not args.no_progress)

    if args.output:
        with atomic_write(args.output, "w", encoding="utf-8", newline="") as handle:
            counts = write_predictions(predictions(), predictor.regions, handle)
    else:
        counts = write_predictions(predictions(), predictor.regions, sys.stdout)
        sys.stdout.flush()
    unreadable = counts["total"] - counts["read"]
    print(
        f"radregion predict: {counts['read']} of {counts['total']} images predicted, {unreadable} unreadable, "
        f"{counts['out_of_domain']} out of domain (model {predictor.version})"
        + (f" -> {args.output}" if args.output else ""),
        file=sys.stderr,
    )
    print_problems("predict", counts["errors"], where_all=" (every reason is in the CSV's error column)")
    if counts["read"] == 0:
        print("radregion predict: error: no image could be read", file=sys.stderr)
        return 1
    return 0
