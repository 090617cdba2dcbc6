"""Linear heads: frozen-backbone features -> multinomial logistic regression; few-label fitting of a bundle."""

from __future__ import annotations

import math
import shlex
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from radregion.ood import auroc, fit_ood, METHODS

OOD_PERCENTILE = 95.0
DEFAULT_C = 0.5


@dataclass
class LinearHead:
    weight: np.ndarray        # (C, D), acts on standardised features
    bias: np.ndarray          # (C,)
    feature_mean: np.ndarray  # (D,)
    feature_std: np.ndarray   # (D,)
    regions: list

    def logits(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float32) - self.feature_mean) / self.feature_std
        return z @ self.weight.T + self.bias

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = self.logits(features)
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(1, keepdims=True)).astype(np.float32)

    def predict(self, features) -> list[str]:
        return [self.regions[i] for i in self.probabilities(features).argmax(1)]

    def tensors(self) -> dict:
        return {"head.weight": self.weight, "head.bias": self.bias,
                "head.feature_mean": self.feature_mean, "head.feature_std": self.feature_std}


def first_labels(labels) -> list[str]:
    """A multi-label image is fitted with its first label."""
    return [lab if isinstance(lab, str) else lab[0] for lab in labels]


def fit_head(features: np.ndarray, labels, regions=None, class_balanced: bool = True, C: float = DEFAULT_C,
             max_iter: int = 1000, tol: float = 1e-3) -> LinearHead:
    """Multinomial logistic regression (lbfgs) on standardised features.

    `labels`: one region name (or tuple of names, first used) per row. `regions`: the head's classes in order
    (default: those present, sorted); each must have at least one example.
    """
    features = np.asarray(features, np.float32)
    names = first_labels(labels)
    regions = list(regions) if regions is not None else sorted(set(names))
    missing = sorted(set(regions) - set(names))
    if missing:
        raise ValueError(f"no labelled image for region(s) {', '.join(missing)}")
    unknown = sorted(set(names) - set(regions))
    if unknown:
        raise ValueError(f"labels not among the head's regions: {', '.join(unknown)}")
    if len(regions) < 2:
        raise ValueError(f"a head needs at least two regions, got {regions}")
    y = np.array([regions.index(n) for n in names])
    mean = features.mean(0)
    std = features.std(0) + 1e-6
    z = (features - mean) / std
    model = LogisticRegression(C=C, class_weight="balanced" if class_balanced else None, max_iter=max_iter, tol=tol)
    with warnings.catch_warnings():  # few labels per region: sklearn's "regression?" hint is noise here
        warnings.filterwarnings("ignore", message="The number of unique classes")
        model.fit(z, y)
    weight, bias = model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
    if len(regions) == 2:  # sklearn keeps one row for two classes
        weight, bias = np.stack([-weight[0] / 2, weight[0] / 2]), np.array([-bias[0] / 2, bias[0] / 2], np.float32)
    return LinearHead(weight, bias, mean.astype(np.float32), std.astype(np.float32), regions)


def _folds(items, k, seed) -> np.ndarray:
    """Patient-grouped fold id per item (datasets.patient_folds when it can stratify, else GroupKFold)."""
    from sklearn.model_selection import GroupKFold

    try:
        from radregion.datasets import patient_folds

        with warnings.catch_warnings():  # few labels per region: sklearn's "regression?" hint is noise here
            warnings.filterwarnings("ignore", message="The number of unique classes")
            return np.asarray(patient_folds(items, k=k, seed=seed))
    except (ImportError, ValueError):
        groups = [it.group for it in items]
        k = max(2, min(k, len(set(groups))))
        folds = np.zeros(len(items), int)
        for fold, (_, test) in enumerate(GroupKFold(n_splits=k).split(np.zeros(len(items)), groups=groups)):
            folds[test] = fold
        return folds


def out_of_domain_regions(taxonomy, extra=()) -> set[str]:
    regions = {r.name for r in taxonomy.regions if r.out_of_domain} if taxonomy is not None else set()
    return regions | set(extra)


