"""Strategy `ood`: most out-of-domain first (highest OOD score)."""

from .scored import ScoredStrategy


class OutOfDomain(ScoredStrategy):
    name = "ood"

    def __init__(self, context):
        super().__init__(context, "Most out-of-domain first (highest OOD score)")

    def rank(self, table, rows, datastore):
        return sorted(((k, table.ood_score[k]) for k in rows), key=lambda kv: (-kv[1], table.ids[kv[0]]))
