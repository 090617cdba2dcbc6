"""Distillation (`radregion.distill`, `fit-head --teacher`): the mixed targets against Hinton et al.'s weighted
loss computed by torch, the teacher's columns, and a real fine-tune on a real `radregion predict` CSV."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from radregion.bundle import load_bundle
from radregion.cli import main
from radregion.datasets import read_labels_csv, sample_per_class, write_labels_csv
from radregion.distill import Teacher, distilled_targets, teacher_distributions


def test_mixed_targets_give_hintons_weighted_loss():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(6, 5)))
    labels = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0]]
    teacher = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
    teacher[5] = np.nan  # an image the teacher did not see
    w = 0.3
    mixed = torch.from_numpy(distilled_targets(labels, teacher, w)).double()
    ce = torch.nn.functional.cross_entropy  # torch's soft-target cross-entropy, per image
    reference = (1 - w) * ce(logits[:5], torch.from_numpy(labels[:5]).double(), reduction="none") + w * ce(
        logits[:5], torch.from_numpy(teacher[:5]).double(), reduction="none"
    )
    assert torch.allclose(ce(logits[:5], mixed[:5], reduction="none"), reference, atol=1e-6)
    assert (mixed[5].numpy() == labels[5]).all()  # unseen: the label alone
    assert np.allclose(mixed.sum(1).numpy(), 1)
    assert np.allclose(distilled_targets(labels, teacher, 1.0)[:5], teacher[:5])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"teacher's weight must be in \(0, 1\]"):
            distilled_targets(labels, teacher, bad)


def test_teacher_columns_are_picked_by_name_and_renormalised():
    probabilities = np.array([[0.2, 0.5, 0.3], [0.6, 0.0, 0.4]])
    got = teacher_distributions(probabilities, ["Knee", "Chest", "Others"], ["Chest", "Knee"])
    assert np.allclose(got, [[0.5 / 0.7, 0.2 / 0.7], [0.0, 1.0]])
    with pytest.raises(ValueError, match="no probability for Hand"):
        teacher_distributions(probabilities, ["Knee", "Chest", "Others"], ["Chest", "Hand"])
    with pytest.raises(ValueError, match="no probability on the head's regions"):
        teacher_distributions(np.array([[0.0, 0.0, 1.0]]), ["Knee", "Chest", "Others"], ["Chest", "Knee"])


def _rows(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_fit_head_distils_a_teachers_answers(tiny_bundle, unifesp, tmp_path, capsys):
    every = read_labels_csv(unifesp / "labels.csv")
    items = sample_per_class([it for it in every if "Others" not in it.labels], 2, seed=1)
    patients = {it.patient_id for it in items}
    others = [it for it in every if "Others" in it.labels and it.patient_id not in patients][:3]
    patients |= {it.patient_id for it in others}
    held = [it for it in every if it.patient_id not in patients and "Others" not in it.labels][:2]
    labels_csv = write_labels_csv(items + others, tmp_path / "train.csv")
    held_csv = write_labels_csv(held, tmp_path / "held.csv")
    # the teacher (here the tiny model) answers for 6 labelled images and 10 unlabelled ones
    folder = tmp_path / "teach"
    folder.mkdir()
    sources = [it.path for it in items[:6]] + sorted((unifesp / "unlabelled").glob("*.png"))[:10]
    for i, source in enumerate(sources):
        (folder / f"{i:02d}.png").symlink_to(source)
    teacher_csv = tmp_path / "teacher.csv"
    assert main(["predict", "--model", str(tiny_bundle), "--no-progress", "-o", str(teacher_csv), str(folder)]) == 0
    teacher = Teacher.from_predictions(teacher_csv)
    assert teacher.regions == load_bundle(tiny_bundle).regions and np.allclose(teacher.probabilities.sum(1), 1, 1e-3)
    flagged = int(teacher.out_of_domain[6:].sum())

    def fit(output, *extra):
        args = ["fit-head", "--model", str(tiny_bundle), "--labels", str(labels_csv), "--fine-tune", "--epochs", "1"]
        return main(args + ["--outlier-exposure", "--seed", "2", "--output", str(tmp_path / output), *extra])

    assert fit("taught", "--teacher", str(teacher_csv), "--teacher-weight", "0.7", "--held-out", str(held_csv)) == 0
    taught = load_bundle(tmp_path / "taught")
    recorded = taught.meta["training"]["head"]["teacher"]
    assert recorded == {
        "predictions": str(teacher_csv.resolve()),
        "weight": 0.7,
        "labelled_images": 6,  # the symlinks resolve to the labelled files
        "unlabelled_images": 10 - flagged,
        "unlabelled_outliers": flagged,
    }
    assert "--teacher" in taught.meta["training"]["command"]
    assert fit("plain") == 0
    plain, tuned = load_bundle(tmp_path / "plain").backbone(), taught.backbone()
    assert "teacher" not in load_bundle(tmp_path / "plain").meta["training"]["head"]
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), tuned.state_dict().values()))
    capsys.readouterr()

    # a teacher that answered for a held-out image would train on the test split
    columns, rows = _rows(teacher_csv)
    rows[-1]["path"] = str(held[0].path)
    leaky = tmp_path / "leaky.csv"
    with leaky.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    assert fit("leak", "--teacher", str(leaky), "--held-out", str(held_csv)) == 2
    err = capsys.readouterr().err
    assert f"{leaky.resolve()}: answers for 1 held-out image(s) (e.g. {Path(held[0].path).resolve()})" in err
    assert fit("weightless", "--teacher", str(teacher_csv), "--teacher-weight", "0") == 2
    assert "teacher's weight must be in (0, 1], not 0.0" in capsys.readouterr().err
    assert fit("labels", "--teacher", str(labels_csv)) == 2
    assert f"{labels_csv}: not a `radregion predict` CSV" in capsys.readouterr().err
    args = ["fit-head", "--model", str(tiny_bundle), "--labels", str(labels_csv), "--teacher", str(teacher_csv)]
    assert main(args + ["--output", str(tmp_path / "frozen")]) == 2
    assert "add --fine-tune" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("leak", "weightless", "labels", "frozen"))
