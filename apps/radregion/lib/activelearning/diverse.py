"""Strategy `diverse`: among the most uncertain images, spread out in feature space.

Greedy k-center (Sener & Savarese, ICLR 2018, "Active learning for convolutional neural networks: a core-set
approach") over the `diverse_pool` most uncertain unlabelled images: each next image is the one farthest (cosine)
from the labelled images and from the images picked before it. Score = that distance.
"""

import numpy as np

from .scored import ScoredStrategy


class Diverse(ScoredStrategy):
    name = "diverse"

    def __init__(self, context):
        super().__init__(context, "Uncertain and spread out in feature space (k-center among the most uncertain)")

    def rank(self, table, rows, datastore):
        if not rows:
            return []
        margin = table.margin()
        pool = sorted(rows, key=lambda k: (margin[k], table.ids[k]))[: self.context.config.diverse_pool]
        feats = _normalise(table.features)
        labelled = [table.index(i) for i in datastore.get_labeled_images("final")]
        centres = feats[[k for k in labelled if k is not None]]
        if len(centres):
            nearest = (1.0 - feats[pool] @ centres.T).min(1)
        else:
            nearest = np.full(len(pool), np.inf)  # nothing labelled yet: start with the most uncertain
        order, remaining = [], list(range(len(pool)))
        while remaining:
            best = max(remaining, key=lambda j: (nearest[j], -j))
            score = nearest[best] if np.isfinite(nearest[best]) else 2.0
            order.append((pool[best], float(score)))
            remaining.remove(best)
            nearest = np.minimum(nearest, 1.0 - feats[pool] @ feats[pool[best]])
        return order


def _normalise(features):
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-12)
