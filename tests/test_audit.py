"""The label audit on real images: flipped labels are found, DICOM-folder mode, the CSV files, bad input."""

import csv
import random
from pathlib import Path

import numpy as np
import pytest

from radregion.audit import issues
from radregion.audit.writer import AUDIT_COLUMNS, write_audit_csv
from radregion.cli import main
from radregion.validation import label_set_fold_ids

# Visually distinct regions, so that even the tiny random-backbone bundle separates them.
REGIONS = ("Chest", "Knee", "Feet", "Pelvis", "Cervical Spine")
PER_REGION = 30
FLIP_RATE = 0.10


def flipped_labels_csv(unifesp: Path, path: Path, seed: int = 0) -> set:
    """A labels CSV of PER_REGION images per region with FLIP_RATE of them relabelled; returns the flipped images."""
    rng = random.Random(seed)
    with open(unifesp / "labels.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["labels"] in REGIONS]
    chosen = []
    for region in REGIONS:
        these = sorted((r for r in rows if r["labels"] == region), key=lambda r: r["image"])
        chosen += rng.sample(these, PER_REGION)
    flipped = set(rng.sample(range(len(chosen)), round(FLIP_RATE * len(chosen))))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "labels", "PatientID"])
        for i, row in enumerate(chosen):
            label = rng.choice([r for r in REGIONS if r != row["labels"]]) if i in flipped else row["labels"]
            writer.writerow([str(unifesp / row["image"]), label, row["PatientID"]])
    return {str(unifesp / chosen[i]["image"]) for i in flipped}


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- issues.py: arrays in, arrays out ---------------------------------------------------------------------


def noisy_probabilities(n=600, classes=6, flip_rate=0.1, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), true] += 4.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels, flipped = true.copy(), rng.random(n) < flip_rate
    labels[flipped] = (true[flipped] + rng.integers(1, classes, flipped.sum())) % classes
    return labels, probs, flipped


@pytest.mark.parametrize("method", issues.METHODS)
def test_find_label_issues_finds_flips(method):
    labels, probs, flipped = noisy_probabilities()
    flagged = issues.find_label_issues(labels, probs, method)
    assert (flagged & flipped).sum() / flagged.sum() >= 0.8
    assert (flagged & flipped).sum() / flipped.sum() >= 0.7
    scores = issues.issue_scores(labels, probs)
    assert scores[flipped].mean() > scores[~flipped].mean() + 0.3


def test_find_label_issues_starts_no_process():
    """The server audits in a process that runs threads: a process pool forked there hung (cleanlab's default)."""
    import sys

    forks = []
    watching = [True]
    sys.addaudithook(lambda event, _: forks.append(event) if watching[0] and event == "os.fork" else None)
    try:
        labels, probs, _ = noisy_probabilities()
        for method in issues.METHODS:
            issues.find_label_issues(labels, probs, method)
    finally:
        watching[0] = False
    assert forks == []


def test_unlabelled_and_out_of_domain_never_flagged():
    labels, probs, flipped = noisy_probabilities()
    labels[:10] = -1
    ood = np.zeros(len(labels), bool)
    ood[np.flatnonzero(flipped)[:5]] = True
    for method in issues.METHODS:
        flagged = issues.find_label_issues(labels, probs, method, out_of_domain=ood)
        assert not flagged[:10].any() and not flagged[ood].any()
        assert np.isnan(issues.issue_scores(labels, probs)[:10]).all()


def test_issues_with_absent_classes_and_bad_input():
    labels, probs, _ = noisy_probabilities(classes=4)
    wide = np.concatenate([probs, np.zeros((len(probs), 3))], axis=1)  # classes nobody was given
    assert issues.find_label_issues(labels, wide).sum() == issues.find_label_issues(labels, probs).sum()
    with pytest.raises(ValueError, match="unknown label-issue method"):
        issues.find_label_issues(labels, probs, "magic")
    with pytest.raises(ValueError, match="class indices"):
        issues.find_label_issues(labels + 10, probs)


