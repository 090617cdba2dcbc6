"""Out-of-domain scores, arrays in and arrays out."""

import numpy as np

from radregion.head import fit_head
from radregion.ood import METHODS, OODDetector, auroc, fit_ood


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(3, 16))
    labels = np.repeat(np.arange(3), 40)
    features = centres[labels] + rng.normal(size=(120, 16))
    outliers = rng.normal(size=(30, 16)) * 0.5 + centres.mean(0)  # between the regions: no region claims them
    return features.astype(np.float32), labels, outliers.astype(np.float32)


def test_msp_is_one_minus_the_heads_top_probability():
    features, labels, outliers = _blobs()
    detector = fit_ood(features, labels, "msp")
    head = fit_head(features, [str(c) for c in labels], ["0", "1", "2"])
    expected = 1.0 - head.probabilities(outliers).max(1)
    assert np.allclose(detector.score(outliers), expected, atol=1e-5)


def test_every_method_tells_outliers_apart_and_survives_the_bundle_format():
    features, labels, outliers = _blobs(1)
    for method in METHODS:
        detector = fit_ood(features, labels, method)
        assert auroc(detector.score(features), detector.score(outliers)) > 0.9, method
        info, arrays = detector.to_dict()
        again = OODDetector.from_dict({**info, **arrays})
        assert np.allclose(again.score(outliers), detector.score(outliers)), method
