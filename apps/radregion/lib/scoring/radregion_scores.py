"""Scoring method `radregion_scores`: scores every image with the current model, once per model version.

MONAI Label runs it at start, after each training and after each active-learning request; images already
scored by the current model are skipped, so a run after a plain request costs nothing.
"""

from monailabel.interfaces.tasks.scoring import ScoringMethod


class RadRegionScores(ScoringMethod):
    def __init__(self, context):
        super().__init__("Per-image probabilities, margin, features, OOD score and archive label of the current model")
        self.context = context

    def __call__(self, request, datastore):
        table = self.context.refresh_scores(datastore)
        return {"model_version": table.version, "images": len(table), "unreadable": len(table.errors)}
