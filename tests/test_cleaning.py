"""Cleaning: exposed-field crop, percentile normalisation, aspect-keeping resize and square padding."""

import numpy as np
import pytest

from radregion.cleaning import CleaningSettings, clean, find_field, line_percentiles, resize_longest
from radregion.io import read_radiograph


def _anatomy(shape, seed=0):
    """Textured content (no uniform rows or columns anywhere)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    return (0.4 + 0.25 * np.sin(xx / 7.0) * np.cos(yy / 11.0) + 0.1 * rng.random(shape)).astype(np.float32)


def _collimated(shape=(300, 400), field=(60, 250, 90, 330), marker=True, seed=0):
    """Bright noisy shutters left/right, black padding top/bottom, an 'R' marker block inside a shutter."""
    rng = np.random.default_rng(seed)
    top, bottom, left, right = field
    image = np.empty(shape, dtype=np.float32)
    image[:] = 0.95 + 0.02 * rng.random(shape)  # shutters: unexposed, white once bone-bright
    image[:top] = image[bottom:] = 0.0  # padding bands
    image[top:bottom, left:right] = _anatomy((bottom - top, right - left), seed)
    if marker:
        image[120:135, 20:30] = 0.2
    return image


def test_settings_round_trip_and_key():
    settings = CleaningSettings(size=128, low_percentile=1.0)
    assert CleaningSettings.from_dict(settings.to_dict()) == settings
    assert settings.key() == CleaningSettings(size=128, low_percentile=1.0).key()
    assert settings.key() != CleaningSettings(size=128).key() != CleaningSettings().key()
    assert len(settings.key()) == 16


@pytest.mark.parametrize(
    "bad, message",
    [({"size": 4}, "size"), ({"low_percentile": 60, "high_percentile": 40}, "percentiles"), ({"sise": 224}, "sise")],
)
def test_bad_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        CleaningSettings.from_dict(bad)


def test_field_is_found_despite_shutters_padding_and_marker():
    image = _collimated()
    top, bottom, left, right = find_field(image)
    assert abs(top - 60) <= 4 and abs(bottom - 250) <= 4
    assert abs(left - 90) <= 4 and abs(right - 330) <= 4


def test_no_border_means_no_crop():
    image = _anatomy((200, 150))
    assert find_field(image) == (0, 200, 0, 150)
    assert find_field(np.full((50, 60), 0.3, dtype=np.float32)) == (0, 50, 0, 60)


def test_clean_output_and_determinism():
    image = _collimated()
    settings = CleaningSettings(size=96)
    out = clean(image, settings)
    assert out.dtype == np.float32 and out.shape == (96, 96)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_array_equal(out, clean(image.copy(), settings))


def test_aspect_ratio_is_kept_and_padding_is_black():
    wide = _anatomy((100, 200))
    out = clean(wide, CleaningSettings(size=64, crop_borders=False))
    content_rows = np.flatnonzero(out.max(axis=1) > 0)
    assert content_rows[0] >= 15 and content_rows[-1] <= 48  # 32 rows of content, centred
    assert np.all(out[:15] == 0) and np.all(out[49:] == 0)


def test_crop_switch_changes_the_result():
    image = _collimated()
    cropped = clean(image, CleaningSettings(size=64))
    uncropped = clean(image, CleaningSettings(size=64, crop_borders=False))
    # Without the crop the white shutters fill the left and right edges of the square.
    assert uncropped[28:36, :3].mean() > 0.8 and cropped[28:36, :3].mean() < 0.8


def test_percentiles_stretch_and_clip():
    image = _anatomy((80, 80))
    image[0, 0] = 50.0  # one hot pixel must not squash the rest
    out = clean(image, CleaningSettings(size=80, crop_borders=False, low_percentile=1, high_percentile=99))
    assert np.median(out) > 0.3 and (out == 1.0).mean() >= 0.005


def test_constant_and_small_images():
    assert np.all(clean(np.full((10, 10), 0.7, np.float32), CleaningSettings(size=32)) == 0)
    small = clean(_anatomy((20, 16)), CleaningSettings(size=64))
    assert small.shape == (64, 64) and small.max() == 1.0
    with pytest.raises(ValueError, match="2-D"):
        clean(np.zeros((3, 4, 5), np.float32), CleaningSettings())


def test_real_collimated_tibia_is_cropped_to_the_field(real_dicoms):
    tibia = next(p for p in real_dicoms if p.name == "RG3_J2KR.dcm")
    image = read_radiograph(tibia, max_size=512).image
    top, bottom, left, right = find_field(image)
    width = image.shape[1]
    assert left > 0.15 * width and right < 0.85 * width  # the white shutters left and right are gone
    assert image[:, left + 5 : right - 5].mean() < 0.7  # what is left is mostly the exposed field


def test_real_chest_keeps_most_of_the_image(real_dicoms):
    chest = next(p for p in real_dicoms if p.name == "RG1_J2KI.dcm")
    image = read_radiograph(chest, max_size=512).image
    top, bottom, left, right = find_field(image)
    assert (bottom - top) * (right - left) > 0.8 * image.size


@pytest.mark.parametrize("shape", [(256, 200), (37, 256), (1, 9), (9, 1), (2, 2)])
def test_line_percentiles_equal_numpys_bit_for_bit(shape, real_dicoms):
    rng = np.random.default_rng(sum(shape))
    q = (10, 50, 90)
    smooth = rng.random(shape, dtype=np.float32)
    tied = np.round(smooth * 4) / 4  # many equal values, as in shutters and padding
    images = [smooth, tied.astype(np.float32)]
    if shape == (256, 200):  # a real radiograph's pixels, as the field search sees them
        images.append(read_radiograph(real_dicoms[0], max_size=256).image[: shape[0], : shape[1]])
    for image in images:
        for axis in (0, 1):
            expected = np.percentile(image, q, axis=axis)
            got = line_percentiles(image, q, axis=axis)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert np.array_equal(got, expected)


@pytest.mark.parametrize("shape", [(320, 256), (257, 511), (90, 60), (160, 160), (100, 37)])
def test_resize_equals_monai_resize_longest(shape):
    from monai.transforms import Resize

    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    mode = "area" if max(shape) > 160 else "bilinear"
    expected = np.asarray(Resize(spatial_size=160, size_mode="longest", mode=mode, anti_aliasing=False)(image[None]))[0]
    resized = resize_longest(image, 160)
    assert resized.shape == expected.shape and max(resized.shape) == 160
    assert np.array_equal(resized, expected)
