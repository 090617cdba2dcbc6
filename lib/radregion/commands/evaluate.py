"""`radregion evaluate`: top-1, macro recall, per-region recall with bootstrap CIs and a confusion matrix."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers):
    parser = subparsers.add_parser(
        "evaluate",
        help="measure a model on labelled images",
        description="Top-1 (an image with several regions is right if the prediction is any of them), macro "
        "recall, per-region recall, bootstrap 95% CIs (patients resampled), a confusion-matrix PNG, "
        "and the out-of-domain AUROC when the labels include out-of-domain images (Others).",
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="BUNDLE",
        help="bundle (default: the shipped model); repeat to evaluate an ensemble",
    )
    parser.add_argument("--labels", required=True, metavar="CSV")
    parser.add_argument("--images-root", metavar="DIR", help="default: the CSV's folder")
    parser.add_argument(
        "--output",
        default="evaluation",
        metavar="DIR",
        help="writes figures.json, confusion.png, predictions.csv here (default ./evaluation)",
    )
    parser.add_argument(
        "--exclude-regions",
        nargs="+",
        default=[],
        metavar="REGION",
        help="more out-of-domain regions besides the taxonomy's own (Others in unifesp22): scored by the OOD flag only",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="resamples for the CIs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--precision", choices=("auto", "fp32"), default="auto", help="as `radregion predict --precision`"
    )
    return parser


def run(args) -> int:
    import numpy as np

    from radregion.atomic import atomic_write
    from radregion.bundle import load_bundle, resolve_model, trained_on
    from radregion.cli import print_problems
    from radregion.datasets import read_labels_csv
    from radregion.evaluate import evaluate_predictions, plot_confusion, write_json
    from radregion.head import out_of_domain_regions
    from radregion.inference import Predictor
    from radregion.prediction_csv import write_predictions

    models = [resolve_model(m) for m in args.model] if args.model else [resolve_model()]
    bundles = [load_bundle(m) for m in models]
    taxonomy = bundles[0].taxonomy()
    exclude = taxonomy.check_names(args.exclude_regions, "--exclude-regions")
    # missing files count as unreadable; labels the model's taxonomy does not know are an error
    items = read_labels_csv(args.labels, args.images_root, taxonomy=taxonomy, check_files=False)
    predictor = Predictor(bundles if len(bundles) > 1 else bundles[0], workers=args.workers, precision=args.precision)
    for bundle in bundles:
        seen, sources, _ = trained_on(bundle, [it.path for it in items], include_head=True)
        if seen.any():
            listed = f"listed in {', '.join(sources)} or " if sources else ""
            print(
                f"radregion evaluate: warning: {bundle.path} was trained with the labels of {int(seen.sum())} of "
                f"these {len(items)} images ({listed}in the training set stored with its head): the figures are "
                "in-sample for them (evaluate on a held-out split)",
                file=sys.stderr,
            )
    predictions = list(predictor.predict([it.path for it in items], batch_size=args.batch_size, progress=True))
    ood_regions = out_of_domain_regions(taxonomy, exclude)
    figures = evaluate_predictions(predictions, items, predictor.regions, ood_regions, args.bootstrap, args.seed)
    figures.update(
        {
            "model": [str(m) for m in models],
            "model_version": predictor.version,
            "labels": str(args.labels),
            "precision": args.precision,
        }
    )

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(figures, out / "figures.json")
    plot_confusion(
        np.array(figures["confusion"]["matrix"]),
        figures["confusion"]["regions"],
        out / "confusion.png",
        title=f"{Path(str(models[0])).name}: top-1 {figures['top1']:.3f}",
    )
    with atomic_write(out / "predictions.csv", "w", encoding="utf-8", newline="") as handle:
        write_predictions(predictions, predictor.regions, handle)

    ci = figures.get("ci95", {})
    ood = figures["out_of_domain"]
    lines = [
        f"images: {figures['n_images']} in-domain ({len(figures['unreadable'])} unreadable), "
        f"{ood['n_out_of_domain']} out-of-domain",
        f"top-1: {figures['top1']:.3f} {_ci(ci.get('top1'))}",
        f"macro recall: {figures['macro_recall']:.3f} {_ci(ci.get('macro_recall'))}",
    ]
    if ood["auroc"] is not None:
        lines.append(
            f"OOD AUROC: {ood['auroc']:.3f}; flagged: {ood['flagged_out_of_domain']:.2f} of out-of-domain, "
            f"{ood['flagged_in_domain']:.2f} of in-domain"
        )
    lines.append(
        "per-region recall: "
        + ", ".join(
            f"{r} {v:.2f} (n={figures['per_region_count'][r]})"
            for r, v in figures["per_region_recall"].items()
            if v is not None
        )
    )
    lines.append(f"written: {out / 'figures.json'}, {out / 'confusion.png'}, {out / 'predictions.csv'}")
    print("\n".join(lines))
    print_problems(
        "evaluate",
        [f"{e['path']}: {e['error']}" for e in figures["unreadable"]],
        where_all=f" (all in {out / 'figures.json'})",
    )
    return 0


def _ci(pair) -> str:
    return f"(95% CI {pair[0]:.3f}-{pair[1]:.3f})" if pair else ""
