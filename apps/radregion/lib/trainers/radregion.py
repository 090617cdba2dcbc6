"""Train task `radregion`: a new head over every region of the model, published only if it is not worse.

Frozen backbone: training takes seconds on CPU and reads no image twice.
- Training data: the features the current head was fitted on, stored in its bundle (`Bundle.training_set()`:
  the model's own training images, every region of the taxonomy), plus the confirmed labels (features from the
  score cache). A confirmed image that is also in the stored set (the same file content where the bundle stores
  its images' ids, else the same features) counts once, with its confirmed label: confirmed labels win where they
  disagree.
- The new head is fitted on everything (stored + confirmed) for all regions.
- Two checks, both must hold to publish:
  1. confirmed labels: a patient-grouped split (the engine's `patient_split`); a head fitted without the
     validation patients against the current model on them, macro recall (the engine's `macro_recall`);
  2. the original held-out set: with a bundle that stores one (`Bundle.held_out()`, from `radregion fit-head
     --held-out`: other patients' images, features of the same backbone), the new head against the current one on
     it, macro recall (`macro_recall`) not lower; a bundle without one falls back to the patient-grouped
     cross-validation of the stored training set (the engine's `radregion.validation`): each fold's head fitted
     with and without the confirmed labels, out-of-fold macro recall with them not lower than without.
     Both up to `--conf heldout_tolerance` (default 0.01: refitting alone moves it by that much); the status's
     "heldout" block names the method used and its images.
- Then the new head, with the stored training set and held-out set unchanged (the next training starts from the
  same base), is published as the next generation, unless a newer model was published since this run was
  requested (the server adds `base_generation` to every training request).
  The status (train_stats.json, GET /info/) says published or kept, why, and on how many images.
"""

import logging
import time
from pathlib import Path

import numpy as np
from monailabel.interfaces.tasks.train import TrainTask

from ..context import read_json, read_label, write_json
from .. import faults
from ..errors import TrainingError
from ..published import PublishConflict
from ..scores import ScoreTable

logger = logging.getLogger(__name__)
HELDOUT_FOLDS = 5
HELD_OUT_SET = "held_out_set"  # the check's method: the bundle's held-out set
CROSS_VALIDATION = "cross_validation"  # without one: the stored training set's patient-grouped folds
SAME_IMAGE_COSINE = 0.999  # stored and served fp32 features of one image differ by fp16 storage rounding only


