"""Few-label curves: a linear head on each frozen backbone with 1, 5, 20 and all labelled train images per region.

Every step is a `radregion` command (fit-head, then evaluate on the test CSV), logged in WORK/commands.log; the
figures go to WORK/few_labels.json, a table on screen and, with --plot, top-1 and macro recall against labels per
region (bench/study_figures.label_plot). Backbones are given as NAME=BUNDLE.

    .venv/bin/python bench/few_labels.py --backbone "ImageNet Lite0=runs/model-s1/imagenet" \\
        --backbone "ImageNet + SimCLR=runs/ssl/simclr-imagenet" --train runs/model-s1/train.csv \\
        --test runs/model-s1/test.csv --work runs/few_labels --plot docs/imagenet_labels.png
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from study_figures import SHOTS, label_plot

from radregion.datasets import read_labels_csv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", action="append", required=True, metavar="NAME=BUNDLE")
    parser.add_argument("--train", required=True, metavar="CSV")
    parser.add_argument("--test", required=True, metavar="CSV")
    parser.add_argument("--work", required=True, metavar="DIR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    radregion = str(Path(sys.executable).with_name("radregion"))
    backbones = dict(b.split("=", 1) for b in args.backbone)
    results_file = work / "few_labels.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for n, (name, bundle) in enumerate(backbones.items()):
        for k in SHOTS:
            key = f"arm{n}/{k}"
            head, evaluation = work / f"arm{n}_k{k}", work / f"arm{n}_k{k}_evaluation"
            shots = [] if k == "all" else ["--per-class", k]
            for command in (
                [radregion, "fit-head", "--model", bundle, "--labels", args.train, *shots, "--seed", str(args.seed)]
                + ["--output", str(head)],
                [radregion, "evaluate", "--model", str(head), "--labels", args.test, "--output", str(evaluation)],
            ):
                with open(work / "commands.log", "a") as log:
                    log.write(" ".join(command) + "\n")
                    log.flush()
                    if subprocess.run(command, stdout=log, stderr=log).returncode:
                        raise SystemExit(f"failed: {' '.join(command)} (see {work / 'commands.log'})")
            figures = json.loads((evaluation / "figures.json").read_text())
            results[key] = {
                "backbone": name,
                "top1": figures["top1"],
                "macro_recall": figures["macro_recall"],
                "ci95_top1": figures["ci95"]["top1"],
                "ood_auroc": (figures.get("out_of_domain") or {}).get("auroc"),
            }
            results_file.write_text(json.dumps(results, indent=1))
            r = results[key]
            lo, hi = r["ci95_top1"]
            print(
                f"{name:>24} K={k:>3}: top-1 {r['top1']:.3f} ({lo:.3f}-{hi:.3f}), macro recall {r['macro_recall']:.3f}"
            )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        regions = [it.labels[0] for it in read_labels_csv(args.test) if "Others" not in it.labels]
        majority = max(regions.count(r) for r in set(regions)) / len(regions)
        labels = {f"arm{n}": name for n, name in enumerate(backbones)}
        label_plot(results, Path(args.plot), majority, labels, title="Linear head on frozen features")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
