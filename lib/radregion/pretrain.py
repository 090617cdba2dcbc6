"""Self-supervised pretraining of a backbone: SimCLR, BYOL or SupCon.

One process, or one per device under torchrun (DistributedDataParallel; gloo on CPU, NCCL on GPU), in the device
and precision of `radregion.device`; AdamW with linear warm-up then cosine decay per step; every epoch (and on
SIGINT/SIGTERM) an atomic checkpoint next to the output, from which `resume=True` continues on the identical
schedule; TensorBoard logs and a progress bar on rank 0; the result is a bundle without head.

`pretrain()` is `setup()` -> `PretrainRun.epoch()` per epoch -> `PretrainRun.finish()`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from radregion import device as device_rule
from radregion.atomic import atomic_write
from radregion.device import set_cpu_threads
from radregion.distributed import World, stop_on_signals
from radregion.errors import RadiographError
from radregion.losses import byol_loss, ntxent_loss, supcon_loss
from radregion.networks import (
    BYOLPredictor,
    ProjectionHead,
    build_backbone,
    feature_dim,
    momentum_copy,
    parameter_groups,
    update_momentum,
)
from radregion.pretrain_data import ViewsDataset, fit_batch_size, prepare_images

METHODS = ("simclr", "byol", "supcon")
TEMPERATURE = {"simclr": 0.2, "supcon": 0.1}
BYOL_BASE_MOMENTUM = 0.99
CROP_MARGIN = 1.25  # images are cached this much larger than the input size, so random crops keep detail
CHECKPOINT_FORMAT = 1


def checkpoint_path(output) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".checkpoint.pt")


# --- model -------------------------------------------------------------------------------------------------
class SSLModel(nn.Module):
    """Backbone + projector (+ BYOL predictor). forward: images -> projections (BYOL: predictions)."""

    def __init__(self, method: str, arch: str, pretrained: bool = False):
        super().__init__()
        self.backbone = build_backbone(arch, pretrained)
        dim = feature_dim(arch)
        if method == "byol":
            self.projector = ProjectionHead(dim, 4096, 256)
            self.predictor = BYOLPredictor(256, 4096)
        else:
            self.projector = ProjectionHead(dim, 2048, 128)
            self.predictor = None

    def encoder(self) -> nn.Sequential:
        """backbone + projector as one module (shares their parameters): what the BYOL target copies."""
        return nn.Sequential(self.backbone, self.projector)

    def forward(self, x):
        z = self.projector(self.backbone(x))
        return self.predictor(z) if self.predictor is not None else z


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0, per optimisation step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def byol_momentum(step: int, total_steps: int, base: float = BYOL_BASE_MOMENTUM) -> float:
    """BYOL's schedule: from `base` up to 1 with a cosine over training."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


# --- the run: setup, one epoch at a time, finish -----------------------------------------------------------
def pretrain(method: str, images, output, *, stop_after: int | None = None, **options) -> Path | None:
    """Pretrain a backbone and write it as a bundle at `output` (returns its path): `setup`, then
    `PretrainRun.epoch` for each epoch left, then `PretrainRun.finish`. Options: those of `setup`.

    `stop_after=k` stops after epoch k leaving a checkpoint (for time-sliced jobs; returns None). SIGINT/SIGTERM
    save a checkpoint and raise KeyboardInterrupt. Distributed when started by torchrun.
    """
    run = setup(method, images, output, **options)
    try:
        with stop_on_signals() as signals:
            for epoch in run.epochs_left():
                if stop_after is not None and epoch >= stop_after:
                    return None
                run.epoch(epoch, signals)
        return run.finish()
    finally:
        run.close()


