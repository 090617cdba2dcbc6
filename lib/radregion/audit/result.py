"""What an audit found, per image, and its rows for label_issues.csv and corrections.csv."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class AuditResult:
    images: list[str]  # the image as written in the CSVs
    paths: list[Path]
    patient_ids: list[str | None]
    regions: list[str]  # class names, columns of pred_probs
    given: list[tuple[str, ...]]  # given regions per image; () = no given label
    given_index: np.ndarray  # (N,) the given class the model finds likeliest; -1 = none
    pred_probs: np.ndarray  # (N, C) out-of-fold probabilities
    issue_score: np.ndarray  # (N,) in [0, 1]; NaN without a given label
    is_issue: np.ndarray  # (N,) bool
    ood_score: np.ndarray  # (N,)
    out_of_domain: np.ndarray  # (N,) bool
    features: np.ndarray | None = None
    method: str = "ours"
    probabilities_from: str = ""
    models: list[str] = field(default_factory=list)
    errors: list = field(default_factory=list)  # RadiographError per unreadable file
    source: str = ""
    min_confidence: float = 0.5  # to accept a suggestion for an image without a label
    trained_on: np.ndarray | None = None  # (N,) bool: in the training set of a model's head (`in_training_set`)

    @property
    def suggested_index(self) -> np.ndarray:
        return self.pred_probs.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.pred_probs.max(axis=1)

    def given_text(self, i) -> str:
        return "|".join(self.given[i])

    @property
    def unlabelled(self) -> np.ndarray:
        return np.array([not labels for labels in self.given], dtype=bool)

    def accepted(self) -> np.ndarray:
        """Suggestions taken into corrections.csv: suspected errors, and confident labels for unlabelled images."""
        return self.is_issue | (self.unlabelled & ~self.out_of_domain & (self.confidence >= self.min_confidence))

    def rows(self) -> list[dict]:
        suggested = self.suggested_index
        return [
            {
                "image": self.images[i],
                "given_label": self.given_text(i),
                "suggested_label": self.regions[suggested[i]],
                "issue_score": float(self.issue_score[i]),
                "is_issue": bool(self.is_issue[i]),
                "ood_score": float(self.ood_score[i]),
                "out_of_domain": bool(self.out_of_domain[i]),
                "confidence": float(self.confidence[i]),
            }
            for i in range(len(self.images))
        ]

    def corrections(self) -> list[dict]:
        suggested = self.suggested_index
        return [
            {"image": self.paths[i], "labels": self.regions[suggested[i]], "PatientID": self.patient_ids[i]}
            for i in np.flatnonzero(self.accepted())
        ]

    def counts(self) -> dict:
        unlabelled = self.unlabelled
        return {
            "images": len(self.images),
            "labelled": int((~unlabelled).sum()),
            "unlabelled": int(unlabelled.sum()),
            "issues": int(self.is_issue.sum()),
            "out_of_domain": int(self.out_of_domain.sum()),
            "suggestions": int((self.accepted() & unlabelled).sum()),
            "unreadable": len(self.errors),
            "trained_on": int(self.trained_on.sum()) if self.trained_on is not None else 0,
        }

    def training_note(self) -> str:
        """The warning when audited images are ones the model was trained on ("" when none is)."""
        n = self.counts()["trained_on"]
        if not n:
            return ""
        flagged = int((self.is_issue & self.trained_on).sum())
        return (
            f"{n} of the {len(self.images)} audited images are in the training set of the model's head "
            f"({flagged} of them suspected): their labels reached the model, which rarely doubts them, so few "
            "suspects among them do not mean clean labels. Audit them with a model trained without them, e.g. "
            "cross-fitted on two halves (docs/audit.md)."
        )
