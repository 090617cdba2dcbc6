"""Strategy `random`: any unlabelled image, scored or not, in random order (MONAI Label's own `random` knows
nothing of what the other queues just handed out)."""

import random

from .scored import ScoredStrategy


class RandomStrategy(ScoredStrategy):
    name = "random"
    uses_scores = False

    def __init__(self, context):
        super().__init__(context, "Any unlabelled image, in random order")

    def rank(self, table, rows, datastore):
        return [(k, 0.0) for k in rows]

    def candidates(self, ranked, pending):
        out = ranked + [(image_id, None) for image_id in pending]
        random.shuffle(out)
        return out
