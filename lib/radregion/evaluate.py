"""Figures of a model on labelled images: top-1, macro recall, per-region recall, bootstrap CIs, confusion matrix.

An image with several regions counts as right if the prediction is any of them. Per-region recall is over the
images that carry that region. CIs resample patients (images of one patient are not independent) when patient
ids are known, else images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from radregion.atomic import atomic_write


def _correct(predicted, truths) -> np.ndarray:
    return np.array([p is not None and p in t for p, t in zip(predicted, truths)], bool)


def _recalls(correct: np.ndarray, truths, regions) -> dict[str, float | None]:
    out = {}
    for region in regions:
        mask = np.array([region in t for t in truths], bool)
        out[region] = float(correct[mask].mean()) if mask.any() else None
    return out


def _macro(recalls: dict) -> float:
    values = [v for v in recalls.values() if v is not None]
    return float(np.mean(values)) if values else float("nan")


def macro_recall(predicted, truths, regions=None) -> float:
    """Mean per-region recall over `regions` (default: every region in `truths`) that have images; a prediction
    of None is wrong. `truths`: a region name or a tuple of them per image."""
    truths = [tuple(t) if not isinstance(t, str) else (t,) for t in truths]
    regions = sorted({r for t in truths for r in t}) if regions is None else regions
    return _macro(_recalls(_correct(predicted, truths), truths, regions))


def summarise(predicted, truths, regions, groups=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """top1, macro_recall, per_region_recall (+ counts), and bootstrap 95% CIs of top1 and macro recall."""
    truths = [tuple(t) if not isinstance(t, str) else (t,) for t in truths]
    correct = _correct(predicted, truths)
    recalls = _recalls(correct, truths, regions)
    result = {
        "n_images": len(truths),
        "top1": float(correct.mean()) if len(correct) else float("nan"),
        "macro_recall": _macro(recalls),
        "per_region_recall": recalls,
        "per_region_count": {r: int(sum(r in t for t in truths)) for r in regions},
    }
    if len(correct) and n_boot:
        result["ci95"] = _bootstrap(correct, truths, regions, groups, n_boot, seed)
    return result


def _bootstrap(correct, truths, regions, groups, n_boot, seed) -> dict:
    rng = np.random.default_rng(seed)
    if groups is not None and all(g is not None for g in groups):
        _, group_index = np.unique(np.asarray(groups, str), return_inverse=True)
        members = [np.flatnonzero(group_index == g) for g in range(group_index.max() + 1)]
        unit = "patient"
    else:
        members = [np.array([i]) for i in range(len(correct))]
        unit = "image"
    membership = np.array([[r in t for r in regions] for t in truths], bool)  # (N, R)
    top1, macro = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        c, m = correct[idx], membership[idx]
        top1[b] = c.mean()
        n = m.sum(0)
        per = (c[:, None] & m).sum(0)[n > 0] / n[n > 0]
        macro[b] = per.mean() if len(per) else np.nan
    return {
        "top1": [float(np.nanpercentile(top1, 2.5)), float(np.nanpercentile(top1, 97.5))],
        "macro_recall": [float(np.nanpercentile(macro, 2.5)), float(np.nanpercentile(macro, 97.5))],
        "resamples": n_boot,
        "unit": unit,
        "seed": seed,
    }


def confusion(predicted, truths, regions) -> np.ndarray:
    """(R, R+1) counts: row = true region (first label, or the predicted one when it is among the labels),
    column = predicted region; the last column counts images without a prediction (unreadable)."""
    matrix = np.zeros((len(regions), len(regions) + 1), int)
    index = {r: i for i, r in enumerate(regions)}
    for p, t in zip(predicted, truths):
        t = (t,) if isinstance(t, str) else tuple(t)
        true = p if p in t else t[0]
        if true not in index:
            continue
        matrix[index[true], index.get(p, len(regions))] += 1
    return matrix


def plot_confusion(matrix: np.ndarray, regions, path, title="Confusion matrix") -> Path:
    """Row-normalised confusion matrix with counts, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    columns = list(regions) + (["(error)"] if matrix[:, -1].any() else [])
    matrix = matrix[:, : len(columns)]
    rows = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    size = 2 + 0.45 * len(columns)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), columns, rotation=90)
    ax.set_yticks(range(len(regions)), regions)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i, j in zip(*np.nonzero(matrix)):
        ax.text(
            j,
            i,
            str(matrix[i, j]),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if norm[i, j] > 0.5 else "black",
        )
    fig.colorbar(image, ax=ax, fraction=0.04, label="fraction of the row")
    fig.tight_layout()
    try:
        with atomic_write(path) as handle:
            fig.savefig(handle, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path


def write_json(data, path) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return Path(path)


def evaluate_predictions(predictions, items, regions, out_of_domain_regions=(), n_boot=1000, seed=0) -> dict:
    """Figures from `Prediction`s and the `LabelledImage`s they belong to (same order).

    Images whose labels are all out-of-domain are scored only by the OOD flag (AUROC, flagged fraction);
    unreadable images count as wrong and are listed.
    """
    from radregion.ood import auroc

    ood = set(out_of_domain_regions)
    keep, ood_scores, in_scores, errors = [], [], [], []
    for pred, item in zip(predictions, items):
        labels = tuple(lab for lab in item.labels if lab not in ood)
        if pred.error:
            errors.append({"path": str(item.path), "error": pred.error})
        if not labels:
            if not pred.error:
                ood_scores.append((pred.ood_score, pred.out_of_domain))
            continue
        keep.append((pred.region if not pred.error else None, labels, item.patient_id))
        if not pred.error:
            in_scores.append((pred.ood_score, pred.out_of_domain))
    predicted = [k[0] for k in keep]
    truths = [k[1] for k in keep]
    label_regions = [r for r in regions] + sorted({r for t in truths for r in t} - set(regions))
    figures = summarise(predicted, truths, label_regions, groups=[k[2] for k in keep], n_boot=n_boot, seed=seed)
    figures["unreadable"] = errors
    figures["out_of_domain"] = {
        "n_in_domain": len(in_scores),
        "n_out_of_domain": len(ood_scores),
        "auroc": auroc([s for s, _ in in_scores], [s for s, _ in ood_scores]),
        "flagged_in_domain": float(np.mean([f for _, f in in_scores])) if in_scores else None,
        "flagged_out_of_domain": float(np.mean([f for _, f in ood_scores])) if ood_scores else None,
    }
    figures["confusion"] = {"regions": label_regions, "matrix": confusion(predicted, truths, label_regions).tolist()}
    return figures
