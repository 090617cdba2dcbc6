"""The study's comparison on the shared UNIFESP radiographs, every step a `radregion` command.

    .venv/bin/python bench/study.py [--data ../shared/data/unifesp] [--work runs/study] [--epochs 10]

Patient split (`radregion split --seed 0`), then backbones at equal epochs on the train images plus the unlabelled
ones: SimCLR, BYOL, SupCon (train labels used), SimCLR without the gauge augmentation, SimCLR without cleaning.
Linear heads on frozen features with K = 1, 5, 20 train images per region and with all of them; the SimCLR + BYOL +
SupCon ensemble; a supervised-from-scratch baseline (random backbone fine-tuned on the same K images, the same
image budget at every K). Writes WORK/study.json (figures + the command of each), WORK/commands.log, and
docs/study_labels.png, docs/study_gradcam.png, docs/study_tsne.png; prints the tables. A step whose output
exists is skipped, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RADREGION = str(Path(sys.executable).parent / "radregion")
SHOTS = ("1", "5", "20", "all")
SSL_ARMS = {  # arm -> extra `radregion pretrain` options
    "simclr": ["--method", "simclr"],
    "byol": ["--method", "byol"],
    "supcon": ["--method", "supcon"],
    "simclr-no-gauge": ["--method", "simclr", "--no-gauge"],
    "simclr-no-clean": ["--method", "simclr", "--no-clean"],
}
ENSEMBLE = ("simclr", "byol", "supcon")
SCRATCH_IMAGE_BUDGET = 15_000  # images seen by each supervised-from-scratch run (about 15 epochs of all labels)


class Study:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.results_file = self.work / "study.json"
        self.results = json.loads(self.results_file.read_text()) if self.results_file.exists() else {}
        self.train, self.test = self.work / "train.csv", self.work / "test.csv"

    def run(self, name, args, output):
        """Run one radregion command unless its output exists; log it."""
        output = Path(output)
        command = [RADREGION, *args]
        shown = "radregion " + " ".join(shlex.quote(str(a)) for a in args)
        if output.exists():
            return shown
        print(f"[study] {name}: {shown}", file=sys.stderr, flush=True)
        start = time.time()
        with open(self.work / "commands.log", "a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} {shown}\n")
            log.flush()
            done = subprocess.run(command, stdout=log, stderr=log, cwd=self.work)
            log.write(f"    -> exit {done.returncode} after {time.time() - start:.0f} s\n")
        if done.returncode != 0:
            raise SystemExit(f"[study] {name} failed (exit {done.returncode}); see {self.work / 'commands.log'}")
        return shown

    def record(self, key, command, evaluation):
        figures = json.loads((Path(evaluation) / "figures.json").read_text())
        self.results[key] = {
            "top1": figures["top1"],
            "macro_recall": figures["macro_recall"],
            "ci95_top1": figures["ci95"]["top1"],
            "n_images": figures["n_images"],
            "ood_auroc": (figures.get("out_of_domain") or {}).get("auroc"),
            "commands": command,
        }
        self.results_file.write_text(json.dumps(self.results, indent=1))

    # ---- steps --------------------------------------------------------------------------------------
    def split(self):
        data = Path(self.args.data).resolve()
        self.run(
            "split",
            ["split", "--labels", data / "labels.csv", "--test-fraction", "0.2", "--seed", "0", "--output", self.work],
            self.test,
        )

    def pretrain(self, arm):
        a = self.args
        return self.run(
            f"pretrain {arm}",
            [
                "pretrain",
                *SSL_ARMS[arm],
                "--images",
                self.train,
                Path(a.data).resolve() / "unlabelled",
                "--output",
                f"backbones/{arm}",
                "--arch",
                a.arch,
                "--size",
                str(a.size),
                "--epochs",
                str(a.epochs),
                "--batch-size",
                "64",
                "--workers",
                "2",
                "--seed",
                "0",
                "--log-dir",
                f"tensorboard/{arm}",
                "--no-progress",
            ],
            self.work / "backbones" / arm,
        )

    def head(self, arm, shots, extra=(), backbone=None):
        few = [] if shots == "all" else ["--per-class", shots]
        return self.run(
            f"head {arm} K={shots}",
            [
                "fit-head",
                "--model",
                backbone or f"backbones/{arm}",
                "--labels",
                self.train,
                *few,
                "--seed",
                "0",
                *extra,
                "--output",
                f"heads/{arm}_k{shots}",
            ],
            self.work / "heads" / f"{arm}_k{shots}",
        )

    def evaluate(self, key, models):
        models_args = [x for m in models for x in ("--model", m)]
        return self.run(
            f"evaluate {key}",
            ["evaluate", *models_args, "--labels", self.test, "--output", f"evaluations/{key}"],
            self.work / "evaluations" / key,
        )

    def scratch(self, shots):
        self.run(
            "random backbone",
            [
                "pretrain",
                "--method",
                "simclr",
                "--images",
                self.train,
                "--output",
                "backbones/random",
                "--arch",
                self.args.arch,
                "--size",
                str(self.args.size),
                "--epochs",
                "0",
                "--seed",
                "0",
            ],
            self.work / "backbones" / "random",
        )
        n = 21 * int(shots) if shots != "all" else 1010  # in-domain train images (21 regions; K=1 takes 1 each)
        epochs = max(1, math.ceil(SCRATCH_IMAGE_BUDGET / n))
        return self.head(
            "scratch", shots, ["--fine-tune", "--epochs", str(epochs), "--lr", "1e-3"], backbone="backbones/random"
        )

    def arm(self, arm):
        pretrained = self.pretrain(arm)
        for shots in SHOTS:
            key = f"{arm}_k{shots}"
            fitted = self.head(arm, shots)
            evaluated = self.evaluate(key, [f"heads/{key}"])
            self.record(f"{arm}/{shots}", [pretrained, fitted, evaluated], self.work / "evaluations" / key)

    def all(self):
        self.split()
        for arm in ENSEMBLE:
            self.arm(arm)
        for shots in SHOTS:
            evaluated = self.evaluate(f"ensemble_k{shots}", [f"heads/{arm}_k{shots}" for arm in ENSEMBLE])
            self.record(f"ensemble/{shots}", [evaluated], self.work / "evaluations" / f"ensemble_k{shots}")
        for shots in SHOTS:
            fitted = self.scratch(shots)
            evaluated = self.evaluate(f"scratch_k{shots}", [f"heads/scratch_k{shots}"])
            self.record(f"scratch/{shots}", [fitted, evaluated], self.work / "evaluations" / f"scratch_k{shots}")
        for arm in SSL_ARMS:
            if arm not in ENSEMBLE:
                self.arm(arm)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "unifesp"))
    parser.add_argument("--work", default=str(REPO / "runs" / "study"))
    parser.add_argument("--epochs", type=int, default=10, help="pretraining epochs of every arm")
    parser.add_argument("--arch", default="resnet10")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--figures-only", action="store_true", help="only redraw the figures from WORK")
    args = parser.parse_args(argv)
    study = Study(args)
    if not args.figures_only:
        study.all()
    from study_figures import draw_all

    draw_all(study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
