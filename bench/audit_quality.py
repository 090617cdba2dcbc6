"""How well the label audit finds injected label errors.

Flips 5%, 10% and 20% of the shared labelled UNIFESP images to another region, computes patient-held-out
out-of-fold probabilities once per noise level, and prints precision, recall and AUROC of the flagged issues for
the project's method ("ours") and cleanlab's default on the same probabilities, and the precision (= recall) of the
ranking's top N when N is the true number of flips (what a perfect count estimate would give). Out-of-domain images
(Others, and images the model's OOD detector flags) are never counted as label errors by either method.

The archive's own labels are not all right: the audit run on them unflipped (the same folds) flags some images
already, listed once with their given and suggested regions (to be looked at), and each of them that is flagged
again among the flips counts as a false alarm in "precision". "P new" leaves those archive suspects out of the
count: the precision on the errors injected, whether or not the archive's own label of a suspect is wrong.

    .venv/bin/python bench/audit_quality.py [--model BUNDLE ...] [--labels CSV] [--rates 0.05 0.1 0.2]
Default model: apps/radregion/model (the shipped model); without one, a random-weight resnet10 at 64 px
(BatchNorm statistics of 200 labelled images): a floor for the method, not the product's figures. Images whose true
labels reached the model's backbone (fine-tuning, SupCon pretraining: read from bundle.json provenance; where those
CSVs are not on this machine, the images of the training set stored with its head, by content or features) are left
out.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from radregion.audit import issues
from radregion.audit.pipeline import audit_regions, in_training_set, label_probabilities
from radregion.bundle import load_bundle, trained_on
from radregion.datasets import read_labels_csv
from radregion.ensemble import bundles_ood
from radregion.features import bundle_features
from radregion.validation import label_set_fold_ids

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "apps" / "radregion" / "model"
DEFAULT_LABELS = REPO.parent / "shared" / "data" / "unifesp" / "labels.csv"


def random_bundle(folder: Path, items, size=64, arch="resnet10") -> Path:
    """A headless random-weight bundle; BatchNorm statistics from one pass over 200 of the images."""
    import torch

    from radregion.bundle import save_bundle
    from radregion.cleaning import CleaningSettings
    from radregion.features import load_clean_images
    from radregion.networks import build_backbone, feature_dim
    from radregion.soup import recalibrate_batch_norm

    torch.manual_seed(0)
    settings = CleaningSettings(size=size)
    backbone = build_backbone(arch)
    sample = [items[i].path for i in np.random.default_rng(0).choice(len(items), min(200, len(items)), replace=False)]
    images = load_clean_images(sample, settings)
    recalibrate_batch_norm(backbone, images, batch_size=len(images))  # BatchNorm statistics of one pass
    meta = {
        "architecture": {"name": arch, "feature_dim": feature_dim(arch), "in_channels": 1},
        "cleaning": settings.to_dict(),
        "taxonomy": {"name": "unifesp22"},
        "training": {"data": "random init, BatchNorm statistics of 200 images", "command": "bench"},
    }
    return save_bundle(folder / "random", backbone.state_dict(), None, meta)


def flip_labels(label_sets, regions, rate, rng):
    """A copy of `label_sets` with round(rate * N) images given one region they do not carry."""
    flipped = rng.choice(len(label_sets), size=round(rate * len(label_sets)), replace=False)
    noisy = list(label_sets)
    for i in flipped:
        noisy[i] = (str(rng.choice([r for r in regions if r not in label_sets[i]])),)
    mask = np.zeros(len(label_sets), dtype=bool)
    mask[flipped] = True
    return noisy, mask


def normalized_margin_score(given, probs) -> np.ndarray:
    """The alternative ranking: 1 - cleanlab's normalized-margin quality, over the classes given."""
    from cleanlab.rank import get_label_quality_scores

    present = np.unique(given)
    p = probs[:, present] / probs[:, present].sum(1, keepdims=True)
    return 1.0 - get_label_quality_scores(np.searchsorted(present, given), p, method="normalized_margin")


