"""Inference speed of RadRegion (issue 4 "Bench and targets"), printed in one run.

1. end-to-end img/s of `radregion predict` (a subprocess: start-up, decoding, cleaning, model, CSV) over the
   unlabelled UNIFESP images, run twice: the first run on a CPU exports the backbone to ONNX, the second finds the
   export in the engine's cache (`radregion.runtime`);
2. model-only img/s of the engine's path (`radregion.runtime.InferenceBackbone`: ONNX Runtime on a CPU in fp32,
   else torch with the device rule's autocast, channels_last), and torch's channels_last path beside it;
3. a naive eager fp32 forward of the same architecture (NCHW, no autocast), and the reference of issue 12: a naive
   eager fp32 forward of MONAI ResNet-18 (stride 2, 224 px, batch 32, model only);
4. the bound: measured GEMM GFLOP/s (bf16 and fp32) / the model's FLOPs per image;
5. peak memory (RSS of the predict process; CUDA max allocated on GPU);
6. start-up (`radregion predict` on one image) and the end-to-end ceiling it leaves: images / (start-up +
   images / model-only), the rate if decoding and cleaning cost nothing.

    .venv/bin/python bench/predict_speed.py [--model BUNDLE] [--limit N] [--batch-size 32] [--device cpu]

Without --model (and no shipped default model) it builds a random-weight resnet18 bundle at --size px.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from radregion.bundle import default_model_path, load_bundle, save_bundle
from radregion.device import (
    autocast,
    autocast_dtype,
    inference_precision,
    precision_name,
    prepare_backbone,
    resolve_device,
)
from radregion.features import forward_features
from radregion.runtime import InferenceBackbone

REPO = Path(__file__).resolve().parents[1]


def random_bundle(folder: Path, arch: str, size: int) -> Path:
    from radregion.cleaning import CleaningSettings
    from radregion.head import LinearHead
    from radregion.networks import build_backbone, feature_dim
    from radregion.ood import fit_ood

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    dim = feature_dim(arch)
    regions = [f"region{i}" for i in range(21)]
    head = LinearHead(
        rng.normal(size=(21, dim)).astype(np.float32),
        np.zeros(21, np.float32),
        np.zeros(dim, np.float32),
        np.ones(dim, np.float32),
        regions,
    )
    ood = fit_ood(rng.normal(size=(200, dim)).astype(np.float32), rng.integers(0, 21, 200))
    ood.threshold = 30.0
    meta = {
        "architecture": {"name": arch, "feature_dim": dim, "in_channels": 1},
        "cleaning": CleaningSettings(size=size).to_dict(),
        "taxonomy": {"name": "unifesp22"},
    }
    return save_bundle(folder / "random", build_backbone(arch).state_dict(), head, meta, ood=ood, half_backbone=True)


def rate(fn, n_images, warmup=2, min_seconds=3.0):
    for _ in range(warmup):
        fn()
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return runs * n_images / elapsed


def torch_compilations(net, x) -> dict:
    """torch's own CPU inference optimisations of `net`, measured beside ONNX Runtime: TorchScript frozen with
    `optimize_for_inference`, and fx's conv-batch-norm fusion (each under inference mode)."""
    import copy

    from torch.fx.experimental.optimization import fuse

    out = {}
    with torch.inference_mode():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(copy.deepcopy(net), x)))
    out["TorchScript freeze + optimize_for_inference"] = torch.inference_mode()(frozen)
    try:
        out["fx conv-bn fusion"] = torch.inference_mode()(fuse(copy.deepcopy(net)))
    except Exception as error:  # fx cannot trace every architecture
        print(f"fx conv-bn fusion: not traceable ({type(error).__name__})")
    return out


def gemm_gflops(dtype, device, n=2048, seconds=2.0):
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def step():
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return rate(step, 1, min_seconds=seconds) * 2 * n**3 / 1e9


