"""Faster start of a command-line inference run.

Importing MONAI imports every optional integration that is installed (ignite, mlflow, matplotlib, ...; MONAI
Label brings them): 6.3 s for `import monai` on the 2-core development machine, 2.7 s without them. Inference
uses none of them, so the `predict` command marks them unavailable before the engine is imported; MONAI's
`optional_import` then skips them. With an EfficientNet-Lite0 bundle (the shipped model) inference imports neither
MONAI nor scikit-learn at all: the engine imports them where it builds a MONAI ResNet or fits a head. Never call
this in a process that needs them (the server, training, audit).
"""

import sys

UNUSED_BY_INFERENCE = (
    "ignite",
    "mlflow",
    "matplotlib",
    "fastapi",
    "torchvision",
    "transformers",
    "nibabel",
    "tensorboard",
    "scipy.signal",
)


def skip_unused_imports() -> list[str]:
    """Mark the integrations unavailable in this process unless already imported; returns the names marked."""
    marked = [name for name in UNUSED_BY_INFERENCE if name not in sys.modules]
    for name in marked:
        sys.modules[name] = None
    return marked
