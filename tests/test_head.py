"""Linear heads and the OOD detector on real features; `radregion fit-head` end to end."""

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis

from radregion.bundle import load_bundle
from radregion.cli import main
from radregion.datasets import read_labels_csv, sample_per_class
from radregion.features import extract_features, load_clean_images
from radregion.head import fit_head
from radregion.ood import METHODS, NEEDS_OUTLIERS, auroc, fit_ood


@pytest.fixture(scope="module")
def real_features(tiny_bundle, unifesp):
    bundle = load_bundle(tiny_bundle)
    items = [it for it in sample_per_class(read_labels_csv(unifesp / "labels.csv"), 5, seed=1) if it.label != "Others"]
    images = load_clean_images([it.path for it in items], bundle.settings)
    return extract_features(bundle.backbone(), images), [it.labels for it in items]


def test_head_learns_real_features(real_features):
    features, labels = real_features
    head = fit_head(features, labels)
    firsts = [lab[0] for lab in labels]
    accuracy = np.mean(np.array(head.predict(features)) == np.array(firsts))
    chance = 1 / len(head.regions)
    assert len(head.regions) == 21
    assert accuracy > 0.8 > 5 * chance
    probs = head.probabilities(features)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


def test_all_labels_train_each_region_of_an_image(real_features):
    features, labels = real_features
    shared = [i for i, lab in enumerate(labels) if len(lab) > 1]
    assert shared  # the sample holds images of several regions (e.g. Hand|Wrist)
    rows = [i for i, lab in enumerate(labels) for _ in lab]
    expanded = fit_head(features[rows], [name for lab in labels for name in lab])
    each = fit_head(features, labels, all_labels=True)
    np.testing.assert_allclose(each.logits(features), expanded.logits(features), rtol=1e-5, atol=1e-4)
    first = fit_head(features, labels)
    assert not np.allclose(each.logits(features[shared]), first.logits(features[shared]), atol=1e-2)


def test_fit_head_input_errors(real_features):
    features, labels = real_features
    with pytest.raises(ValueError, match="at least two regions"):
        fit_head(features[:2], ["Chest", "Chest"])
    with pytest.raises(ValueError, match="no labelled image for region"):
        fit_head(features[:2], ["Chest", "Hand"], regions=["Chest", "Hand", "Knee"])


def test_two_region_head_matches_sklearn_decision(real_features):
    features, labels = real_features
    names = [lab[0] for lab in labels]
    keep = [i for i, n in enumerate(names) if n in ("Chest", "Knee")]
    head = fit_head(features[keep], [names[i] for i in keep])
    assert head.weight.shape == (2, features.shape[1])
    assert head.predict(features[keep]) == [names[i] for i in keep]


def test_mahalanobis_score_matches_scipy(real_features):
    features, labels = real_features
    y = np.array([hash(lab[0]) % 3 for lab in labels])
    detector = fit_ood(features, y, "mahalanobis")
    a = detector.arrays
    z = (features[:5] - a["feature_mean"]) / a["feature_std"]
    expected = [min(mahalanobis(zi, mu, a["precision"].astype(np.float64)) for mu in a["class_means"]) for zi in z]
    np.testing.assert_allclose(detector.score(features[:5]), expected, rtol=1e-3)


def test_knn_score_is_zero_on_the_bank_and_grows_away_from_it(real_features):
    features, _ = real_features
    detector = fit_ood(features, None, "knn", k=1)
    assert np.allclose(detector.score(features[:5]), 0, atol=1e-5)
    far = features[:5] + 50 * features.std(0) * np.random.default_rng(0).standard_normal(features[:5].shape)
    assert (detector.score(far) > 0.3).all()


def test_auroc():
    assert auroc([0.1, 0.2], [0.3, 0.4]) == 1.0 and auroc([0.3], [0.1]) == 0.0 and auroc([], [1.0]) is None


def test_tiny_bundle_ood_threshold_is_calibrated(tiny_bundle):
    metrics = load_bundle(tiny_bundle).meta["metrics"]
    assert metrics["ood"]["in_domain_flagged_fraction"] <= 0.07
    # TINY_PER_CLASS Others images are too few for the classifier score (fitting.MIN_OUTLIERS per fold)
    assert set(metrics["ood"]["auroc_others"]) == set(METHODS) - set(NEEDS_OUTLIERS)
    assert 0 <= metrics["cross_validated"]["top1"] <= 1 and metrics["cross_validated"]["folds"] == 5


