"""Evaluation figures on hand-computed cases, and `radregion evaluate` on real images."""

import csv
import json

import numpy as np
import pytest

from radregion.cli import main
from radregion.evaluate import confusion, summarise


def test_summarise_hand_computed():
    predicted = ["A", "B", "A", None]
    truths = [("A",), ("A", "B"), ("B",), ("A",)]  # the second is right: B is one of its regions
    figures = summarise(predicted, truths, ["A", "B"], n_boot=0)
    assert figures["top1"] == pytest.approx(2 / 4)
    assert figures["per_region_recall"] == {"A": pytest.approx(2 / 3), "B": pytest.approx(1 / 2)}
    assert figures["macro_recall"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert figures["per_region_count"] == {"A": 3, "B": 2}


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    truths = [(r,) for r in rng.choice(["A", "B", "C"], 300)]
    predicted = [t[0] if rng.random() < 0.8 else "A" for t in truths]
    groups = [f"p{i // 3}" for i in range(300)]
    a = summarise(predicted, truths, ["A", "B", "C"], groups=groups, n_boot=300, seed=1)
    b = summarise(predicted, truths, ["A", "B", "C"], groups=groups, n_boot=300, seed=1)
    assert a["ci95"] == b["ci95"] and a["ci95"]["unit"] == "patient"
    low, high = a["ci95"]["top1"]
    assert low < a["top1"] < high and high - low < 0.2
    low, high = a["ci95"]["macro_recall"]
    assert low < a["macro_recall"] < high


def test_confusion_counts_multi_label_as_right():
    matrix = confusion(["A", "B", None], [("A",), ("A", "B"), ("B",)], ["A", "B"])
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 1]]


def test_evaluate_command_writes_figures_and_png(tiny_bundle, unifesp, tmp_path, capsys):
    with open(unifesp / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    chosen, seen = [], {}
    for row in rows:  # two images per region, Others included (scored by the OOD flag only)
        if seen.get(row["labels"], 0) < 2:
            seen[row["labels"]] = seen.get(row["labels"], 0) + 1
            chosen.append(row)
    chosen.append({**chosen[0], "image": "images/does-not-exist.png"})
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_bundle),
            "--labels",
            str(labels),
            "--images-root",
            str(unifesp),
            "--output",
            str(out),
            "--bootstrap",
            "200",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures = json.loads((out / "figures.json").read_text())
    n_others = sum(r["labels"] == "Others" for r in chosen)
    assert figures["n_images"] == len(chosen) - n_others
    assert figures["out_of_domain"]["n_out_of_domain"] == n_others and figures["out_of_domain"]["auroc"] is not None
    assert len(figures["unreadable"]) == 1 and figures["ci95"]["resamples"] == 200
    assert 0 <= figures["top1"] <= 1 and set(figures["per_region_recall"]) >= {"Chest", "Hand"}
    assert len((out / "predictions.csv").read_text().splitlines()) == len(chosen) + 1
    assert "top-1:" in capsys.readouterr().out
