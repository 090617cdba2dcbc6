"""Common part of the strategies that rank unlabelled images by the cached scores of the current model."""

import logging
import time

from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)


class ScoredStrategy(Strategy):
    """Hands out the best-ranked unlabelled image; skips images this strategy handed out within
    `skip_served_s` seconds (another annotator has them open) unless nothing else is left."""

    name = ""

    def __init__(self, context, description):
        super().__init__(description)
        self.context = context

    def rank(self, table, rows, datastore) -> list:
        """[(row, score)] best first; `rows` index the unlabelled, readable images of `table`."""
        raise NotImplementedError

    def ranked_ids(self, datastore) -> list:
        """[(image_id, score)] in the order this strategy hands images out (for clients and tests)."""
        table = self.context.current_scores()
        if table is None:
            return []
        unlabelled = set(datastore.get_unlabeled_images("final"))
        rows = [k for k, image_id in enumerate(table.ids) if image_id in unlabelled]
        return [(table.ids[k], float(score)) for k, score in self.rank(table, rows, datastore)]

    def __call__(self, request, datastore):
        table = self.context.current_scores()
        if table is None:
            logger.info(f"{self.name}: no scores yet (the scoring method has not finished)")
            return None
        ranked = self.ranked_ids(datastore)
        if not ranked:
            return None
        now = int(time.time())
        skip = self.context.config.skip_served_s
        strategy = request.get("strategy", self.name)

        def served_recently(image_id):
            info = datastore.get_image_info(image_id).get("strategy", {}).get(strategy, {})
            return now - int(info.get("ts", 0)) < skip

        position = next((n for n, (image_id, _) in enumerate(ranked) if not served_recently(image_id)), 0)
        image_id, score = ranked[position]
        k = table.index(image_id)
        predicted = table.predicted()
        return {"id": image_id, "score": score, "rank": position + 1, "candidates": len(ranked),
                "model_version": table.version, "region": predicted[k],
                "confidence": float(table.confidence()[k]), "ood_score": float(table.ood_score[k]),
                "pacs_label": table.pacs_label[k]}
