"""The Predictor on real files: per-file errors, parallel decoding, precision, PACS labels, reload, ensembles."""

import numpy as np
import pytest

from radregion.bundle import load_bundle
from radregion.datasets import read_labels_csv, sample_per_class
from radregion.ensemble import ood_spread
from radregion.features import extract_features, load_clean_images
from radregion.fitting import train_head
from radregion.head import fit_head
from radregion.inference import Predictor


@pytest.fixture(scope="module")
def some_images(unifesp):
    return sorted((unifesp / "unlabelled").glob("*.png"))[:24]


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor(tiny_bundle, device="cpu")


def test_predict_real_files_and_bad_ones(predictor, some_images, real_dicoms, tmp_path):
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 20)
    paths = [some_images[0], corrupt, real_dicoms[0], tmp_path / "missing.png", some_images[1]]
    preds = list(predictor.predict(paths, batch_size=2))
    assert [p.path for p in preds] == [str(p) for p in paths]
    good = [preds[0], preds[2], preds[4]]
    for p in good:
        assert p.error is None and p.region in predictor.regions
        assert sum(p.probabilities.values()) == pytest.approx(1, abs=1e-4)
        assert p.confidence == pytest.approx(max(p.probabilities.values()))
        assert np.isfinite(p.ood_score) and p.out_of_domain == (p.ood_score > predictor.threshold)
        assert p.features.shape == (512,)
    assert preds[1].error and preds[1].region is None and preds[1].probabilities == {}
    assert "not found" in preds[3].error
    assert preds[0].pacs_label is None and preds[0].agrees_with_pacs is None  # PNG: no header, no PACS label
    assert preds[2].pacs_label == "Chest" and preds[2].agrees_with_pacs == (preds[2].region == "Chest")


def test_worker_processes_give_the_same_answers(tiny_bundle, some_images):
    parallel = list(Predictor(tiny_bundle, workers=2).predict(some_images, batch_size=8))
    serial = list(Predictor(tiny_bundle, workers=0).predict(some_images, batch_size=8))
    assert [p.path for p in parallel] == [p.path for p in serial]
    np.testing.assert_allclose([p.ood_score for p in parallel], [p.ood_score for p in serial], rtol=1e-5)
    assert [p.region for p in parallel] == [p.region for p in serial]


def test_a_process_with_threads_decodes_in_threads_not_forked_workers(tiny_bundle, some_images):
    """A server runs threads; a fork there copies the locks they hold into the workers, which may then wait forever."""
    import threading

    import psutil

    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, daemon=True)
    busy.start()
    try:
        children, preds = [], []
        for p in Predictor(tiny_bundle, workers=2).predict(some_images, batch_size=8):
            children.append(len(psutil.Process().children()))
            preds.append(p)
    finally:
        stop.set()
    serial = list(Predictor(tiny_bundle, workers=0).predict(some_images, batch_size=8))
    assert max(children) == 0
    assert [p.region for p in preds] == [p.region for p in serial]
    np.testing.assert_allclose([p.ood_score for p in preds], [p.ood_score for p in serial], rtol=1e-5)


def test_bf16_agrees_with_fp32(tiny_bundle, unifesp):
    items = sample_per_class(read_labels_csv(unifesp / "labels.csv"), 4, seed=2)
    images = load_clean_images([it.path for it in items], load_bundle(tiny_bundle).settings)
    fast = Predictor(tiny_bundle, precision="bf16").predict_images(images)
    exact = Predictor(tiny_bundle, precision="fp32").predict_images(images)
    agreement = np.mean(fast["probabilities"].argmax(1) == exact["probabilities"].argmax(1))
    assert agreement >= 0.95
    assert fast["features"].dtype == np.float32 and fast["ood_score"].shape == (len(items),)


def test_features_on_a_cpu_are_fp32_and_so_recorded(tiny_bundle, unifesp):
    """On a CPU that computes bf16, bf16 features moved 5 of 743 of the shipped model's regions
    (bench/runtime_agreement.py): `predict`, the audit's and evaluation's `bundle_features` and the features a head is
    fitted on are fp32 on every CPU, and `fit-head` records it (`features_precision` in bundle.json)."""
    from radregion.features import bundle_features

    bundle = load_bundle(tiny_bundle)
    assert bundle.meta["features_precision"] == "fp32"
    items = sample_per_class(read_labels_csv(unifesp / "labels.csv"), 2, seed=3)
    images = load_clean_images([it.path for it in items], bundle.settings)
    exact = extract_features(bundle.backbone(), images, device="cpu", precision="fp32")
    features, ok, _ = bundle_features(bundle, [it.path for it in items], progress=False)
    assert ok.all()
    predictor = Predictor(bundle, device="cpu")
    for answer in (predictor.predict_images(images)["features"], features):  # ONNX Runtime or torch, both fp32
        np.testing.assert_allclose(answer, exact, rtol=1e-4, atol=1e-4)  # bf16 differs by 1e-2 and more


