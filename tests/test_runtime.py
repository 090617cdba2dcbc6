"""ONNX Runtime inference (radregion.runtime) against torch on real radiographs, its kept export, and its fallbacks."""

import logging

import numpy as np
import pytest
import torch

from radregion.bundle import load_bundle, shipped_model_path
from radregion.device import prepare_backbone
from radregion.features import forward_features, images_to_tensor, load_clean_images
from radregion.inference import Predictor
from radregion.networks import build_backbone
from radregion.runtime import ONNX_AFTER_IMAGES, InferenceBackbone, OnnxBackbone, uses_onnxruntime

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shipped():
    return load_bundle(shipped_model_path())


@pytest.fixture(scope="module")
def images(shipped, unifesp):
    """80 real unlabelled radiographs, cleaned as the shipped model reads them."""
    paths = sorted((unifesp / "unlabelled").glob("*.png"))[:80]
    return load_clean_images(paths, shipped.settings)


def torch_features(bundle, images):
    return forward_features(prepare_backbone(bundle.backbone(), CPU), images_to_tensor(images), CPU)


def test_the_rule():
    assert uses_onnxruntime(CPU, "fp32")
    assert uses_onnxruntime(CPU, "auto")  # every CPU, bf16-capable ones too
    assert not uses_onnxruntime(CPU, "bf16")
    assert not uses_onnxruntime(torch.device("cuda"), "fp32")


def test_predictions_through_onnxruntime_equal_torchs(shipped, images):
    predictor = Predictor(shipped, workers=0)
    out = predictor.predict_images(images)
    assert predictor.model.models[0].backbone.runtime == "onnxruntime"  # 80 images: worth the export
    features = torch_features(shipped, images)
    assert np.abs(out["features"] - features).max() < 1e-3
    probabilities = shipped.head().probabilities(features)
    assert (out["probabilities"].argmax(1) == probabilities.argmax(1)).all()
    assert np.abs(out["probabilities"] - probabilities).max() < 1e-4
    detector = shipped.ood_detector()
    assert (out["out_of_domain"] == (detector.score(features) > detector.threshold)).all()


def test_small_requests_run_in_torch_until_enough_images_came(shipped, images):
    backbone = InferenceBackbone(shipped.backbone(), CPU, size=shipped.settings.size)
    backbone.expect(4)  # one small request: not worth an export
    assert backbone.runtime == "torch"
    batch = images_to_tensor(images[:32])
    first = backbone(batch)
    assert backbone.runtime == "torch"
    second = backbone(batch)  # 64 images run: exported now, this batch already through ONNX Runtime
    assert ONNX_AFTER_IMAGES == 64 and backbone.runtime == "onnxruntime"
    assert torch.allclose(first, second, atol=1e-3)


def test_a_kept_export_runs_from_the_first_small_request(shipped, images, tmp_path):
    graph_file = tmp_path / "model.onnx"
    batch = images_to_tensor(images[:1])
    fresh = InferenceBackbone(shipped.backbone(), CPU, size=shipped.settings.size, graph_file=graph_file)
    expected = fresh(batch)  # one image, nothing kept: not worth an export
    assert fresh.runtime == "torch" and not graph_file.exists()
    OnnxBackbone(shipped.backbone(), shipped.settings.size, graph_file)  # an earlier run kept the export
    restarted = InferenceBackbone(shipped.backbone(), CPU, size=shipped.settings.size, graph_file=graph_file)
    restarted.expect(1)
    assert restarted.runtime == "onnxruntime"
    served = InferenceBackbone(shipped.backbone(), CPU, size=shipped.settings.size, graph_file=graph_file)
    first = served(batch)  # a server's first request, announced by nothing
    assert served.runtime == "onnxruntime" and torch.allclose(first, expected, atol=1e-3)


def test_the_export_is_kept_and_checked_before_use(shipped, images, tmp_path):
    graph_file = tmp_path / "onnx" / "model.onnx"
    expected = torch_features(shipped, images[:8])
    tensor = images_to_tensor(images[:8])

    OnnxBackbone(shipped.backbone(), shipped.settings.size, graph_file)
    kept = graph_file.read_bytes()
    assert len(kept) > 1_000_000 and not list(graph_file.parent.glob(".*.tmp"))
    assert np.abs(OnnxBackbone(shipped.backbone(), 160, graph_file)(tensor).numpy() - expected).max() < 1e-3

    # another model's export at this place (same shapes, other weights), then a damaged file: each is replaced
    other = build_backbone("efficientnet-lite0", pretrained=True)
    OnnxBackbone(other, 160, graph_file)
    assert graph_file.read_bytes() != kept
    for _ in ("another model's graph", "a damaged graph"):
        runner = OnnxBackbone(shipped.backbone(), 160, graph_file)
        assert np.abs(runner(tensor).numpy() - expected).max() < 1e-3
        assert graph_file.read_bytes() == kept
        graph_file.write_bytes(kept[: len(kept) // 2])


class EigenvaluePooling(torch.nn.Module):
    """A backbone the ONNX exporter cannot trace (no ONNX operator for eigvalsh): second-order pooled features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)

    def forward(self, x):
        maps = self.conv(x).flatten(2)
        return torch.linalg.eigvalsh(maps @ maps.transpose(1, 2) / maps.shape[-1])


def test_a_backbone_the_exporter_cannot_trace_runs_in_torch(caplog):
    module = EigenvaluePooling()
    batch = torch.rand(ONNX_AFTER_IMAGES, 1, 16, 16)
    backbone = InferenceBackbone(module, CPU, size=16)
    with caplog.at_level(logging.WARNING, logger="radregion.runtime"):
        backbone.expect(len(batch))
        out = backbone(batch)
    assert backbone.runtime == "torch"
    assert "ONNX Runtime not used" in caplog.text and "eigvalsh" in caplog.text
    with torch.no_grad():
        assert torch.allclose(out, module(batch))