def setup(
    method: str,
    images,
    output,
    *,
    arch: str = "resnet18",
    size: int = 128,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    warmup_epochs: int = 5,
    seed: int = 0,
    gauge: bool = True,
    clean: bool = True,
    workers: int | None = None,
    resume: bool = False,
    log_dir=None,
    device: str = "auto",
    precision: str = "auto",
    temperature: float | None = None,
    progress: bool = True,
    command: list[str] | None = None,
    init: str | None = None,
    licence: str = "unknown",
) -> "PretrainRun":
    """Everything before the first step: the process world, the images (decoded and cached), model, optimiser,
    data loader, TensorBoard writer, and the state of a checkpoint when `resume`.

    images: folders and/or labels CSVs (SupCon uses their labels; unlabelled images are their own class).
    batch_size is per process (the global batch is batch_size x world size); lr defaults to
    1e-3 x sqrt(global batch / 256) (square-root scaling, as suits Adam). `init="imagenet"` starts from the
    architecture's installed ImageNet weights (`networks.PRETRAINED`), else from a random initialisation;
    `epochs=0` has no epoch: `finish` writes that starting backbone (the start of a supervised fine-tune).
    `licence`: the terms of the images' source, recorded in the bundle.
    """
    from radregion.cleaning import CleaningSettings

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if init not in (None, "imagenet"):
        raise ValueError(f"init must be imagenet or None, not {init!r}")
    if epochs < 0 or batch_size < 2 or size < 32:
        raise ValueError("need epochs >= 0, batch size >= 2 and size >= 32")
    output = Path(output)
    run = PretrainRun(method, output, World(device), precision, progress)
    try:
        world = run.world
        if world.device.type == "cpu":
            set_cpu_threads(world.local_world)
        else:
            torch.backends.cudnn.benchmark = True
        if workers is None:
            workers = min(8, max(1, (os.cpu_count() or 1) // world.local_world - 1))
        if run.checkpoint.exists() and not resume:
            raise RadiographError(
                run.checkpoint,
                "a checkpoint of an unfinished run exists: add --resume to continue it, or delete it to start again",
            )
        crop_settings = dict(crop_borders=False, low_percentile=0.0, high_percentile=100.0) if not clean else {}
        run.settings = CleaningSettings(size=size, **crop_settings)
        load_settings = CleaningSettings(size=int(round(size * CROP_MARGIN)), **crop_settings)
        pretrained = init == "imagenet"
        run.arch, run.epochs, run.licence = arch, epochs, licence
        run.provenance = dict(
            data=[str(Path(i).resolve()) for i in images],
            command=command if command is not None else sys.argv,
            init=init or "random",
        )
        if epochs == 0:  # the starting backbone: where a supervised fine-tune starts
            torch.manual_seed(seed)
            run.model = SSLModel(method, arch, pretrained)
            run.provenance.update(
                epochs=0, stage="ImageNet weights" if pretrained else "random initialisation", seed=seed, cleaning=clean
            )
            return run
        paths, entries, classes, skipped = prepare_images(images, load_settings, world, workers, run.show)
        n_labelled = sum(1 for c in classes if c >= 0)
        if method == "supcon" and n_labelled == 0 and world.main:
            print("pretrain: no labels given (no CSV): SupCon reduces to SimCLR with its temperature", file=sys.stderr)
        batch_size = fit_batch_size(batch_size, len(paths), world)
        run.batch_size, run.workers = batch_size, workers
        steps_per_epoch = len(paths) // world.world // batch_size
        run.total_steps = steps_per_epoch * epochs
        run.warmup_steps = min(warmup_epochs * steps_per_epoch, run.total_steps // 2)
        run.global_batch = batch_size * world.world
        run.lr = lr if lr is not None else 1e-3 * math.sqrt(run.global_batch / 256)
        run.temperature = temperature if temperature is not None else TEMPERATURE.get(method)
        run.config = dict(
            method=method,
            arch=arch,
            init=init,
            size=size,
            epochs=epochs,
            batch_size=batch_size,
            lr=run.lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            seed=seed,
            gauge=gauge,
            clean=clean,
            images=len(paths),
            world_size=world.world,
            temperature=run.temperature,
        )
        run.provenance.update(
            stage="pretrain",
            method=method,
            epochs=epochs,
            batch_size=batch_size,
            global_batch=run.global_batch,
            lr=run.lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            seed=seed,
            gauge=gauge,
            cleaning=clean,
            images=len(paths),
            labelled_images=n_labelled,
            skipped_files=len(skipped),
            temperature=run.temperature,
            world_size=world.world,
            device=world.device.type,
        )

        torch.manual_seed(seed)
        run.model = SSLModel(method, arch, pretrained).to(world.device).to(memory_format=run.layout)
        run.target = momentum_copy(run.model.encoder()) if method == "byol" else None
        run.optimizer = torch.optim.AdamW(parameter_groups(run.model, weight_decay), lr=run.lr)
        run.scaler = device_rule.grad_scaler(world.device, precision)
        if resume and run.checkpoint.exists():
            state = _load_checkpoint(
                run.checkpoint, run.config, world.device, run.model, run.target, run.optimizer, run.scaler
            )
            run.start_epoch, run.start_step, run.global_step = (
                state["epoch"],
                state["step_in_epoch"],
                state["global_step"],
            )
            if world.main:
                print(
                    f"pretrain: resuming {run.checkpoint} at epoch {run.start_epoch + 1}, step {run.start_step + 1}",
                    file=sys.stderr,
                )
        elif resume and world.main:
            print(f"pretrain: no checkpoint at {run.checkpoint}: starting from the beginning", file=sys.stderr)

        run.train_model = run.model
        if world.enabled:
            run.train_model = nn.parallel.DistributedDataParallel(
                run.model, device_ids=[world.device.index] if world.device.type == "cuda" else None
            )
        run.dataset = ViewsDataset(paths, entries, classes, load_settings, size, gauge, seed)
        run.sampler = DistributedSampler(
            run.dataset, num_replicas=world.world, rank=world.rank, shuffle=True, seed=seed, drop_last=True
        )
        if world.main:
            from torch.utils.tensorboard import SummaryWriter

            run.writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        from tqdm import tqdm

        run.bar = tqdm(
            total=run.total_steps * run.global_batch * 2,
            initial=run.global_step * run.global_batch * 2,
            unit="view",
            unit_scale=True,
            desc=f"{method} {arch} {size}px",
            disable=not run.show,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        return run
    except BaseException:
        run.close()
        raise


class PretrainRun:
    """The state of one pretraining run between `setup` and `finish` (its fields are set by `setup`)."""

    def __init__(self, method: str, output: Path, world: World, precision: str, progress: bool):
        self.method, self.output, self.world, self.precision = method, output, world, precision
        self.checkpoint = checkpoint_path(output)
        self.show = progress and world.main
        self.autocast_dtype = device_rule.autocast_dtype(world.device, precision)
        self.autocast = device_rule.autocast(world.device, precision)
        self.layout = device_rule.memory_format(world.device, precision)
        self.epochs = 0
        self.start_epoch = self.start_step = self.global_step = 0
        self.loss_value = float("nan")
        self.model = self.target = self.writer = self.bar = None

    def epochs_left(self) -> range:
        return range(self.start_epoch, self.epochs)

    def epoch(self, epoch: int, signals: dict) -> None:
        """One epoch (from the resumed step in the first), then a checkpoint. A stop signal saves a checkpoint
        at the step reached and raises KeyboardInterrupt."""
        world, model, target, optimizer, scaler = self.world, self.model, self.target, self.optimizer, self.scaler
        self.sampler.set_epoch(epoch)
        self.dataset.epoch = epoch
        skip = self.start_step if epoch == self.start_epoch else 0
        order = list(self.sampler)[skip * self.batch_size :]
        # workers fork although TensorBoard's writer thread runs: they never take its locks, and
        # forkserver workers cost 12 s an epoch here (measured) to import torch and MONAI again
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.workers,
            drop_last=True,
            pin_memory=world.device.type == "cuda",
        )
        model.train()
        epoch_start, epoch_views = time.perf_counter(), 0
        step_in_epoch = skip
        stopped = False
        batches = iter(loader)
        while True:
            try:
                first, second, batch_classes = next(batches)
            except StopIteration:
                break
            except RuntimeError:
                if not signals["stop"]:
                    raise
                stopped = True  # Ctrl-C reached the loader workers too
                break
            for group in optimizer.param_groups:
                group["lr"] = self.lr * lr_factor(self.global_step, self.warmup_steps, self.total_steps)
            x = torch.cat([first, second]).to(world.device, non_blocking=True)
            loss = _loss(
                self.method,
                self.train_model,
                target,
                x.contiguous(memory_format=self.layout),
                batch_classes.to(world.device),
                world,
                self.temperature,
                self.autocast,
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if target is not None:
                momentum = byol_momentum(self.global_step, self.total_steps)
                update_momentum(model.encoder(), target, momentum)
            self.loss_value = loss.item()
            if not math.isfinite(self.loss_value):
                raise ValueError(
                    f"pretrain: the loss became {self.loss_value} at step {self.global_step + 1}; try a lower --lr"
                )
            self.global_step += 1
            step_in_epoch += 1
            epoch_views += 2 * self.global_batch
            self.bar.update(2 * self.global_batch)
            self.bar.set_postfix(epoch=f"{epoch + 1}/{self.epochs}", loss=f"{self.loss_value:.3f}", refresh=False)
            if self.writer is not None:
                self.writer.add_scalar("train/loss", self.loss_value, self.global_step)
                self.writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], self.global_step)
                if target is not None:
                    self.writer.add_scalar("train/byol_momentum", momentum, self.global_step)
                if self.global_step == 1:
                    self.writer.add_images("views/first", first[:8], self.global_step)
                    self.writer.add_images("views/second", second[:8], self.global_step)
            if world.any(signals["stop"]):
                stopped = True
                break
        if stopped:
            self._save_checkpoint(epoch, step_in_epoch)
            world.barrier()
            self.bar.close()
            if world.main:
                print(
                    f"\npretrain: stopped; checkpoint {self.checkpoint} (epoch {epoch + 1}, step "
                    f"{step_in_epoch}); continue with --resume",
                    file=sys.stderr,
                )
            raise KeyboardInterrupt
        seconds = time.perf_counter() - epoch_start
        if self.writer is not None:
            self.writer.add_scalar("train/views_per_second", epoch_views / max(seconds, 1e-9), self.global_step)
            self.writer.add_scalar("train/epoch_loss_last", self.loss_value, epoch + 1)
            self.writer.flush()
        self._save_checkpoint(epoch + 1, 0)
        world.barrier()

    def finish(self) -> Path:
        """Write the backbone as a bundle without head (rank 0) and remove the checkpoint."""
        if self.bar is not None:
            self.bar.close()
        if not self.world.main:
            return self.output
        training = dict(self.provenance)
        if self.epochs:
            training.update(
                precision=str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "float32",
                final_loss=self.loss_value,
            )
        _write_bundle(self.output, self.model.backbone, self.arch, self.settings, training, self.licence)
        self.checkpoint.unlink(missing_ok=True)
        return self.output

    def close(self) -> None:
        """Release the writer, the progress bar and the process group (after `finish`, or on an error)."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.world.close()

    def _save_checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        if not self.world.main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "target": self.target.state_dict() if self.target is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        with atomic_write(self.checkpoint) as handle:
            torch.save(state, handle)


def _load_checkpoint(path: Path, config: dict, device, model, target, optimizer, scaler) -> dict:
    """Restore the training state in place (tensors only: weights_only=True); the position to resume from."""
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT or state["config"] != config:
        different = {k: (state["config"].get(k), v) for k, v in config.items() if state["config"].get(k) != v}
        raise RadiographError(path, f"checkpoint is of a different run (saved, now: {different})")
    model.load_state_dict(state["model"])
    if target is not None:
        target.load_state_dict(state["target"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state


def _write_bundle(output: Path, backbone: nn.Module, arch: str, settings, training: dict, licence: str) -> None:
    from radregion.bundle import provenance, save_bundle

    meta = {
        "architecture": {"name": arch, "feature_dim": feature_dim(arch), "in_channels": 1},
        "cleaning": settings.to_dict(),
        "licence": licence,
        "training": provenance(data=training.pop("data"), command=training.pop("command"), **training),
    }
    state = {
        k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in backbone.state_dict().items()
    }
    save_bundle(output, state, None, meta)


def _loss(method, model, target, x, classes, world: World, temperature, autocast) -> torch.Tensor:
    """The method's loss on a batch x = (both views of B images); computed in fp32, gathered across ranks."""
    with autocast:
        out = model(x)
        if target is not None:
            with torch.no_grad():
                target_out = target(x)
    first, second = out.float().chunk(2)
    if method == "byol":
        target_first, target_second = target_out.float().chunk(2)
        return byol_loss(first, target_second) + byol_loss(second, target_first)
    first, second = world.gather(first), world.gather(second)
    if method == "simclr":
        return ntxent_loss(first, second, temperature)
    classes = world.gather_plain(classes)
    return supcon_loss(torch.cat([first, second]), torch.cat([classes, classes]), temperature)
