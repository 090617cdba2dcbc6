"""How a 1-channel radiograph meets the RGB ImageNet stem of EfficientNet-Lite0: folded into one grey filter
(`stem="grey"`, the engine's choice) or the channel replicated into R, G and B (`stem="rgb"`).

Measured with frozen ImageNet features and the engine's logistic head on the model card's patient split
(`radregion split --test-fraction 0.2 --seed 0`): top-1 and macro recall on the held-out in-domain images.
    .venv/bin/python bench/imagenet_stem.py
"""

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from radregion.cleaning import CleaningSettings
from radregion.datasets import patient_split, read_labels_csv
from radregion.device import resolve_device
from radregion.evaluate import summarise
from radregion.features import extract_features, load_clean_images
from radregion.head import first_labels, fit_head
from radregion.networks import EfficientNetLite


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_root = Path(
        os.environ.get("RADREGION_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
    )
    parser.add_argument("--labels", default=data_root / "unifesp" / "labels.csv")
    parser.add_argument("--size", type=int, default=160, help="input size (default: the shipped recipe's)")
    args = parser.parse_args()

    # the split of `radregion split` (all images, Others included), then its in-domain images
    train, test = (
        [it for it in side if "Others" not in it.labels] for side in patient_split(read_labels_csv(args.labels), 0.2, 0)
    )
    settings = CleaningSettings(size=args.size)
    train_images = load_clean_images([it.path for it in train], settings)
    test_images = load_clean_images([it.path for it in test], settings)
    train_names = first_labels(it.labels for it in train)
    regions = sorted(set(train_names))
    device = resolve_device("auto")
    print(f"{len(train)} train / {len(test)} test in-domain images, {args.size} px, {device}")
    for stem in ("grey", "rgb"):
        torch.manual_seed(0)
        backbone = EfficientNetLite("efficientnet-lite0", pretrained=True, stem=stem)
        head = fit_head(extract_features(backbone, train_images), train_names, regions)
        predicted = head.predict(extract_features(backbone, test_images))
        result = summarise(
            predicted, [it.labels for it in test], regions, groups=[it.patient_id for it in test], n_boot=0
        )
        print(
            f"stem={stem}: frozen ImageNet features, logistic head: top-1 {result['top1']:.3f}, macro recall "
            f"{result['macro_recall']:.3f}"
        )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
