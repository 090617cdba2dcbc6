"""Fine-tuning: region weights, the outlier-exposure loss (against its definition), a real fine-tune on the device
rule, the training set a bundle keeps, and which out-of-domain images outlier exposure saw or kept back."""

import copy
from collections import Counter

import numpy as np
import pytest
import torch

from radregion.bundle import load_bundle
from radregion.finetune import (
    frozen_batch_norm_statistics,
    outlier_exposure_loss,
    region_weights,
    sharpness_ascent,
)


def test_region_weights():
    targets = torch.tensor([0] * 90 + [1] * 10)
    balanced = region_weights(targets, 2, "balanced")
    assert torch.allclose(balanced, torch.tensor([100 / 180, 100 / 20]))
    assert torch.allclose(region_weights(targets, 2, "sqrt"), balanced.sqrt())
    assert region_weights(targets, 2, "none") is None
    with pytest.raises(ValueError, match="class weights"):
        region_weights(targets, 2, "inverse")


def test_outlier_exposure_is_cross_entropy_to_the_uniform_distribution():
    logits = torch.randn(5, 7)
    uniform = torch.full((5, 7), 1 / 7)
    reference = torch.nn.functional.cross_entropy(logits, uniform)  # soft-target cross-entropy (torch's own)
    assert torch.allclose(outlier_exposure_loss(logits), reference, atol=1e-6)
    assert outlier_exposure_loss(torch.zeros(2, 7)) == pytest.approx(np.log(7), abs=1e-6)  # its minimum


