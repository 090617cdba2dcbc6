"""Pretraining speed: views/s of SimCLR training steps (ResNet-18) at 128 and 224 px, fp32 against bf16
autocast + channels_last, beside the bound that the machine's measured GEMM throughput and the model's training
FLOPs per view (3 x forward, counted with FlopCounterMode) give. Also the augmentation throughput per core.

    .venv/bin/python bench/train_speed.py [--sizes 128 224] [--batch 32] [--steps 3] [--device cpu]
"""

import argparse
import contextlib
import os
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from radregion.augment import pretrain_views
from radregion.losses import ntxent_loss
from radregion.pretrain import SSLModel


class Clock:
    """Wall time and this process's CPU time: on a shared CPU, work per CPU-second x cores estimates what the
    machine would do if it were ours alone."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def gemm_flops(dtype, device, n=2048, runs=8) -> tuple[float, float]:
    """FLOP per wall second and per CPU second of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    with Clock() as clock:
        for _ in range(runs):
            torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
    flops = 2 * n**3 * runs
    return flops / clock.wall, flops / max(clock.cpu, 1e-9)


def forward_flops_per_view(size: int) -> float:
    model = SSLModel("simclr", "resnet18").train()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 1, size, size))
    return counter.get_total_flops() / 2


def train_views_per_second(size, batch, steps, device, bf16) -> tuple[float, float]:
    torch.manual_seed(0)
    model = SSLModel("simclr", "resnet18").to(device).train()
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(2 * batch, 1, size, size, device=device)
    if bf16:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        with autocast:
            z = model(x)
        loss = ntxent_loss(*z.float().chunk(2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: oneDNN / cuDNN pick their kernels
    with Clock() as clock:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return steps * 2 * batch / clock.wall, steps * 2 * batch / max(clock.cpu, 1e-9)


def augment_views_per_cpu_second(size, pairs=40) -> float:
    rng = np.random.default_rng(0)
    image = (rng.random((int(size * 1.25),) * 2) * 255).astype(np.uint8)
    views = pretrain_views(size).set_random_state(0)
    torch.set_num_threads(1)
    with Clock() as clock:
        for _ in range(pairs):
            views(image)
    return 2 * pairs / max(clock.cpu, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--batch", type=int, default=16, help="images per step (2 views each)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch} "
        f"images = {2 * args.batch} views per step"
    )
    threads = torch.get_num_threads() if device.type == "cpu" else None
    gemm = {"fp32": gemm_flops(torch.float32, device), "bf16": gemm_flops(torch.bfloat16, device)}
    for name, (wall, cpu) in gemm.items():
        extra = f" ({cpu / 1e9:.0f} per CPU-second)" if threads else ""
        print(f"GEMM 2048^3 {name}: {wall / 1e9:.0f} GFLOP/s{extra}")
    if threads:
        print(
            f"views/CPU-s x {threads} threads = what the CPU would do if it were ours alone; bound from GEMM "
            "per CPU-second x threads"
        )
    print(
        f"{'size':>5} {'precision':<19} {'GFLOP/view':>10} {'views/s':>8} {'views/CPU-s':>11} {'bound/s':>8} "
        f"{'of bound':>8}"
    )
    for size in args.sizes:
        train_flops = 3 * forward_flops_per_view(size)
        for name, bf16 in (("fp32", False), ("bf16+channels_last", True)):
            wall, per_cpu = train_views_per_second(size, args.batch, args.steps, device, bf16)
            wall_gemm, cpu_gemm = gemm["bf16" if bf16 else "fp32"]
            bound = cpu_gemm * threads / train_flops if threads else wall_gemm / train_flops
            achieved = per_cpu * threads if threads else wall
            print(
                f"{size:>5} {name:<19} {train_flops / 1e9:>10.2f} {wall:>8.1f} {per_cpu:>11.1f} {bound:>8.1f} "
                f"{achieved / bound:>8.0%}"
            )
    for size in args.sizes:
        print(
            f"augmentation (pretrain_views, 1 thread): {augment_views_per_cpu_second(size):.0f} views/CPU-s at "
            f"{size} px"
        )


if __name__ == "__main__":
    main()
