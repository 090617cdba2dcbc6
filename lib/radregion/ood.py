"""Out-of-domain score from backbone features: higher = less like any region the head was trained on.

The methods, all on standardised features:
- "mahalanobis": min over regions of the Mahalanobis distance to the region mean, one shared covariance
  estimated with Ledoit-Wolf shrinkage (Lee et al., NeurIPS 2018, "A simple unified framework for detecting
  out-of-distribution samples").
- "knn": 1 - mean cosine similarity to the k nearest training images (Sun et al., ICML 2022).
- "msp": 1 - the maximum softmax probability of a logistic head over the regions (Hendrycks & Gimpel, ICLR 2017,
  "A baseline for detecting misclassified and out-of-distribution examples"); the score that outlier exposure
  (`radregion.finetune`) trains a backbone for, where it pulls out-of-domain features towards the region means.
- "energy": the free energy -log sum_c exp f_c of the same logistic head's logits (Liu et al., NeurIPS 2020,
  "Energy-based out-of-distribution detection"): high where no region's logit is large, unlike "msp" not
  squashed by the softmax; the score an energy-bounded outlier exposure (`radregion.losses.energy`) trains for.
- "classifier": the logit of a logistic regression of known out-of-domain images (the taxonomy's `Others`) against
  in-domain ones, class-balanced, L2 strength `CLASSIFIER_C`: outlier exposure (Hendrycks et al., ICLR 2019, "Deep
  anomaly detection with outlier exposure") applied to the frozen features. Needs out-of-domain images; it scores
  how much an image resembles them, so it is measured out of fold on them before it is chosen (fitting.py).
The threshold is a percentile of the scores of held-out in-domain images (out-of-fold, see fitting.train_head).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("mahalanobis", "knn", "msp", "energy", "classifier")
HEAD_METHODS = ("msp", "energy")  # scores of a logistic head over the regions
NEEDS_OUTLIERS = ("classifier",)
CLASSIFIER_C = 0.03  # held-out AUROC flat for C in 0.01-0.1 on the shipped recipe's features (docs/results.md)


@dataclass
class OODDetector:
    method: str
    arrays: dict  # str -> np.ndarray: "feature_mean", "feature_std", then the method's statistics
    threshold: float = float("inf")
    params: dict = field(default_factory=dict)  # JSON-able: k, percentile, measured AUROCs

    def score(self, features: np.ndarray) -> np.ndarray:
        z = _standardise(features, self.arrays["feature_mean"], self.arrays["feature_std"])
        if self.method == "mahalanobis":
            return _mahalanobis_min(z, self.arrays["class_means"], self.arrays["precision"])
        if self.method == "knn":
            return _knn_distance(z, self.arrays["bank"], int(self.params.get("k", 5)))
        if self.method == "msp":
            return _max_softmax_distance(z, self.arrays["weight"], self.arrays["bias"])
        if self.method == "energy":
            return _free_energy(z, self.arrays["weight"], self.arrays["bias"])
        if self.method == "classifier":
            return (z @ self.arrays["weight"][0] + self.arrays["bias"][0]).astype(np.float32)
        raise ValueError(f"unknown OOD method {self.method!r} (known: {', '.join(METHODS)})")

    def is_out_of_domain(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def to_dict(self) -> tuple[dict, dict]:
        """(bundle.json "ood" block, arrays for the "ood.*" tensors)."""
        return {"method": self.method, "threshold": float(self.threshold), **self.params}, dict(self.arrays)

    @classmethod
    def from_dict(cls, info: dict) -> "OODDetector":
        """From `Bundle.ood`: the JSON block with the arrays merged in."""
        arrays = {k: np.asarray(v, np.float32) for k, v in info.items() if isinstance(v, np.ndarray)}
        params = {k: v for k, v in info.items() if k not in arrays and k not in ("method", "threshold")}
        return cls(info["method"], arrays, float(info["threshold"]), params)


def fit_ood(
    features: np.ndarray, labels: np.ndarray, method: str = "mahalanobis", k: int = 5, outliers=None
) -> OODDetector:
    """Fit the statistics of `method` on in-domain features with integer region labels (threshold unset);
    "classifier" also needs the features of known out-of-domain images (`outliers`)."""
    features = np.asarray(features, np.float32)
    mean = features.mean(0)
    std = features.std(0) + 1e-6
    z = _standardise(features, mean, std)
    arrays = {"feature_mean": mean, "feature_std": std}
    if method == "mahalanobis":
        labels = np.asarray(labels)
        classes = np.unique(labels)
        means = np.stack([z[labels == c].mean(0) for c in classes])
        centred = z - means[np.searchsorted(classes, labels)]
        arrays["class_means"] = means.astype(np.float32)
        from sklearn.covariance import LedoitWolf  # fitting only: scoring needs no sklearn (start-up)

        arrays["precision"] = LedoitWolf(assume_centered=True).fit(centred).precision_.astype(np.float32)
        return OODDetector(method, arrays)
    if method == "knn":
        arrays["bank"] = _normalise(z)
        return OODDetector(method, arrays, params={"k": int(k)})
    if method in HEAD_METHODS:
        from radregion.head import fit_head

        labels = np.asarray(labels)
        head = fit_head(features, [str(c) for c in labels], [str(c) for c in np.unique(labels)])
        # the head standardises as the detector does (same mean and std): its weights act on z directly
        arrays.update(weight=head.weight, bias=head.bias)
        return OODDetector(method, arrays)
    if method == "classifier":
        from sklearn.linear_model import LogisticRegression

        if outliers is None or len(outliers) == 0:
            raise ValueError("the classifier OOD score needs out-of-domain images (outliers)")
        x = np.concatenate([z, _standardise(outliers, mean, std)])
        is_out = np.r_[np.zeros(len(z)), np.ones(len(outliers))]
        model = LogisticRegression(C=CLASSIFIER_C, class_weight="balanced", max_iter=3000).fit(x, is_out)
        arrays.update(weight=model.coef_.astype(np.float32), bias=model.intercept_.astype(np.float32))
        return OODDetector(method, arrays, params={"C": CLASSIFIER_C, "n_outliers": int(len(outliers))})
    raise ValueError(f"unknown OOD method {method!r} (known: {', '.join(METHODS)})")


def auroc(in_domain_scores, out_of_domain_scores) -> float | None:
    """AUROC of telling out-of-domain from in-domain images by score (None without both kinds or scores)."""
    scores = np.r_[np.asarray(in_domain_scores, float), np.asarray(out_of_domain_scores, float)]
    if len(in_domain_scores) == 0 or len(out_of_domain_scores) == 0 or not np.isfinite(scores).all():
        return None
    y = np.r_[np.zeros(len(in_domain_scores)), np.ones(len(out_of_domain_scores))]
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores))


def _standardise(features, mean, std):
    return (np.asarray(features, np.float32) - mean) / std


def _normalise(z):
    return (z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-12)).astype(np.float32)


def _mahalanobis_min(z, means, precision):
    zp = z @ precision
    d2 = (zp * z).sum(1)[:, None] - 2 * zp @ means.T + ((means @ precision) * means).sum(1)[None, :]
    return np.sqrt(np.maximum(d2.min(1), 0)).astype(np.float32)


def _knn_distance(z, bank, k):
    sims = _normalise(z) @ bank.T
    k = max(1, min(k, bank.shape[0]))
    top = np.partition(sims, -k, axis=1)[:, -k:]
    return (1.0 - top.mean(1)).astype(np.float32)


def _free_energy(z, weight, bias):
    logits = z @ weight.T + bias
    top = logits.max(1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(1))).astype(np.float32)


def _max_softmax_distance(z, weight, bias):
    logits = z @ weight.T + bias
    logits -= logits.max(1, keepdims=True)
    probs = np.exp(logits)
    return (1.0 - 1.0 / probs.sum(1)).astype(np.float32)  # 1 - max softmax (the max logit is 0 after the shift)
