"""Fit a bundle's head from labelled images: optional full fine-tuning, features, a patient-grouped
cross-validated head and a calibrated out-of-domain detector, saved as a new bundle."""

from __future__ import annotations

import hashlib
import shlex
from collections import Counter
from dataclasses import dataclass
import sys

import numpy as np

from radregion.errors import RadiographError
from radregion.head import DEFAULT_C, first_labels, fit_head, out_of_domain_regions
from radregion.ood import METHODS, NEEDS_OUTLIERS, auroc, fit_ood
from radregion.validation import fold_ids, fold_masks, out_of_fold_predictions

OOD_PERCENTILE = 95.0
MIN_OUTLIERS = 10  # out-of-domain images each fold's training part needs before the classifier score is tried
# Outlier exposure may keep a fraction of the out-of-domain images (whole patients) out of fine-tuning, so that the
# OOD score is chosen and judged on images the backbone was not pushed away from (judged on those it was, a score
# looks near perfect: out-of-fold AUROC 0.998 against 0.785 on the test split's). Off by default: on the model
# card's split, keeping a third back lowered the test AUROC from 0.951 / 0.894 to 0.849 / 0.777 (seeds 1 / 0), and
# its own judgement was still optimistic (0.946 / 0.978); docs/results.md.
DEFAULT_OUTLIER_HOLD_BACK = 0.0


def taxonomy_of(bundle):
    """The bundle's taxonomy, or None when it records none that can be read."""
    try:
        return bundle.taxonomy()
    except (ImportError, KeyError, ValueError, FileNotFoundError):
        return None


def split_in_domain(items, ood_regions):
    """-> (in-domain items, their in-domain label tuples, out-of-domain items)."""
    in_items, in_labels, ood_items = [], [], []
    for item in items:
        labels = tuple(lab for lab in item.labels if lab not in ood_regions)
        if labels:
            in_items.append(item)
            in_labels.append(labels)
        else:
            ood_items.append(item)
    return in_items, in_labels, ood_items


def shared_patients(train_items, held_items) -> list[str]:
    """The patients (PatientID; an image without one is its own patient) of `held_items` also in `train_items`."""
    train = {it.group for it in train_items}
    return sorted({it.patient_id or str(it.path) for it in held_items if it.group in train})


def check_held_out(train_items, held_items, held_source, train_source="the training labels"):
    """RadiographError naming `held_source` and the patients when a held-out image shares a patient (or is the
    same image) with the training images."""
    shared = shared_patients(train_items, held_items)
    if shared:
        shown = ", ".join(shared[:10]) + (f" and {len(shared) - 10} more" if len(shared) > 10 else "")
        raise RadiographError(
            held_source,
            f"held-out images share {len(shared)} patient(s) with {train_source}: {shown}; a held-out set must "
            "come from other patients (`radregion split` makes one)",
        )


def held_out_items(items, ood_regions, regions):
    """-> (held-out in-domain items whose labels name a region of the head, their region index, how many were
    left out: {"out_of_domain", "region_not_in_head"}). The index is that of the first such label."""
    kept, targets, left_out = [], [], {"out_of_domain": 0, "region_not_in_head": 0}
    in_items, in_labels, ood_items = split_in_domain(items, ood_regions)
    left_out["out_of_domain"] = len(ood_items)
    for item, labels in zip(in_items, in_labels):
        known = [lab for lab in labels if lab in regions]
        if known:
            kept.append(item)
            targets.append(regions.index(known[0]))
        else:
            left_out["region_not_in_head"] += 1
    return kept, np.array(targets, np.int64), left_out


