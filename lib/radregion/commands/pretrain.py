"""`radregion pretrain`: self-supervised pretraining of a backbone into a bundle (no head yet)."""

import argparse
import os
import sys

# Spelled out so that `radregion --help` does not import torch and MONAI (seconds); test_pretrain checks they match
# radregion.pretrain.METHODS and radregion.networks.ARCHITECTURES.
METHODS = ("simclr", "byol", "supcon")
ARCHITECTURES = ("resnet10", "resnet18", "resnet34", "resnet50", "efficientnet-lite0", "efficientnet-lite1")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a backbone with SimCLR, BYOL or SupCon",
        description="Pretrain a backbone on radiographs without (SimCLR, BYOL) or with (SupCon) labels and write it "
        "as a bundle without head (then: radregion fit-head). Runs on as many processes as torchrun "
        "starts: torchrun --nproc_per_node N -m radregion.cli pretrain ...",
    )
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="DIR_OR_CSV",
        help="folders of radiographs (searched recursively) and/or labels CSVs (SupCon uses the labels)",
    )
    p.add_argument("--output", required=True, metavar="BUNDLE", help="bundle folder to write")
    p.add_argument("--arch", default="resnet18", choices=ARCHITECTURES)
    p.add_argument(
        "--init",
        choices=("random", "imagenet"),
        default="random",
        help="start from random weights (default) or the installed ImageNet weights (efficientnet-lite0 and -lite1)",
    )
    p.add_argument("--size", type=int, default=128, help="input size in pixels (default 128)")
    p.add_argument(
        "--epochs",
        type=int,
        default=100,
        help="default 100; 0 writes the starting backbone (random or --init imagenet) for fit-head --fine-tune",
    )
    p.add_argument("--batch-size", type=int, default=64, help="per process (default 64)")
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 1e-3 x sqrt(global batch / 256))"
    )
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--temperature", type=float, default=None, help="SimCLR 0.2, SupCon 0.1 by default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gauge", dest="gauge", action="store_false", help="without the gauge augmentation")
    p.add_argument(
        "--no-clean",
        dest="clean",
        action="store_false",
        help="no border crop or percentile windowing (for the ablation)",
    )
    p.add_argument("--resume", action="store_true", help="continue from BUNDLE.checkpoint.pt")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="stop after this many epochs leaving the checkpoint (for time-limited jobs)",
    )
    p.add_argument("--log-dir", default=None, help="TensorBoard folder (default runs/DATE_HOST)")
    p.add_argument("--workers", type=int, default=None, help="data loader processes per training process")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="auto: bf16 autocast on CPU, bf16/fp16 AMP on GPU",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--licence",
        default="unknown",
        metavar="TEXT",
        help="the terms under which the images may be used (recorded in the bundle; default unknown)",
    )
    return p


def run(args) -> int:
    from radregion.pretrain import pretrain

    result = pretrain(
        args.method,
        args.images,
        args.output,
        arch=args.arch,
        size=args.size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
        gauge=args.gauge,
        clean=args.clean,
        workers=args.workers,
        resume=args.resume,
        log_dir=args.log_dir,
        device=args.device,
        precision=args.precision,
        temperature=args.temperature,
        stop_after=args.stop_after,
        progress=args.progress,
        command=["radregion"] + sys.argv[1:],
        init=None if args.init == "random" else args.init,
        licence=args.licence,
    )
    if result is None:
        print(f"stopped after {args.stop_after} epoch(s); continue with --resume")
    elif os.environ.get("RANK", "0") == "0":
        print(f"wrote {result}")
    return 0
