"""ONNX Runtime against torch on real radiographs (`radregion.runtime`): for every image, whether the two paths give
the same region and out-of-domain flag, and the largest feature, probability and OOD-score differences.

    .venv/bin/python bench/runtime_agreement.py [--model BUNDLE] [--images FOLDER]
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from radregion.bundle import default_model_path, load_bundle
from radregion.device import prepare_backbone
from radregion.features import forward_features, images_to_tensor, load_clean_images
from radregion.runtime import OnnxBackbone

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "unifesp" / "unlabelled"))
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    paths = sorted(p for p in Path(args.images).rglob("*.png"))
    tensor = images_to_tensor(load_clean_images(paths, bundle.settings))
    cpu = torch.device("cpu")
    runners = {
        "torch": prepare_backbone(bundle.backbone(), cpu, "fp32"),
        "onnxruntime": OnnxBackbone(bundle.backbone(), bundle.settings.size),
    }
    features = {
        name: np.concatenate(
            [forward_features(run, tensor[i : i + 64], cpu, "fp32") for i in range(0, len(tensor), 64)]
        )
        for name, run in runners.items()
    }
    head, detector = bundle.head(), bundle.ood_detector()
    probs = {name: head.probabilities(f) for name, f in features.items()}
    scores = {name: detector.score(f) for name, f in features.items()}
    a, b = "torch", "onnxruntime"
    print(f"model {bundle.version}; {len(paths)} images from {args.images}")
    print(f"regions that differ: {int((probs[a].argmax(1) != probs[b].argmax(1)).sum())}")
    flags = {name: s > detector.threshold for name, s in scores.items()}
    print(f"out-of-domain flags that differ: {int((flags[a] != flags[b]).sum())}")
    print(
        f"largest difference: features {np.abs(features[a] - features[b]).max():.2g} "
        f"(largest |feature| {np.abs(features[a]).max():.2f}), probabilities {np.abs(probs[a] - probs[b]).max():.2g}, "
        f"OOD scores {np.abs(scores[a] - scores[b]).max():.2g}"
    )


if __name__ == "__main__":
    main()
