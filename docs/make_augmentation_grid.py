"""Make docs/augmentations.png: real radiographs, their gauge-augmented version, pretraining views, head views.

.venv/bin/python docs/make_augmentation_grid.py [--data ../shared/data/unifesp] [--size 128]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from radregion.augment import head_transform, pretrain_views  # noqa: E402
from radregion.cache import load_clean  # noqa: E402
from radregion.cleaning import CleaningSettings  # noqa: E402
from radregion.gauge import GaugeAugment  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "unifesp")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "augmentations.png")
    args = parser.parse_args()

    paths = sorted((args.data / "images").glob("*.png"))
    picks = [paths[i] for i in np.linspace(0, len(paths) - 1, args.rows).astype(int)]
    settings = CleaningSettings(size=int(args.size * 1.25))
    columns = ["cleaned", "gauge (p=1)", "view 1", "view 2", "view 3", "view 4", "head view"]
    fig, axes = plt.subplots(len(picks), len(columns), figsize=(1.6 * len(columns), 1.6 * len(picks)))
    for row, path in enumerate(picks):
        image = load_clean(path, settings)
        views = pretrain_views(args.size).set_random_state(row)
        strong = [v for _ in range(2) for v in views(image)]
        panels = [image / 255.0, GaugeAugment(prob=1.0).set_random_state(row)(image / 255.0)]
        panels += [v[0].numpy() for v in strong]
        panels.append(head_transform(args.size).set_random_state(row)(image)[0].numpy())
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
    fig.suptitle(f"RadRegion augmentations at {args.size} px (UNIFESP images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
