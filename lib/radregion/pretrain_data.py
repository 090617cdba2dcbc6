"""The data of self-supervised pretraining: inputs (folders, labels CSVs) -> usable cached images -> view pairs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from radregion.augment import pretrain_views
from radregion.errors import RadiographError


def collect_images(inputs) -> tuple[list[Path], list[str | None], list[RadiographError]]:
    """Folders (recursive), labels CSVs and single files -> sorted unique paths, their label (None if
    unlabelled; several regions joined with "|") and the files skipped while searching."""
    from radregion.datasets import read_labels_csv
    from radregion.io import find_radiographs

    labels: dict[Path, str | None] = {}
    errors: list[RadiographError] = []
    for entry in inputs:
        entry = Path(entry)
        if entry.is_dir():
            paths, skipped = find_radiographs(entry)
            errors.extend(skipped)
            for path in paths:
                labels.setdefault(path.resolve(), None)
        elif entry.is_file() and entry.suffix.lower() == ".csv":
            for item in read_labels_csv(entry):
                labels[Path(item.path).resolve()] = "|".join(sorted(item.labels)) or None
        elif entry.is_file():
            labels.setdefault(entry.resolve(), None)
        else:
            raise RadiographError(entry, "not found: --images takes folders of radiographs and labels CSVs")
    paths = sorted(labels)
    return paths, [labels[p] for p in paths], errors


def class_ids(labels: list[str | None]) -> list[int]:
    """Labelled images share an id per label; every unlabelled image gets a (negative) id of its own."""
    names = sorted({label for label in labels if label is not None})
    index = {name: i for i, name in enumerate(names)}
    return [index[label] if label is not None else -(i + 1) for i, label in enumerate(labels)]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch: the same whatever the workers, ranks or resumes."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ViewsDataset(Dataset):
    """Cleaned images from the image cache -> (view1, view2, class id).

    Reads the cache entries found by `usable_images` directly, so that a large DICOM is not hashed again in
    every epoch; a missing or damaged entry is rebuilt through `load_clean`.
    """

    def __init__(self, paths, entries, classes, settings, size: int, gauge: bool, seed: int):
        self.paths, self.entries, self.classes = list(paths), list(entries), list(classes)
        self.settings, self.seed = settings, seed
        self.views = pretrain_views(size, gauge=gauge)
        self.epoch = 0

    def __len__(self):
        return len(self.paths)

    def _image(self, index) -> np.ndarray:
        from radregion.cache import load_clean

        try:
            image = np.load(self.entries[index], allow_pickle=False)
            if image.dtype == np.uint8 and image.shape == (self.settings.size,) * 2:
                return image
        except (OSError, ValueError, EOFError):
            pass
        return load_clean(self.paths[index], self.settings)

    def __getitem__(self, index):
        image = self._image(index)
        self.views.set_random_state(seed=item_seed(self.seed, self.epoch, index))
        first, second = self.views(image)
        return first, second, self.classes[index]


def usable_images(paths, classes, settings, workers: int, progress: bool):
    """Decode and clean every image once (fills the cache): (paths, cache entries, classes) of the usable ones
    and the errors of the others."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from radregion.cache import ImageCache

    cache = ImageCache()

    def check(path):
        try:
            entry = cache.entry(path, settings)
            if not entry.is_file():
                cache.load(path, settings)
            return entry
        except (RadiographError, OSError) as error:
            return error if isinstance(error, RadiographError) else RadiographError(path, f"cannot read ({error})")

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(
            tqdm(
                pool.map(check, paths), total=len(paths), desc="caching", unit="img", disable=not progress, leave=False
            )
        )
    kept = [(p, r, c) for p, r, c in zip(paths, results, classes) if not isinstance(r, RadiographError)]
    errors = [r for r in results if isinstance(r, RadiographError)]
    return [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept], errors


def prepare_images(images, load_settings, world, workers: int, show: bool):
    """Paths, cache entries and class ids of the usable images (rank 0 fills the cache first); skipped files
    are reported."""
    paths, labels, skipped = collect_images(images)
    classes = class_ids(labels)
    if world.main:
        paths, entries, classes, bad = usable_images(paths, classes, load_settings, workers, show)
    world.barrier()
    if not world.main:
        paths, entries, classes, bad = usable_images(paths, classes, load_settings, workers, False)
    skipped = skipped + bad
    if world.main and skipped:
        print(f"pretrain: skipped {len(skipped)} unusable file(s):", file=sys.stderr)
        for error in skipped[:10]:
            print(f"  {error}", file=sys.stderr)
    if len(paths) < 2:
        raise ValueError(
            f"pretrain: found {len(paths)} usable radiograph(s) in {', '.join(map(str, images))}; need at least 2"
        )
    return paths, entries, classes, skipped


def fit_batch_size(batch_size: int, n_images: int, world) -> int:
    per_rank = n_images // world.world
    if batch_size > per_rank:
        if world.main:
            print(
                f"pretrain: batch size {batch_size} > {per_rank} images per process: using {per_rank}", file=sys.stderr
            )
        batch_size = per_rank
    if batch_size < 2:
        raise ValueError(f"pretrain: {n_images} images are too few for {world.world} processes")
    return batch_size
