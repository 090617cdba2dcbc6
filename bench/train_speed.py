"""Pretraining speed: views/s of one SimCLR training step (ResNet-18) at 128 and 224 px, fp32 against bf16
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


def gemm_flops_per_second(dtype, device, n=2048, seconds=2.0) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start)


def forward_flops_per_view(size: int) -> float:
    model = SSLModel("simclr", "resnet18").train()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 1, size, size))
    return counter.get_total_flops() / 2


def train_views_per_second(size, batch, steps, device, bf16) -> float:
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * 2 * batch / (time.perf_counter() - start)


def augment_views_per_second(size, seconds=2.0) -> float:
    rng = np.random.default_rng(0)
    image = (rng.random((int(size * 1.25),) * 2) * 255).astype(np.uint8)
    views = pretrain_views(size).set_random_state(0)
    pairs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        views(image)
        pairs += 1
    return 2 * pairs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--batch", type=int, default=32, help="images per step (2 views each)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch} "
          f"images = {2 * args.batch} views per step")
    gemm = {"fp32": gemm_flops_per_second(torch.float32, device), "bf16": gemm_flops_per_second(torch.bfloat16, device)}
    print(f"GEMM 2048^3: fp32 {gemm['fp32'] / 1e9:.0f} GFLOP/s, bf16 {gemm['bf16'] / 1e9:.0f} GFLOP/s")
    header = f"{'size':>5} {'precision':<22} {'GFLOP/view(train)':>17} {'views/s':>8} {'bound':>8} {'of bound':>8}"
    print(header)
    for size in args.sizes:
        train_flops = 3 * forward_flops_per_view(size)
        for name, bf16 in (("fp32", False), ("bf16+channels_last", True)):
            measured = train_views_per_second(size, args.batch, args.steps, device, bf16)
            bound = gemm["bf16" if bf16 else "fp32"] / train_flops
            print(f"{size:>5} {name:<22} {train_flops / 1e9:>17.2f} {measured:>8.1f} {bound:>8.1f} "
                  f"{measured / bound:>8.0%}")
    for size in args.sizes:
        print(f"augmentation (pretrain_views, 1 core): {augment_views_per_second(size):.0f} views/s at {size} px")


if __name__ == "__main__":
    main()
