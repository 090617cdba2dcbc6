"""Common part of the queues: rank unlabelled images by the cached scores of the current model, hand out the
best one that no queue has handed out recently.

- An image handed out by any queue within `skip_served_s` seconds is skipped (another annotator has it open)
  unless nothing else is left; the choice and its record happen under one lock, so two concurrent requests never
  get the same image.
- While scoring runs (no scores yet, scores of the previous model, or images not scored yet) the queues still
  serve: scored images in their order, then the unscored ones in id order, marked `"provisional": true` with how
  far scoring has come.
"""

import logging
import threading
import time

from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_SERVED = {}  # image id -> time it was handed out by any queue of this server


class ScoredStrategy(Strategy):
    name = ""
    uses_scores = True  # False: the order does not come from the scores (never provisional)

    def __init__(self, context, description):
        super().__init__(description)
        self.context = context

    def rank(self, table, rows, datastore) -> list:
        """[(row, score)] best first; `rows` index the unlabelled, readable images of `table`."""
        raise NotImplementedError

    def ranked_ids(self, datastore, table=None, unlabelled=None) -> list:
        """[(image_id, score)] of the scored unlabelled images, in the order this queue hands them out."""
        table = self.context.current_scores() if table is None else table
        if table is None:
            return []
        unlabelled = set(datastore.get_unlabeled_images("final") if unlabelled is None else unlabelled)
        rows = [k for k, image_id in enumerate(table.ids) if image_id in unlabelled]
        return [(table.ids[k], float(score)) for k, score in self.rank(table, rows, datastore)]

    def __call__(self, request, datastore):
        table = self.context.current_scores()
        unlabelled = datastore.get_unlabeled_images("final")
        ranked = self.ranked_ids(datastore, table, unlabelled)
        pending = sorted(i for i in unlabelled if table is None or i not in table)  # not scored (nor unreadable)
        candidates = self.candidates(ranked, pending)
        if not candidates:
            return None
        version = self.context.version
        provisional = self.uses_scores and (table is None or table.version != version or bool(pending))
        with _LOCK:
            now = time.time()
            skip = self.context.config.skip_served_s
            position = next(
                (n for n, (image_id, _) in enumerate(candidates) if now - _last_served(datastore, image_id) >= skip), 0
            )
            image_id, score = candidates[position]
            _SERVED[image_id] = now
        result = {
            "id": image_id,
            "score": score,
            "rank": position + 1,
            "candidates": len(candidates),
            "model_version": table.version if table is not None else None,
            "provisional": provisional,
        }
        k = table.index(image_id) if table is not None else None
        if k is not None:
            result.update(
                region=table.predicted()[k],
                confidence=float(table.confidence()[k]),
                ood_score=float(table.ood_score[k]),
                pacs_label=table.pacs_label[k],
            )
        if provisional:
            result["scoring"] = {
                "model_version": version,
                "scored": len(table) if table is not None else 0,
                "images": len(datastore.list_images()),
                "scores_of": table.version if table is not None else None,
            }
            logger.info(f"{self.name}: provisional choice {image_id} (scoring in progress)")
        return result

    def candidates(self, ranked, pending) -> list:
        """[(image_id, score or None)] in hand-out order: the scored ones ranked, then the unscored ones."""
        return ranked + [(image_id, None) for image_id in pending]


def _last_served(datastore, image_id) -> float:
    """When any queue last handed out the image: this server's memory, else the datastore's record."""
    seen = _SERVED.get(image_id, 0.0)
    try:
        info = datastore.get_image_info(image_id).get("strategy", {}) or {}
        seen = max([seen] + [float(v.get("ts", 0)) for v in info.values() if isinstance(v, dict)])
    except Exception:  # an image that just left the datastore: never served
        pass
    return seen
