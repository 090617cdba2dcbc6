"""Test-time augmentation: does averaging the head's probabilities over flipped views help a bundle?

Prints top-1 and macro recall (the engine's `summarise`, bootstrap CIs by patient) on the in-domain images of a
labelled CSV for the plain view and for the averages over a horizontal flip and a vertical flip, each costing one
more forward pass per image. Not used by `radregion predict`: a lever measured for issue 12 (docs/results.md).

    .venv/bin/python bench/tta.py --model runs/model-s1/model --labels runs/model-s1/test.csv
"""

import argparse

import numpy as np

from radregion.bundle import default_model_path, load_bundle
from radregion.datasets import read_labels_csv
from radregion.evaluate import summarise
from radregion.features import extract_features, load_clean_images
from radregion.head import out_of_domain_regions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    parser.add_argument("--labels", required=True, metavar="CSV")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    bundle = load_bundle(args.model or default_model_path())
    head, taxonomy = bundle.head(), bundle.taxonomy()
    skip = out_of_domain_regions(taxonomy, ())
    items = [it for it in read_labels_csv(args.labels, taxonomy=taxonomy) if not set(it.labels) & skip]
    images = load_clean_images([it.path for it in items], bundle.settings, args.workers)
    backbone = bundle.backbone()
    views = {"plain": images, "horizontal flip": images[:, :, ::-1], "vertical flip": images[:, ::-1, :]}
    probs = {name: head.probabilities(extract_features(backbone, np.ascontiguousarray(v))) for name, v in views.items()}
    runs = {
        "plain": [probs["plain"]],
        "plain + horizontal flip": [probs["plain"], probs["horizontal flip"]],
        "plain + both flips": list(probs.values()),
    }
    regions = list(head.regions)
    print(f"model {bundle.path} ({bundle.version}); {len(items)} in-domain images of {args.labels}")
    for name, members in runs.items():
        predicted = [regions[i] for i in np.mean(members, axis=0).argmax(1)]
        s = summarise(predicted, [it.labels for it in items], regions, groups=[it.group for it in items])
        lo, hi = s["ci95"]["top1"]
        print(f"{name:>24}: top-1 {s['top1']:.3f} ({lo:.3f}-{hi:.3f}), macro recall {s['macro_recall']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
