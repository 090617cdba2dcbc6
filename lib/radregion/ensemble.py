"""Models ready to run: one bundle, or several whose probabilities are averaged (as in the study).

An ensemble's OOD score is the mean over members of score / threshold, so its threshold is 1.0; a single
bundle reports its own score and threshold unchanged.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from radregion.device import prepare_backbone, resolve_device
from radregion.features import forward_features, images_to_tensor


class LoadedModel:
    """One bundle with its backbone prepared on the device (eval, channels_last)."""

    def __init__(self, bundle, device="auto", precision="auto"):
        self.bundle = bundle
        self.device = resolve_device(device)
        self.precision = precision
        self.backbone = prepare_backbone(bundle.backbone(), self.device, precision)
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

    @property
    def bundles(self):
        return [m.bundle for m in self.models]

    @property
    def version(self) -> str:
        if len(self.models) == 1:
            return self.models[0].bundle.version
        joined = "+".join(m.bundle.version for m in self.models)
        return "ens-" + hashlib.sha256(joined.encode()).hexdigest()[:12]

    def _scored(self, model) -> bool:
        """A member's OOD score counts when it has a detector and, in an ensemble, a positive threshold to scale
        by (heads fitted on one image per region calibrate a zero threshold)."""
        return model.ood is not None and (len(self.models) == 1 or model.ood.threshold > 0)

    @property
    def threshold(self) -> float:
        """The OOD threshold of `run`'s scores (inf when a member has no usable OOD detector)."""
        if not all(self._scored(m) for m in self.models):
            return float("inf")
        return self.models[0].ood.threshold if len(self.models) == 1 else 1.0

    def run(self, images_uint8: np.ndarray) -> dict:
        """{"probabilities": (N, C), "features": (N, sum D), "ood_score": (N,), "out_of_domain": (N,) bool}."""
        batch = images_to_tensor(images_uint8)
        probs, feats, scores = [], [], []
        for model, order in zip(self.models, self._orders):
            p, f, s = model.run(batch)
            probs.append(p[:, order])
            feats.append(f)
            if s is not None and self._scored(model):
                scores.append(s if len(self.models) == 1 else s / model.ood.threshold)
        n = len(batch)
        score = (np.mean(scores, 0) if len(scores) == len(self.models) else np.full(n, np.nan)).astype(np.float32)
        return {
            "probabilities": np.mean(probs, 0).astype(np.float32),
            "features": np.concatenate(feats, 1),
            "ood_score": score,
            "out_of_domain": score > self.threshold,
        }
