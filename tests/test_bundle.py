"""Model bundles: safetensors + JSON only, exact round trip, atomic replacement, clear errors."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from radregion.bundle import load_bundle, save_bundle
from radregion.errors import RadiographError
from radregion.head import LinearHead
from radregion.networks import build_backbone

META = {
    "architecture": {"name": "resnet10", "feature_dim": 512, "in_channels": 1},
    "cleaning": {"size": 64, "crop_borders": True, "low_percentile": 0.5, "high_percentile": 99.5},
    "taxonomy": {"name": "unifesp22"},
    "training": {"data": "none", "command": "test"},
}


def _head(seed=0, regions=("Chest", "Hand", "Knee")):
    rng = np.random.default_rng(seed)
    d = META["architecture"]["feature_dim"]
    return LinearHead(
        rng.normal(size=(len(regions), d)).astype(np.float32),
        rng.normal(size=len(regions)).astype(np.float32),
        rng.normal(size=d).astype(np.float32),
        rng.uniform(0.5, 2, d).astype(np.float32),
        list(regions),
    )


def test_tiny_bundle_is_complete_and_never_pickled(tiny_bundle):
    files = sorted(p.name for p in tiny_bundle.iterdir())
    assert files == ["bundle.json", "model.safetensors"]
    with safe_open(str(tiny_bundle / "model.safetensors"), framework="np") as f:
        keys = set(f.keys())
    assert {"head.weight", "head.bias", "head.feature_mean", "head.feature_std"} <= keys
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("ood.") for k in keys)

    bundle = load_bundle(tiny_bundle)
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    assert meta["format_version"] == 1 and meta["input_size"] == 64 and meta["weights_dtype"] == "float16"
    assert {"data", "command", "git_commit", "date"} <= set(meta["training"])
    assert meta["licence"] == "unknown"  # nobody said under which terms (radregion ... --licence)
    assert "Others" not in bundle.regions and len(bundle.regions) == 21
    assert meta["taxonomy"]["out_of_domain"]["regions"] == ["Others"]
    assert bundle.head_weight.shape == (21, 512) and bundle.head_weight.dtype == np.float32
    assert np.isfinite(bundle.ood["threshold"]) and bundle.ood["method"] in ("mahalanobis", "knn")
    assert meta["metrics"]["n_images"]["out_of_domain"] > 0
    net = bundle.backbone()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert bundle.settings.size == 64 and len(bundle.version) == 12


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(1)
    state = build_backbone("resnet10").state_dict()
    head = _head()
    bundle = load_bundle(save_bundle(tmp_path / "b", state, head, META))
    loaded = bundle.backbone().state_dict()
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    np.testing.assert_array_equal(bundle.head_weight, head.weight)
    np.testing.assert_array_equal(bundle.feature_std, head.feature_std)
    assert bundle.regions == ["Chest", "Hand", "Knee"] and bundle.ood_detector() is None
    x = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    np.testing.assert_allclose(bundle.head().probabilities(x), head.probabilities(x), rtol=1e-6)


def test_bundle_without_head(tmp_path):
    state = build_backbone("resnet10").state_dict()
    bundle = load_bundle(save_bundle(tmp_path / "pretrained", state, None, META))
    assert not bundle.has_head and bundle.head() is None and bundle.regions == []


def test_replacement_is_atomic_and_leaves_nothing_behind(tmp_path):
    state = build_backbone("resnet10").state_dict()
    target = tmp_path / "model"
    first = load_bundle(save_bundle(target, state, _head(0), META))
    second = load_bundle(save_bundle(target, state, _head(1), META))
    assert first.version != second.version
    assert load_bundle(target).version == second.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    shared = torch.zeros(3)
    with pytest.raises(RuntimeError):  # safetensors refuses shared tensors half-way: the old bundle stays
        save_bundle(target, {**state, "a": shared, "b": shared}, _head(2), META)
    assert load_bundle(target).version == second.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("x")
    with pytest.raises(RadiographError, match="not a model bundle"):
        save_bundle(tmp_path / "data", build_backbone("resnet10").state_dict(), None, META)
    assert (tmp_path / "data" / "precious.txt").read_text() == "x"


def test_with_head_shares_the_backbone(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle)
    head = _head(3, regions=bundle.regions)
    new = bundle.with_head(tmp_path / "new", head, bundle.ood_detector(), {"metrics": {"note": "test"}})
    for key, value in bundle.backbone_state(dtype=None).items():
        assert torch.equal(value, new.backbone_state(dtype=None)[key])
    np.testing.assert_array_equal(new.head_weight, head.weight)
    assert new.meta["metrics"] == {"note": "test"} and new.version != bundle.version
    assert new.ood["threshold"] == bundle.ood["threshold"]


def test_bad_bundles_name_the_file(tmp_path, tiny_bundle_copy):
    with pytest.raises(RadiographError, match="no model bundle"):
        load_bundle(tmp_path / "missing")
    weights = tiny_bundle_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RadiographError, match="model.safetensors: unreadable weights"):
        load_bundle(tiny_bundle_copy)
    (tiny_bundle_copy / "bundle.json").write_text("{not json")
    with pytest.raises(RadiographError, match="bundle.json: unreadable"):
        load_bundle(tiny_bundle_copy)
