"""Strategy `disagreement`: the model contradicts the archive (PACS) label, most confident first.

The queue of suspected archive errors; images without an archive label are not in it.
"""

from .scored import ScoredStrategy


class Disagreement(ScoredStrategy):
    name = "disagreement"

    def __init__(self, context):
        super().__init__(context, "Prediction differs from the archive label, most confident first")

    def rank(self, table, rows, datastore):
        confidence = table.confidence()
        rows = [k for k in rows if table.agrees_with_archive(k) is False]  # "HAND WRIST" agrees with Wrist
        return sorted(((k, confidence[k]) for k in rows), key=lambda kv: (-kv[1], table.ids[kv[0]]))
