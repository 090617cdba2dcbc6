"""The backbone that inference runs: ONNX Runtime on a CPU in fp32, torch everywhere else.

PyTorch's eager CPU kernels run EfficientNet-Lite0's depthwise convolutions slowly: on the AVX2-only development CPU
(2 threads, batch 32, 160 px) torch channels_last ran 35-46 img/s, TorchScript freezing and fx conv-bn fusion no
better (40 and 43), ONNX Runtime the same network at 168-190 img/s (`bench/predict_speed.py` prints them all).
So where the device rule (`radregion.device`) computes in fp32 on the CPU and enough images come to pay
for it, the backbone is exported to ONNX (1-2 s; a bundle's export is kept in the engine's cache, named by its
version, and the bundle's safetensors stay the weights' source) and run by ONNX Runtime; a probe batch checks that
both give the same features before it is used. Where bf16 or a GPU computes, or an export fails, torch runs it (the
failure is logged, never raised).
"""

from __future__ import annotations

import io
import logging
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from radregion.atomic import atomic_write
from radregion.device import autocast_dtype, inference_precision, prepare_backbone

log = logging.getLogger(__name__)

ONNX_AFTER_IMAGES = 64  # the export costs about 1.5 s, what torch takes for ~60 Lite0 images at 160 px
PROBE_TOLERANCE = 1e-3  # max |ONNX - torch| feature difference accepted (measured: about 1e-5 for Lite0)


def uses_onnxruntime(device: torch.device, precision: str = "auto") -> bool:
    """The rule: ONNX Runtime runs inference exactly where features are computed in fp32 on the CPU (every CPU, unless
    another precision is asked for: `radregion.device.inference_precision`)."""
    return device.type == "cpu" and autocast_dtype(device, inference_precision(device, precision)) is None


class OnnxBackbone:
    """A backbone exported to ONNX and run by ONNX Runtime: (N, 1, S, S) float tensor -> (N, D) float tensor.

    `graph_file`: where the export is kept (`cache.onnx_entry`): read when it is there, written (atomically) when
    it is not; either way the runtime's features of a probe batch must match torch's, else the backbone is exported
    again. Without it the export stays in memory."""

    def __init__(self, backbone: torch.nn.Module, size: int, graph_file=None):
        backbone = backbone.eval().float().to("cpu")
        probe = _probe_batch(size)
        with torch.no_grad():
            expected = backbone(probe).numpy()
        graph = _read_graph(graph_file)
        if graph is not None:
            try:
                self.session = _session(graph)
                if _difference(self._run(probe.numpy()), expected) <= PROBE_TOLERANCE:
                    return
            except Exception:  # a damaged file (onnxruntime raises its own exception types): exported again below
                pass
        graph = _export(backbone, probe)
        self.session = _session(graph)
        difference = _difference(self._run(probe.numpy()), expected)
        if not difference <= PROBE_TOLERANCE:
            raise RuntimeError(f"ONNX Runtime features differ from torch's by {difference:.2g}")
        if graph_file is not None:
            try:
                with atomic_write(graph_file) as handle:
                    handle.write(graph)
            except OSError as error:  # a read-only cache costs the next run an export, nothing else
                log.warning("cannot keep the ONNX export in %s (%s)", graph_file, error)

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": np.ascontiguousarray(images, dtype=np.float32)})[0]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run(batch.detach().float().cpu().numpy()))


def _read_graph(graph_file) -> bytes | None:
    if graph_file is None:
        return None
    try:
        return Path(graph_file).read_bytes()
    except OSError:
        return None


def _export(backbone: torch.nn.Module, probe: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow it folds into constants
        torch.onnx.export(
            backbone,
            (probe,),
            buffer,
            input_names=["image"],
            output_names=["features"],
            dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
            do_constant_folding=False,  # ONNX Runtime folds the batch norms itself; the export takes half the time
            dynamo=False,
        )
    return buffer.getvalue()


def _session(graph: bytes):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # set_cpu_threads' share of the cores
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    # idle threads sleep rather than spin: decoding workers and a server's other threads share the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _difference(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max()) if got.shape == expected.shape else math.inf


def _probe_batch(size: int) -> torch.Tensor:
    """Two fixed images (a ramp and its mirror): a deterministic, non-constant input for the export and its check."""
    ramp = torch.linspace(0, 1, size * size).view(1, 1, size, size)
    return torch.cat([ramp, ramp.flip(-1).transpose(-1, -2)])


class InferenceBackbone:
    """A backbone ready for inference on `size` px images under the rule: torch (eval mode, on the device, the
    rule's layout) until the work makes an export worth it, then, where `uses_onnxruntime`, an `OnnxBackbone`
    (`graph_file`: where its export is kept). Worth it: a run of at least `ONNX_AFTER_IMAGES` images announced
    with `expect`, or that many images run so far (a server's many small requests), or any run once the export is
    kept (then it is only read and checked: a restarted server's first request already runs in ONNX Runtime).
    Calls take and return torch tensors; thread-safe."""

    def __init__(
        self, backbone: torch.nn.Module, device: torch.device, precision: str = "auto", size: int = 0, graph_file=None
    ):
        self.module = prepare_backbone(backbone, device, precision)
        self.size = size
        self.graph_file = graph_file  # where the export is kept (`OnnxBackbone`); None: in memory only
        self.onnx = None
        self._wanted = bool(size) and uses_onnxruntime(device, precision)
        self._run_so_far = 0
        self._lock = threading.Lock()

    @property
    def runtime(self) -> str:
        """What runs the next batch: "onnxruntime" or "torch"."""
        return "onnxruntime" if self.onnx is not None else "torch"

    def expect(self, images: int) -> None:
        """A run of `images` images starts: export now if it is long enough to pay for the export."""
        if images >= ONNX_AFTER_IMAGES or self._kept():
            self._switch()

    def _kept(self) -> bool:
        """Whether an export of this backbone may already be kept (`OnnxBackbone` checks it before use)."""
        return self._wanted and self.graph_file is not None and Path(self.graph_file).is_file()

    def _switch(self) -> None:
        with self._lock:
            if not self._wanted or self.onnx is not None:
                return
            self._wanted = False  # one try: a failed export is not repeated
            try:
                self.onnx = OnnxBackbone(self.module, self.size, self.graph_file)
            except Exception as error:  # an architecture the exporter cannot trace still runs, in torch
                log.warning("ONNX Runtime not used (%s: %s); the backbone runs in torch", type(error).__name__, error)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.onnx is None and self._wanted:
            self._run_so_far += len(batch)
            if self._run_so_far >= ONNX_AFTER_IMAGES or self._kept():
                self._switch()
        return (self.onnx or self.module)(batch)


def bundle_backbone(bundle, device: torch.device, precision: str = "auto") -> InferenceBackbone:
    """`bundle`'s backbone as an `InferenceBackbone` for its cleaned size, its export kept under its version."""
    from radregion.cache import onnx_entry

    size = bundle.settings.size
    graph_file = onnx_entry(bundle.version, size)
    return InferenceBackbone(bundle.backbone(), device, precision, size=size, graph_file=graph_file)