def test_primary_label_of_a_multi_region_image_is_the_likeliest():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert issues.primary_labels([(0, 1), ()], probs).tolist() == [1, -1]


def test_write_audit_csv_orders_most_suspicious_first(tmp_path):
    rows = [
        {
            "image": "a",
            "given_label": "Chest",
            "suggested_label": "Chest",
            "issue_score": 0.1,
            "is_issue": False,
            "ood_score": 0.2,
            "out_of_domain": False,
        },
        {
            "image": "b",
            "given_label": "",
            "suggested_label": "Knee",
            "issue_score": float("nan"),
            "is_issue": False,
            "ood_score": 0.3,
            "out_of_domain": False,
        },
        {
            "image": "c",
            "given_label": "Knee",
            "suggested_label": "Chest",
            "issue_score": 0.9,
            "is_issue": True,
            "ood_score": 0.1,
            "out_of_domain": False,
        },
        {
            "image": "d",
            "given_label": "Knee",
            "suggested_label": "Knee",
            "issue_score": 0.2,
            "is_issue": False,
            "ood_score": 3.0,
            "out_of_domain": True,
        },
    ]
    path = write_audit_csv(rows, tmp_path / "label_issues.csv")
    written = read_csv(path)
    assert list(written[0]) == list(AUDIT_COLUMNS)
    assert [r["image"] for r in written] == ["c", "d", "a", "b"]
    assert written[0]["is_issue"] == "true" and written[3]["issue_score"] == ""
    assert [p.name for p in tmp_path.iterdir()] == ["label_issues.csv"]  # no temp file left


# --- the command on real images ---------------------------------------------------------------------------


