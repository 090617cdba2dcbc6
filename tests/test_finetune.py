"""Fine-tuning: region weights, the outlier-exposure loss (against its definition), a real fine-tune on the device
rule, and the training set a bundle keeps."""

import numpy as np
import pytest
import torch

from radregion.bundle import load_bundle
from radregion.finetune import outlier_exposure_loss, region_weights


def test_region_weights():
    targets = torch.tensor([0] * 90 + [1] * 10)
    balanced = region_weights(targets, 2, "balanced")
    assert torch.allclose(balanced, torch.tensor([100 / 180, 100 / 20]))
    assert torch.allclose(region_weights(targets, 2, "sqrt"), balanced.sqrt())
    assert region_weights(targets, 2, "none") is None
    with pytest.raises(ValueError, match="class weights"):
        region_weights(targets, 2, "inverse")


def test_outlier_exposure_is_cross_entropy_to_the_uniform_distribution():
    logits = torch.randn(5, 7)
    uniform = torch.full((5, 7), 1 / 7)
    reference = torch.nn.functional.cross_entropy(logits, uniform)  # soft-target cross-entropy (torch's own)
    assert torch.allclose(outlier_exposure_loss(logits), reference, atol=1e-6)
    assert outlier_exposure_loss(torch.zeros(2, 7)) == pytest.approx(np.log(7), abs=1e-6)  # its minimum


def test_fine_tune_with_outlier_exposure_keeps_the_training_set(tiny_bundle, unifesp, tmp_path):
    from radregion.datasets import read_labels_csv, sample_per_class
    from radregion.fitting import train_head

    items = sample_per_class(read_labels_csv(unifesp / "labels.csv"), 2, seed=3)
    assert any("Others" in it.labels for it in items)
    result = train_head(
        load_bundle(tiny_bundle), items, tmp_path / "tuned", fine_tune_epochs=1, outlier_exposure=True, folds=2, seed=3
    )
    head = result.meta["training"]["head"]
    assert head["outlier_exposure"] and head["class_weights"] == "sqrt"
    assert "optimistic" in result.meta["metrics"]["ood"]["note"]
    stored = result.training_set()
    n_in = result.meta["metrics"]["n_images"]["in_domain"]
    assert stored.features.shape == (n_in, 512) and stored.targets.max() < len(result.regions)
    assert len(np.unique(stored.groups)) == len({it.patient_id for it in items if "Others" not in it.labels})
    # the stored features are the fine-tuned backbone's features of those images (fp16 in the bundle)
    from radregion.features import extract_features, load_clean_images
    from radregion.fitting import split_in_domain

    in_items, _, _ = split_in_domain(items, {"Others"})
    feats = extract_features(result.backbone(), load_clean_images([it.path for it in in_items], result.settings))
    assert np.allclose(stored.features, feats, atol=0.05 * np.abs(feats).max())
    assert load_bundle(tiny_bundle).training_set() is not None  # the fixture's head keeps its own