def train_head(bundle, items, output, *, exclude_regions=("Others",), class_balanced=True, C=DEFAULT_C,
               folds=5, seed=0, fine_tune_epochs=0, fine_tune_lr=1e-4, data=None, command=None, workers=2,
               progress=False, half_backbone=None):
    """Fit head + OOD detector of `bundle` on labelled `items` and save a new bundle at `output`.

    Images whose labels are all out-of-domain (`exclude_regions` plus the taxonomy's out-of-domain regions)
    never go in the head; they measure the OOD AUROC. Patient-grouped out-of-fold predictions give the
    cross-validated metrics and the OOD threshold (its `OOD_PERCENTILE` on held-out in-domain images).
    `half_backbone` stores the backbone in fp16 (None: as the input bundle stores it).
    """
    from radregion.bundle import load_bundle, provenance, save_bundle
    from radregion.evaluate import summarise
    from radregion.features import extract_features, load_clean_images

    taxonomy = _taxonomy(bundle)
    ood_regions = out_of_domain_regions(taxonomy, exclude_regions)
    in_items, in_labels, ood_items = [], [], []
    for item in items:
        labels = tuple(lab for lab in item.labels if lab not in ood_regions)
        if labels:
            in_items.append(item)
            in_labels.append(labels)
        else:
            ood_items.append(item)
    if not in_items:
        raise ValueError("no labelled in-domain images to fit a head on")
    order = taxonomy.names if taxonomy is not None else sorted({lab for labs in in_labels for lab in labs})
    present = set(first_labels(in_labels))
    regions = [r for r in order if r in present] + sorted(present - set(order))

    if fine_tune_epochs:
        backbone = fine_tune(bundle, in_items, in_labels, regions, epochs=fine_tune_epochs, lr=fine_tune_lr,
                             seed=seed, workers=workers, progress=progress)
    else:
        backbone = bundle.backbone()
    settings = bundle.settings
    feats = extract_features(backbone, load_clean_images([it.path for it in in_items], settings, workers))
    ood_feats = (extract_features(backbone, load_clean_images([it.path for it in ood_items], settings, workers))
                 if ood_items else np.zeros((0, feats.shape[1]), np.float32))

    fold_of = _folds(in_items, folds, seed)
    names = first_labels(in_labels)
    y = np.array([regions.index(n) for n in names])
    oof_pred, oof_scores = _cross_validate(feats, y, regions, fold_of, class_balanced, C)
    head = fit_head(feats, names, regions, class_balanced, C)
    detector, aurocs = _calibrated_ood(feats, y, oof_scores, ood_feats)

    known = [i for i, p in enumerate(oof_pred) if p is not None]
    metrics = {
        "cross_validated": {"folds": int(len(np.unique(fold_of))), **summarise(
            [oof_pred[i] for i in known], [in_labels[i] for i in known], regions,
            groups=[in_items[i].patient_id for i in known], n_boot=200, seed=seed)},
        "ood": {"method": detector.method, "auroc_others": aurocs, "n_out_of_domain_images": len(ood_items),
                "in_domain_flagged_fraction": float(np.mean(oof_scores[detector.method] > detector.threshold))},
        "n_images": {"in_domain": len(in_items), "out_of_domain": len(ood_items)},
    }
    if fine_tune_epochs:
        metrics["cross_validated"]["note"] = "optimistic: the fine-tuned backbone saw every fold's images"
    meta_updates = {
        "taxonomy": {**bundle.meta.get("taxonomy", {}),
                     "name": taxonomy.name if taxonomy is not None else bundle.meta.get("taxonomy", {}).get("name"),
                     "definition": taxonomy.to_dict() if taxonomy is not None else None,
                     "out_of_domain": {"regions": sorted(ood_regions),
                                       "handling": "not in the head; flagged by the OOD score above threshold"}},
        "training": provenance(data, command or " ".join(shlex.quote(a) for a in sys.argv),
                               head={"C": C, "class_balanced": class_balanced, "seed": seed,
                                     "fine_tune_epochs": fine_tune_epochs,
                                     **({"fine_tune_lr": fine_tune_lr} if fine_tune_epochs else {})},
                               backbone=bundle.meta.get("training")),
        "metrics": metrics,
    }
    meta = {k: v for k, v in bundle.meta.items() if k not in ("ood", "metrics")}
    meta.update(meta_updates)
    if half_backbone is None:
        half_backbone = bundle.meta.get("weights_dtype") == "float16"
    save_bundle(output, backbone.state_dict(), head, meta, ood=detector, half_backbone=half_backbone)
    return load_bundle(output)


