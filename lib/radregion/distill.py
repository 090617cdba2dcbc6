"""Knowledge distillation: fine-tuning targets from a teacher's probabilities (Hinton, Vinyals & Dean, NIPS 2014
deep learning workshop, "Distilling the knowledge in a neural network", sec. 2: a weighted average of the
cross-entropy to the teacher's soft targets and to the true labels). The teacher is a model or an ensemble of seeds
(`radregion predict --model A --model B ...`), its probabilities read from the predictions CSV it wrote, at
temperature 1: the network's own probabilities.

Cross-entropy is linear in its target, so the weighted sum of the two losses is the cross-entropy to the weighted
sum of the two targets: a labelled image trains towards (1 - w) * its label distribution + w * the teacher's
distribution over the head's regions; an image the teacher predicted that has no label, towards the teacher's
distribution alone (the student learns the ensemble's answers on the unlabelled archive, soft, where
`radregion.pseudolabel` keeps the confident ones as hard labels); one the teacher flagged out of domain is an
outlier (outlier exposure, when it is on). Arrays in, arrays out (`teacher_distributions`, `distilled_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_TEACHER_WEIGHT = 0.5


@dataclass
class Teacher:
    """A teacher's answers: image paths (resolved), probabilities (N, R) over `regions`, out-of-domain flags (N,),
    the weight of its targets on labelled images, and where they came from."""

    paths: list
    probabilities: np.ndarray
    regions: list
    out_of_domain: np.ndarray
    weight: float = DEFAULT_TEACHER_WEIGHT
    source: str = ""

    @classmethod
    def from_predictions(cls, csv_path, weight: float = DEFAULT_TEACHER_WEIGHT) -> Teacher:
        """The read rows of a `radregion predict` CSV (paths relative to the current folder, as it wrote them);
        RadiographError naming the CSV when it has no region probabilities or no read image."""
        from radregion.errors import RadiographError
        from radregion.prediction_csv import read_predictions

        check_weight(weight)
        rows = [r for r in read_predictions(csv_path, resolve_paths=True) if not r["error"] and r["probabilities"]]
        if not rows:
            raise RadiographError(csv_path, "no read image with region probabilities: nothing to distil")
        regions = list(rows[0]["probabilities"])
        return cls(
            paths=[Path(r["path"]) for r in rows],
            probabilities=np.array([[r["probabilities"].get(c, np.nan) for c in regions] for r in rows], np.float64),
            regions=regions,
            out_of_domain=np.array([bool(r["out_of_domain"]) for r in rows], bool),
            weight=weight,
            source=str(Path(csv_path).resolve()),
        )

    def settings(self) -> dict:
        """What a bundle records of its teacher."""
        return {"predictions": self.source, "weight": self.weight}


def check_weight(weight: float) -> None:
    if not 0 < weight <= 1:
        raise ValueError(f"the teacher's weight must be in (0, 1], not {weight}")


def teacher_distributions(probabilities, teacher_regions, regions) -> np.ndarray:
    """The teacher's (N, R') probabilities as distributions over `regions` (the head's, in its order): columns
    picked by name, regions the head lacks dropped, each row renormalised to 1 (a CSV keeps 4 decimals).
    ValueError when the teacher lacks one of `regions` or a row has no mass on them."""
    missing = [r for r in regions if r not in teacher_regions]
    if missing:
        raise ValueError(f"the teacher has no probability for {', '.join(missing)}")
    picked = np.asarray(probabilities, np.float64)[:, [list(teacher_regions).index(r) for r in regions]]
    total = picked.sum(1, keepdims=True)
    if not (np.isfinite(picked).all() and (total > 0).all()):
        raise ValueError("a teacher row has no probability on the head's regions")
    return (picked / total).astype(np.float32)


def distilled_targets(label_targets, teacher, weight: float) -> np.ndarray:
    """(1 - `weight`) * `label_targets` + `weight` * `teacher`, both (N, R) distributions; a row of `teacher` that
    is nan (the teacher did not see the image) keeps its label target."""
    check_weight(weight)
    label_targets = np.asarray(label_targets, np.float32)
    teacher = np.asarray(teacher, np.float32)
    if label_targets.shape != teacher.shape:
        raise ValueError(f"label targets {label_targets.shape} and teacher {teacher.shape} differ in shape")
    seen = np.isfinite(teacher).all(1, keepdims=True)
    mixed = (1 - weight) * label_targets + weight * np.nan_to_num(teacher)
    return np.where(seen, mixed, label_targets).astype(np.float32)