def test_sharpness_aware_step_against_its_definition():
    """One SAM step (Foret et al. 2021, eq. 2-3) written out by hand: the gradient at w + rho g / ||g|| applied at
    w, and the batch norm's running statistics those of the first pass alone."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x, y = torch.randn(16, 4), torch.randint(3, (16,))
    rho, lr = 0.3, 0.1
    plain = copy.deepcopy(net)

    def loss_of(model):
        return torch.nn.functional.cross_entropy(model(x), y)

    reference = copy.deepcopy(net)
    grads = torch.autograd.grad(loss_of(reference), list(reference.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    statistics = [reference[1].running_mean.clone(), reference[1].running_var.clone()]
    with torch.no_grad():
        for p, g in zip(reference.parameters(), grads, strict=True):
            p.add_(rho * g / norm)
    saved = copy.deepcopy(reference[1].state_dict())
    ascent = torch.autograd.grad(loss_of(reference), list(reference.parameters()))
    reference[1].load_state_dict(saved)  # the second pass leaves the statistics be
    with torch.no_grad():
        for p, g, g0 in zip(reference.parameters(), ascent, grads, strict=True):
            p.sub_(rho * g0 / norm + lr * g)

    optimiser = torch.optim.SGD(net.parameters(), lr=lr)
    loss_of(net).backward()
    with sharpness_ascent(optimiser, rho), frozen_batch_norm_statistics(net):
        optimiser.zero_grad()
        loss_of(net).backward()
    optimiser.step()
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    assert torch.equal(net[1].running_mean, statistics[0]) and torch.equal(net[1].running_var, statistics[1])
    assert net[1].momentum == 0.1  # restored
    plain_optimiser = torch.optim.SGD(plain.parameters(), lr=lr)
    loss_of(plain).backward()
    plain_optimiser.step()  # a plain step from the same start lands elsewhere: the ascent mattered
    assert not all(torch.allclose(p, q, atol=1e-4) for p, q in zip(plain.parameters(), net.parameters(), strict=True))


def test_fine_tune_with_outlier_exposure_keeps_the_training_set(tiny_bundle, unifesp, tmp_path):
    from radregion.datasets import read_labels_csv, sample_per_class
    from radregion.fitting import exposed_outliers, exposure_hold_back, held_back_from_exposure, train_head

    every = read_labels_csv(unifesp / "labels.csv")
    items = sample_per_class([it for it in every if "Others" not in it.labels], 2, seed=3)
    others = list({it.group: it for it in every if "Others" in it.labels}.values())[:6]  # six patients
    rule = exposure_hold_back(others, 3, 1 / 3)
    kept = np.array([held_back_from_exposure(it, rule) for it in others])
    assert kept.sum() == 2  # a third of six patients' images
    result = train_head(
        load_bundle(tiny_bundle),
        items + others,
        tmp_path / "tuned",
        fine_tune_epochs=1,
        outlier_exposure=True,
        outlier_hold_back=1 / 3,
        folds=2,
        seed=3,
    )
    head = result.meta["training"]["head"]
    assert head["outlier_exposure"] and head["class_weights"] == "sqrt"
    # a third of the out-of-domain images is kept out of outlier exposure, and the OOD score is judged on those
    # alone, here and by a later fit-head on the fine-tuned backbone
    assert head["outlier_exposure_hold_back"] == rule
    assert (exposed_outliers(result.meta["training"], others) == ~kept).all()
    refit = train_head(result, items + others, tmp_path / "refit", folds=2, seed=0)
    for bundle in (result, refit):
        ood = bundle.meta["metrics"]["ood"]
        assert ood["judged_on"] == kept.sum() and f"judged on the {kept.sum()} of 6" in ood["note"]
    assert (exposed_outliers(refit.meta["training"], others) == ~kept).all()
    by_default = train_head(
        load_bundle(tiny_bundle),
        items + others,
        tmp_path / "all",
        fine_tune_epochs=1,
        outlier_exposure=True,
        ema=0.9,
        sam=0.05,
        augment="strong",
        layer_decay=0.9,
        label_smoothing=0.0,
        outlier_loss="energy",
        probe_first=True,
        all_labels=True,
        augment_workers=2,
        folds=2,
    )  # every out-of-domain image exposed, and the score's AUROC said to be optimistic
    assert "outlier_exposure_hold_back" not in by_default.meta["training"]["head"]
    assert by_default.meta["training"]["head"]["ema"] == 0.9 and "mixup" not in by_default.meta["training"]["head"]
    assert by_default.meta["training"]["head"]["sam"] == 0.05 and "sam" not in result.meta["training"]["head"]
    assert by_default.meta["training"]["head"]["augment"] == "strong"
    assert "augment" not in result.meta["training"]["head"]
    assert (
        by_default.meta["training"]["head"]["layer_decay"] == 0.9
        and "layer_decay" not in result.meta["training"]["head"]
    )
    assert (
        by_default.meta["training"]["head"]["label_smoothing"] == 0.0
        and "label_smoothing" not in result.meta["training"]["head"]
    )
    assert by_default.meta["training"]["head"]["outlier_loss"] == "energy"
    assert "outlier_loss" not in result.meta["training"]["head"]
    assert by_default.meta["training"]["head"]["augment_workers"] == 2
    for setting in ("probe_first", "all_labels"):
        assert by_default.meta["training"]["head"][setting] and setting not in result.meta["training"]["head"]
    assert "augment_workers" not in result.meta["training"]["head"]  # in-process on a CPU: nothing to record
    assert (
        by_default.meta["metrics"]["ood"]["judged_on"] == 6
        and "optimistic" in by_default.meta["metrics"]["ood"]["note"]
    )
    stored = result.training_set()
    n_in = result.meta["metrics"]["n_images"]["in_domain"]
    assert stored.features.shape == (n_in, 512) and stored.targets.max() < len(result.regions)
    assert len(np.unique(stored.groups)) == len({it.patient_id for it in items if "Others" not in it.labels})
    # the stored features are the fine-tuned backbone's features of those images (fp16 in the bundle)
    from radregion.features import extract_features, load_clean_images
    from radregion.fitting import split_in_domain

    in_items, _, _ = split_in_domain(items, {"Others"})
    feats = extract_features(result.backbone(), load_clean_images([it.path for it in in_items], result.settings))
    assert np.allclose(stored.features, feats, atol=0.05 * np.abs(feats).max())
    assert load_bundle(tiny_bundle).training_set() is not None  # the fixture's head keeps its own


def test_exposed_outliers_follow_each_exposure_stage_and_its_labels_csv(unifesp, tmp_path):
    from radregion.datasets import read_labels_csv
    from radregion.fitting import exposed_outliers, exposure_hold_back, held_back_from_exposure

    every = [it for it in read_labels_csv(unifesp / "labels.csv") if "Others" in it.labels]
    for seed in range(4):  # whole patients, about a third of the images, however unevenly patients are imaged
        rule = exposure_hold_back(every, seed, 1 / 3)
        kept = [it for it in every if held_back_from_exposure(it, rule)]
        assert abs(len(kept) - len(every) / 3) <= max(Counter(it.group for it in every).values()) / 2
        assert not {it.group for it in kept} & {it.group for it in every if it not in kept}
    assert exposure_hold_back(every, 0, fraction=0) is None  # --outlier-hold-back 0: every image is exposed
    others = list({it.group: it for it in every}.values())[:12]
    listed, not_listed = others[:8], others[8:]
    csv = tmp_path / "train.csv"
    csv.write_text("image,labels,PatientID\n" + "".join(f"{it.path},Others,{it.patient_id}\n" for it in listed))
    rule = {"seed": 5, "below": 0.4}
    kept = np.array([held_back_from_exposure(it, rule) for it in others])
    tuned = {"data": str(csv), "head": {"fine_tune_epochs": 2, "outlier_exposure": True}}
    with_rule = {**tuned, "head": {**tuned["head"], "outlier_exposure_hold_back": rule}}
    refit = {"data": str(csv), "head": {"fine_tune_epochs": 0}, "backbone": with_rule}

    in_csv = np.array([it in listed for it in others])
    assert (exposed_outliers(with_rule, others) == (in_csv & ~kept)).all()
    assert (exposed_outliers(refit, others) == (in_csv & ~kept)).all()  # found through the backbone's stage
    assert (exposed_outliers(tuned, others) == in_csv).all()  # an older bundle kept none back
    assert not exposed_outliers({"data": str(csv), "head": {"fine_tune_epochs": 2}}, others).any()  # no exposure
    gone = {**with_rule, "data": str(tmp_path / "moved.csv")}  # a CSV not here: every image not kept back is seen
    assert (exposed_outliers(gone, others) == ~kept).all()
    assert len(not_listed) == 4 and 0 < kept.sum() < len(others)


def test_moving_average_mixup_probe_first_and_shared_targets_change_only_what_they_should(tiny_bundle, unifesp):
    from radregion.datasets import read_labels_csv, sample_per_class
    from radregion.features import load_clean_images
    from radregion.finetune import fine_tune

    bundle = load_bundle(tiny_bundle)
    items = sample_per_class([it for it in read_labels_csv(unifesp / "labels.csv") if "Others" not in it.labels], 3)
    regions = sorted({it.labels[0] for it in items})
    images = load_clean_images([it.path for it in items], bundle.settings)
    targets = [regions.index(it.labels[0]) for it in items]

    def tuned_on(targets, **options):
        backbone = fine_tune(bundle, images, targets, len(regions), epochs=1, batch_size=16, seed=2, **options)
        return torch.cat([p.detach().flatten() for p in backbone.state_dict().values() if p.is_floating_point()])

    def tuned(**options):
        return tuned_on(targets, **options)

    start = torch.cat([p.flatten() for p in bundle.backbone().state_dict().values() if p.is_floating_point()])
    last = tuned()
    assert torch.equal(tuned(), last)  # deterministic for a seed
    # a vanishing decay averages nothing: the last weights; a long one stays between the start and the last weights
    assert torch.allclose(tuned(ema=1e-9), last, atol=1e-6)
    slow = tuned(ema=0.999)
    assert not torch.allclose(slow, last, atol=1e-6)
    assert (slow - start).norm() < (last - start).norm()
    assert not torch.allclose(tuned(mixup=0.4), last, atol=1e-6)  # mixed images and targets train differently
    # augmentation in worker processes: the same run again for the same seed and number of workers, and the
    # workers' augmentation is not the in-process one (each worker reseeds its copy)
    in_workers = tuned(augment_workers=2)
    assert torch.equal(tuned(augment_workers=2), in_workers)
    assert not torch.allclose(in_workers, last, atol=1e-6)
    assert torch.equal(tuned(augment_workers=0), last)  # 0 is the CPU's default: in this process
    # linear probing first (LP-FT): the head on the frozen features, moved onto the raw features, gives the same
    # logits, and fine-tuning from it trains the backbone differently from a random linear layer
    from radregion.features import extract_features
    from radregion.head import fit_head

    frozen = extract_features(bundle.backbone(), images)
    probe = fit_head(frozen, [regions[t] for t in targets], regions)
    weight, bias = probe.on_raw_features()
    assert np.allclose(frozen @ weight.T + bias, probe.logits(frozen), rtol=1e-4, atol=1e-3)
    assert not torch.allclose(tuned(start_head=probe), last, atol=1e-6)
    # target distributions: one-hot rows train as the region indices do; an image shared by two regions differently
    one_hot = np.eye(len(regions), dtype=np.float32)[targets]
    assert torch.allclose(tuned_on(one_hot), last, atol=1e-5)
    shared = one_hot.copy()
    shared[0] = 0
    shared[0, [targets[0], (targets[0] + 1) % len(regions)]] = 0.5
    assert not torch.allclose(tuned_on(shared), last, atol=1e-5)
    with pytest.raises(ValueError, match="distributions"):
        tuned_on(one_hot * 2)
    two = [i for i, t in enumerate(targets) if t < 2]
    too_few = fit_head(frozen[two], [regions[targets[i]] for i in two])
    assert not torch.allclose(tuned(sam=0.05), last, atol=1e-6)  # sharpness-aware steps train differently
    assert not torch.allclose(tuned(augment="strong"), last, atol=1e-6)
    assert not torch.allclose(tuned(label_smoothing=0.0), last, atol=1e-6)  # plain cross-entropy
    exposed = tuned(outliers=images[:4])  # outlier exposure: its uniform term, or the energy bound instead
    assert not torch.allclose(exposed, last, atol=1e-6)
    assert not torch.allclose(tuned(outliers=images[:4], outlier_loss="energy"), exposed, atol=1e-6)
    # layer-wise learning-rate decay: a factor of 1 is the single rate; below 1 the stem moves less
    assert torch.allclose(tuned(layer_decay=1.0), last, atol=1e-6)
    n_stem = next(bundle.backbone().parameters()).numel()
    decayed = tuned(layer_decay=0.5)
    assert (decayed - start)[:n_stem].norm() < 0.5 * (last - start)[:n_stem].norm()
    bad_options = ({"ema": 1.0}, {"ema": 0.0}, {"mixup": 0.0}, {"sam": 0.0}, {"augment_workers": -1})
    for bad in (
        *bad_options,
        {"layer_decay": 0.0},
        {"layer_decay": 1.5},
        {"label_smoothing": 1.0},
        {"label_smoothing": -0.1},
        {"outlier_loss": "entropy"},
        {"augment": "heavy"},
        {"start_head": too_few},
    ):
        with pytest.raises(ValueError, match="decay|alpha|radius|workers|(smoothing|loss|augmentation) must|starting"):
            fine_tune(bundle, images, targets, len(regions), epochs=1, **bad)
