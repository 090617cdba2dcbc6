"""Full fine-tuning of a bundle's backbone on labelled images (the supervised stage before a head is fitted).

Backbone + a linear layer, label-smoothed cross-entropy (Szegedy et al. 2016) with square-root inverse-frequency
region weights (fully balanced weights collapsed an ImageNet start: Chest recall 0.12), AdamW with a one-cycle
schedule (linear warm-up, cosine decay), the fine-tuning augmentation of `radregion.augment`, on the device and in
the precision of `radregion.device`. Optional outlier exposure (Hendrycks et al., ICLR 2019, "Deep anomaly detection
with outlier exposure", eq. 1): images of out-of-domain regions are pushed towards the uniform distribution over
the regions, so the features set them apart. Optional mixup (Zhang et al., ICLR 2018, "mixup: Beyond empirical risk
minimization", eq. 1; MONAI's `MixUp`) of the in-domain images and their targets, and an exponential moving average
of the backbone's weights (Polyak & Juditsky 1992; the decay warmed up as min(d, (1 + t) / (10 + t)), as in
TensorFlow's ExponentialMovingAverage with num_updates), returned in place of the last weights. Optional
sharpness-aware minimisation (Foret et al., ICLR 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", eqs. 2-3; robust to noisy labels in their experiments): each step takes the gradient at the weights
moved by rho along the normalised gradient, w + rho g / ||g||, and applies it at w. Outlier exposure's term is
either Hendrycks et al.'s cross-entropy to the uniform distribution or the energy bound of Liu et al. (NeurIPS 2020,
`radregion.losses.energy`): in-domain energies pushed below one margin, out-of-domain ones above another.
"""

from __future__ import annotations

import contextlib
import math
import sys

import numpy as np
import torch

from radregion import device as device_rule
from radregion.losses.energy import energy_margin_loss
from radregion.networks import BATCH_NORMS, momentum_copy, parameter_groups, update_momentum

CLASS_WEIGHTS = ("sqrt", "balanced", "none")
OUTLIER_LOSSES = ("uniform", "energy")
OUTLIER_WEIGHT = {"uniform": 0.5, "energy": 0.1}  # lambda of each outlier-exposure term, as its paper
DEFAULT_LABEL_SMOOTHING = 0.1


def region_weights(targets: torch.Tensor, n_regions: int, how: str = "sqrt") -> torch.Tensor | None:
    """Loss weight per region: (N / (C n_c))^p with p = 1/2 ("sqrt"), 1 ("balanced"); None for "none". `targets`:
    region indices, or (N, C) target distributions (n_c: their column sums)."""
    if how not in CLASS_WEIGHTS:
        raise ValueError(f"class weights must be one of {', '.join(CLASS_WEIGHTS)}, not {how!r}")
    if how == "none":
        return None
    counts = targets.sum(0) if targets.dim() == 2 else torch.bincount(targets, minlength=n_regions).float()
    counts = counts.clamp(min=1)
    weights = counts.sum() / (n_regions * counts)
    return weights.sqrt() if how == "sqrt" else weights