def scores(flagged, score, truth, suspects) -> dict:
    """Precision, recall, AUROC of the ranking, precision (= recall) of the top as many as there are flips, and
    precision without the unflipped `suspects` (images flagged on the unflipped labels)."""
    tp = int((flagged & truth).sum())
    new = flagged & ~(suspects & ~truth)
    known = ~np.isnan(score)
    top = np.argsort(-np.nan_to_num(score, nan=-np.inf))[: int(truth.sum())]
    return {
        "precision": tp / max(int(flagged.sum()), 1),
        "recall": tp / max(int(truth.sum()), 1),
        "auroc": float(roc_auc_score(truth[known], score[known])),
        "flagged": int(flagged.sum()),
        "precision_new": tp / max(int(new.sum()), 1),
        "at_flips": float(truth[top].mean()) if len(top) else float("nan"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", metavar="BUNDLE", help="bundle (repeat for an ensemble)")
    parser.add_argument("--labels", default=str(DEFAULT_LABELS), metavar="CSV")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1, help="noise draws per rate (figures are averaged)")
    args = parser.parse_args(argv)

    scratch = tempfile.TemporaryDirectory(prefix="audit-bench-")
    models = args.model or [DEFAULT_MODEL]
    if not args.model and not (DEFAULT_MODEL / "bundle.json").is_file():
        print(f"no shipped model at {DEFAULT_MODEL}: random-weight resnet10 at 64 px (pass --model BUNDLE)")
        models = [random_bundle(Path(scratch.name), read_labels_csv(args.labels))]
    bundles = [load_bundle(m) for m in models]
    taxonomy = bundles[0].taxonomy()
    regions, _ = audit_regions(bundles[0], taxonomy)
    items = [it for it in read_labels_csv(args.labels, taxonomy=taxonomy) if any(r in regions for r in it.labels)]
    paths = [it.path for it in items]
    start = time.perf_counter()
    feats, seen = [], np.zeros(len(items), bool)
    for bundle in bundles:
        f, ok, errors = bundle_features(bundle, paths)
        if errors:
            print(f"{len(errors)} unreadable images, e.g. {errors[0]}", file=sys.stderr)
        trained, _, unreadable = trained_on(bundle, paths)
        if unreadable:  # the CSVs of another machine: the head's stored training images, by content or features
            trained |= in_training_set(bundle, f, paths)
            stored = bundle.training_set() if bundle.has_head else None
            print(
                f"{bundle.path}: its training CSVs are not here ({', '.join(unreadable)}); "
                f"{int(trained.sum())} images recognised as its {len(stored) if stored is not None else 0} stored "
                f"training images by {'content' if stored is not None and stored.images is not None else 'features'}"
            )
        seen |= trained
        feats.append(f)
    if seen.any():
        print(f"left out {int(seen.sum())} images the model was trained on (held-out images only)")
        items, feats = [it for it, s in zip(items, seen) if not s], [f[~seen] for f in feats]
        paths = [it.path for it in items]
    clean = [tuple(r for r in it.labels if r in regions) for it in items]
    patients = [it.patient_id for it in items]
    present = sorted({r for labels in clean for r in labels})
    _, out_of_domain = bundles_ood(bundles, feats)
    print(
        f"model {', '.join(f'{b.path} ({b.version})' for b in bundles)}; {len(items)} in-domain images of "
        f"{len(set(patients))} patients, {len(present)} regions; features {time.perf_counter() - start:.0f} s; "
        f"{int(out_of_domain.sum())} flagged out of domain by the model"
    )

    def audit(label_sets, seed):
        """(given label index, probabilities) of the out-of-fold audit of `label_sets` with the folds of `seed`."""
        folds = label_set_fold_ids(label_sets, patients, paths, k=args.folds, seed=seed)
        probs = np.mean([label_probabilities(b, f, label_sets, regions, folds) for b, f in zip(bundles, feats)], axis=0)
        return issues.primary_labels([[regions.index(r) for r in labels] for labels in label_sets], probs), probs

    suspects = {}  # (method, seed) -> images flagged on the unflipped labels
    for seed in range(args.seeds):
        given, probs = audit(clean, seed)
        for method in issues.METHODS:
            suspects[method, seed] = issues.find_label_issues(given, probs, method, out_of_domain=out_of_domain)
        if seed == 0:
            listed = np.flatnonzero(suspects[issues.DEFAULT_METHOD, 0])
            print(f"archive suspects ({issues.DEFAULT_METHOD}, unflipped labels, folds of seed 0): {len(listed)}")
            for i in listed:
                print(f"  {paths[i]}: given {'|'.join(clean[i])}, suggested {regions[int(np.argmax(probs[i]))]}")
    print(
        f"{'noise':>6} {'method':>9} {'precision':>9} {'recall':>7} {'AUROC':>6} {'flagged':>8} {'flips':>6}  P=R@flips"
        "  P new"
    )
    for rate in args.rates:
        table, margin_auroc = {m: [] for m in issues.METHODS}, []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            noisy, truth = flip_labels(clean, present, rate, rng)
            given, probs = audit(noisy, seed)
            for method in issues.METHODS:
                flagged = issues.find_label_issues(given, probs, method, out_of_domain=out_of_domain)
                table[method].append(scores(flagged, issues.issue_scores(given, probs), truth, suspects[method, seed]))
            margin_auroc.append(roc_auc_score(truth, normalized_margin_score(given, probs)))
        for method, runs in table.items():
            mean = {k: np.mean([r[k] for r in runs]) for k in runs[0]}
            print(
                f"{rate:>6.0%} {method:>9} {mean['precision']:>9.3f} {mean['recall']:>7.3f} {mean['auroc']:>6.3f} "
                f"{mean['flagged']:>8.0f} {int(truth.sum()):>6}  {mean['at_flips']:>9.3f}  {mean['precision_new']:.3f}"
            )
        print(
            f"{'':>6} ranking AUROC: self-confidence (used) {mean['auroc']:.3f}, "
            f"normalized margin {np.mean(margin_auroc):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