def flops_per_image(net, size, device):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, size, size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundle (default: the shipped model, else a random resnet18 bundle)")
    parser.add_argument("--arch", default="resnet18", help="architecture of the random bundle")
    parser.add_argument("--size", type=int, default=224, help="input size of the random bundle")
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "unifesp" / "unlabelled"))
    parser.add_argument("--limit", type=int, help="use only the first N images for the end-to-end run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="radregion-bench-"))
    model = Path(args.model) if args.model else default_model_path()
    if not (model / "bundle.json").is_file():
        model = random_bundle(tmp, args.arch, args.size)
        print(f"model: random-weight {args.arch} bundle at {args.size} px (no default model yet)")
    bundle = load_bundle(model)
    size, arch = bundle.settings.size, bundle.meta["architecture"]["name"]
    device = resolve_device(args.device)
    print(
        f"model: {model} ({arch}, {size} px, version {bundle.version}); device {device}; "
        f"torch threads {torch.get_num_threads()}; batch {args.batch_size}"
    )

    images = sorted(p for p in Path(args.images).rglob("*") if p.is_file())[: args.limit]
    env = {**os.environ, "RADREGION_CACHE": str(tmp / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "radregion.cli",
        "predict",
        "--model",
        str(model),
        "--output",
        str(tmp / "p.csv"),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--device",
        str(device),
        "--no-progress",
    ]

    def run_predict(paths):
        start = time.perf_counter()
        result = subprocess.run(cmd + list(map(str, paths)), capture_output=True, text=True, env=env)
        if result.returncode != 0:
            sys.exit(f"radregion predict failed:\n{result.stderr}")
        return time.perf_counter() - start, result

    e2e_rates = {}
    for run in ("first", "second"):  # the first run exports the backbone to ONNX (CPU), the second finds it kept
        e2e_seconds, result = run_predict(images)
        e2e_rates[run] = len(images) / e2e_seconds
        print(
            f"end-to-end `radregion predict`, {run} run: {len(images)} images in {e2e_seconds:.1f} s = "
            f"{e2e_rates[run]:.1f} img/s (start-up, decoding, cleaning, model, CSV; no image cache; "
            f"{result.stderr.strip().splitlines()[-1]})"
        )
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    batch = torch.randint(0, 256, (args.batch_size, 1, size, size), dtype=torch.uint8).float().div(255)
    precision = inference_precision(device)  # what `radregion predict` runs
    net = InferenceBackbone(bundle.backbone(), device, precision, size=size)
    net.expect(len(images))
    torch_net = prepare_backbone(bundle.backbone(), device)
    x = batch.to(device).contiguous(memory_format=torch.channels_last)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fast():
        forward_features(net, x, device, precision)
        sync()

    def torch_path():
        with torch.inference_mode(), autocast(device):
            torch_net(x)
        sync()

    naive_net = bundle.backbone().to(device).eval()
    x_naive = batch.to(device)

    def naive():
        with torch.no_grad():
            naive_net(x_naive)
        sync()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model_only = rate(fast, args.batch_size)
    torch_rate = rate(torch_path, args.batch_size)
    compiled = torch_compilations(torch_net, x) if device.type == "cpu" else {}
    compiled_rates = {name: rate(lambda net=net: net(x), args.batch_size) for name, net in compiled.items()}
    naive_rate = rate(naive, args.batch_size)
    from radregion.networks import build_backbone

    reference_net = build_backbone("resnet18").to(device).eval()
    x_reference = torch.rand(32, 1, 224, 224, device=device)

    def reference():
        with torch.no_grad():
            reference_net(x_reference)
        sync()

    reference_rate = rate(reference, 32)
    flops = flops_per_image(naive_net, size, device)
    low = autocast_dtype(device, precision) or torch.float32  # what the engine's path runs
    gemm_low, gemm_fp32 = gemm_gflops(low, device), gemm_gflops(torch.float32, device)
    bound_low, bound_fp32 = gemm_low * 1e9 / flops, gemm_fp32 * 1e9 / flops
    low_name = str(low).replace("torch.", "")
    rule_name = precision_name(device)  # the torch paths below: the training rule (bf16 where the CPU computes it)
    print(f"model-only (the engine's path: {net.runtime}, {precision_name(device, precision)}): {model_only:.1f} img/s")
    print(f"model-only, torch {rule_name} + channels_last: {torch_rate:.1f} img/s")
    for name, value in compiled_rates.items():
        print(f"model-only, torch {rule_name} + channels_last, {name}: {value:.1f} img/s (tried, not used)")
    print(f"naive eager fp32 forward: {naive_rate:.1f} img/s")
    print(f"reference: naive eager fp32 MONAI ResNet-18, 224 px, batch 32: {reference_rate:.1f} img/s")
    print(f"model FLOPs per image: {flops / 1e9:.2f} GFLOP")
    print(
        f"GEMM: {gemm_low:.0f} GFLOP/s {low_name}, {gemm_fp32:.0f} GFLOP/s fp32 -> bound "
        f"{bound_low:.1f} img/s {low_name}, {bound_fp32:.1f} img/s fp32"
    )
    startup, _ = run_predict(images[:1])
    ceiling = len(images) / (startup + len(images) / model_only)
    print(
        f"start-up (`radregion predict` on one image): {startup:.1f} s -> end-to-end ceiling with free decoding "
        f"{ceiling:.1f} img/s = {ceiling / naive_rate:.2f} x naive fp32"
    )
    print(
        f"targets: end-to-end / reference ResNet-18 fp32 = {e2e_rates['first'] / reference_rate:.2f} first run, "
        f"{e2e_rates['second'] / reference_rate:.2f} second run (>= 2.5); "
        f"model-only / {low_name} bound = {model_only / bound_low:.0%} (>= 60%)"
    )
    memory = f"peak RSS of `radregion predict`: {peak_rss:.0f} MiB"
    if device.type == "cuda":
        memory += f"; CUDA max allocated (this process) {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    print(memory)


if __name__ == "__main__":
    main()
