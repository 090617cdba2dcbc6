"""Self-supervised pretraining of a backbone: SimCLR, BYOL or SupCon.

One process, or one per device under torchrun (DistributedDataParallel; gloo on CPU, NCCL on GPU). bf16
autocast + channels_last on CPU, AMP on GPU; AdamW with linear warm-up then cosine decay per step; every epoch
(and on SIGINT/SIGTERM) an atomic checkpoint next to the output, from which `resume=True` continues on the
identical schedule; TensorBoard logs and a progress bar on rank 0; the result is a bundle without head.
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
from radregion.networks import (BYOLPredictor, ProjectionHead, build_backbone, feature_dim, momentum_copy,
                                update_momentum)
from radregion.pretrain_data import ViewsDataset, fit_batch_size, prepare_images

METHODS = ("simclr", "byol", "supcon")
TEMPERATURE = {"simclr": 0.2, "supcon": 0.1}
BYOL_BASE_MOMENTUM = 0.99
CROP_MARGIN = 1.25  # images are cached this much larger than the input size, so random crops keep detail
CHECKPOINT_FORMAT = 1
RANK_STATE_ENV = "RADREGION_RANK_STATE_DIR"  # if set, every rank writes its final parameters there (DDP test)


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


def _parameter_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for parameter in model.parameters():
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)  # no decay on norms and biases
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- the loop ----------------------------------------------------------------------------------------------
def pretrain(method: str, images, output, *, arch: str = "resnet18", size: int = 128, epochs: int = 100,
             batch_size: int = 64, lr: float | None = None, weight_decay: float = 1e-4, warmup_epochs: int = 5,
             seed: int = 0, gauge: bool = True, clean: bool = True, workers: int | None = None,
             resume: bool = False, log_dir=None, device: str = "auto", precision: str = "auto",
             temperature: float | None = None, stop_after: int | None = None, progress: bool = True,
             command: list[str] | None = None, init: str | None = None) -> Path | None:
    """Pretrain a backbone and write it as a bundle at `output` (returns its path).

    images: folders and/or labels CSVs (SupCon uses their labels; unlabelled images are their own class).
    batch_size is per process (the global batch is batch_size x world size); lr defaults to
    1e-3 x sqrt(global batch / 256) (square-root scaling, as suits Adam). `stop_after=k` stops after epoch k
    leaving a checkpoint (for time-sliced jobs; returns None). Distributed when started by torchrun.
    `init="imagenet"` starts from the architecture's installed ImageNet weights (efficientnet-lite0), else from a
    random initialisation; `epochs=0` writes that starting backbone (the start of a supervised fine-tune).
    """
    from radregion.cleaning import CleaningSettings

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if init not in (None, "imagenet"):
        raise ValueError(f"init must be imagenet or None, not {init!r}")
    if epochs < 0 or batch_size < 2 or size < 32:
        raise ValueError("need epochs >= 0, batch size >= 2 and size >= 32")
    output = Path(output)
    ckpt_file = checkpoint_path(output)
    world = World(device)
    try:
        if world.device.type == "cpu":
            set_cpu_threads(world.local_world)
        else:
            torch.backends.cudnn.benchmark = True
        if workers is None:
            workers = min(8, max(1, (os.cpu_count() or 1) // world.local_world - 1))
        show = progress and world.main

        if ckpt_file.exists() and not resume:
            raise RadiographError(ckpt_file, "a checkpoint of an unfinished run exists: add --resume to continue "
                                             "it, or delete it to start again")
        crop_settings = dict(crop_borders=False, low_percentile=0.0, high_percentile=100.0) if not clean else {}
        settings = CleaningSettings(size=size, **crop_settings)
        load_settings = CleaningSettings(size=int(round(size * CROP_MARGIN)), **crop_settings)
        pretrained = init == "imagenet"
        if epochs == 0:  # the starting backbone: where a supervised fine-tune starts
            torch.manual_seed(seed)
            if world.main:
                _write_bundle(output, build_backbone(arch, pretrained), arch, settings, dict(
                    data=[str(Path(i).resolve()) for i in images], init=init or "random", epochs=0,
                    stage="ImageNet weights" if pretrained else "random initialisation",
                    command=command if command is not None else sys.argv, seed=seed, cleaning=clean))
            return output
        paths, entries, classes, skipped = prepare_images(images, load_settings, world, workers, show)
        n_labelled = sum(1 for c in classes if c >= 0)
        if method == "supcon" and n_labelled == 0 and world.main:
            print("pretrain: no labels given (no CSV): SupCon reduces to SimCLR with its temperature",
                  file=sys.stderr)
        batch_size = fit_batch_size(batch_size, len(paths), world)
        steps_per_epoch = len(paths) // world.world // batch_size
        total_steps = steps_per_epoch * epochs
        warmup_steps = min(warmup_epochs * steps_per_epoch, total_steps // 2)
        global_batch = batch_size * world.world
        lr = lr if lr is not None else 1e-3 * math.sqrt(global_batch / 256)
        temperature = temperature if temperature is not None else TEMPERATURE.get(method)
        config = dict(method=method, arch=arch, init=init, size=size, epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed, gauge=gauge, clean=clean,
                      images=len(paths), world_size=world.world, temperature=temperature)

        torch.manual_seed(seed)
        autocast_dtype = device_rule.autocast_dtype(world.device, precision)
        layout = device_rule.memory_format(world.device, precision)
        model = SSLModel(method, arch, pretrained).to(world.device).to(memory_format=layout)
        target = momentum_copy(model.encoder()) if method == "byol" else None
        optimizer = torch.optim.AdamW(_parameter_groups(model, weight_decay), lr=lr)
        scaler = device_rule.grad_scaler(world.device, precision)

        start_epoch, start_step, global_step = 0, 0, 0
        if resume and ckpt_file.exists():
            state = _load_checkpoint(ckpt_file, config, world.device, model, target, optimizer, scaler)
            start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
            if world.main:
                print(f"pretrain: resuming {ckpt_file} at epoch {start_epoch + 1}, step {start_step + 1}",
                      file=sys.stderr)
        elif resume and world.main:
            print(f"pretrain: no checkpoint at {ckpt_file}: starting from the beginning", file=sys.stderr)

        train_model = model
        if world.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
        dataset = ViewsDataset(paths, entries, classes, load_settings, size, gauge, seed)
        sampler = DistributedSampler(dataset, num_replicas=world.world, rank=world.rank, shuffle=True, seed=seed,
                                     drop_last=True)

        def save_checkpoint(epoch, step_in_epoch):
            if not world.main:
                return
            state = {"format": CHECKPOINT_FORMAT, "config": config, "epoch": epoch, "step_in_epoch": step_in_epoch,
                     "global_step": global_step, "model": model.state_dict(),
                     "target": target.state_dict() if target is not None else {},
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
            with atomic_write(ckpt_file) as handle:
                torch.save(state, handle)

        writer = None
        if world.main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        from tqdm import tqdm

        bar = tqdm(total=total_steps * global_batch * 2, initial=global_step * global_batch * 2, unit="view",
                   unit_scale=True, desc=f"{method} {arch} {size}px", disable=not show, dynamic_ncols=True,
                   smoothing=0.1)
        loss_value = float("nan")
        autocast = device_rule.autocast(world.device, precision)
        with stop_on_signals() as signals:
            for epoch in range(start_epoch, epochs):
                if stop_after is not None and epoch >= stop_after:
                    bar.close()
                    if writer is not None:
                        writer.close()
                    return None
                sampler.set_epoch(epoch)
                dataset.epoch = epoch
                skip = start_step if epoch == start_epoch else 0
                order = list(sampler)[skip * batch_size:]
                # workers fork although TensorBoard's writer thread runs: they never take its locks, and
                # forkserver workers cost 12 s an epoch here (measured) to import torch and MONAI again
                loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                                    drop_last=True, pin_memory=world.device.type == "cuda")
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
                        group["lr"] = lr * lr_factor(global_step, warmup_steps, total_steps)
                    x = torch.cat([first, second]).to(world.device, non_blocking=True)
                    loss = _loss(method, train_model, target, x.contiguous(memory_format=layout),
                                 batch_classes.to(world.device), world, temperature, autocast)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    if target is not None:
                        momentum = byol_momentum(global_step, total_steps)
                        update_momentum(model.encoder(), target, momentum)
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise ValueError(f"pretrain: the loss became {loss_value} at step {global_step + 1}; "
                                         "try a lower --lr")
                    global_step += 1
                    step_in_epoch += 1
                    epoch_views += 2 * global_batch
                    bar.update(2 * global_batch)
                    bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss_value:.3f}", refresh=False)
                    if writer is not None:
                        writer.add_scalar("train/loss", loss_value, global_step)
                        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
                        if target is not None:
                            writer.add_scalar("train/byol_momentum", momentum, global_step)
                        if global_step == 1:
                            writer.add_images("views/first", first[:8], global_step)
                            writer.add_images("views/second", second[:8], global_step)
                    if world.any(signals["stop"]):
                        stopped = True
                        break
                if stopped:
                    save_checkpoint(epoch, step_in_epoch)
                    world.barrier()
                    bar.close()
                    if world.main:
                        print(f"\npretrain: stopped; checkpoint {ckpt_file} (epoch {epoch + 1}, step "
                              f"{step_in_epoch}); continue with --resume", file=sys.stderr)
                    raise KeyboardInterrupt
                seconds = time.perf_counter() - epoch_start
                if writer is not None:
                    writer.add_scalar("train/views_per_second", epoch_views / max(seconds, 1e-9), global_step)
                    writer.add_scalar("train/epoch_loss_last", loss_value, epoch + 1)
                    writer.flush()
                save_checkpoint(epoch + 1, 0)
                world.barrier()
        bar.close()
        _dump_rank_state(model, world)

        if not world.main:
            return output
        writer.close()
        training = dict(
            data=[str(Path(i).resolve()) for i in images], command=command if command is not None else sys.argv,
            stage="pretrain", init=init or "random", method=method, epochs=epochs, batch_size=batch_size, global_batch=global_batch, lr=lr,
            weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed, gauge=gauge, cleaning=clean,
            images=len(paths), labelled_images=n_labelled, skipped_files=len(skipped), temperature=temperature,
            world_size=world.world, device=world.device.type,
            precision=str(autocast_dtype).replace("torch.", "") if autocast_dtype else "float32",
            final_loss=loss_value)
        _write_bundle(output, model.backbone, arch, settings, training)
        ckpt_file.unlink(missing_ok=True)
        return output
    finally:
        world.close()


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


def _write_bundle(output: Path, backbone: nn.Module, arch: str, settings, training: dict) -> None:
    from radregion.bundle import provenance, save_bundle

    meta = {"architecture": {"name": arch, "feature_dim": feature_dim(arch), "in_channels": 1},
            "cleaning": settings.to_dict(),
            "training": provenance(data=training.pop("data"), command=training.pop("command"), **training)}
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in backbone.state_dict().items()}
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


def _dump_rank_state(model: nn.Module, world: World) -> None:
    folder = os.environ.get(RANK_STATE_ENV)
    if not folder:
        return
    from safetensors.torch import save_file

    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.named_parameters()},
              str(Path(folder) / f"rank{world.rank}.safetensors"))
