"""Linear heads, arrays in and arrays out: frozen-backbone features -> multinomial logistic regression."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

DEFAULT_C = 0.5


@dataclass
class LinearHead:
    weight: np.ndarray  # (C, D), acts on standardised features
    bias: np.ndarray  # (C,)
    feature_mean: np.ndarray  # (D,)
    feature_std: np.ndarray  # (D,)
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

    def on_raw_features(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight (C, D), bias (C,)) acting on the features as they are, not standardised: the same logits."""
        weight = self.weight / self.feature_std
        return weight, self.bias - weight @ self.feature_mean

    def tensors(self) -> dict:
        return {
            "head.weight": self.weight,
            "head.bias": self.bias,
            "head.feature_mean": self.feature_mean,
            "head.feature_std": self.feature_std,
        }


def first_labels(labels) -> list[str]:
    """A multi-label image is fitted with its first label."""
    return [lab if isinstance(lab, str) else lab[0] for lab in labels]


def fit_head(
    features: np.ndarray,
    labels,
    regions=None,
    class_balanced: bool = True,
    C: float = DEFAULT_C,
    max_iter: int = 1000,
    tol: float = 1e-3,
    all_labels: bool = False,
) -> LinearHead:
    """Multinomial logistic regression (lbfgs) on standardised features.

    `labels`: one region name (or tuple of names, first used) per row. `regions`: the head's classes in order
    (default: those present, sorted); each must have at least one example. `all_labels`: a tuple trains each of
    its names, one row per name (the out-of-fold heads of `radregion.validation` fit so).
    """
    features = np.asarray(features, np.float32)
    if all_labels:
        label_sets = [(lab,) if isinstance(lab, str) else tuple(lab) for lab in labels]
        rows = [i for i, names in enumerate(label_sets) for _ in names]
        features, labels = features[rows], [name for names in label_sets for name in names]
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
    from sklearn.linear_model import LogisticRegression  # fitting only: inference needs no sklearn (start-up)

    model = LogisticRegression(C=C, class_weight="balanced" if class_balanced else None, max_iter=max_iter, tol=tol)
    with warnings.catch_warnings():  # few labels per region: sklearn's "regression?" hint is noise here
        warnings.filterwarnings("ignore", message="The number of unique classes")
        model.fit(z, y)
    weight, bias = model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
    if len(regions) == 2:  # sklearn keeps one row for two classes
        weight, bias = np.stack([-weight[0] / 2, weight[0] / 2]), np.array([-bias[0] / 2, bias[0] / 2], np.float32)
    return LinearHead(weight, bias, mean.astype(np.float32), std.astype(np.float32), regions)


def out_of_domain_regions(taxonomy, extra=()) -> set[str]:
    regions = {r.name for r in taxonomy.regions if r.out_of_domain} if taxonomy is not None else set()
    return regions | set(extra)
