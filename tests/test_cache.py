"""The content-addressed cache of cleaned images."""

import shutil

import numpy as np
import pytest

import dicom_factory as factory
from radregion.cache import ImageCache, decode_clean, default_root, file_sha256, load_clean
from radregion.cleaning import CleaningSettings
from radregion.errors import RadiographError

SETTINGS = CleaningSettings(size=64)


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_miss_then_hit_serves_the_stored_image(tmp_path, unifesp):
    source = sorted((unifesp / "images").glob("*.png"))[0]
    cache = ImageCache(tmp_path / "cache")
    first = cache.load(source, SETTINGS)
    assert first.dtype == np.uint8 and first.shape == (64, 64)
    np.testing.assert_array_equal(first, decode_clean(source, SETTINGS))
    entry = cache.entry(source, SETTINGS)
    assert _files(tmp_path / "cache") == [entry]
    # Prove the second load reads the entry instead of decoding: change what the entry holds.
    marker = np.full((64, 64), 7, dtype=np.uint8)
    np.save(entry, marker)
    np.testing.assert_array_equal(cache.load(source, SETTINGS), marker)


def test_key_is_content_and_settings(tmp_path, real_dicoms):
    cache = ImageCache(tmp_path / "cache")
    copy = tmp_path / "renamed.dcm"
    shutil.copy(real_dicoms[1], copy)
    assert cache.entry(copy, SETTINGS) == cache.entry(real_dicoms[1], SETTINGS)
    assert cache.entry(real_dicoms[1], SETTINGS) != cache.entry(real_dicoms[2], SETTINGS)
    assert cache.entry(copy, SETTINGS) != cache.entry(copy, CleaningSettings(size=96))
    assert cache.entry(copy, SETTINGS).stem == file_sha256(copy)
    before = cache.entry(copy, SETTINGS)
    factory.write(copy)  # new content under the same name: a new key, not a stale image
    assert cache.entry(copy, SETTINGS) != before


def test_damaged_entry_is_rebuilt(tmp_path):
    source = factory.write(tmp_path / "x.dcm")
    cache = ImageCache(tmp_path / "cache")
    good = cache.load(source, SETTINGS)
    cache.entry(source, SETTINGS).write_bytes(b"garbage")
    np.testing.assert_array_equal(cache.load(source, SETTINGS), good)
    np.testing.assert_array_equal(np.load(cache.entry(source, SETTINGS)), good)


def test_bad_file_raises_and_leaves_nothing(tmp_path):
    bad = factory.colour_secondary_capture(tmp_path / "rgb.dcm")
    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(RadiographError, match="rgb.dcm: colour secondary capture"):
        cache.load(bad, SETTINGS)
    assert _files(tmp_path / "cache") == []


def test_default_root_and_load_clean(tmp_path, monkeypatch):
    monkeypatch.setenv("RADREGION_CACHE", str(tmp_path / "env-cache"))
    assert default_root() == tmp_path / "env-cache"
    source = factory.write(tmp_path / "x.dcm")
    image = load_clean(source, SETTINGS)
    assert image.shape == (64, 64) and image.dtype == np.uint8
    assert [p.suffix for p in _files(tmp_path / "env-cache")] == [".npy"]
    monkeypatch.delenv("RADREGION_CACHE")
    assert default_root().parts[-2:] == (".cache", "radregion")
