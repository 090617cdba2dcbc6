"""Models ready to run: one bundle, or several whose probabilities are averaged (as in the study).

A single bundle reports its own OOD score and threshold unchanged. An ensemble's OOD score is the mean over members
of (score - threshold) / spread, the spread being the standard deviation of that member's scores on its stored
training images: each member's margin over its own threshold in units of its own in-domain spread, so the
ensemble's threshold is 0 (`combine_ood`, also the audit's rule). A ratio score / threshold would fail for the
`classifier` score, a logit whose threshold is usually negative (-2.77 for the shipped model).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from radregion.device import resolve_device
from radregion.features import forward_features, images_to_tensor
from radregion.runtime import bundle_backbone


class LoadedModel:
    """One bundle with its backbone ready for inference on the device (`runtime.bundle_backbone`)."""

    def __init__(self, bundle, device="auto", precision="auto"):
        self.bundle = bundle
        self.device = resolve_device(device)
        self.precision = precision
        self.backbone = bundle_backbone(bundle, self.device, precision)
        self.head = bundle.head()
        self.ood = bundle.ood_detector()

    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(N, 1, S, S) float -> probabilities (N, C), features (N, D), OOD scores (N,) or None."""
        features = forward_features(self.backbone, batch, self.device, self.precision)
        probs = self.head.probabilities(features) if self.head is not None else np.zeros((len(features), 0), np.float32)
        scores = self.ood.score(features) if self.ood is not None else None
        return probs, features, scores


class Ensemble:
    """Average the probabilities of bundles that share cleaning settings and regions."""

    def __init__(self, bundles, device="auto", precision="auto"):
        bundles = list(bundles)
        if not bundles:
            raise ValueError("an ensemble needs at least one bundle")
        first = bundles[0]
        for other in bundles[1:]:
            if other.settings != first.settings:
                raise ValueError(f"{other.path}: cleaning settings differ from {first.path}; cannot ensemble")
            if set(other.regions) != set(first.regions):
                raise ValueError(f"{other.path}: regions differ from {first.path}; cannot ensemble")
        self.models = [LoadedModel(b, device, precision) for b in bundles]
        self.regions = list(first.regions)
        self.settings = first.settings
        self._orders = [[b.regions.index(r) for r in self.regions] for b in bundles]
        self._spreads = member_spreads(bundles, [m.ood for m in self.models])

    @property
    def bundles(self):
        return [m.bundle for m in self.models]

    @property
    def version(self) -> str:
        if len(self.models) == 1:
            return self.models[0].bundle.version
        joined = "+".join(m.bundle.version for m in self.models)
        return "ens-" + hashlib.sha256(joined.encode()).hexdigest()[:12]

    def _ood_members(self) -> tuple[list, list]:
        """The members' OOD thresholds (None: no detector) and spreads, as `combine_ood` takes them."""
        return [m.ood.threshold if m.ood is not None else None for m in self.models], self._spreads

    @property
    def threshold(self) -> float:
        """The OOD threshold of `run`'s scores (inf when a member has no usable OOD detector)."""
        return ensemble_threshold(*self._ood_members())

    def expect(self, images: int) -> None:
        """A run of `images` images starts (`InferenceBackbone.expect`)."""
        for model in self.models:
            model.backbone.expect(images)

    def run(self, images_uint8: np.ndarray) -> dict:
        """{"probabilities": (N, C), "features": (N, sum D), "ood_score": (N,), "out_of_domain": (N,) bool}."""
        batch = images_to_tensor(images_uint8)
        probs, feats, scores = [], [], []
        for model, order in zip(self.models, self._orders):
            p, f, s = model.run(batch)
            probs.append(p[:, order])
            feats.append(f)
            scores.append(s)
        score, out_of_domain = combine_ood(scores, *self._ood_members(), len(batch))
        return {
            "probabilities": np.mean(probs, 0).astype(np.float32),
            "features": np.concatenate(feats, 1),
            "ood_score": score.astype(np.float32),
            "out_of_domain": out_of_domain,
        }


def ood_spread(bundle, detector=None) -> float | None:
    """The standard deviation of `bundle`'s OOD scores (of `detector`, by default its own) on its stored training
    images, the unit an ensemble measures each member's margin in; None without a detector, a stored training set
    or any spread."""
    detector = detector if detector is not None else bundle.ood_detector()
    stored = bundle.training_set()
    if detector is None or stored is None or len(stored) < 2:
        return None
    spread = float(np.std(detector.score(stored.features)))
    return spread if np.isfinite(spread) and spread > 0 else None


def bundles_ood(bundles, features_per_bundle) -> tuple[np.ndarray, np.ndarray]:
    """`combine_ood` of `bundles`' own detectors on their features of the same N images ((N, D) each)."""
    detectors = [b.ood_detector() for b in bundles]
    return combine_ood(
        [d.score(f) if d is not None else None for d, f in zip(detectors, features_per_bundle)],
        [d.threshold if d is not None else None for d in detectors],
        member_spreads(bundles, detectors),
        len(features_per_bundle[0]),
    )


def member_spreads(bundles, detectors) -> list:
    """`ood_spread` of each member of an ensemble; a single bundle needs none (its score is used as it is)."""
    if len(bundles) == 1:
        return [None]
    return [ood_spread(b, d) for b, d in zip(bundles, detectors)]


def ensemble_threshold(thresholds, spreads) -> float:
    """The threshold of `combine_ood`'s score: a single member's own; 0 for an ensemble; inf when a member has no
    detector (None threshold) or, in an ensemble, no spread."""
    if any(t is None for t in thresholds) or (len(thresholds) > 1 and any(s is None for s in spreads)):
        return float("inf")
    return float(thresholds[0]) if len(thresholds) == 1 else 0.0


def combine_ood(scores, thresholds, spreads, n) -> tuple[np.ndarray, np.ndarray]:
    """Members' OOD scores (each (N,) or None), thresholds and spreads (`ood_spread`) -> (score (N,), flagged (N,)):
    one member's score as it is; an ensemble's mean of (score - threshold) / spread. NaN scores, never flagged,
    when a member has no score (or, in an ensemble, no spread)."""
    threshold = ensemble_threshold(thresholds, spreads)
    if any(s is None for s in scores) or not np.isfinite(threshold):
        return np.full(n, np.nan), np.zeros(n, bool)
    if len(scores) == 1:
        score = np.asarray(scores[0], np.float64)
    else:
        score = np.mean([(np.asarray(s, np.float64) - t) / d for s, t, d in zip(scores, thresholds, spreads)], 0)
    return score, score > threshold
