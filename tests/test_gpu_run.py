"""bench/gpu/run.sh, the prepared run for a GPU machine, dry-run on the CPU (QUICK=1) on a small payload: its
plumbing end to end (fine-tunes in parallel, heads refitted with the held-out split, evaluation, the ensemble, the
summary, the files packed for the way back)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_run_dry_run_fits_evaluates_and_packs(tiny_bundle, unifesp, tmp_path):
    from radregion.datasets import patient_split, read_labels_csv, sample_per_class, write_labels_csv

    payload = tmp_path / "payload"
    (payload / "unifesp").mkdir(parents=True)
    shutil.copytree(tiny_bundle, payload / "imagenet")
    items = sample_per_class(read_labels_csv(unifesp / "labels.csv"), 3, seed=1)
    train, test = patient_split(items, 0.3, seed=0)
    write_labels_csv(train, payload / "unifesp" / "train.csv")
    write_labels_csv(test, payload / "unifesp" / "test.csv")
    out = tmp_path / "out"
    env = {"QUICK": "1", "PY": sys.executable, "D": str(payload), "W": str(tmp_path / "work"), "OUT": str(out)}
    run = ["bash", "bench/gpu/run.sh"]
    result = subprocess.run(run, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "q64s1: done" in log and "q64s0: done" in log and "failed" not in log, log[-3000:]
    n_in = sum("Others" not in it.labels for it in test)
    for name in ("q64s1", "q64s0", "ens-q"):  # one summary line each, over the held-out in-domain images
        assert f"{name}/evaluation: top1 " in log and f"n={n_in}" in log
    assert {p.name for p in out.iterdir()} == {"log.txt", "results.tgz", "q64s1.tar", "q64s0.tar"}
    with tarfile.open(out / "results.tgz") as packed:
        figures = json.load(packed.extractfile("q64s1/evaluation/figures.json"))
        assert figures["n_images"] == n_in and "ens-q/evaluation/figures.json" in packed.getnames()
    with tarfile.open(out / "q64s1.tar") as bundle:
        assert {"model/bundle.json", "model/model.safetensors"} <= set(bundle.getnames())
