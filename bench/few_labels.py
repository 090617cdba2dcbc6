"""Few-label curves: a linear head on each frozen backbone with 1, 5, 20 and all labelled train images per region.

Every step is a `radregion` command (fit-head with seed 0, then evaluate on the test CSV) run by bench/study.py's
`Study` (logged in WORK/commands.log, skipped when its output exists); the figures go to WORK/study.json, a table
on screen and, with --plot, top-1 and macro recall against labels per region (bench/study_figures.label_plot).
Backbones are given as NAME=BUNDLE.

    .venv/bin/python bench/few_labels.py --backbone "ImageNet Lite0=runs/model-s1/imagenet" \\
        --backbone "ImageNet + SimCLR=runs/ssl/simclr-imagenet" --train runs/model-s1/train.csv \\
        --test runs/model-s1/test.csv --work runs/few_labels --plot docs/imagenet_labels.png
"""

import argparse
from pathlib import Path
from types import SimpleNamespace

from study import Study
from study_figures import SHOTS, label_plot, majority_top1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", action="append", required=True, metavar="NAME=BUNDLE")
    parser.add_argument("--train", required=True, metavar="CSV")
    parser.add_argument("--test", required=True, metavar="CSV")
    parser.add_argument("--work", required=True, metavar="DIR")
    parser.add_argument("--plot", metavar="PNG")
    args = parser.parse_args(argv)
    study = Study(SimpleNamespace(work=args.work))  # its command runner, log and results file (WORK/study.json)
    study.train, study.test = Path(args.train).resolve(), Path(args.test).resolve()
    backbones = dict(b.split("=", 1) for b in args.backbone)
    for n, (name, bundle) in enumerate(backbones.items()):
        for k in SHOTS:
            arm, key = f"arm{n}", f"arm{n}/{k}"
            fitted = study.head(arm, k, backbone=str(Path(bundle).resolve()))
            evaluated = study.evaluate(f"{arm}_k{k}", [f"heads/{arm}_k{k}"])
            study.record(key, [fitted, evaluated], study.work / "evaluations" / f"{arm}_k{k}")
            r = study.results[key]
            lo, hi = r["ci95_top1"]
            print(f"{name:>24} K={k:>3}: top-1 {r['top1']:.3f} ({lo:.3f}-{hi:.3f}), ", end="")
            print(f"macro recall {r['macro_recall']:.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        labels = {f"arm{n}": name for n, name in enumerate(backbones)}
        label_plot(
            study.results, Path(args.plot), majority_top1(args.test), labels, title="Linear head on frozen features"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