class RadRegionTrainer(TrainTask):
    def __init__(self, context):
        super().__init__(
            "Fit a new head on the model's training data plus the confirmed labels; publish it if "
            "it is not worse on the confirmed labels nor on the original data"
        )
        self.context = context
        self.stats_file = context.state_dir / "train_stats.json"

    def config(self):
        c = self.context.config
        return {
            "val_fraction": c.val_fraction,
            "min_labels": c.min_labels,
            "auto_train_every": c.auto_train_every,
            "heldout_tolerance": c.heldout_tolerance,
        }

    def stats(self):
        return read_json(self.stats_file)

    def __call__(self, request, datastore):
        start = time.time()
        base = self.context.models.current()
        previous = base.get("version")
        try:
            result = self._train(request, datastore, base)
        except Exception as error:
            write_json(
                self.stats_file,
                {
                    "status": "failed",
                    "published": False,
                    "reason": str(error),
                    "error": str(error),
                    "model_version": previous,
                    "previous_version": previous,
                    "seconds": round(time.time() - start, 2),
                    "finished_at": _now(),
                },
            )
            logger.error(f"training failed, model {previous} kept: {error}")
            raise
        result.update({"previous_version": previous, "seconds": round(time.time() - start, 2), "finished_at": _now()})
        write_json(self.stats_file, result)
        logger.info(f"training {result['status']}: {result['reason']}")
        return result

    # ---- steps --------------------------------------------------------------------------------------
    def _train(self, request, datastore, base):
        from radregion.bundle import load_bundle
        from radregion.evaluate import macro_recall
        from radregion.head import fit_head

        config = self.context.config
        if _flag(request.get("fine_tune", config.fine_tune)):
            raise TrainingError(
                "the server fits heads only: fine-tuning the backbone needs the model's original "
                "training images (run `radregion fit-head --fine-tune` and serve that bundle)"
            )
        bundle = load_bundle(self.context.models.root / base["folder"])
        requested = int(request.get("base_generation", base["generation"]))  # set when the run was requested
        if requested != int(base["generation"]):
            return self._kept(
                bundle,
                {},
                f"a newer model (generation {base['generation']}, {bundle.version}) was "
                f"published since this training was requested (generation {requested})",
            )
        regions = bundle.regions
        stored = bundle.training_set()
        if stored is None:
            raise TrainingError(
                f"model {bundle.version} does not store the features its head was fitted on, so a "
                f"new head would lose every region nobody confirmed; refit it with `radregion "
                f"fit-head` (which stores them) and serve that bundle"
            )
        labels = confirmed_labels(datastore, regions)
        if len(labels) < config.min_labels:
            raise TrainingError(
                f"training needs at least {config.min_labels} confirmed in-domain labels; have {len(labels)}"
            )
        table = self.context.refresh_scores(datastore, list(labels))
        ids = [i for i in labels if table.index(i) is not None]
        x_conf = _features(table, ids)
        y_conf = np.array([regions.index(labels[i]) for i in ids], int)
        x_stored = np.asarray(stored.features, np.float32)
        files = [datastore.get_image_uri(i) for i in ids] if stored.images is not None else []  # by content
        same = same_images(stored, x_conf, files)
        x_base, y_base, g_base = x_stored[~same], np.asarray(stored.targets)[~same], np.asarray(stored.groups)[~same]
        counts = {
            "stored": int(len(x_stored)),
            "stored_replaced_by_confirmed": int(same.sum()),
            "confirmed": len(ids),
            "confirmed_unreadable": len(labels) - len(ids),
        }
        missing = [regions[r] for r in range(len(regions)) if not np.any(y_base == r) and not np.any(y_conf == r)]
        if missing:
            raise TrainingError(f"no training image left for region(s) {', '.join(missing)}")

        # 1. patient-grouped validation on the confirmed labels
        train_rows, val_rows, n_patients = self._split(datastore, table, ids, labels)
        counts.update(confirmed_train=len(train_rows), validation=len(val_rows))
        report = {"regions": len(regions), "n_images": counts, "labels_by_region": _count(labels.values())}
        if not val_rows:
            return self._kept(
                bundle,
                report,
                "no validation images: confirm images of at least two patients for a region so one can be held out",
            )
        truths = [regions[y_conf[k]] for k in val_rows]
        fitted = np.concatenate([y_base, y_conf[train_rows]])  # a region whose only images are held out: left out
        head = fit_head(
            np.concatenate([x_base, x_conf[train_rows]]),
            [regions[t] for t in fitted],
            [r for k, r in enumerate(regions) if np.any(fitted == k)],
        )
        new = macro_recall(head.predict(x_conf[val_rows]), truths, regions)
        current = macro_recall(bundle.head().predict(x_conf[val_rows]), truths, regions)
        report["validation"] = {
            "n_images": len(val_rows),
            "n_patients": n_patients,
            "metric": "macro_recall",
            "new": round(new, 4),
            "current": round(current, 4),
        }
        # the head to publish: everything, every region
        head = fit_head(
            np.concatenate([x_base, x_conf]), [regions[t] for t in np.concatenate([y_base, y_conf])], regions
        )
        # 2. the original held-out set (or, without one, the stored set's folds with and without the confirmed labels)
        held_out = bundle.held_out()
        if held_out is not None:
            held = held_out_set_check(held_out, bundle.head(), head, regions)
        else:
            held = heldout_check(x_base, y_base, g_base, x_conf, y_conf, regions)
        report["heldout"] = held
        problems = []
        if new < current:
            problems.append(
                f"worse on the {len(val_rows)} validation images of {n_patients} patient(s): "
                f"macro recall {new:.3f} < current {current:.3f}"
            )
        if held["new"] < held["current"] - config.heldout_tolerance:
            problems.append(
                f"worse on {_held_words(held)}: macro recall {held['new']:.3f} < {held['current']:.3f} "
                + ("of the current model" if held_out is not None else "without the confirmed labels")
            )
        if problems:
            return self._kept(bundle, report, "; ".join(problems))

        models = self.context.models
        path = models.staging()
        path.rmdir()
        reason = (
            f"not worse on {len(val_rows)} validation images of {n_patients} patient(s) (macro recall "
            f"{new:.3f} vs {current:.3f}) nor on {_held_words(held)} ({held['new']:.3f} vs "
            f"{held['current']:.3f}); fitted on {len(x_base)} stored + {len(ids)} confirmed images"
        )
        new_bundle = bundle.with_head(
            path,
            head,
            ood=bundle.ood_detector(),
            training_set=stored,
            held_out=held_out,
            meta_updates={"server_training": {**report, "date": _now()}},
        )
        try:
            crash_at = faults.requested(request, "crash_at")
            record = models.publish(
                path, reason, expect_generation=requested, crash_at=crash_at, trained_from=base.get("folder")
            )
        except PublishConflict as error:
            return self._kept(bundle, report, str(error))
        self._rescore(table, head, new_bundle)
        return {
            "status": "published",
            "published": True,
            "reason": reason,
            "model_version": record["version"],
            "generation": record["generation"],
            **report,
        }

    def _kept(self, bundle, report, reason):
        return {"status": "kept", "published": False, "reason": reason, "model_version": bundle.version, **report}

    def _split(self, datastore, table, ids, labels):
        """Rows of `ids` for training and validation: patient-grouped, stratified (the engine's split)."""
        from radregion.datasets import LabelledImage, patient_split

        items = [LabelledImage(Path(f"{k}"), (labels[i],), _patient(datastore, i)) for k, i in enumerate(ids)]
        try:
            train, val = patient_split(items, test_fraction=self.context.config.val_fraction, seed=0)
        except ValueError as error:
            raise TrainingError(f"cannot split the confirmed labels: {error}") from None
        return [int(it.path.name) for it in train], [int(it.path.name) for it in val], len({it.group for it in val})

    def _rescore(self, table: ScoreTable, head, bundle):
        """Scores of the new model from the cached features: same backbone, so no image is read again."""
        new = ScoreTable(
            bundle.version,
            head.regions,
            table.ids,
            head.probabilities(table.features),
            table.features,
            table.ood_score,
            table.out_of_domain,
            table.pacs_label,
            table.errors,
            table.pacs_labels,
        )
        self.context.scores.save(new)


