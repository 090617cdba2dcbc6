"""Figures of bench/study.py: top-1 against labels per region, Grad-CAM with and without the gauge augmentation,
t-SNE of frozen features coloured by region. Reads the study's work folder; writes into docs/."""

from __future__ import annotations

from pathlib import Path


DOCS = Path(__file__).resolve().parents[1] / "docs"
LABELS = {
    "simclr": "SimCLR",
    "byol": "BYOL",
    "supcon": "SupCon (train labels)",
    "ensemble": "Ensemble S+B+SC",
    "scratch": "Supervised from scratch",
    "simclr-no-gauge": "SimCLR, no gauge",
    "simclr-no-clean": "SimCLR, no cleaning",
}
SHOTS = ("1", "5", "20", "all")
GRADCAM_PER_ROW = 6


def draw_all(study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    results, work = study.results, study.work
    if results:
        label_plot(results, DOCS / "study_labels.png", majority_top1(study.test))
    arms = [a for a in ("simclr", "simclr-no-gauge", "simclr-no-clean") if (work / "heads" / f"{a}_kall").exists()]
    if len(arms) > 1:
        gradcam_grid(work, arms, DOCS / "study_gradcam.png")
    if "simclr" in arms:
        tsne_figure(work / "heads" / "simclr_kall", study.test, DOCS / "study_tsne.png")
    print_tables(results)


def label_plot(
    results: dict,
    path: Path,
    majority: float | None = None,
    labels: dict = LABELS,
    title: str = "Linear head on frozen features (supervised from scratch: fine-tuned end to end)",
) -> None:
    """Top-1 (with 95% CIs) and macro recall against labels per region, one line per `labels` arm (results keyed
    "arm/K"); `majority`: top-1 of always answering the commonest test region."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, (arm, label) in enumerate(labels.items()):
        points = [(i + 0.04 * (n - 3), results[f"{arm}/{k}"]) for i, k in enumerate(SHOTS) if f"{arm}/{k}" in results]
        if not points:
            continue
        xs = [i for i, _ in points]
        style = "--" if "no-" in arm else "-"
        top1 = [r["top1"] for _, r in points]
        errors = [
            [r["top1"] - r["ci95_top1"][0] for _, r in points],
            [r["ci95_top1"][1] - r["top1"] for _, r in points],
        ]
        axes[0].errorbar(xs, top1, yerr=errors, fmt=style + "o", capsize=3, label=label, alpha=0.85)
        axes[1].plot(xs, [r["macro_recall"] for _, r in points], style + "o", label=label, alpha=0.85)
    if majority is not None:
        axes[0].axhline(majority, color="grey", linestyle=":", label="always the commonest region (Chest)")
    for ax, name in zip(axes, ("top-1 (95% CI)", "macro recall over regions")):
        ax.set_xticks(range(len(SHOTS)), ["1", "5", "20", "all (~48)"])
        ax.set_xlabel("labelled train images per region")
        ax.set_ylabel(f"{name}, patient-held-out test split")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def majority_top1(test_csv) -> float:
    """Top-1 of always answering the commonest in-domain region of the test CSV (the plots' baseline)."""
    regions = [it.labels[0] for it in _test_items(test_csv)]
    return max(regions.count(r) for r in set(regions)) / len(regions)


def _test_items(test_csv):
    from radregion.datasets import read_labels_csv

    return [it for it in read_labels_csv(test_csv) if "Others" not in it.labels]


def gradcam_grid(work: Path, arms, path: Path) -> None:
    """The same test images (one per region, the first few regions), Grad-CAM of each arm's all-label head for
    the true region; rows = arms, each image as that arm's cleaning settings prepare it."""
    import matplotlib.pyplot as plt

    from radregion.audit.gradcam import Classifier, grad_cams, overlay
    from radregion.bundle import load_bundle
    from radregion.features import extract_features, load_clean_images

    items, seen = [], set()
    for item in _test_items(work / "test.csv"):
        if item.labels[0] not in seen and len(item.labels) == 1:
            seen.add(item.labels[0])
            items.append(item)
        if len(items) == GRADCAM_PER_ROW:
            break
    fig, axes = plt.subplots(len(arms), len(items), figsize=(2.1 * len(items), 2.6 * len(arms)))
    for row, arm in enumerate(arms):
        bundle = load_bundle(work / "heads" / f"{arm}_kall")
        head = bundle.head()
        images = load_clean_images([it.path for it in items], bundle.settings)
        classifier = Classifier.from_head(bundle.backbone(), head)
        maps = grad_cams(classifier, images, [head.regions.index(it.labels[0]) for it in items])
        predicted = head.predict(extract_features(classifier.backbone, images))
        for col, item in enumerate(items):
            ax = axes[row, col]
            ax.imshow(overlay(images[col], maps[col]))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{item.labels[0]}\npred {predicted[col]}", fontsize=7)
            if col == 0:
                ax.set_ylabel(LABELS[arm], fontsize=8)
    fig.suptitle("Grad-CAM for the true region (all-label linear heads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tsne_figure(bundle_path: Path, test_csv: Path, path: Path) -> None:
    import matplotlib.pyplot as plt

    from radregion.audit.report import tsne_coordinates
    from radregion.bundle import load_bundle
    from radregion.datasets import read_labels_csv
    from radregion.features import extract_features, load_clean_images

    bundle = load_bundle(bundle_path)
    items = [it for it in read_labels_csv(test_csv.parent / "train.csv") if "Others" not in it.labels]
    items += _test_items(test_csv)
    feats = extract_features(bundle.backbone(), load_clean_images([it.path for it in items], bundle.settings))
    xy = tsne_coordinates(feats)
    regions = sorted({it.labels[0] for it in items})
    colours = plt.get_cmap("tab20", len(regions))
    fig, ax = plt.subplots(figsize=(8, 6))
    for i, region in enumerate(regions):
        rows = [j for j, it in enumerate(items) if it.labels[0] == region]
        ax.scatter(xy[rows, 0], xy[rows, 1], s=6, color=colours(i), label=region)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_title(
        f"t-SNE of frozen SimCLR features, {len(items)} labelled images (no labels in pretraining)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_tables(results: dict) -> None:
    print("| backbone | " + " | ".join(f"K = {k}" for k in SHOTS) + " |")
    print("| --- " * (len(SHOTS) + 1) + "|")
    for arm, label in LABELS.items():
        cells = []
        for k in SHOTS:
            r = results.get(f"{arm}/{k}")
            cells.append(
                f"{r['top1']:.3f} ({r['ci95_top1'][0]:.3f}–{r['ci95_top1'][1]:.3f}) / {r['macro_recall']:.3f}"
                if r
                else "–"
            )
        print(f"| {label} | " + " | ".join(cells) + " |")
