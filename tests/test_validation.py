"""radregion.validation: patient-grouped folds and out-of-fold heads that never judge an image they saw."""

from pathlib import Path

import numpy as np
import pytest

from radregion.datasets import LabelledImage
from radregion.evaluate import macro_recall
from radregion.head import fit_head
from radregion.validation import (
    fold_ids,
    fold_masks,
    label_set_fold_ids,
    out_of_fold_predictions,
    out_of_fold_probabilities,
)


def _items(labels, patients):
    return [LabelledImage(Path(f"{i}.png"), (lab,), p) for i, (lab, p) in enumerate(zip(labels, patients))]


def test_fold_ids_keep_a_patient_in_one_fold_and_stratify():
    labels = ["A"] * 30 + ["B"] * 30
    patients = [f"p{i // 3}" for i in range(60)]  # three images per patient
    folds = fold_ids(_items(labels, patients), k=5, seed=0)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    for patient in set(patients):
        assert len({folds[i] for i, p in enumerate(patients) if p == patient}) == 1
    for fold in range(5):  # both regions in every fold
        assert {labels[i] for i in np.flatnonzero(folds == fold)} == {"A", "B"}
    assert np.array_equal(fold_ids(_items(labels, patients), k=5, seed=0), folds)


def test_fold_ids_cap_k_at_the_patients_and_need_two():
    items = _items(["A", "B", "A", "B"], ["p1", "p1", "p2", "p2"])
    folds = fold_ids(items, k=5)
    assert sorted(set(folds)) == [0, 1] and folds[0] == folds[1] and folds[2] == folds[3]
    with pytest.raises(ValueError, match="at least two patients"):
        fold_ids(items[:2], k=5)


def test_unlabelled_images_are_never_held_out():
    folds = label_set_fold_ids(
        [("A",), (), ("B",), ("A",), ("B",)], ["p1", "p2", "p3", "p4", "p5"], [f"{i}.png" for i in range(5)], k=2
    )
    assert folds[1] == -1 and set(folds[[0, 2, 3, 4]]) == {0, 1}
    assert [(f, list(train), list(test)) for f, train, test in fold_masks([0, -1, 1])] == [
        (0, [False, False, True], [True, False, False]),
        (1, [True, False, False], [False, False, True]),
    ]


def test_out_of_fold_heads_do_not_see_the_rows_they_judge():
    """Random labels on random high-dimensional features: a head that saw a row memorises its label, one that
    did not is at chance. Out-of-fold accuracy must be near chance, in-sample near perfect."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(80, 300)).astype(np.float32)
    labels = [("A", "B")[i] for i in rng.integers(0, 2, 80)]
    folds = fold_ids(_items(labels, [f"p{i}" for i in range(80)]), k=5)
    in_sample = fit_head(features, labels, ["A", "B"], C=100.0).predict(features)
    out_of_fold = out_of_fold_predictions(features, labels, ["A", "B"], folds, C=100.0)
    assert np.mean([p == t for p, t in zip(in_sample, labels)]) > 0.95
    assert np.mean([p == t for p, t in zip(out_of_fold, labels)]) < 0.75


def test_out_of_fold_probabilities_and_extra_rows():
    rng = np.random.default_rng(1)
    centres = {"A": np.zeros(8), "B": np.full(8, 3.0), "C": np.full(8, -3.0)}
    labels = ["A", "B"] * 10
    features = np.stack([centres[lab] + rng.normal(size=8) for lab in labels]).astype(np.float32)
    folds = np.arange(20) % 4
    probs = out_of_fold_probabilities(features, [(lab,) for lab in labels], ["A", "B", "C"], folds)
    assert probs.shape == (20, 3) and np.allclose(probs.sum(1), 1) and (probs[:, 2] == 0).all()
    extra = np.stack([centres["C"] + rng.normal(size=8) for _ in range(5)]).astype(np.float32)
    with_extra = out_of_fold_predictions(
        features, labels, ["A", "B", "C"], folds, extra_features=extra, extra_label_sets=[("C",)] * 5
    )
    assert len(with_extra) == 20 and with_extra == labels  # the extra rows train every fold, are never predicted
    assert (
        out_of_fold_probabilities(
            features,
            [(lab,) for lab in labels],
            ["A", "B", "C"],
            folds,
            extra_features=extra,
            extra_label_sets=[("C",)] * 5,
        )[:, 2].max()
        > 0
    )


def test_a_fold_with_one_region_is_skipped_or_an_error():
    features = np.arange(12, dtype=np.float32).reshape(6, 2)
    labels = ["A", "A", "A", "B", "B", "B"]
    folds = np.array([0, 0, 0, 1, 1, 1])  # each training part holds one region only
    assert out_of_fold_predictions(features, labels, ["A", "B"], folds) == [None] * 6
    with pytest.raises(ValueError, match="too few labelled regions"):
        out_of_fold_probabilities(features, [(lab,) for lab in labels], ["A", "B"], folds)


def test_macro_recall_hand_computed():
    assert macro_recall(["A", "B", "A", None], [("A",), ("A", "B"), ("B",), ("A",)]) == pytest.approx(
        (2 / 3 + 1 / 2) / 2
    )
    assert macro_recall(["A", "A"], ["A", "B"], regions=["A", "B", "C"]) == pytest.approx(0.5)
