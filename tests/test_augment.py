"""Two-view and head augmentations (MONAI) and the gauge augmentation on real radiographs."""

import numpy as np
import pytest
import torch
from PIL import Image

from radregion.augment import fine_tune_view, head_transform, pretrain_views
from radregion.gauge import GaugeAugment


@pytest.fixture(scope="module")
def radiograph(unifesp) -> np.ndarray:
    path = sorted((unifesp / "images").glob("*.png"))[0]
    return np.asarray(Image.open(path).convert("L"))  # uint8, long side 320


@pytest.mark.parametrize("as_float", [False, True])
def test_pretrain_views_shapes_and_range(radiograph, as_float):
    image = radiograph.astype(np.float32) / 255 if as_float else radiograph
    first, second = pretrain_views(64).set_random_state(0)(image)
    for view in (first, second):
        assert type(view) is torch.Tensor and view.dtype == torch.float32 and view.shape == (1, 64, 64)
        assert view.min() >= 0 and view.max() <= 1 and view.std() > 0.02
    assert not torch.equal(first, second)


def test_pretrain_views_are_deterministic_under_a_seed(radiograph):
    a = pretrain_views(64).set_random_state(7)
    b = pretrain_views(64).set_random_state(7)
    runs_a = [a(radiograph) for _ in range(3)]
    runs_b = [b(radiograph) for _ in range(3)]
    for (a1, a2), (b1, b2) in zip(runs_a, runs_b):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    other = pretrain_views(64).set_random_state(8)(radiograph)
    assert not torch.equal(other[0], runs_a[0][0])


def test_head_transform_is_mild(radiograph):
    view = head_transform(64, gauge=False).set_random_state(0)(radiograph)
    assert view.shape == (1, 64, 64) and 0 <= view.min() and view.max() <= 1
    plain = torch.nn.functional.interpolate(
        torch.as_tensor(radiograph / 255.0, dtype=torch.float32)[None, None], size=(64, 64), mode="area"
    )[0]
    strong = pretrain_views(64, gauge=False).set_random_state(0)(radiograph)[0]
    assert (view - plain).abs().mean() < (strong - plain).abs().mean()


def test_strong_fine_tune_view_changes_more_and_cuts_out_rectangles(radiograph):
    """`strong` (fit-head --augment strong) moves a view further from the plain image than `standard`, and blacks
    out square holes (cutout) in a third or more of the views."""
    from radregion.cleaning import CleaningSettings, clean

    square = clean(radiograph, CleaningSettings(size=64))
    plain = torch.as_tensor(square)[None]
    change, holes = {}, 0
    for strength in ("standard", "strong"):
        view = fine_tune_view(64, gauge=False, strength=strength)
        views = [view.set_random_state(seed)(square) for seed in range(30)]
        assert all(v.shape == (1, 64, 64) and 0 <= v.min() and v.max() <= 1 for v in views)
        change[strength] = np.mean([(v - plain).abs().mean().item() for v in views])
        if strength == "strong":  # a hole: an 8 x 8 block of exact zeros, pooled
            holes = sum(bool((torch.nn.functional.max_pool2d(v, 8, stride=1) == 0).any()) for v in views)
    assert change["strong"] > 1.05 * change["standard"], change  # 1.13 measured; crops and turns dominate both
    assert holes >= 10, holes
    with pytest.raises(ValueError, match="standard, strong"):
        fine_tune_view(64, strength="heavy")


def test_rejects_colour_images():
    with pytest.raises(ValueError, match="grayscale"):
        pretrain_views(32)(np.zeros((3, 40, 40), np.uint8))


def test_gauge_pastes_something_and_stays_in_range(radiograph):
    image = radiograph.astype(np.float32) / 255
    gauge = GaugeAugment(prob=1.0)
    changed = []
    for seed in range(20):
        out = gauge.set_random_state(seed)(image)
        assert out.shape == image.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1
        changed.append(np.count_nonzero(np.abs(out - image) > 0.05))
    # (a bright metal gauge on an over-exposed corner may hide, but not often)
    assert sum(count > 10 for count in changed) >= 18
    assert np.count_nonzero(image != radiograph.astype(np.float32) / 255) == 0  # input untouched


def test_gauge_kinds_each_draw(radiograph):
    gauge = GaugeAugment().set_random_state(0)
    for kind in GaugeAugment.KINDS:
        mask = getattr(gauge, f"_{kind}")(256)
        assert mask.ndim == 2 and mask.max() > 0.5 and 0 <= mask.min() and mask.max() <= 1


def test_gauge_probability_zero_is_identity_and_tensors_work(radiograph):
    image = torch.as_tensor(radiograph.astype(np.float32) / 255)[None]
    assert torch.equal(GaugeAugment(prob=0.0)(image), image)
    out = GaugeAugment(prob=1.0).set_random_state(3)(image)
    assert isinstance(out, torch.Tensor) and out.shape == image.shape and not torch.equal(out, image)


def test_gauge_is_deterministic_under_a_seed(radiograph):
    image = radiograph.astype(np.float32) / 255
    a = GaugeAugment(prob=1.0).set_random_state(5)(image)
    b = GaugeAugment(prob=1.0).set_random_state(5)(image)
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "make_view",
    [lambda: head_transform(64, gauge=False), lambda: pretrain_views(64, gauge=False)],
    ids=["head", "pretrain"],
)
def test_views_include_quarter_turns(radiograph, make_view):
    """Archives hold radiographs turned by 90 degrees: some training views must be turned too."""
    from radregion.cleaning import CleaningSettings, clean

    square = torch.as_tensor(clean(radiograph, CleaningSettings(size=64)))
    turns = [torch.rot90(square, k) for k in range(4)]
    augment = make_view()
    closest = []
    for seed in range(40):
        view = augment.set_random_state(seed)(square.numpy())
        view = view[0] if isinstance(view, tuple) else view
        closest.append(int(np.argmax([np.corrcoef(view[0].flatten(), t.flatten())[0, 1] for t in turns])))
    # crops and flips alone make a quarter turn the closest match now and then (6 of 40 before turns were added)
    assert closest.count(0) >= 10 and closest.count(1) + closest.count(3) >= 8, closest
