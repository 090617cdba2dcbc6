"""Out-of-domain scores, arrays in and arrays out."""

import numpy as np

from radregion.head import fit_head
import pytest
from sklearn.linear_model import LogisticRegression

from radregion.ood import CLASSIFIER_C, METHODS, NEEDS_OUTLIERS, OODDetector, auroc, fit_ood


def _blobs(seed=0, n_outliers=30):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(3, 16))
    labels = np.repeat(np.arange(3), 40)
    features = centres[labels] + rng.normal(size=(120, 16))
    # between the regions (no region claims them) and off to one side (a direction only they take)
    outliers = rng.normal(size=(n_outliers, 16)) * 0.5 + centres.mean(0) + 3.0 * np.eye(16)[0]
    return features.astype(np.float32), labels, outliers.astype(np.float32)


def test_msp_is_one_minus_the_heads_top_probability():
    features, labels, outliers = _blobs()
    detector = fit_ood(features, labels, "msp")
    head = fit_head(features, [str(c) for c in labels], ["0", "1", "2"])
    expected = 1.0 - head.probabilities(outliers).max(1)
    assert np.allclose(detector.score(outliers), expected, atol=1e-5)


def test_energy_is_minus_the_log_sum_exp_of_the_heads_logits():
    from scipy.special import logsumexp

    features, labels, outliers = _blobs(2)
    detector = fit_ood(features, labels, "energy")
    head = fit_head(features, [str(c) for c in labels], ["0", "1", "2"])
    assert np.allclose(detector.score(outliers), -logsumexp(head.logits(outliers), axis=1), atol=1e-4)
    assert np.allclose(detector.score(features), -logsumexp(head.logits(features), axis=1), atol=1e-4)


def test_every_method_tells_outliers_apart_and_survives_the_bundle_format():
    features, labels, outliers = _blobs(1, n_outliers=60)
    outliers, known_outliers = outliers[:30], outliers[30:]  # the classifier learns from other images of the kind
    for method in METHODS:
        detector = fit_ood(features, labels, method, outliers=known_outliers if method in NEEDS_OUTLIERS else None)
        assert auroc(detector.score(features), detector.score(outliers)) > 0.9, method
        info, arrays = detector.to_dict()
        again = OODDetector.from_dict({**info, **arrays})
        assert np.allclose(again.score(outliers), detector.score(outliers)), method


def test_classifier_is_the_logit_of_sklearns_balanced_logistic_regression():
    features, labels, outliers = _blobs(3)
    detector = fit_ood(features, labels, "classifier", outliers=outliers)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (np.concatenate([features, outliers]) - mean) / std
    y = np.r_[np.zeros(len(features)), np.ones(len(outliers))]
    reference = LogisticRegression(C=CLASSIFIER_C, class_weight="balanced", max_iter=3000).fit(x, y)
    assert np.allclose(detector.score(outliers), reference.decision_function((outliers - mean) / std), atol=1e-3)


def test_classifier_refuses_without_out_of_domain_images():
    features, labels, _ = _blobs()
    with pytest.raises(ValueError, match="out-of-domain images"):
        fit_ood(features, labels, "classifier")
