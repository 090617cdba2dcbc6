"""`radregion fit-head`: a new bundle with the same backbone and a head + OOD detector fitted on labels."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def register(subparsers):
    from radregion.distill import DEFAULT_TEACHER_WEIGHT

    parser = subparsers.add_parser(
        "fit-head",
        help="fit a linear head (and the out-of-domain detector) on labelled images",
        description="Fit a multinomial logistic-regression head on frozen features of a bundle's backbone and "
        "calibrate the out-of-domain score on patient-grouped held-out folds. Images of "
        "out-of-domain regions (Others) never go in the head; they measure the OOD AUROC.",
    )
    parser.add_argument("--model", metavar="BUNDLE", help="bundle with the backbone (default: the shipped model)")
    parser.add_argument("--labels", required=True, metavar="CSV", help="labels CSV (image,labels,PatientID,...)")
    parser.add_argument(
        "--images-root",
        metavar="DIR",
        help="folder the CSVs' image paths are relative to (default: each CSV's folder)",
    )
    parser.add_argument(
        "--held-out",
        metavar="CSV",
        help="labels CSV of other patients' images (e.g. the test.csv of `radregion split`): their features are "
        "stored in the bundle as its held-out set, what the server's retraining must not be worse on; refused "
        "when it shares a patient with --labels",
    )
    few = parser.add_mutually_exclusive_group()
    few.add_argument("--per-class", type=int, metavar="K", help="use K labelled images per region")
    few.add_argument("--fraction", type=float, metavar="F", help="use this fraction of the labelled images")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument(
        "--exclude-regions",
        nargs="+",
        default=[],
        metavar="REGION",
        help="more out-of-domain regions besides the taxonomy's own (Others in unifesp22): kept out "
        "of the head, used for the OOD AUROC",
    )
    parser.add_argument(
        "--taxonomy",
        metavar="NAME_OR_FILE",
        help="the region names the labels may use: a built-in taxonomy (unifesp22, paper14) or a "
        "JSON/YAML file (default: the bundle's taxonomy)",
    )
    parser.add_argument("--C", type=float, default=None, dest="C", help="inverse L2 strength (default 0.5)")
    parser.add_argument("--no-class-balance", action="store_true", help="do not weight regions by 1/frequency")
    parser.add_argument("--fine-tune", action="store_true", help="fine-tune the whole backbone first (slow)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of --fine-tune (default 5)")
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="peak learning rate of --fine-tune's one-cycle schedule (default 1e-4, a gentle "
        "update; the default model: 1e-3 for 80 epochs from its SupCon backbone)",
    )
    parser.add_argument(
        "--class-weights",
        choices=("sqrt", "balanced", "none"),
        default="sqrt",
        help="--fine-tune's loss weight per region: sqrt (default) or fully balanced inverse frequency, or none",
    )
    parser.add_argument(
        "--mixup",
        type=float,
        metavar="ALPHA",
        help="--fine-tune mixes pairs of in-domain images and their labels with weights from Beta(ALPHA, ALPHA) "
        "(mixup; e.g. 0.2; default off)",
    )
    parser.add_argument(
        "--ema",
        type=float,
        metavar="DECAY",
        help="--fine-tune keeps a moving average of the backbone's weights with this decay (e.g. 0.99) and uses it "
        "instead of the last weights (default off)",
    )
    parser.add_argument(
        "--sam",
        type=float,
        metavar="RHO",
        help="--fine-tune with sharpness-aware minimisation of radius RHO (e.g. 0.05): each step takes the gradient "
        "at weights moved uphill by RHO, at twice the cost of a plain step (default off)",
    )
    parser.add_argument(
        "--layer-decay",
        type=float,
        metavar="D",
        help="--fine-tune with layer-wise learning-rate decay: each block learns at D times the rate of the block "
        "above it, so the layers nearest the image move least (e.g. 0.9; default off: one rate)",
    )
    parser.add_argument(
        "--label-smoothing",
        type=float,
        metavar="EPS",
        help="--fine-tune's label smoothing of the region targets: each keeps 1 - EPS and shares EPS among all "
        "regions (default 0.1; 0: plain cross-entropy)",
    )
    parser.add_argument(
        "--augment",
        choices=("standard", "strong"),
        default="standard",
        help="--fine-tune's augmentation: standard (default: crop, turns, mirror, mild intensity jitter) or strong "
        "(a wider crop, stronger gamma, blur, noise and cutout rectangles)",
    )
    parser.add_argument(
        "--all-labels",
        action="store_true",
        help="an image of several regions (e.g. Hand|Wrist) trains each of them: fine-tuning towards an equal share "
        "of each, the head on one row per region (default: its first label alone)",
    )
    parser.add_argument(
        "--probe-first",
        action="store_true",
        help="--fine-tune starts its linear layer from a logistic head fitted on the frozen backbone's features "
        "instead of random weights (linear probing then fine-tuning, LP-FT; default off)",
    )
    parser.add_argument(
        "--teacher",
        metavar="PREDICTIONS",
        help="--fine-tune distils a teacher's answers: the CSV `radregion predict` wrote for the training images "
        "and unlabelled ones (one model, or an ensemble with --model repeated). A labelled image trains towards "
        "its label and the teacher's probabilities mixed by --teacher-weight, an unlabelled one towards the "
        "teacher's alone (flagged out-of-domain ones are outliers with --outlier-exposure); none of the "
        "--held-out images may be in it (default off)",
    )
    parser.add_argument(
        "--teacher-weight",
        type=float,
        default=DEFAULT_TEACHER_WEIGHT,
        metavar="W",
        help=f"the teacher's share of a labelled image's target (default {DEFAULT_TEACHER_WEIGHT})",
    )
    parser.add_argument(
        "--outlier-exposure",
        action="store_true",
        help="--fine-tune also pushes out-of-domain images (Others) towards a uniform prediction",
    )
    parser.add_argument(
        "--outlier-loss",
        choices=("uniform", "energy"),
        default="uniform",
        help="with --outlier-exposure: uniform (default; Hendrycks et al. 2019: out-of-domain images towards a "
        "uniform prediction) or energy (Liu et al. 2020: in-domain energies below -25, out-of-domain above -7)",
    )
    parser.add_argument(
        "--outlier-hold-back",
        type=float,
        metavar="F",
        help="with --outlier-exposure: keep this fraction of the out-of-domain images (whole patients, e.g. 0.33) "
        "out of fine-tuning, to choose and judge the out-of-domain score on (default 0: all are exposed, and the "
        "score's AUROC on them is optimistic; keeping a third back cost 0.10 of test AUROC, docs/results.md)",
    )
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda ...")
    parser.add_argument(
        "--size",
        type=int,
        metavar="PX",
        help="input size of the new bundle (default: the backbone's; a ResNet takes any size)",
    )
    parser.add_argument("--half", action="store_true", help="store the backbone in fp16 (half the size)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument(
        "--augment-workers",
        type=int,
        metavar="N",
        help="with --fine-tune: processes that augment the batches ahead of the training step (default: none on a "
        "CPU, on a GPU every core but one, at most 8); the augmentation depends on the seed and this number",
    )
    parser.add_argument(
        "--licence",
        default="unknown",
        metavar="TEXT",
        help="the terms under which the labelled images may be used (recorded in the bundle with "
        "the backbone's; default unknown)",
    )
    parser.add_argument("--output", required=True, metavar="BUNDLE", help="the new bundle (replaced atomically)")
    return parser


def run(args) -> int:
    from radregion.bundle import combined_licence, load_bundle, resolve_model
    from radregion.datasets import read_labels_csv, sample_fraction, sample_per_class
    from radregion.distill import Teacher
    from radregion.fitting import DEFAULT_OUTLIER_HOLD_BACK, check_held_out, split_in_domain, train_head
    from radregion.head import DEFAULT_C, out_of_domain_regions
    from radregion.taxonomy import load_taxonomy

    if args.outlier_hold_back is not None and not 0 <= args.outlier_hold_back < 1:
        raise ValueError(f"--outlier-hold-back must be at least 0 and below 1, not {args.outlier_hold_back}")
    if args.mixup is not None and not args.mixup > 0:
        raise ValueError(f"--mixup must be above 0, not {args.mixup}")
    if args.ema is not None and not 0 < args.ema < 1:
        raise ValueError(f"--ema must be between 0 and 1, not {args.ema}")
    if args.sam is not None and not args.sam > 0:
        raise ValueError(f"--sam must be above 0, not {args.sam}")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise ValueError(f"--layer-decay must be above 0 and at most 1, not {args.layer_decay}")
    if args.label_smoothing is not None and not 0 <= args.label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be at least 0 and below 1, not {args.label_smoothing}")
    if args.augment_workers is not None and args.augment_workers < 0:
        raise ValueError(f"--augment-workers must be 0 or more, not {args.augment_workers}")
    if args.outlier_loss != "uniform" and not (args.fine_tune and args.outlier_exposure):
        raise ValueError("--outlier-loss is outlier exposure's loss in fine-tuning: add --fine-tune --outlier-exposure")
    if args.teacher and not args.fine_tune:
        raise ValueError("--teacher's answers are distilled by fine-tuning: add --fine-tune")
    teacher = Teacher.from_predictions(args.teacher, args.teacher_weight) if args.teacher else None

    bundle = load_bundle(resolve_model(args.model))
    if args.size is not None:
        if args.size < 32:
            raise ValueError("--size must be at least 32")
        bundle.meta["cleaning"]["size"] = args.size
    if args.taxonomy:
        taxonomy = load_taxonomy(args.taxonomy)
        bundle.meta["taxonomy"] = {"name": taxonomy.name, "definition": taxonomy.to_dict()}  # the new head's
    else:
        taxonomy = bundle.taxonomy()
    args.exclude_regions = list(taxonomy.check_names(args.exclude_regions, "--exclude-regions"))
    items = read_labels_csv(args.labels, args.images_root, taxonomy=taxonomy)
    held_out = None
    if args.held_out:
        held_out = read_labels_csv(args.held_out, args.images_root, taxonomy=taxonomy)
        check_held_out(items, held_out, Path(args.held_out).resolve(), f"--labels {Path(args.labels).resolve()}")
    in_domain, _, out_domain = split_in_domain(items, out_of_domain_regions(taxonomy, args.exclude_regions))
    bundle.meta["licence"] = combined_licence(args.licence, bundle.meta.get("licence"))
    if args.per_class is not None:
        if args.per_class < 1:
            raise ValueError("--per-class must be at least 1")
        in_domain = sample_per_class(in_domain, args.per_class, seed=args.seed)
    elif args.fraction is not None:
        if not 0 < args.fraction <= 1:
            raise ValueError("--fraction must be in (0, 1]")
        in_domain = sample_fraction(in_domain, args.fraction, seed=args.seed)
    sampling = (
        f"{args.per_class} per region"
        if args.per_class is not None
        else f"fraction {args.fraction}"
        if args.fraction is not None
        else "all"
    )
    data = (
        f"{Path(args.labels).resolve()} ({sampling}, seed {args.seed}): {len(in_domain)} in-domain images, "
        f"{len(out_domain)} out-of-domain images for OOD evaluation"
    )
    print(f"radregion fit-head: {data}", file=sys.stderr)
    result = train_head(
        bundle,
        in_domain + out_domain,
        args.output,
        exclude_regions=args.exclude_regions,
        class_balanced=not args.no_class_balance,
        C=args.C if args.C is not None else DEFAULT_C,
        seed=args.seed,
        fine_tune_epochs=args.epochs if args.fine_tune else 0,
        fine_tune_lr=args.lr,
        class_weights=args.class_weights,
        mixup=args.mixup,
        ema=args.ema,
        sam=args.sam,
        augment=args.augment,
        layer_decay=args.layer_decay,
        label_smoothing=args.label_smoothing,
        probe_first=args.probe_first,
        all_labels=args.all_labels,
        teacher=teacher,
        augment_workers=args.augment_workers,
        outlier_exposure=args.outlier_exposure,
        outlier_loss=args.outlier_loss,
        outlier_hold_back=DEFAULT_OUTLIER_HOLD_BACK if args.outlier_hold_back is None else args.outlier_hold_back,
        device=args.device,
        data=data,
        command=command_line(args),
        workers=args.workers,
        progress=True,
        half_backbone=True if args.half else None,
        held_out=held_out,
        held_out_data=str(Path(args.held_out).resolve()) if args.held_out else None,
    )
    cv = result.meta["metrics"]["cross_validated"]
    ood = result.meta["metrics"]["ood"]
    ci = cv.get("ci95", {})
    auroc = ood["auroc_others"].get(ood["method"])
    print(
        f"radregion fit-head: {len(result.regions)} regions; cross-validated top-1 {cv['top1']:.3f} "
        f"{_ci(ci.get('top1'))}, macro recall {cv['macro_recall']:.3f} {_ci(ci.get('macro_recall'))}; "
        f"OOD {ood['method']} AUROC on out-of-domain images "
        f"{'n/a' if auroc is None else f'{auroc:.3f}'} -> {result.path} (version {result.version})",
        file=sys.stderr,
    )
    if ood.get("note"):
        print(f"radregion fit-head: OOD AUROC {ood['note']}", file=sys.stderr)
    held = result.meta["training"].get("held_out")
    if held:
        left = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in held["left_out"].items() if n)
        print(
            f"radregion fit-head: held-out set: {held['n_images']} images of {held['n_patients']} patients stored "
            f"from {held['data']}{f' (left out: {left})' if left else ''}",
            file=sys.stderr,
        )
    seen = backbone_saw(bundle, in_domain)
    if seen:
        print(f"radregion fit-head: note: {seen}", file=sys.stderr)
    return 0


def backbone_saw(bundle, items) -> str | None:
    """Words on the labels the backbone was trained with (fine-tuning, SupCon) where they may include `items`:
    then the cross-validated figures are optimistic, since only the head is held out. None when it saw none."""
    from radregion.bundle import trained_on

    seen, sources, unreadable = trained_on(bundle, [item.path for item in items])
    advice = "measure the model with `radregion evaluate` on images it has not seen"
    if seen.any() and not unreadable:
        return (
            f"the backbone was trained with labels from {', '.join(sources)}, which list {int(seen.sum())} of "
            f"these {len(items)} in-domain images: the cross-validated figures above are optimistic (only the head "
            f"was held out); {advice}"
        )
    if seen.any():
        return (
            f"the backbone was trained with the labels of {', '.join(unreadable)}, which cannot be read here; "
            f"{int(seen.sum())} of these {len(items)} in-domain images trained it or are in the training set stored "
            f"with its head (by content): the cross-validated figures above are optimistic if it was fine-tuned on "
            f"them; {advice}"
        )
    if unreadable:
        return (
            f"the backbone was trained with the labels of {', '.join(unreadable)}, which cannot be read here: "
            "if these images are among them, the cross-validated figures above are optimistic"
        )
    return None


def command_line(args) -> str:
    """The command as it could be typed again (rebuilt from the parsed options)."""
    parts = ["radregion", "fit-head"]
    for option in (
        "model",
        "labels",
        "images_root",
        "held_out",
        "per_class",
        "fraction",
        "seed",
        "C",
        "epochs",
        "size",
        "taxonomy",
        "output",
    ):
        value = getattr(args, option)
        if value is not None and not (option == "epochs" and not args.fine_tune):
            parts += [f"--{option.replace('_', '-')}", str(value)]
    parts += ["--lr", str(args.lr)] if args.fine_tune else []
    parts += ["--exclude-regions", *args.exclude_regions] if args.exclude_regions else []
    parts += ["--fine-tune", "--class-weights", args.class_weights] if args.fine_tune else []
    parts += ["--augment", args.augment] if args.fine_tune and args.augment != "standard" else []
    for option in ("mixup", "ema", "sam", "layer_decay", "label_smoothing", "augment_workers"):
        value = getattr(args, option)
        parts += [f"--{option.replace('_', '-')}", str(value)] if args.fine_tune and value is not None else []
    parts += ["--probe-first"] if args.fine_tune and args.probe_first else []
    parts += ["--all-labels"] if args.all_labels else []
    parts += ["--teacher", args.teacher, "--teacher-weight", str(args.teacher_weight)] if args.teacher else []
    if args.fine_tune and args.outlier_exposure:
        parts += ["--outlier-exposure"]
        parts += ["--outlier-loss", args.outlier_loss] if args.outlier_loss != "uniform" else []
        parts += ["--outlier-hold-back", str(args.outlier_hold_back)] if args.outlier_hold_back is not None else []
    parts += ["--half"] if args.half else []
    parts += ["--licence", args.licence] if args.licence != "unknown" else []
    parts += ["--no-class-balance"] if args.no_class_balance else []
    return " ".join(shlex.quote(p) for p in parts)


def _ci(pair) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair else ""