def _with_teacher(teacher, in_items, ood_items, held_out, regions, tune, outlier_exposure, settings, workers):
    """Fine-tuning's (images, targets, outliers) `tune` with `teacher`'s answers added (`train_head`), and counts
    of what it added."""
    from radregion.distill import distilled_targets, teacher_distributions
    from radregion.features import load_clean_images

    images, targets, outliers = tune
    try:
        answers = teacher_distributions(teacher.probabilities, teacher.regions, regions)
    except ValueError as error:
        raise RadiographError(teacher.source, str(error)) from None
    row_of = {path: i for i, path in enumerate(teacher.paths)}
    held = sorted({it.path.resolve() for it in held_out or ()} & set(row_of))
    if held:
        raise RadiographError(
            teacher.source,
            f"answers for {len(held)} held-out image(s) (e.g. {held[0]}): fine-tuning on them would train on the "
            "images the model is measured on; predict the training and unlabelled images only",
        )
    labels = targets if np.ndim(targets) == 2 else np.eye(len(regions), dtype=np.float32)[targets]
    answered = np.full(labels.shape, np.nan, np.float32)
    in_paths = [it.path.resolve() for it in in_items]
    rows = [row_of.get(path) for path in in_paths]
    for i, row in enumerate(rows):
        if row is not None:
            answered[i] = answers[row]
    labelled = {*in_paths, *(it.path.resolve() for it in ood_items)}
    new = np.array([path not in labelled for path in teacher.paths], bool)
    extra = np.flatnonzero(new & ~teacher.out_of_domain)
    extra_out = np.flatnonzero(new & teacher.out_of_domain) if outlier_exposure else np.zeros(0, int)
    loaded = load_clean_images([teacher.paths[i] for i in (*extra, *extra_out)], settings, workers)
    images = np.concatenate([images, loaded[: len(extra)]])
    targets = np.concatenate([distilled_targets(labels, answered, teacher.weight), answers[extra]])
    if len(extra_out):
        outliers = loaded[len(extra) :] if outliers is None else np.concatenate([outliers, loaded[len(extra) :]])
    taught = {
        "labelled_images": sum(row is not None for row in rows),
        "unlabelled_images": len(extra),
        "unlabelled_outliers": len(extra_out),
    }
    return images, targets, outliers, taught


def patient_numbers(items) -> np.ndarray:
    """A patient group number (0, 1, ...) per item, in order of first appearance."""
    numbers = {}
    return np.array([numbers.setdefault(it.group, len(numbers)) for it in items], np.int64)