def test_audit_finds_flipped_labels(tiny_bundle, unifesp, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    flipped = flipped_labels_csv(unifesp, labels)
    out = tmp_path / "audit"
    assert main(["audit", "--model", str(tiny_bundle), "--labels", str(labels), "--output", str(out)]) == 0

    rows = read_csv(out / "label_issues.csv")
    assert list(rows[0]) == list(AUDIT_COLUMNS)
    assert len(rows) == PER_REGION * len(REGIONS)
    flagged = {r["image"] for r in rows if r["is_issue"] == "true"}
    found = flagged & flipped
    assert len(found) / len(flipped) >= 0.5, f"found {len(found)} of {len(flipped)} flips"
    assert len(found) / len(flagged) >= 2.5 * FLIP_RATE, f"{len(found)} of {len(flagged)} flagged are flips"
    is_issue = [r["is_issue"] == "true" for r in rows]
    assert is_issue == sorted(is_issue, reverse=True)  # suspected errors first ...
    scores = [float(r["issue_score"]) for r in rows if r["is_issue"] == "true"]
    assert scores == sorted(scores, reverse=True)  # ... most suspicious first
    from radregion.bundle import load_bundle

    known = set(load_bundle(tiny_bundle).regions)  # the heads also learn the model's own training set: any region
    for row in rows:
        if row["is_issue"] == "true":
            assert row["suggested_label"] != row["given_label"] and row["suggested_label"] in known

    from radregion.datasets import read_labels_csv

    corrections = read_labels_csv(out / "corrections.csv")  # the labels-CSV format, paths resolvable
    by_image = {r["image"]: r for r in rows}
    assert {str(c.path) for c in corrections} == flagged
    for item in corrections:
        assert item.labels == (by_image[str(item.path)]["suggested_label"],)
        assert item.patient_id

    report = (out / "index.html").read_text()
    assert "http://" not in report and "https://" not in report
    assert report.count('alt="Grad-CAM"') == len(flagged)
    assert capsys.readouterr().out.startswith(f"{len(rows)} images: {len(flagged)} suspected label errors")


def test_audit_cleanlab_method_agrees_on_most_flips(tiny_bundle, unifesp, tmp_path):
    labels = tmp_path / "labels.csv"
    flipped = flipped_labels_csv(unifesp, labels)
    out = tmp_path / "audit"
    assert (
        main(
            [
                "audit",
                "--model",
                str(tiny_bundle),
                "--labels",
                str(labels),
                "--output",
                str(out),
                "--method",
                "cleanlab",
                "--no-gradcam",
            ]
        )
        == 0
    )
    flagged = {r["image"] for r in read_csv(out / "label_issues.csv") if r["is_issue"] == "true"}
    assert len(flagged & flipped) / len(flipped) >= 0.5
    assert 'alt="Grad-CAM"' not in (out / "index.html").read_text()


def test_audit_unknown_region_is_a_clear_error(tiny_bundle, unifesp, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    image = next((unifesp / "images").glob("*.png"))
    labels.write_text(f"image,labels\n{image},Chset\n")
    assert main(["audit", "--model", str(tiny_bundle), "--labels", str(labels), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(labels) in err and "Chset" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "label_issues.csv").exists()


# --- DICOM-folder mode ------------------------------------------------------------------------------------


def dicom_folder(unifesp, real_dicoms, folder: Path, per_region=6) -> dict:
    """Real CR DICOMs plus DICOMs made from labelled PNGs: some with a BodyPartExamined, some with a wrong
    one, some with none; returns {file name: what the test knows about it}."""
    import shutil

    from PIL import Image

    from radregion.dicomwrite import array_to_dicom

    folder.mkdir()
    known = {}
    for path in real_dicoms:
        shutil.copy(path, folder / path.name)
        # RG1: BodyPartExamined CHEST; RG3: EXTREMITY (generic) but "distal tibia" in the header.
        known[path.name] = {"given": "Chest" if path.name.startswith("RG1") else "Lower Leg"}
    rows = read_csv(unifesp / "labels.csv")
    terms = {"Chest": "CHEST", "Knee": "KNEE", "Feet": "FOOT", "Pelvis": "PELVIS"}
    rng = random.Random(1)
    for region, term in terms.items():
        these = sorted((r for r in rows if r["labels"] == region), key=lambda r: r["image"])
        for n, row in enumerate(rng.sample(these, per_region)):
            pixels = np.asarray(Image.open(unifesp / row["image"]).convert("L"))
            wrong = n == 0 and region != "Chest"  # one wrong header per region, claiming CHEST
            body_part = None if n == 1 else ("CHEST" if wrong else term)
            name = f"{region.lower()}_{n}.dcm"
            array_to_dicom(pixels, folder / "sub" / name, body_part=body_part, patient_id=f"P{row['PatientID']}")
            known[name] = {"given": "" if body_part is None else ("Chest" if wrong else region), "true": region}
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    return known


def test_audit_dicom_folder(tiny_bundle, unifesp, real_dicoms, tmp_path, capsys):
    folder = tmp_path / "pacs"
    known = dicom_folder(unifesp, real_dicoms, folder)
    out = tmp_path / "audit"
    assert main(["audit", "--model", str(tiny_bundle), "--dicom-folder", str(folder), "--output", str(out)]) == 0
    rows = {Path(r["image"]).name: r for r in read_csv(out / "label_issues.csv")}
    assert set(rows) == set(known)  # the broken file is reported, not audited
    assert "broken.dcm" in capsys.readouterr().err
    for name, facts in known.items():
        assert rows[name]["given_label"] == facts["given"], name
        assert rows[name]["suggested_label"]
        if not facts["given"]:
            assert rows[name]["issue_score"] == "" and rows[name]["is_issue"] == "false"

    from radregion.datasets import read_labels_csv

    corrections = {c.path.name: c for c in read_labels_csv(out / "corrections.csv")}
    flagged = {n for n, r in rows.items() if r["is_issue"] == "true"}
    assert flagged <= set(corrections)
    unlabelled = [n for n, f in known.items() if not f["given"] and rows[n]["out_of_domain"] == "false"]
    assert any(n in corrections for n in unlabelled)  # missing labels get suggestions
    for name, item in corrections.items():
        assert item.labels == (rows[name]["suggested_label"],)
    html = (out / "index.html").read_text()
    assert "broken.dcm" in html and "Unreadable files (1)" in html


def test_gradcam_maps_follow_the_requested_region(tiny_bundle, unifesp):
    from radregion.audit.gradcam import Classifier, grad_cams, overlay
    from radregion.bundle import load_bundle
    from radregion.features import load_clean_images

    bundle = load_bundle(tiny_bundle)
    head = bundle.head()
    images = load_clean_images(sorted((unifesp / "images").glob("*.png"))[:3], bundle.settings)
    classifier = Classifier(bundle.backbone(), head.weight, head.bias, head.feature_mean, head.feature_std)
    logits = classifier(torch_input(images)).detach().numpy()
    np.testing.assert_allclose(logits, head.logits(extract(bundle, images)), rtol=1e-3, atol=1e-3)
    first, last = grad_cams(classifier, images, [0, 0, 0]), grad_cams(classifier, images, [len(head.regions) - 1] * 3)
    peaks = first.max(axis=(1, 2))
    assert first.shape == images.shape and first.min() >= 0
    assert set(np.round(peaks, 5)) <= {0.0, 1.0} and peaks.max() == 1  # 0: no positive evidence (ReLU)
    assert not np.allclose(first, last)  # a map per requested region, not one for all
    rgb = overlay(np.stack([images[0]] * 2)[0], first[0][::2, ::2])  # a smaller map is resized to the image
    assert rgb.shape == images[0].shape + (3,) and rgb.dtype == np.uint8


def torch_input(images):
    from radregion.features import images_to_tensor

    return images_to_tensor(images)


def extract(bundle, images):
    from radregion.features import extract_features

    return extract_features(bundle.backbone(), images, precision="fp32")


def test_features_cached_and_ensemble_averaging(tiny_bundle, unifesp, tmp_path):
    from radregion.cache import feature_cache_dir
    from radregion.audit.pipeline import inputs_from_labels_csv, run_audit
    from radregion.bundle import load_bundle
    from radregion.ensemble import ood_spread

    labels = tmp_path / "labels.csv"
    flipped_labels_csv(unifesp, labels, seed=5)
    bundle = load_bundle(tiny_bundle)
    inputs = inputs_from_labels_csv(labels, taxonomy=bundle.taxonomy())
    single = run_audit([bundle], inputs, progress=False)
    cached = sorted(feature_cache_dir(bundle, "fp32").rglob("*.npy"))  # features on a CPU are fp32
    assert len(cached) >= len(inputs.paths)
    stamps = [p.stat().st_mtime_ns for p in cached]
    pair = run_audit([bundle, load_bundle(tiny_bundle)], inputs, progress=False)
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read back, not recomputed
    np.testing.assert_allclose(pair.pred_probs, single.pred_probs, atol=1e-6)
    assert (pair.is_issue == single.is_issue).all()
    threshold, spread = bundle.ood_detector().threshold, ood_spread(bundle)
    np.testing.assert_allclose(pair.ood_score, (single.ood_score - threshold) / spread, rtol=1e-5)  # ensemble margin
    assert (pair.out_of_domain == single.out_of_domain).all()
    assert "averaged over 2 models" in pair.probabilities_from


def test_audit_of_a_few_dicoms_uses_the_models_own_head(tiny_bundle, real_dicoms, tmp_path):
    import shutil

    folder = tmp_path / "few"
    folder.mkdir()
    for path in real_dicoms:
        shutil.copy(path, folder / path.name)
    out = tmp_path / "audit"
    assert (
        main(
            ["audit", "--model", str(tiny_bundle), "--dicom-folder", str(folder), "--output", str(out), "--no-gradcam"]
        )
        == 0
    )
    rows = read_csv(out / "label_issues.csv")
    assert sorted(Path(r["image"]).name for r in rows) == sorted(p.name for p in real_dicoms)
    assert all(r["suggested_label"] and r["ood_score"] for r in rows)
    assert "the model&#x27;s own head" in (out / "index.html").read_text()


def test_out_of_fold_heads_also_learn_from_the_models_training_set(tiny_bundle, unifesp, tmp_path):
    """Each fold's head is fitted on the archive's other folds plus the bundle's stored (curated) training set: the
    probabilities are those of out_of_fold_probabilities with the stored rows as extra, never predicted, rows."""
    from radregion.audit.pipeline import inputs_from_labels_csv, label_probabilities, run_audit
    from radregion.bundle import load_bundle
    from radregion.validation import out_of_fold_probabilities

    labels = tmp_path / "labels.csv"
    flipped_labels_csv(unifesp, labels, seed=5)
    bundle = load_bundle(tiny_bundle)
    stored = bundle.training_set()
    assert stored is not None and len(stored)
    result = run_audit([bundle], inputs_from_labels_csv(labels, taxonomy=bundle.taxonomy()), progress=False)
    assert "the model's own training set" in result.probabilities_from
    in_domain = [tuple(r for r in labels if r in result.regions) for labels in result.given]
    folds = label_set_fold_ids(in_domain, result.patient_ids, result.paths)
    feats = result.features
    with_stored = label_probabilities(bundle, feats, in_domain, result.regions, folds)
    np.testing.assert_allclose(result.pred_probs, with_stored, atol=1e-6)
    others = ~in_training_set_rows(stored, feats)  # the stored rows of audited images never judge them
    expected = out_of_fold_probabilities(
        feats,
        in_domain,
        result.regions,
        folds,
        extra_features=stored.features[others],
        extra_label_sets=[(r,) for r, keep in zip(stored.truths(result.regions), others) if keep],
    )
    np.testing.assert_allclose(with_stored, expected, atol=1e-6)
    assert not np.allclose(with_stored, out_of_fold_probabilities(feats, in_domain, result.regions, folds), atol=1e-3)


def in_training_set_rows(stored, audited_features):
    """Which stored rows are audited images: brute force, the same-image rule of the audit (1% relative distance)."""
    bank = np.asarray(stored.features, np.float32)[:, None, :]
    distance = np.linalg.norm(bank - np.asarray(audited_features, np.float32)[None], axis=2)
    return (distance / np.linalg.norm(bank, axis=2)).min(1) < 1e-2


def test_images_the_head_was_trained_on_are_named_and_never_judge_themselves(tiny_bundle, unifesp, tmp_path, capsys):
    """Auditing the model's own training labels: those images' stored rows leave the out-of-fold heads (else each
    image's own label judges it), and the audit says how many there are, in the terminal and in the report."""
    from fixtures.bundle import TINY_PER_CLASS

    from radregion.bundle import load_bundle
    from radregion.datasets import read_labels_csv, sample_per_class

    bundle = load_bundle(tiny_bundle)
    trained = [
        it
        for it in sample_per_class(read_labels_csv(unifesp / "labels.csv"), TINY_PER_CLASS, seed=0)
        if it.labels[0] in REGIONS
    ]
    assert len(trained) == TINY_PER_CLASS * len(REGIONS)
    labels = tmp_path / "labels.csv"
    flipped_labels_csv(unifesp, labels, seed=5)
    with open(labels, newline="") as handle:
        rows = [
            r for r in csv.DictReader(handle) if Path(r["image"]).resolve() not in {t.path.resolve() for t in trained}
        ]
    rows += [{"image": str(t.path), "labels": t.labels[0], "PatientID": t.patient_id} for t in trained]
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "labels", "PatientID"])
        writer.writeheader()
        writer.writerows(rows)

    out = tmp_path / "audit"
    assert (
        main(["audit", "--model", str(tiny_bundle), "--labels", str(labels), "--output", str(out), "--no-gradcam"]) == 0
    )
    err = capsys.readouterr().err
    assert (
        f"warning: {len(trained)} of the {len(rows)} audited images are in the training set of the model's head" in err
    )
    assert "cross-fitted" in err and "training set of the model&#x27;s head" in (out / "index.html").read_text()

    from radregion.audit.pipeline import in_training_set, inputs_from_labels_csv, run_audit
    from radregion.bundle import image_ids
    from radregion.validation import out_of_fold_probabilities

    result = run_audit([bundle], inputs_from_labels_csv(labels, taxonomy=bundle.taxonomy()), progress=False)
    expected = np.array([Path(p).resolve() in {t.path.resolve() for t in trained} for p in result.paths])
    assert (result.trained_on == expected).all() and expected.sum() == len(trained)
    assert (in_training_set(bundle, result.features) == expected).all()
    stored = bundle.training_set()
    keep = ~in_training_set_rows(stored, result.features)
    assert keep.sum() == len(stored) - len(trained)
    assert set(image_ids([t.path for t in trained])) <= set(stored.images.tolist())  # which image each row is
    assert (in_training_set(bundle, result.features, result.paths) == expected).all()
    in_domain = [tuple(r for r in labels if r in result.regions) for labels in result.given]
    folds = label_set_fold_ids(in_domain, result.patient_ids, result.paths)
    truths = stored.truths(result.regions)

    def probabilities(rows):
        extra = [(truths[j],) for j in np.flatnonzero(rows)]
        return out_of_fold_probabilities(
            result.features,
            in_domain,
            result.regions,
            folds,
            extra_features=stored.features[rows],
            extra_label_sets=extra,
        )

    np.testing.assert_allclose(result.pred_probs, probabilities(keep), atol=1e-6)
    assert not np.allclose(result.pred_probs, probabilities(np.ones(len(stored), bool)), atol=1e-3)  # the leak

    unrelated = tmp_path / "unrelated.csv"  # none of the head's images: no warning
    with open(unrelated, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "labels", "PatientID"])
        writer.writeheader()
        writer.writerows(rows[: -len(trained)])
    assert (
        main(["audit", "--model", str(tiny_bundle), "--labels", str(unrelated), "--output", str(out), "--no-gradcam"])
        == 0
    )
    assert "warning" not in capsys.readouterr().err


