"""ONNX Runtime against torch on real radiographs (`radregion.runtime`): for every image, whether the two paths give
the same region and out-of-domain flag, and the largest feature, probability and OOD-score differences. On a CPU
that computes bf16 natively, also torch's bf16 autocast (what features were computed in there before session 18, and
what training uses) against fp32: a model's head and score were fitted on the features of the machine that trained it.

    .venv/bin/python bench/runtime_agreement.py [--model BUNDLE] [--images FOLDER]
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from radregion.bundle import default_model_path, load_bundle
from radregion.device import cpu_has_native_bf16, prepare_backbone
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
    runners = {  # name: (backbone, precision)
        "torch": (prepare_backbone(bundle.backbone(), cpu, "fp32"), "fp32"),
        "onnxruntime": (OnnxBackbone(bundle.backbone(), bundle.settings.size), "fp32"),
    }
    if cpu_has_native_bf16():
        runners["torch bf16"] = (prepare_backbone(bundle.backbone(), cpu, "bf16"), "bf16")
    features = {
        name: np.concatenate(
            [forward_features(run, tensor[i : i + 64], cpu, precision) for i in range(0, len(tensor), 64)]
        )
        for name, (run, precision) in runners.items()
    }
    head, detector = bundle.head(), bundle.ood_detector()
    probs = {name: head.probabilities(f) for name, f in features.items()}
    scores = {name: detector.score(f) for name, f in features.items()}
    flags = {name: s > detector.threshold for name, s in scores.items()}
    print(f"model {bundle.version}; {len(paths)} images from {args.images}")
    a = "torch"
    for b in [name for name in runners if name != a]:
        print(f"== {b} against {a} fp32")
        print(f"regions that differ: {int((probs[a].argmax(1) != probs[b].argmax(1)).sum())}")
        print(f"out-of-domain flags that differ: {int((flags[a] != flags[b]).sum())}")
        relative = np.linalg.norm(features[a] - features[b], axis=1) / np.linalg.norm(features[a], axis=1)
        print(
            f"largest difference: features {np.abs(features[a] - features[b]).max():.2g} "
            f"(largest |feature| {np.abs(features[a]).max():.2f}; relative L2 median {np.median(relative):.2g}), "
            f"probabilities {np.abs(probs[a] - probs[b]).max():.2g}, "
            f"OOD scores {np.abs(scores[a] - scores[b]).max():.2g}"
        )


if __name__ == "__main__":
    main()