def patient_draw(group: str, seed: int) -> float:
    """A number in [0, 1) per patient (`LabelledImage.group`) and seed: a hash, the same in every process."""
    digest = hashlib.sha256(f"{seed}\0{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def exposure_hold_back(ood_items, seed: int, fraction: float) -> dict | None:
    """The rule that keeps whole patients, about `fraction` of `ood_items`' images, out of outlier exposure: those
    whose `patient_draw` is below "below" ({"seed", "below"}, recorded in the bundle so a later fit-head finds the
    same patients). None with fewer than two patients or a fraction of 0."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the hold-back fraction must be in [0, 1), not {fraction}")
    counts = Counter(item.group for item in ood_items)
    if len(counts) < 2 or fraction == 0:
        return None
    order = sorted(counts, key=lambda group: patient_draw(group, seed))
    taken = np.cumsum([counts[group] for group in order])[:-1]  # images kept back with the first k + 1 patients
    k = int(np.argmin(np.abs(taken - fraction * len(ood_items))))
    draws = [patient_draw(group, seed) for group in order[k : k + 2]]
    return {"seed": int(seed), "below": float(sum(draws) / 2)}


def held_back_from_exposure(item, rule: dict | None) -> bool:
    """Whether an `exposure_hold_back` rule keeps `item` out of outlier exposure."""
    return bool(rule) and patient_draw(item.group, rule["seed"]) < rule["below"]


def exposed_outliers(training, ood_items) -> np.ndarray:
    """(N,) bool: which of `ood_items` a backbone with this "training" block (see `bundle.provenance`) was
    fine-tuned on by outlier exposure. An image is taken as seen when it is in an exposure stage's labels CSV and
    not held back by that stage's rule; when the stage names no CSV that can be read here, every image not held
    back is taken as seen."""
    from radregion.bundle import training_stages, stage_csvs
    from radregion.datasets import read_labels_csv

    exposed = np.zeros(len(ood_items), bool)
    for stage in training_stages(training):
        head = stage.get("head") or {}
        if not (head.get("fine_tune_epochs") and head.get("outlier_exposure")):
            continue
        sources, listed, readable = stage_csvs(stage), set(), True
        for source in sources:
            try:
                listed |= {it.path.resolve() for it in read_labels_csv(source, check_files=False)}
            except RadiographError:
                readable = False
        rule = head.get("outlier_exposure_hold_back")
        for i, item in enumerate(ood_items):
            in_stage = not (readable and sources) or item.path.resolve() in listed
            exposed[i] |= in_stage and not held_back_from_exposure(item, rule)
    return exposed


def train_head(
    bundle,
    items,
    output,
    *,
    exclude_regions=("Others",),
    class_balanced=True,
    C=DEFAULT_C,
    folds=5,
    seed=0,
    fine_tune_epochs=0,
    fine_tune_lr=5e-4,
    class_weights="sqrt",
    mixup=None,
    ema=None,
    sam=None,
    augment="standard",
    layer_decay=None,
    label_smoothing=None,
    probe_first=False,
    all_labels=False,
    teacher=None,
    augment_workers=None,
    outlier_exposure=False,
    outlier_loss="uniform",
    outlier_hold_back=DEFAULT_OUTLIER_HOLD_BACK,
    data=None,
    command=None,
    workers=2,
    progress=False,
    half_backbone=None,
    device="auto",
    held_out=None,
    held_out_data=None,
):
    """Fit head + OOD detector of `bundle` on labelled `items` and save a new bundle at `output`.

    Images whose labels are all out-of-domain (`exclude_regions` plus the taxonomy's out-of-domain regions)
    never go in the head; they measure the OOD AUROC (and, with `outlier_exposure`, take part in fine-tuning).
    Patient-grouped out-of-fold predictions give the cross-validated metrics and the OOD threshold (its
    `OOD_PERCENTILE` on held-out in-domain images). `probe_first`: fine-tuning starts its linear layer from a
    head fitted on the frozen backbone's features (LP-FT) instead of random weights. `all_labels`: an image with
    k of the head's regions (e.g. `Hand|Wrist`) trains each of them, fine-tuning towards 1/k on each and the head
    on one row per region, instead of its first label alone. `teacher`: a `distill.Teacher` whose answers fine-tuning
    distils (mixed into the labelled images' targets; its other in-domain images trained towards its answers alone,
    those it flags out of domain exposed as outliers with `outlier_exposure`); refused when it answered for a
    held-out image. The features the head was
    fitted on are stored in the bundle (`Bundle.training_set`). `half_backbone` stores the backbone in fp16 (None:
    as the input bundle).
    `held_out`: labelled images of other patients (RadiographError naming `held_out_data` when one shares a
    patient with `items`); the features of those of the head's regions, from the same (fine-tuned) backbone, are
    stored as the bundle's held-out set (`Bundle.held_out()`), what the server's retraining must not be worse on.
    """
    from radregion.bundle import TrainingSet, image_ids, provenance
    from radregion.evaluate import summarise
    from radregion.features import extract_features, load_clean_images

    taxonomy = taxonomy_of(bundle)
    ood_regions = out_of_domain_regions(taxonomy, exclude_regions)
    in_items, in_labels, ood_items = split_in_domain(items, ood_regions)
    if not in_items:
        raise ValueError("no labelled in-domain images to fit a head on")
    order = taxonomy.names if taxonomy is not None else sorted({lab for labs in in_labels for lab in labs})
    present = set(first_labels(in_labels))
    regions = [r for r in order if r in present] + sorted(present - set(order))
    names = first_labels(in_labels)
    y = np.array([regions.index(n) for n in names])
    head_labels = [tuple(lab for lab in labs if lab in regions) for labs in in_labels] if all_labels else names
    targets = y
    if all_labels:  # a distribution over each image's regions
        targets = np.zeros((len(y), len(regions)), np.float32)
        for i, labs in enumerate(head_labels):
            targets[i, [regions.index(lab) for lab in labs]] = 1 / len(labs)
    if teacher is not None and not fine_tune_epochs:
        raise ValueError("a teacher's answers are distilled by fine-tuning: add fine-tuning epochs (--fine-tune)")
    if held_out is not None:
        check_held_out(items, held_out, held_out_data or "the held-out images")
        held_items, held_y, held_left_out = held_out_items(held_out, ood_regions, regions)
        if not held_items:
            raise RadiographError(
                held_out_data or "the held-out images", "no held-out image of a region the head is fitted on"
            )

    settings = bundle.settings
    in_images = load_clean_images([it.path for it in in_items], settings, workers)
    ood_images = load_clean_images([it.path for it in ood_items], settings, workers) if ood_items else None
    exposed_now, hold_back = np.zeros(len(ood_items), bool), None
    if fine_tune_epochs and outlier_exposure and ood_items:
        hold_back = exposure_hold_back(ood_items, seed, outlier_hold_back)
        exposed_now = np.array([not held_back_from_exposure(it, hold_back) for it in ood_items])
    unseen = ~(exposed_outliers(bundle.meta.get("training"), ood_items) | exposed_now)
    if fine_tune_epochs:
        from radregion.device import augment_workers as device_augment_workers
        from radregion.device import resolve_device
        from radregion.finetune import DEFAULT_LABEL_SMOOTHING, fine_tune

        if augment_workers is None:
            augment_workers = device_augment_workers(resolve_device(device))
        tune = (in_images, targets, ood_images[exposed_now] if exposed_now.any() else None)
        if teacher is not None:
            *tune, taught = _with_teacher(
                teacher, in_items, ood_items, held_out, regions, tune, outlier_exposure, settings, workers
            )
        probe = None
        if probe_first:
            frozen = extract_features(bundle.backbone(), in_images, device=device)
            probe = fit_head(frozen, head_labels, regions, class_balanced, C, all_labels=all_labels)
        backbone = fine_tune(
            bundle,
            tune[0],
            tune[1],
            len(regions),
            outliers=tune[2],
            epochs=fine_tune_epochs,
            lr=fine_tune_lr,
            class_weights=class_weights,
            mixup=mixup,
            ema=ema,
            sam=sam,
            augment=augment,
            layer_decay=layer_decay,
            label_smoothing=DEFAULT_LABEL_SMOOTHING if label_smoothing is None else label_smoothing,
            outlier_loss=outlier_loss,
            start_head=probe,
            augment_workers=augment_workers,
            seed=seed,
            device=device,
            progress=progress,
        )
    else:
        backbone = bundle.backbone()
    feats = extract_features(backbone, in_images, device=device)
    ood_feats = (
        extract_features(backbone, ood_images, device=device)
        if ood_images is not None
        else np.zeros((0, feats.shape[1]), np.float32)
    )

    fold_of = fold_ids(in_items, folds, seed)
    oof_pred = out_of_fold_predictions(feats, head_labels, regions, fold_of, class_balanced=class_balanced, C=C)
    outliers = Outliers(ood_feats, outlier_folds(in_items, fold_of, ood_items, folds, seed), unseen)
    oof_scores = _out_of_fold_ood_scores(feats, y, fold_of, outliers)
    head = fit_head(feats, head_labels, regions, class_balanced, C, all_labels=all_labels)
    detector, aurocs = _calibrated_ood(feats, y, oof_scores, outliers)

    known = [i for i, p in enumerate(oof_pred) if p is not None]
    metrics = {
        "cross_validated": {
            "folds": int(len(np.unique(fold_of))),
            **summarise(
                [oof_pred[i] for i in known],
                [in_labels[i] for i in known],
                regions,
                groups=[in_items[i].patient_id for i in known],
                n_boot=200,
                seed=seed,
            ),
        },
        "ood": {
            "method": detector.method,
            "auroc_others": aurocs,
            "n_out_of_domain_images": len(ood_items),
            "judged_on": int(outliers.judged.sum()),
            "in_domain_flagged_fraction": float(np.mean(oof_scores[detector.method] > detector.threshold)),
        },
        "n_images": {"in_domain": len(in_items), "out_of_domain": len(ood_items)},
    }
    if fine_tune_epochs:
        metrics["cross_validated"]["note"] = "optimistic: the fine-tuned backbone saw every fold's images"
    if len(ood_items) and not unseen.any():
        metrics["ood"]["note"] = "optimistic: the backbone was fine-tuned on all these out-of-domain images"
    elif not unseen.all():
        metrics["ood"]["note"] = (
            f"judged on the {int(unseen.sum())} of {len(ood_items)} out-of-domain images that outlier exposure "
            "kept out of fine-tuning"
        )
    head_settings = {"C": C, "class_balanced": class_balanced, "seed": seed, "fine_tune_epochs": fine_tune_epochs}
    if fine_tune_epochs:
        head_settings.update(
            fine_tune_lr=fine_tune_lr,
            class_weights=class_weights,
            outlier_exposure=bool(exposed_now.any()),
        )
        options = {"mixup": mixup, "ema": ema, "sam": sam, "layer_decay": layer_decay}
        options["label_smoothing"] = label_smoothing
        options["outlier_loss"] = None if outlier_loss == "uniform" or not exposed_now.any() else outlier_loss
        options["augment"] = None if augment == "standard" else augment
        head_settings.update({k: v for k, v in options.items() if v is not None})
        if probe_first:
            head_settings["probe_first"] = True
        if teacher is not None:
            head_settings["teacher"] = {**teacher.settings(), **taught}
        if augment_workers:  # the augmentation's random streams depend on it
            head_settings["augment_workers"] = augment_workers
        if hold_back:
            head_settings["outlier_exposure_hold_back"] = hold_back
    if all_labels:
        head_settings["all_labels"] = True
    from radregion.device import features_precision, resolve_device

    meta_updates = {
        "features_precision": features_precision(resolve_device(device)),  # what `feats` were computed in
        "taxonomy": {
            **bundle.meta.get("taxonomy", {}),
            "name": taxonomy.name if taxonomy is not None else bundle.meta.get("taxonomy", {}).get("name"),
            "definition": taxonomy.to_dict() if taxonomy is not None else None,
            "out_of_domain": {
                "regions": sorted(ood_regions),
                "handling": "not in the head; flagged by the OOD score above threshold",
            },
        },
        "training": provenance(
            data,
            command or " ".join(shlex.quote(a) for a in sys.argv),
            head=head_settings,
            backbone=bundle.meta.get("training"),
        ),
        "metrics": metrics,
    }
    training_set = TrainingSet(feats, y, patient_numbers(in_items), image_ids([it.path for it in in_items]))
    held_set = None
    if held_out is not None:
        held_images = load_clean_images([it.path for it in held_items], settings, workers)
        held_set = TrainingSet(
            extract_features(backbone, held_images, device=device),
            held_y,
            patient_numbers(held_items),
            image_ids([it.path for it in held_items]),
        )
        meta_updates["training"]["held_out"] = {
            "data": held_out_data,
            "n_images": len(held_set),
            "n_patients": int(len(np.unique(held_set.groups))),
            "left_out": held_left_out,
        }
    return bundle.with_head(
        output,
        head,
        detector,
        meta_updates,
        backbone_state=backbone.state_dict(),
        half_backbone=half_backbone,
        training_set=training_set,
        held_out=held_set,
    )


@dataclass
class Outliers:
    """Features of the known out-of-domain images, their folds (-1: in no fold) and which of them the backbone was
    not fine-tuned on (outlier exposure; None: none was)."""

    features: np.ndarray
    folds: np.ndarray
    unseen: np.ndarray | None = None

    @property
    def judged(self) -> np.ndarray:
        """(M,) bool: the images a score is judged on: the unseen ones when there are any, else all."""
        if self.unseen is not None and self.unseen.any():
            return self.unseen
        return np.ones(len(self.features), bool)

    def usable_by_classifier(self, fold_of) -> bool:
        """Every fold's training part holds at least MIN_OUTLIERS of them (else the classifier is not offered)."""
        return len(self.features) > 0 and all(
            ((self.folds >= 0) & (self.folds != fold)).sum() >= MIN_OUTLIERS for fold in np.unique(fold_of)
        )


def outlier_folds(in_items, fold_of, ood_items, k, seed) -> np.ndarray:
    """Folds of the out-of-domain images: a patient's fold among the in-domain images where it has one, else
    patient-grouped folds of their own (so no patient is on both sides of a fold)."""
    if not ood_items:
        return np.zeros(0, int)
    patient_fold = {it.group: int(f) for it, f in zip(in_items, fold_of)}
    own = fold_ids(ood_items, k, seed) if len({it.group for it in ood_items}) >= 2 else np.full(len(ood_items), -1)
    return np.array([patient_fold.get(it.group, int(f)) for it, f in zip(ood_items, own)])


def _methods(fold_of, outliers: Outliers) -> list:
    return [m for m in METHODS if m not in NEEDS_OUTLIERS or outliers.usable_by_classifier(fold_of)]


def _out_of_fold_ood_scores(feats, y, fold_of, outliers: Outliers) -> dict:
    """Each OOD method's score of every image by a detector fitted on the other folds; for the methods that learn
    from the out-of-domain images, their out-of-fold scores too (key "<method>:outliers")."""
    methods = _methods(fold_of, outliers)
    scores = {m: np.zeros(len(y), np.float32) for m in methods}
    for method in set(methods) & set(NEEDS_OUTLIERS):
        scores[f"{method}:outliers"] = np.full(len(outliers.features), np.nan, np.float32)
    for fold, train, test in fold_masks(fold_of):
        out_train, out_test = (outliers.folds >= 0) & (outliers.folds != fold), outliers.folds == fold
        for method in methods:
            needs = method in NEEDS_OUTLIERS
            detector = fit_ood(feats[train], y[train], method, outliers=outliers.features[out_train] if needs else None)
            scores[method][test] = detector.score(feats[test])
            if needs and out_test.any():
                scores[f"{method}:outliers"][out_test] = detector.score(outliers.features[out_test])
    return scores


def _calibrated_ood(feats, y, oof_scores, outliers: Outliers):
    """Each method fitted on all in-domain features, threshold from its out-of-fold scores; the one with the
    better AUROC on the out-of-domain images wins (Mahalanobis when there are none), judged on those the backbone
    was not fine-tuned on where there are any (`Outliers.judged`). A method that learns from those images is
    judged on its out-of-fold scores of them. -> (detector, AUROCs)"""
    aurocs, detectors = {}, {}
    for method in (m for m in METHODS if m in oof_scores):
        needs = method in NEEDS_OUTLIERS
        detector = fit_ood(feats, y, method, outliers=outliers.features if needs else None)
        detector.threshold = float(np.percentile(oof_scores[method], OOD_PERCENTILE))
        detector.params.update({"percentile": OOD_PERCENTILE, "calibration": "patient-grouped out-of-fold in-domain"})
        detectors[method] = detector
        if needs:
            out = oof_scores[f"{method}:outliers"][outliers.judged]
            aurocs[method] = auroc(oof_scores[method], out[np.isfinite(out)])
        else:
            aurocs[method] = auroc(oof_scores[method], detector.score(outliers.features[outliers.judged]))
    best = max(detectors, key=lambda m: aurocs[m] or 0.0) if len(outliers.features) else "mahalanobis"
    return detectors[best], aurocs