def test_training_images_are_known_by_content_when_the_stored_features_differ(tiny_bundle, unifesp, tmp_path):
    """A head fitted on another device (GPU bf16) stores features further from this machine's than the 1% rule: the
    stored file-content ids still find the images; a bundle without them (written before) falls back to features."""
    from fixtures.bundle import TINY_PER_CLASS

    from radregion.audit.pipeline import in_training_set
    from radregion.bundle import TrainingSet, load_bundle
    from radregion.datasets import read_labels_csv, sample_per_class
    from radregion.features import bundle_features

    bundle = load_bundle(tiny_bundle)
    stored = bundle.training_set()
    rng = np.random.default_rng(0)
    features = np.asarray(stored.features, np.float32)
    shifted = features * (1 + 0.1 * rng.standard_normal(features.shape)).astype(np.float32)  # ~10% apart
    head_items = sample_per_class(read_labels_csv(unifesp / "labels.csv"), TINY_PER_CLASS, seed=0)  # the fixture's
    paths = [it.path for it in head_items if "Others" not in it.labels]
    assert len(paths) == len(stored)
    audited, _, _ = bundle_features(bundle, paths, progress=False)

    def rebuilt(images):
        return bundle.with_head(
            tmp_path / f"b{images is None}",
            bundle.head(),
            bundle.ood_detector(),
            training_set=TrainingSet(shifted, stored.targets, stored.groups, images),
        )

    assert in_training_set(rebuilt(stored.images), audited, paths).all()
    assert not in_training_set(rebuilt(None), audited, paths).any()  # features alone: 10% is not the same image
    assert in_training_set(bundle, audited).all()  # this machine's own features: found without the ids
