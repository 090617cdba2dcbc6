"""Distributed training helpers: the world torchrun describes, a gather that keeps gradients, signal flags."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import torch
import torch.distributed as dist


class World:
    """World size / rank from torchrun's environment; a single process otherwise."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate x from all ranks, keeping the gradient path to this rank's part."""
        return GatherWithGradient.apply(x.contiguous()) if self.enabled else x

    def gather_plain(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate x from all ranks (no gradient)."""
        if not self.enabled:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own rows (works on gloo too)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM set a flag instead of killing, so the loop can checkpoint first."""
    requested = {"stop": False}
    if sys.platform == "win32" or not _in_main_thread():
        yield requested
        return

    def handler(signum, frame):
        requested["stop"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