def test_predict_images_matches_predict(predictor, some_images):
    images = load_clean_images(some_images[:3], predictor.settings)
    out = predictor.predict_images(images)
    preds = list(predictor.predict(some_images[:3]))
    assert out["probabilities"].shape == (3, len(predictor.regions))
    np.testing.assert_allclose(out["probabilities"].max(1), [p.confidence for p in preds], rtol=1e-4)


def test_reload_if_changed(tiny_bundle_copy, unifesp, some_images):
    predictor = Predictor(tiny_bundle_copy)
    before = predictor.version
    assert predictor.reload_if_changed() is False
    items = sample_per_class(read_labels_csv(unifesp / "labels.csv"), 3, seed=5)
    train_head(load_bundle(tiny_bundle_copy), items, tiny_bundle_copy, seed=5, folds=2)  # replaced in place
    assert predictor.reload_if_changed() is True
    assert predictor.version != before and predictor.version == load_bundle(tiny_bundle_copy).version
    assert predictor.reload_if_changed() is False
    assert next(predictor.predict(some_images[:1])).error is None


def test_ensemble_averages_probabilities(tiny_bundle, unifesp, tmp_path, some_images):
    bundle = load_bundle(tiny_bundle)
    items = [it for it in sample_per_class(read_labels_csv(unifesp / "labels.csv"), 3, seed=7) if it.label != "Others"]
    features = extract_features(bundle.backbone(), load_clean_images([it.path for it in items], bundle.settings))
    head = fit_head(features, [it.labels for it in items], bundle.regions[::-1], C=0.05)  # other region order
    other = bundle.with_head(tmp_path / "other", head, bundle.ood_detector(), training_set=bundle.training_set())
    images = load_clean_images(some_images[:6], other.settings)
    single = [Predictor(b).predict_images(images) for b in (tiny_bundle, other.path)]
    ensemble = Predictor([tiny_bundle, other.path])
    out = ensemble.predict_images(images)
    aligned = single[1]["probabilities"][:, [other.regions.index(r) for r in bundle.regions]]
    assert ensemble.regions == bundle.regions
    np.testing.assert_allclose(out["probabilities"], (single[0]["probabilities"] + aligned) / 2, rtol=1e-5)
    assert ensemble.threshold == 0.0 and ensemble.version.startswith("ens-")
    assert out["features"].shape == (6, 1024)
    # the OOD score: each member's margin over its threshold in units of its scores' spread on its training images
    detector, spread = bundle.ood_detector(), ood_spread(bundle)
    assert spread == pytest.approx(np.std(detector.score(bundle.training_set().features)))
    margin = (single[0]["ood_score"] - detector.threshold) / spread
    np.testing.assert_allclose(out["ood_score"], margin, rtol=1e-4, atol=1e-5)  # `other`: the same detector, set
    assert (out["out_of_domain"] == (margin > 0)).all()

    # a member without a detector: no ensemble OOD score (NaN, never flagged), no crash
    bare = bundle.with_head(tmp_path / "bare", head, None)
    out = Predictor([tiny_bundle, bare.path]).predict_images(images)
    assert np.isnan(out["ood_score"]).all() and not out["out_of_domain"].any()
    from radregion.ood import auroc

    assert auroc(out["ood_score"][:3], out["ood_score"][3:]) is None


def test_an_ensemble_of_the_shipped_model_flags_what_the_model_flags(unifesp, real_dicoms):
    """Its `classifier` OOD score is a logit with a negative threshold (-2.77): the ensemble rule must not depend
    on the threshold's sign (a ratio score / threshold flagged nothing)."""
    from radregion.bundle import default_model_path

    shipped = load_bundle(default_model_path())
    assert shipped.ood_detector().threshold < 0
    others = [it.path for it in read_labels_csv(unifesp / "labels.csv") if it.labels == ("Others",)][:12]
    paths = others + sorted((unifesp / "images").glob("*.png"))[:12] + list(real_dicoms)
    alone = list(Predictor(shipped).predict(paths))
    twice = list(Predictor([shipped, shipped]).predict(paths))
    assert [p.out_of_domain for p in twice] == [p.out_of_domain for p in alone]
    assert sum(p.out_of_domain for p in alone) >= 3  # some of the 12 archive `Others` are flagged


def test_bundle_without_head_is_refused(tiny_bundle, tmp_path):
    from radregion.bundle import save_bundle

    bundle = load_bundle(tiny_bundle)
    bare = save_bundle(tmp_path / "bare", bundle.backbone_state(), None, bundle.meta)
    with pytest.raises(ValueError, match="no head yet"):
        Predictor(bare)
