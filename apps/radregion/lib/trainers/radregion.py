"""Train task `radregion`: a new head on the confirmed labels, validated, published only if not worse.

Frozen backbone (features from the score cache, so training takes seconds on CPU): the engine's `fit_head` on
the confirmed labels, plus, for regions nobody has confirmed yet, the current model's most confident images
(so a few confirmed regions do not erase the others). Validation: a stratified split of the confirmed labels,
new head against the current model on the same images. `--conf fine_tune true` fine-tunes the backbone
through the engine's `train_head` instead.
"""

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from monailabel.interfaces.tasks.train import TrainTask

from ..context import read_json, read_label, write_json
from ..errors import TrainingError
from ..scores import ScoreTable

logger = logging.getLogger(__name__)
PSEUDO_PER_REGION = 20


class RadRegionTrainer(TrainTask):
    def __init__(self, context):
        super().__init__("Fit a new head on the confirmed labels; publish it if validation is not worse")
        self.context = context
        self.stats_file = context.state_dir / "train_stats.json"

    def config(self):
        c = self.context.config
        return {"fine_tune": c.fine_tune, "val_fraction": c.val_fraction, "min_labels": c.min_labels,
                "auto_train_every": c.auto_train_every}

    def stats(self):
        return read_json(self.stats_file)

    def __call__(self, request, datastore):
        start = time.time()
        previous = self.context.version
        try:
            result = self._train(request, datastore)
        except Exception as error:
            write_json(self.stats_file, {"status": "failed", "published": False, "error": str(error),
                                         "model_version": previous, "previous_version": previous,
                                         "seconds": round(time.time() - start, 2), "finished_at": _now()})
            logger.error(f"training failed, model {previous} kept: {error}")
            raise
        result.update({"previous_version": previous, "seconds": round(time.time() - start, 2),
                       "finished_at": _now()})
        write_json(self.stats_file, result)
        logger.info(f"training: {result}")
        return result

    # ---- steps --------------------------------------------------------------------------------------
    def _train(self, request, datastore):
        config = self.context.config
        fine_tune = _flag(request.get("fine_tune", config.fine_tune))
        bundle = self.context.bundle()
        labels = confirmed_labels(datastore, bundle.regions)
        regions_seen = sorted(set(labels.values()))
        if len(labels) < config.min_labels or len(regions_seen) < 2:
            raise TrainingError(f"training needs at least {config.min_labels} confirmed in-domain labels of at least "
                                f"2 regions; have {len(labels)} of {len(regions_seen)} ({', '.join(regions_seen)})")
        table = self.context.refresh_scores(datastore, list(labels))
        ids = [i for i in labels if table.index(i) is not None]
        train_ids, val_ids = stratified_split(ids, [labels[i] for i in ids], config.val_fraction)
        if not val_ids:
            raise TrainingError("no validation images: confirm at least 2 images of one region")
        pseudo = pseudo_labels(table, datastore, bundle.regions, set(regions_seen), config) \
            if config.keep_regions else {}
        current_score = balanced_accuracy([labels[i] for i in val_ids], _rows(table, val_ids, table.predicted()))
        if fine_tune:
            return self._fine_tune(bundle, datastore, labels, pseudo, train_ids, val_ids, current_score)
        from radregion.head import fit_head

        train_labels = {**pseudo, **{i: labels[i] for i in train_ids}}
        head = fit_head(_features(table, list(train_labels)), list(train_labels.values()),
                        _ordered(bundle.regions, train_labels.values()))
        new_score = balanced_accuracy([labels[i] for i in val_ids], head.predict(_features(table, val_ids)))
        report = {"n_labels": len(ids), "n_pseudo_labels": len(pseudo), "regions": regions_seen,
                  "validation": {"n_images": len(val_ids), "metric": "balanced_accuracy",
                                 "new": round(new_score, 4), "current": round(current_score, 4)},
                  "fine_tune": False}
        if new_score < current_score:
            return {"status": "kept", "published": False, "model_version": bundle.version,
                    "reason": "validation got worse", **report}
        all_labels = {**pseudo, **labels}
        all_labels = {i: r for i, r in all_labels.items() if table.index(i) is not None}
        head = fit_head(_features(table, list(all_labels)), list(all_labels.values()),
                        _ordered(bundle.regions, all_labels.values()))
        new = bundle.with_head(self.context.model_dir, head, ood=bundle.ood_detector(),
                               meta_updates={"server_training": {**report, "date": _now()}})
        self._rescore(table, head, new)
        return {"status": "published", "published": True, "model_version": new.version, **report}

    def _rescore(self, table: ScoreTable, head, bundle):
        """Scores of the new model from the cached features: same backbone, so no image is read again."""
        new = ScoreTable(bundle.version, head.regions, table.ids, head.probabilities(table.features),
                         table.features, table.ood_score, table.out_of_domain, table.pacs_label, table.errors)
        self.context.scores.save(new)

    def _fine_tune(self, bundle, datastore, labels, pseudo, train_ids, val_ids, current_score):
        from radregion.bundle import _replace_folder
        from radregion.datasets import LabelledImage
        from radregion.head import train_head
        from radregion.inference import Predictor

        config = self.context.config
        train_labels = {**pseudo, **{i: labels[i] for i in train_ids}}
        items = [LabelledImage(Path(datastore.get_image_uri(i)), (r,), i) for i, r in train_labels.items()]
        tmp = Path(tempfile.mkdtemp(dir=self.context.state_dir, prefix=".train-"))
        try:
            new = train_head(bundle, items, tmp / "model", folds=min(5, max(2, len(items) // 4)),
                             fine_tune_epochs=config.fine_tune_epochs, workers=config.workers,
                             command="monailabel train radregion (fine_tune)")
            predictor = Predictor(new.path, device=config.device, workers=config.workers, cache=config.cache)
            predicted = [p.region for p in predictor.predict([datastore.get_image_uri(i) for i in val_ids])]
            new_score = balanced_accuracy([labels[i] for i in val_ids], predicted)
            report = {"n_labels": len(labels), "n_pseudo_labels": len(pseudo), "fine_tune": True,
                      "validation": {"n_images": len(val_ids), "metric": "balanced_accuracy",
                                     "new": round(new_score, 4), "current": round(current_score, 4)}}
            if new_score < current_score:
                return {"status": "kept", "published": False, "model_version": bundle.version,
                        "reason": "validation got worse", **report}
            version = new.version
            _replace_folder(tmp / "model", self.context.model_dir)
            return {"status": "published", "published": True, "model_version": version, **report}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def confirmed_labels(datastore, regions) -> dict:
    """{image_id: region} of the confirmed (tag `final`) in-domain labels whose region the model knows."""
    out = {}
    for image_id in datastore.get_labeled_images("final"):
        label = read_label(datastore, image_id)
        if label and not label.get("out_of_domain") and label.get("region") in regions:
            out[image_id] = label["region"]
    return out


def stratified_split(ids, labels, val_fraction, seed=0):
    """Per region, round(fraction * n) images (at least one when the region has two) go to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for region in sorted(set(labels)):
        members = [i for i, r in zip(ids, labels) if r == region]
        rng.shuffle(members)
        n_val = max(1, round(val_fraction * len(members))) if len(members) >= 2 else 0
        val += members[:n_val]
        train += members[n_val:]
    return train, val


def pseudo_labels(table, datastore, regions, confirmed_regions, config) -> dict:
    """The current model's most confident unlabelled in-domain images of each region nobody confirmed yet."""
    unlabelled = set(datastore.get_unlabeled_images("final"))
    predicted, confidence = table.predicted(), table.confidence()
    out = {}
    for region in regions:
        if region in confirmed_regions:
            continue
        rows = [k for k, i in enumerate(table.ids) if i in unlabelled and predicted[k] == region
                and confidence[k] >= config.pseudo_confidence and not table.out_of_domain[k]]
        rows.sort(key=lambda k: -confidence[k])
        out.update({table.ids[k]: region for k in rows[:PSEUDO_PER_REGION]})
    return out


def balanced_accuracy(truth, predicted) -> float:
    """Mean recall over the regions present in `truth`."""
    recalls = []
    for region in sorted(set(truth)):
        hits = [p == t for t, p in zip(truth, predicted) if t == region]
        recalls.append(sum(hits) / len(hits))
    return float(np.mean(recalls)) if recalls else 0.0


def _features(table, ids):
    return table.features[[table.index(i) for i in ids]]


def _rows(table, ids, values):
    return [values[table.index(i)] for i in ids]


def _ordered(regions, present):
    present = set(present)
    return [r for r in regions if r in present]


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
