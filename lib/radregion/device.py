"""The one device and precision rule of pretraining, fine-tuning, feature extraction and inference.

`device="auto"`: the first CUDA device when there is one, else the CPU. `precision="auto"`: bf16 autocast (fp16
on a GPU without bf16, with a gradient scaler when training) where the processor computes bf16 natively, fp32
elsewhere: a CPU without AVX512-BF16 or AMX emulates bf16 (measured on an AVX2-only CPU: EfficientNet-Lite0
inference 0.27 img/s in bf16 against 2.8 in fp32, one thread); "fp32" turns autocast off. The layout is
channels_last. Features (inference, evaluation, the audit, and those a head is fitted on) follow
`inference_precision`: fp32 on every CPU, where ONNX Runtime runs the backbone (`radregion.runtime`).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_device(device="auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None: fp32, no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if precision == "fp16":
        raise ValueError("fp16 autocast is for GPUs; use bf16 or fp32 on CPU")
    if precision == "auto" and not cpu_has_native_bf16():
        return None
    return torch.bfloat16


def precision_name(device: torch.device, precision: str = "auto") -> str:
    """What `precision` computes in on `device`: "fp32", "bf16" or "fp16" (what a bundle records of its head)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(device, precision)]


def inference_precision(device: torch.device, precision: str = "auto") -> str:
    """The precision features are computed in: "auto" is fp32 on every CPU, and the rule's bf16 (fp16) on a GPU; an
    asked precision is kept. On a CPU that computes bf16, bf16 features of the shipped model (its head fitted on
    fp32 ones) changed 5 regions and 8 out-of-domain flags of 743 images (relative feature change 0.11:
    bench/runtime_agreement.py), and ONNX Runtime's fp32 ran EfficientNet-Lite0 three times as fast as torch's bf16
    there (bench/predict_speed.py): fp32 gives every CPU the same answers, and faster. Training keeps bf16."""
    if precision == "auto" and device.type == "cpu":
        return "fp32"
    return precision


def features_precision(device: torch.device) -> str:
    """The `precision_name` of what "auto" features are computed in on `device` (fit-head records it in bundle.json;
    the feature cache is keyed by it)."""
    return precision_name(device, inference_precision(device))


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context of the rule (a null context for fp32)."""
    dtype = autocast_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(device: torch.device, precision: str = "auto") -> torch.memory_format:
    """channels_last everywhere (measured on the AVX2 CPU in fp32: EfficientNet-Lite0 training 1.5 against 0.85
    img/s, inference 2.8 against 1.7 img/s in the default layout)."""
    return torch.channels_last


def grad_scaler(device: torch.device, precision: str = "auto") -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (bf16 needs none)."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, precision) == torch.float16)


def prepare_backbone(backbone: torch.nn.Module, device: torch.device, precision: str = "auto") -> torch.nn.Module:
    """Eval mode, on the device, in the rule's memory layout."""
    return backbone.eval().to(device).to(memory_format=memory_format(device, precision))


def augment_workers(device: torch.device) -> int:
    """Processes that augment fine-tuning batches beside the training process: none on a CPU, whose cores train
    the network; on a GPU every core but one, at most 8. Measured on one H200 with 16 cores (`make model`'s
    fine-tune, 160 px, 8 epochs): 51 s with the augmentation in the training process, 31 s with 8 workers."""
    return 0 if device.type == "cpu" else max(0, min(8, (os.cpu_count() or 1) - 1))


def set_cpu_threads(processes: int = 1) -> None:
    """On the CPU, one torch thread per core shared by `processes` training processes."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, processes)))