def _cross_validate(feats, y, regions, fold_of, class_balanced, C):
    """Out-of-fold region predictions (None where a fold's training part has < 2 regions) and OOD scores."""
    oof_pred = [None] * len(y)
    oof_scores = {m: np.zeros(len(y), np.float32) for m in METHODS}
    for fold in np.unique(fold_of):
        train, test = fold_of != fold, fold_of == fold
        train_regions = sorted(set(y[train]))
        if len(train_regions) >= 2:
            fold_head = fit_head(feats[train], [regions[i] for i in y[train]],
                                 [regions[i] for i in train_regions], class_balanced, C)
            for i, region in zip(np.flatnonzero(test), fold_head.predict(feats[test])):
                oof_pred[i] = region
        for method in METHODS:
            oof_scores[method][test] = fit_ood(feats[train], y[train], method).score(feats[test])
    return oof_pred, oof_scores


def _calibrated_ood(feats, y, oof_scores, ood_feats):
    """Each method fitted on all in-domain features, threshold from its out-of-fold scores; the one with the
    better AUROC on the out-of-domain images wins (Mahalanobis when there are none). -> (detector, AUROCs)"""
    aurocs, detectors = {}, {}
    for method in METHODS:
        detector = fit_ood(feats, y, method)
        detector.threshold = float(np.percentile(oof_scores[method], OOD_PERCENTILE))
        detector.params.update({"percentile": OOD_PERCENTILE, "calibration": "patient-grouped out-of-fold in-domain"})
        detectors[method] = detector
        aurocs[method] = auroc(oof_scores[method], detector.score(ood_feats))
    best = max(METHODS, key=lambda m: aurocs[m] or 0.0) if len(ood_feats) else "mahalanobis"
    return detectors[best], aurocs


def _taxonomy(bundle):
    try:
        return bundle.taxonomy()
    except (ImportError, KeyError, ValueError, FileNotFoundError):
        return None


def fine_tune(bundle, items, labels, regions, epochs=5, lr=1e-4, batch_size=32, seed=0, workers=2, progress=False):
    """Full fine-tuning: backbone + a linear layer, label-smoothed cross-entropy, one-cycle learning rate, mild
    augmentation; returns the backbone."""
    import torch

    from radregion.augment import head_transform
    from radregion.features import images_to_tensor, load_clean_images

    torch.manual_seed(seed)
    backbone = bundle.backbone().train()
    dim = bundle.meta["architecture"]["feature_dim"]
    linear = torch.nn.Linear(dim, len(regions))
    y = torch.tensor([regions.index(n) for n in first_labels(labels)])
    images = images_to_tensor(load_clean_images([it.path for it in items], bundle.settings, workers))
    augment = head_transform(bundle.settings.size).set_random_state(seed)
    counts = torch.bincount(y, minlength=len(regions)).clamp(min=1).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (len(regions) * counts), label_smoothing=0.1)
    params = list(backbone.parameters()) + list(linear.parameters())
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    # one-cycle: warm-up then cosine decay to zero (a constant rate left the last epochs noisy)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=max(1, epochs * math.ceil(
        len(y) / batch_size)), pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    steps = range(epochs)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="fine-tune", unit="epoch", file=sys.stderr)
    for _ in steps:
        for batch in torch.randperm(len(y), generator=generator).split(batch_size):
            x = torch.stack([augment(img) for img in images[batch]])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(linear(backbone(x)).float(), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return backbone.eval()