def test_fit_head_cli_is_seeded(tiny_bundle, unifesp, tmp_path, capsys):
    out_a, out_b, out_c = (tmp_path / n for n in ("a", "b", "c"))
    args = ["fit-head", "--model", str(tiny_bundle), "--labels", str(unifesp / "labels.csv"), "--per-class", "2"]
    assert main(args + ["--seed", "3", "--output", str(out_a)]) == 0
    assert main(args + ["--seed", "3", "--output", str(out_b)]) == 0
    assert main(args + ["--seed", "4", "--output", str(out_c)]) == 0
    a, b, c = load_bundle(out_a), load_bundle(out_b), load_bundle(out_c)
    assert a.version == b.version != c.version
    assert len(a.regions) == 21 and "Others" not in a.regions
    assert a.meta["metrics"]["n_images"]["out_of_domain"] > 10  # all Others images measure the OOD AUROC
    assert "--per-class 2" in a.meta["training"]["command"]
    assert "cross-validated top-1" in capsys.readouterr().err


def test_fit_head_cli_size_sets_the_new_bundles_input_size(tiny_bundle, unifesp, tmp_path, capsys):
    out = tmp_path / "bigger"
    size = load_bundle(tiny_bundle).settings.size + 16
    assert (
        main(
            [
                "fit-head",
                "--model",
                str(tiny_bundle),
                "--labels",
                str(unifesp / "labels.csv"),
                "--per-class",
                "1",
                "--size",
                str(size),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    bundle = load_bundle(out)
    assert bundle.settings.size == size and f"--size {size}" in bundle.meta["training"]["command"]
    assert (
        main(
            [
                "fit-head",
                "--model",
                str(tiny_bundle),
                "--labels",
                str(unifesp / "labels.csv"),
                "--size",
                "8",
                "--output",
                str(tmp_path / "tiny"),
            ]
        )
        == 2
    )
    assert "--size must be at least 32" in capsys.readouterr().err


def test_fit_head_cli_without_default_model(unifesp, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RADREGION_MODEL", str(tmp_path / "nowhere"))
    code = main(["fit-head", "--labels", str(unifesp / "labels.csv"), "--output", str(tmp_path / "out")])
    assert code == 2 and "no default model" in capsys.readouterr().err


def test_fit_head_cli_fine_tune_changes_the_backbone(tiny_bundle, unifesp, tmp_path):
    out = tmp_path / "tuned"
    assert (
        main(
            [
                "fit-head",
                "--model",
                str(tiny_bundle),
                "--labels",
                str(unifesp / "labels.csv"),
                "--per-class",
                "1",
                "--fine-tune",
                "--epochs",
                "1",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    before, after = load_bundle(tiny_bundle), load_bundle(out)
    changed = [
        k
        for k, v in before.backbone_state().items()
        if v.is_floating_point() and not np.allclose(v.numpy(), after.backbone_state()[k].numpy())
    ]
    assert changed and after.meta["training"]["head"]["fine_tune_epochs"] == 1
    assert after.meta["training"]["head"]["fine_tune_lr"] == 1e-4
    assert after.meta["weights_dtype"] == "float16" and after.regions == before.regions
    assert "--fine-tune" in after.meta["training"]["command"] and "--lr 0.0001" in after.meta["training"]["command"]


def test_the_classifier_score_is_judged_out_of_fold_on_the_out_of_domain_images():
    """With enough Others images the classifier is tried; its AUROC comes from Others images it never saw, in the
    fold of their patient, and it wins only by that honest figure."""
    from radregion.datasets import LabelledImage
    from radregion.fitting import Outliers, _calibrated_ood, _out_of_fold_ood_scores, outlier_folds

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(3, 16))
    y = np.repeat(np.arange(3), 40)
    feats = (centres[y] + rng.normal(size=(120, 16))).astype(np.float32)
    others = (rng.normal(size=(30, 16)) + 3.0 * np.eye(16)[0]).astype(np.float32)
    in_items = [LabelledImage(Path(f"{i}.png"), (str(c),), f"p{i % 40}") for i, c in enumerate(y)]
    ood_items = [LabelledImage(Path(f"o{i}.png"), ("Others",), f"p{i}" if i < 5 else f"q{i}") for i in range(30)]
    fold_of = np.array([i % 5 for i in range(40)])[[i % 40 for i in range(120)]]
    folds = outlier_folds(in_items, fold_of, ood_items, 5, 0)
    assert all(folds[i] == fold_of[i] for i in range(5))  # an in-domain patient's Others share its fold
    outliers = Outliers(others, folds)
    scores = _out_of_fold_ood_scores(feats, y, fold_of, outliers)
    assert np.isfinite(scores["classifier:outliers"]).all()
    detector, aurocs = _calibrated_ood(feats, y, scores, outliers)
    assert set(aurocs) == set(METHODS)
    assert aurocs["classifier"] == auroc(scores["classifier"], scores["classifier:outliers"])
    assert detector.method == max(aurocs, key=aurocs.get)
    assert not Outliers(others[:8], folds[:8]).usable_by_classifier(fold_of)  # too few: not offered


def test_fit_head_cli_held_out_stores_other_patients_features_and_refuses_shared_ones(
    tiny_bundle, unifesp, tmp_path, capsys
):
    from radregion.bundle import label_sources
    from radregion.datasets import patient_split, write_labels_csv

    train, test = patient_split(read_labels_csv(unifesp / "labels.csv"), test_fraction=0.2, seed=0)
    train_csv = write_labels_csv(sample_per_class(train, 1, seed=0), tmp_path / "train.csv")
    held = sample_per_class(test, 2, seed=0)
    test_csv = write_labels_csv(held, tmp_path / "test.csv")
    out = tmp_path / "model"
    args = ["fit-head", "--model", str(tiny_bundle), "--labels", str(train_csv), "--output", str(out)]
    assert main(args + ["--held-out", str(test_csv)]) == 0
    assert "held-out set:" in capsys.readouterr().err
    bundle = load_bundle(out)
    stored = bundle.held_out()
    in_head = [it for it in held if any(lab in bundle.regions for lab in it.labels)]
    assert len(in_head) < len(held)  # the Others images are not in it
    assert stored is not None and len(stored) == len(in_head) == len(stored.features) == len(stored.groups)
    assert stored.truths(bundle.regions) == [next(lab for lab in it.labels if lab in bundle.regions) for it in in_head]
    assert len(np.unique(stored.groups)) == len({it.patient_id for it in in_head})
    # the features of the bundle's own backbone (stored in fp16)
    expected = extract_features(bundle.backbone(), load_clean_images([it.path for it in in_head], bundle.settings))
    assert np.allclose(stored.features, expected, rtol=1e-2, atol=1e-2)
    record = bundle.meta["training"]["held_out"]
    assert record["n_images"] == len(in_head) and record["data"] == str(test_csv.resolve())
    assert record["left_out"]["out_of_domain"] == len(held) - len(in_head)
    assert f"--held-out {test_csv}" in bundle.meta["training"]["command"]
    assert str(test_csv.resolve()) not in label_sources(bundle.meta["training"], include_head=True)  # not trained on
    assert bundle.training_set() is not None and len(bundle.training_set()) != len(stored)

    # a new head on the same backbone and regions keeps it; another backbone drops it (its features are stale)
    kept = bundle.with_head(tmp_path / "kept", bundle.head(), bundle.ood_detector())
    assert np.array_equal(kept.held_out().features, stored.features)
    assert np.array_equal(kept.held_out().targets, stored.targets)
    other = bundle.with_head(
        tmp_path / "other", bundle.head(), bundle.ood_detector(), backbone_state=bundle.backbone().state_dict()
    )
    assert other.held_out() is None and load_bundle(tiny_bundle).held_out() is None

    # held-out images of a training patient are refused, naming the file and the patient; nothing is written
    shared = sample_per_class(train, 1, seed=0)[0]
    leaky_csv = write_labels_csv(held + [shared], tmp_path / "leaky.csv")
    leaky_out = tmp_path / "leaky"
    assert main(args[:-1] + [str(leaky_out), "--held-out", str(leaky_csv)]) == 2
    err = capsys.readouterr().err
    assert str(leaky_csv.resolve()) in err and "share 1 patient(s)" in err and shared.patient_id in err
    assert not leaky_out.exists()