def confirmed_labels(datastore, regions) -> dict:
    """{image_id: region} of the confirmed (tag `final`) in-domain labels whose region the model knows."""
    out = {}
    for image_id in datastore.get_labeled_images("final"):
        label = read_label(datastore, image_id)
        if label and not label.get("out_of_domain") and label.get("region") in regions:
            out[image_id] = label["region"]
    return out


def same_images(stored, confirmed: np.ndarray, confirmed_files) -> np.ndarray:
    """Mask of the rows of the stored training set (a `radregion.bundle.TrainingSet`) that are a confirmed image: by
    file content where the set stores its images' ids (exact on any device), else by features (cosine >=
    SAME_IMAGE_COSINE: fails where the stored features were computed in another precision than the served ones,
    e.g. bf16 on a GPU)."""
    from radregion.bundle import image_ids

    if not len(stored) or not len(confirmed):
        return np.zeros(len(stored), bool)
    if stored.images is not None:  # a series folder or a file gone since it was scored is no stored image
        return np.isin(stored.images, image_ids([f for f in map(Path, confirmed_files) if f.is_file()]))
    stored = np.asarray(stored.features, np.float32)
    a = stored / (np.linalg.norm(stored, axis=1, keepdims=True) + 1e-12)
    b = confirmed / (np.linalg.norm(confirmed, axis=1, keepdims=True) + 1e-12)
    return (a @ b.T).max(1) >= SAME_IMAGE_COSINE


def held_out_set_check(held_out, current_head, new_head, regions) -> dict:
    """Macro recall (the engine's `macro_recall`) of the current and the new head on the bundle's held-out set."""
    from radregion.evaluate import macro_recall

    truths = held_out.truths(regions)
    return {
        "method": HELD_OUT_SET,
        "n_images": len(held_out),
        "n_patients": int(len(np.unique(held_out.groups))),
        "metric": "macro_recall",
        "new": round(macro_recall(new_head.predict(held_out.features), truths, regions), 4),
        "current": round(macro_recall(current_head.predict(held_out.features), truths, regions), 4),
    }


def _held_words(held) -> str:
    if held["method"] == HELD_OUT_SET:
        return f"the model's held-out set ({held['n_images']} images of {held['n_patients']} patient(s))"
    return f"the original training data's held-out folds ({held['n_images']} images; the model has no held-out set)"


def heldout_check(x, y, groups, x_extra, y_extra, regions, folds=HELDOUT_FOLDS) -> dict:
    """Out-of-fold macro recall on the stored set (the engine's patient-grouped folds and out-of-fold heads):
    heads fitted on each fold's training part alone (`current`) and with the extra (confirmed) rows (`new`)."""
    from radregion.datasets import LabelledImage
    from radregion.evaluate import macro_recall
    from radregion.validation import fold_ids, out_of_fold_predictions

    names = [regions[t] for t in y]
    items = [LabelledImage(Path(f"{n}"), (name,), f"group-{g}") for n, (name, g) in enumerate(zip(names, groups))]
    fold_of = fold_ids(items, k=folds, seed=0)
    current = out_of_fold_predictions(x, names, regions, fold_of)
    new = out_of_fold_predictions(
        x, names, regions, fold_of, extra_features=x_extra, extra_label_sets=[(regions[t],) for t in y_extra]
    )
    return {
        "method": CROSS_VALIDATION,
        "n_images": int(len(y)),
        "folds": int(len(np.unique(fold_of))),
        "metric": "macro_recall",
        "new": round(macro_recall(new, names, regions), 4),
        "current": round(macro_recall(current, names, regions), 4),
    }


def _patient(datastore, image_id):
    """PatientID from the image's DICOM header (None for PNG/JPEG: the image is its own patient)."""
    from radregion.io import read_metadata

    try:
        return read_metadata(datastore.get_image_uri(image_id)).get("PatientID") or None
    except Exception:  # an unreadable header: the image is its own group
        return None


def _features(table, ids):
    return table.features[[table.index(i) for i in ids]]


def _count(values) -> dict:
    out = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
