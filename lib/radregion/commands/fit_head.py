"""`radregion fit-head`: a new bundle with the same backbone and a head + OOD detector fitted on labels."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def register(subparsers):
    parser = subparsers.add_parser(
        "fit-head", help="fit a linear head (and the out-of-domain detector) on labelled images",
        description="Fit a multinomial logistic-regression head on frozen features of a bundle's backbone and "
                    "calibrate the out-of-domain score on patient-grouped held-out folds. Images of "
                    "out-of-domain regions (Others) never go in the head; they measure the OOD AUROC.")
    parser.add_argument("--model", metavar="BUNDLE", help="bundle with the backbone (default: the shipped model)")
    parser.add_argument("--labels", required=True, metavar="CSV", help="labels CSV (image,labels,PatientID,...)")
    parser.add_argument("--images-root", metavar="DIR", help="folder the CSV's image paths are relative to "
                                                             "(default: the CSV's folder)")
    few = parser.add_mutually_exclusive_group()
    few.add_argument("--per-class", type=int, metavar="K", help="use K labelled images per region")
    few.add_argument("--fraction", type=float, metavar="F", help="use this fraction of the labelled images")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--exclude-regions", nargs="+", default=["Others"], metavar="REGION",
                        help="out-of-domain regions: kept out of the head, used for the OOD AUROC (default Others)")
    parser.add_argument("--C", type=float, default=None, dest="C", help="inverse L2 strength (default 0.5)")
    parser.add_argument("--no-class-balance", action="store_true", help="do not weight regions by 1/frequency")
    parser.add_argument("--fine-tune", action="store_true", help="fine-tune the whole backbone first (slow)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of --fine-tune (default 5)")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="peak learning rate of --fine-tune's one-cycle schedule (default 1e-4, a gentle "
                             "update; the default model: 1e-3 for 80 epochs from its SupCon backbone)")
    parser.add_argument("--size", type=int, metavar="PX",
                        help="input size of the new bundle (default: the backbone's; a ResNet takes any size)")
    parser.add_argument("--half", action="store_true", help="store the backbone in fp16 (half the size)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--output", required=True, metavar="BUNDLE", help="the new bundle (replaced atomically)")
    return parser


def run(args) -> int:
    from radregion.bundle import load_bundle, resolve_model
    from radregion.datasets import read_labels_csv, sample_fraction, sample_per_class
    from radregion.head import DEFAULT_C, _taxonomy, out_of_domain_regions, train_head

    bundle = load_bundle(resolve_model(args.model))
    if args.size is not None:
        if args.size < 32:
            raise ValueError("--size must be at least 32")
        bundle.meta["cleaning"]["size"] = args.size
    items = read_labels_csv(args.labels, args.images_root)
    ood_regions = out_of_domain_regions(_taxonomy(bundle), args.exclude_regions)
    in_domain = [it for it in items if any(lab not in ood_regions for lab in it.labels)]
    out_domain = [it for it in items if not any(lab not in ood_regions for lab in it.labels)]
    if args.per_class is not None:
        if args.per_class < 1:
            raise ValueError("--per-class must be at least 1")
        in_domain = sample_per_class(in_domain, args.per_class, seed=args.seed)
    elif args.fraction is not None:
        if not 0 < args.fraction <= 1:
            raise ValueError("--fraction must be in (0, 1]")
        in_domain = sample_fraction(in_domain, args.fraction, seed=args.seed)
    sampling = (f"{args.per_class} per region" if args.per_class is not None
                else f"fraction {args.fraction}" if args.fraction is not None else "all")
    data = (f"{Path(args.labels).resolve()} ({sampling}, seed {args.seed}): {len(in_domain)} in-domain images, "
            f"{len(out_domain)} out-of-domain images for OOD evaluation")
    print(f"radregion fit-head: {data}", file=sys.stderr)
    result = train_head(bundle, in_domain + out_domain, args.output, exclude_regions=args.exclude_regions,
                        class_balanced=not args.no_class_balance, C=args.C if args.C is not None else DEFAULT_C,
                        seed=args.seed, fine_tune_epochs=args.epochs if args.fine_tune else 0, fine_tune_lr=args.lr,
                        data=data, command=command_line(args),
                        workers=args.workers, progress=True, half_backbone=True if args.half else None)
    cv = result.meta["metrics"]["cross_validated"]
    ood = result.meta["metrics"]["ood"]
    ci = cv.get("ci95", {})
    auroc = ood["auroc_others"].get(ood["method"])
    print(f"radregion fit-head: {len(result.regions)} regions; cross-validated top-1 {cv['top1']:.3f} "
          f"{_ci(ci.get('top1'))}, macro recall {cv['macro_recall']:.3f} {_ci(ci.get('macro_recall'))}; "
          f"OOD {ood['method']} AUROC on out-of-domain images "
          f"{'n/a' if auroc is None else f'{auroc:.3f}'} -> {result.path} (version {result.version})",
          file=sys.stderr)
    return 0


def command_line(args) -> str:
    """The command as it could be typed again (rebuilt from the parsed options)."""
    parts = ["radregion", "fit-head"]
    for option in ("model", "labels", "images_root", "per_class", "fraction", "seed", "C", "epochs", "size",
                   "output"):
        value = getattr(args, option)
        if value is not None and not (option == "epochs" and not args.fine_tune):
            parts += [f"--{option.replace('_', '-')}", str(value)]
    parts += ["--lr", str(args.lr)] if args.fine_tune else []
    parts += ["--exclude-regions", *args.exclude_regions]
    parts += ["--fine-tune"] if args.fine_tune else []
    parts += ["--half"] if args.half else []
    parts += ["--no-class-balance"] if args.no_class_balance else []
    return " ".join(shlex.quote(p) for p in parts)


def _ci(pair) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair else ""
