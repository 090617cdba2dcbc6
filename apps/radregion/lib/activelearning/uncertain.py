"""Strategy `uncertain`: smallest margin between the two most probable regions first."""

from .scored import ScoredStrategy


class Uncertain(ScoredStrategy):
    name = "uncertain"

    def __init__(self, context):
        super().__init__(context, "Most uncertain first (smallest top-1 minus top-2 probability)")

    def rank(self, table, rows, datastore):
        margin = table.margin()
        return sorted(((k, margin[k]) for k in rows), key=lambda kv: (kv[1], table.ids[kv[0]]))