def outlier_exposure_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from the logits of out-of-domain images to the uniform distribution over the regions."""
    return -torch.log_softmax(logits.float(), dim=1).mean(1).mean()


def fine_tune(
    bundle,
    images: np.ndarray,
    targets,
    n_regions: int,
    *,
    outliers: np.ndarray | None = None,
    epochs: int = 20,
    lr: float = 5e-4,
    batch_size: int = 32,
    weight_decay: float = 0.01,
    class_weights: str = "sqrt",
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    outlier_loss: str = "uniform",
    mixup: float | None = None,
    ema: float | None = None,
    sam: float | None = None,
    augment: str = "standard",
    layer_decay: float | None = None,
    start_head=None,
    seed: int = 0,
    device="auto",
    precision: str = "auto",
    augment_workers: int | None = None,
    progress: bool = False,
) -> torch.nn.Module:
    """Fine-tune `bundle`'s backbone on cleaned uint8 `images` (N, S, S) with integer `targets` in
    [0, n_regions), or (N, n_regions) target distributions (rows summing to 1: an image of several regions);
    `outliers` (M, S, S): out-of-domain images for outlier exposure, its term `outlier_loss` (OUTLIER_LOSSES);
    `label_smoothing`: the in-domain targets' smoothing; `mixup`: the Beta(a, a) of mixup (None: off);
    `ema`: the decay of a moving average of the weights to return (None: the last weights); `sam`: the radius rho
    of sharpness-aware minimisation (None: plain steps; each step then costs two forward and backward passes);
    `augment`: `standard` or `strong` (`radregion.augment.fine_tune_view`); `layer_decay`: each step of depth
    below the linear layer learns at this factor of the one above (`radregion.networks.parameter_groups`; None: one
    rate);
    `start_head`: a `LinearHead` fitted on the bundle's frozen features, its regions in the targets' order, that
    the fine-tuning's linear layer starts from (linear probing then fine-tuning, LP-FT: Kumar et al., ICLR 2022,
    "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution"; None: random weights);
    `augment_workers`: processes that augment the batches ahead of the training step (None: the device rule's
    `augment_workers`; 0: in this process). The batches (images, outliers, order) depend only on `seed`; their
    augmentation on `seed` and the number of workers. Returns the backbone (CPU, eval mode)."""
    from radregion.augment import fine_tune_view
    from radregion.features import images_to_tensor

    if epochs < 1:
        raise ValueError("fine-tuning needs at least one epoch")
    if mixup is not None and not mixup > 0:
        raise ValueError(f"mixup's alpha must be above 0, not {mixup}")
    if ema is not None and not 0 < ema < 1:
        raise ValueError(f"the moving average's decay must be between 0 and 1, not {ema}")
    if sam is not None and not sam > 0:
        raise ValueError(f"sharpness-aware minimisation's radius must be above 0, not {sam}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"the layer-wise learning-rate decay must be above 0 and at most 1, not {layer_decay}")
    if outlier_loss not in OUTLIER_LOSSES:
        raise ValueError(f"the outlier loss must be one of {', '.join(OUTLIER_LOSSES)}, not {outlier_loss!r}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label smoothing must be at least 0 and below 1, not {label_smoothing}")
    if start_head is not None and len(start_head.regions) != n_regions:
        raise ValueError(f"the starting head has {len(start_head.regions)} regions, the targets {n_regions}")
    if augment_workers is not None and augment_workers < 0:
        raise ValueError(f"augmentation workers must be 0 or more, not {augment_workers}")
    torch.manual_seed(seed)
    device = device_rule.resolve_device(device)
    if augment_workers is None:
        augment_workers = device_rule.augment_workers(device)
    layout = device_rule.memory_format(device, precision)
    backbone = bundle.backbone().to(device).to(memory_format=layout).train()
    linear = torch.nn.Linear(bundle.meta["architecture"]["feature_dim"], n_regions)
    if start_head is not None:
        weight, bias = start_head.on_raw_features()
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight))
            linear.bias.copy_(torch.from_numpy(bias))
    linear = linear.to(device)
    soft = np.ndim(targets) == 2
    y = torch.as_tensor(np.asarray(targets), dtype=torch.float32 if soft else torch.long)
    if soft and (y.shape[1] != n_regions or not torch.allclose(y.sum(1), torch.ones(len(y)), atol=1e-4)):
        raise ValueError(f"target distributions must be rows of {n_regions} values summing to 1")
    x_all = images_to_tensor(images)
    x_out = images_to_tensor(outliers) if outliers is not None and len(outliers) else None
    view = fine_tune_view(bundle.settings.size, strength=augment).set_random_state(seed)
    weights = region_weights(y, n_regions, class_weights)
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=None if weights is None else weights.to(device), label_smoothing=label_smoothing
    )
    groups = parameter_groups([backbone, linear], weight_decay, layer_decay)
    optimiser = torch.optim.AdamW(groups, lr=lr)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser,
        max_lr=[lr * group["lr_scale"] for group in groups],
        total_steps=epochs * steps_per_epoch,
        pct_start=0.1,
        anneal_strategy="cos",
    )
    scaler = device_rule.grad_scaler(device, precision)
    average = momentum_copy(backbone) if ema is not None else None
    mixer = None
    if mixup is not None:
        from monai.transforms import MixUp

        mixer = MixUp(batch_size, mixup).set_random_state(seed)
    generator = torch.Generator().manual_seed(seed)
    outlier_batch = max(1, batch_size // 4)
    plan = []  # (epoch, in-domain indices, outlier indices) of each step
    for epoch in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(batch_size):
            pick = torch.randint(len(x_out), (outlier_batch,), generator=generator) if x_out is not None else None
            plan.append((epoch, batch, pick))
    batches = _AugmentedBatches(plan, x_all, x_out, view, seed)
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=augment_workers,
        worker_init_fn=_AugmentedBatches.seed_worker,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if augment_workers else None,
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG (drop-connect) as it was
    )
    bar, updates = None, 0
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc="fine-tune", unit="step", file=sys.stderr, dynamic_ncols=True)
    for (epoch, batch, _), (inside, outside) in zip(plan, loader, strict=True):
        n_in = len(inside)
        target = y[batch]
        if mixer is not None and n_in == batch_size:  # a short last batch is not mixed
            one_hot = target if soft else torch.nn.functional.one_hot(target, n_regions).float()
            inside, target = mixer(inside, one_hot[:, :, None, None])  # MixUp's 2-D shape
            target = target.flatten(1)
        x = inside if outside is None else torch.cat([inside, outside])
        x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
        target = target.to(device)

        def step_loss() -> torch.Tensor:
            with device_rule.autocast(device, precision):
                logits = linear(backbone(x)).float()
            loss = loss_fn(logits[:n_in], target)
            if x_out is not None and outlier_loss == "energy":
                loss = loss + OUTLIER_WEIGHT["energy"] * energy_margin_loss(logits[:n_in], logits[n_in:])
            elif x_out is not None:
                loss = loss + OUTLIER_WEIGHT["uniform"] * outlier_exposure_loss(logits[n_in:])
            return loss

        loss = step_loss()
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if sam is not None:
            with sharpness_ascent(optimiser, sam), frozen_batch_norm_statistics(backbone):
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(step_loss()).backward()
        scaler.step(optimiser)
        scaler.update()
        schedule.step()
        updates += 1
        if average is not None:
            update_momentum(backbone, average, min(ema, (1 + updates) / (10 + updates)))
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise ValueError(f"fine-tune: the loss became {loss_value} in epoch {epoch + 1}; try a lower --lr")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss_value:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    result = average if average is not None else backbone
    for parameter in result.parameters():
        parameter.requires_grad_(True)
    return result.eval().cpu().to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def sharpness_ascent(optimiser: torch.optim.Optimizer, rho: float):
    """SAM's ascent step (Foret et al. 2021, eq. 2): moves each parameter by rho g / ||g|| (the norm over all of
    them; the scale of a gradient scaler cancels) from the gradients present, and moves it back on leaving, where the
    gradients are those of the perturbed weights. Non-finite gradients move nothing (the scaler skips that step)."""
    params = [p for group in optimiser.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
    shifts = []
    if torch.isfinite(norm) and norm > 0:
        with torch.no_grad():
            for p in params:
                shift = (p.grad.float() * (rho / norm)).to(p.dtype)
                p.add_(shift)
                shifts.append((p, shift))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, shift in shifts:
                p.sub_(shift)


@contextlib.contextmanager
def frozen_batch_norm_statistics(module: torch.nn.Module):
    """Batch norms normalise with their batch but leave their running statistics as they are (SAM's second pass
    sees the same images: counting them twice would skew the statistics towards the perturbed weights)."""
    norms = [m for m in module.modules() if isinstance(m, BATCH_NORMS)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


class _AugmentedBatches(torch.utils.data.Dataset):
    """Step i of a fine-tuning plan: its in-domain images and its outliers, augmented, as two (B, 1, S, S) tensors
    (the outliers None without outlier exposure). In worker processes each worker reseeds its copy of the
    augmentation from the run's seed and its id, so a run is the same for the same seed and number of workers."""

    def __init__(self, plan, x_all, x_out, augment, seed: int):
        self.plan, self.x_all, self.x_out, self.augment, self.seed = plan, x_all, x_out, augment, seed

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int):
        _, batch, pick = self.plan[step]
        inside = torch.stack([self.augment(img) for img in self.x_all[batch]])
        outside = None if pick is None else torch.stack([self.augment(img) for img in self.x_out[pick]])
        return inside, outside

    @staticmethod
    def seed_worker(worker_id: int) -> None:
        batches = torch.utils.data.get_worker_info().dataset
        batches.augment.set_random_state(batches.seed * 1000 + worker_id + 1)
