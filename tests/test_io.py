"""Reading radiographs: real DICOMs and PNGs, pydicom's test files, synthetic DICOMs of every kind and fault."""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import dicom_factory as factory
from radregion.errors import RadiographError
from radregion.io import META_FIELDS, find_radiographs, is_dicom, read_metadata, read_radiograph


def _strips(image):
    """Mean of the central vertical strip and of both lateral strips."""
    width = image.shape[1]
    centre = image[:, width * 2 // 5 : width * 3 // 5].mean()
    lateral = np.concatenate([image[:, width // 10 : width // 4], image[:, -width // 4 : -width // 10]], axis=1)
    return centre, lateral.mean()


def _assert_unit_image(image, shape=None):
    assert image.dtype == np.float32 and image.ndim == 2
    assert image.min() == 0.0 and image.max() == 1.0
    if shape is not None:
        assert image.shape == shape


# --- real CR files (JPEG 2000, MONOCHROME1) -------------------------------------------------------------


def test_real_chest_is_bone_bright(real_dicoms):
    chest = next(p for p in real_dicoms if p.name == "RG1_J2KI.dcm")
    radiograph = read_radiograph(chest)
    _assert_unit_image(radiograph.image, (1955, 1841))
    centre, lateral = _strips(radiograph.image)
    assert centre > lateral + 0.05, "MONOCHROME1 chest: the spine/mediastinum must be brighter than the lungs"
    meta = radiograph.meta
    assert meta["BodyPartExamined"] == "CHEST" and meta["StudyDescription"] == "THORAX"
    assert meta["PhotometricInterpretation"] == "MONOCHROME1" and meta["Modality"] == "CR"
    assert (meta["Rows"], meta["Columns"], meta["BitsStored"]) == (1955, 1841, 15)
    assert meta["format"] == "dicom" and meta["path"] == str(chest)
    assert meta["transfer_syntax"] == "JPEG 2000 Image Compression"
    assert all(isinstance(v, float) for v in meta["PixelSpacing"])
    assert set(meta) <= set(META_FIELDS) | {"path", "format", "transfer_syntax"}


def test_real_tibia_lossy_matches_lossless_and_shutters_are_bright(real_dicoms):
    lossy, lossless = (read_radiograph(p).image for p in real_dicoms if p.name.startswith("RG3"))
    _assert_unit_image(lossless, (1760, 1760))
    assert np.abs(lossy - lossless).mean() < 0.02
    # Collimated (unexposed) bands at the left and right edges show as white once MONOCHROME1 is inverted.
    assert lossless[:, :100].mean() > 0.9 and lossless[:, -100:].mean() > 0.9


def test_read_metadata_reads_the_header_only(real_dicoms):
    for path in real_dicoms:
        meta = read_metadata(path)
        full = read_radiograph(path, max_size=64).meta
        assert meta == full


@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "RG3_J2KR.dcm"])
@pytest.mark.parametrize("max_size", [256, 100])
def test_max_size_downscales_while_reading(real_dicoms, name, max_size):
    """JPEG 2000 is decoded at reduced resolution; it must match the full decode shrunk afterwards."""
    path = next(p for p in real_dicoms if p.name == name)
    full = read_radiograph(path).image
    small = read_radiograph(path, max_size=max_size).image
    assert max_size // 2 <= max(small.shape) <= max_size
    _assert_unit_image(small)
    factor = round(full.shape[0] / small.shape[0])
    reference = full[: small.shape[0] * factor, : small.shape[1] * factor]
    reference = reference.reshape(small.shape[0], factor, small.shape[1], -1).mean(axis=(1, 3))
    assert np.corrcoef(reference.ravel(), small.ravel())[0, 1] > 0.99
    assert np.abs(reference - small).mean() < 0.03


# --- pydicom's own test files -------------------------------------------------------------------------

LOSSLESS_MR = ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
               "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]  # fmt: skip


@pytest.mark.parametrize("name", LOSSLESS_MR)
def test_lossless_syntaxes_decode_to_the_same_image(name):
    reference = read_radiograph(get_testdata_file("MR_small.dcm")).image
    image = read_radiograph(get_testdata_file(name)).image
    np.testing.assert_allclose(image, reference, atol=1e-6)


@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "image_dfl.dcm", "693_J2KI.dcm"])
def test_pydicom_files_read(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    radiograph = read_radiograph(path)
    _assert_unit_image(radiograph.image, (ds.Rows, ds.Columns))
    assert radiograph.meta["Modality"] == ds.Modality


@pytest.mark.parametrize(
    "name, cause",
    [
        ("SC_rgb_rle.dcm", "colour"),
        ("ExplVR_BigEnd.dcm", "colour image (PhotometricInterpretation RGB"),
        ("SC_rgb_rle_2frame.dcm", "multi-frame image (2 frames"),
        ("rtplan.dcm", "no pixel data (RT Plan Storage)"),
        ("rtplan_truncated.dcm", "truncated file: Beam Sequence has 711 of 976 bytes"),
        ("badVR.dcm", "invalid header: NumberOfFrames is '1A', not a number"),
        ("test-SR.dcm", "no pixel data"),
        ("MR_truncated.dcm", "truncated file: Pixel Data has 8130 of 8192 bytes"),
        ("JPEG-lossy.dcm", "cannot decode pixel data (JPEG Extended (Process 2 and 4)): libjpeg error"),
    ],
)
def test_pydicom_bad_files_name_their_cause(name, cause):
    path = get_testdata_file(name)
    with pytest.raises(RadiographError) as caught:
        read_radiograph(path)
    assert name in str(caught.value) and cause in str(caught.value)


# --- synthetic DICOMs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda p: factory.write(p),
        lambda p: factory.write(p, factory.phantom(bits=16)),
        lambda p: factory.write(p, factory.phantom(bits=8)),
        lambda p: factory.monochrome1(p, bits=12),
        lambda p: factory.monochrome1(p, bits=16),
        lambda p: factory.with_high_bits(p),
        lambda p: factory.jpeg_baseline(p, factory.phantom(bits=8)),
        lambda p: factory.jpeg2000_lossless(p, factory.phantom()),
        lambda p: factory.rle(p, factory.phantom()),
        lambda p: factory.write(p, modality="DX"),
        lambda p: factory.write(p, 4095 - factory.phantom(), bits_stored=12, PresentationLUTShape="INVERSE"),
    ],
    ids=[
        "mono2-12bit",
        "mono2-16bit",
        "mono2-8bit",
        "mono1-12bit",
        "mono1-16bit",
        "high-bits",
        "jpeg-baseline",
        "jpeg2000",
        "rle",
        "dx",
        "presentation-lut-inverse",
    ],  # fmt: skip
)
def test_synthetic_dicoms_are_bone_bright(tmp_path, make):
    image = read_radiograph(make(tmp_path / "image.dcm")).image
    _assert_unit_image(image, (96, 80))
    assert factory.bone_contrast(image) > 0.8


def test_window_is_applied(tmp_path):
    image = read_radiograph(factory.with_window(tmp_path / "w.dcm", center=800, width=400)).image
    side = image[:, :10]
    # The window covers only the soft-tissue range: its top-to-bottom gradient fills the whole grey scale.
    assert side[:5].mean() < 0.1 and side[-5:].mean() > 0.9
    plain = read_radiograph(factory.write(tmp_path / "p.dcm")).image
    assert plain[-5:, :10].mean() < 0.3


def test_rescale_is_applied_before_the_window(tmp_path):
    image = read_radiograph(factory.with_rescale(tmp_path / "r.dcm")).image
    windowed = read_radiograph(factory.with_window(tmp_path / "w.dcm", center=800, width=400)).image
    np.testing.assert_allclose(image, windowed, atol=1e-6)


def test_voi_lut_sequence_is_applied(tmp_path):
    image = read_radiograph(factory.with_voi_lut_sequence(tmp_path / "voi.dcm")).image
    assert factory.bone_contrast(image) < -0.8  # the test LUT inverts


@pytest.mark.parametrize("keep_file_meta", [True, False], ids=["meta-no-preamble", "bare-dataset"])
def test_no_preamble_and_no_extension(tmp_path, keep_file_meta):
    source = factory.write(tmp_path / "source.dcm")
    bare = factory.without_preamble(source, tmp_path / "IM000001", keep_file_meta=keep_file_meta)
    assert is_dicom(bare)
    np.testing.assert_array_equal(read_radiograph(bare).image, read_radiograph(source).image)
    assert read_metadata(bare)["Rows"] == 96


def test_content_decides_not_the_extension(tmp_path):
    dicom_named_png = factory.write(tmp_path / "scan.png")
    assert is_dicom(dicom_named_png) and read_radiograph(dicom_named_png).meta["format"] == "dicom"
    png_named_dcm = tmp_path / "photo.dcm"
    Image.fromarray(factory.phantom(bits=8)).save(png_named_dcm, format="PNG")
    assert not is_dicom(png_named_dcm) and read_radiograph(png_named_dcm).meta["format"] == "png"


BAD_DICOMS = {
    "truncated.dcm": (lambda p: factory.truncated(factory.write(p.with_name("ok.dcm")), p), "truncated file"),
    "no_pixels.dcm": (factory.without_pixel_data, "no pixel data"),
    "mpeg2.dcm": (factory.with_transfer_syntax, "unsupported transfer syntax MPEG2 Main Profile"),
    "cine.dcm": (factory.multiframe_cine, "multi-frame cine (3 frames, Modality XA)"),
    "colour_sc.dcm": (factory.colour_secondary_capture, "colour secondary capture"),
    "zero.dcm": (factory.zero_size, "zero-size image"),
    "notes.dcm": (lambda p: p.write_text("Patient notes, not an image\n" * 20), "not a DICOM file"),
    "empty.dcm": (lambda p: p.write_bytes(b""), "empty file"),
}


@pytest.mark.parametrize("name", sorted(BAD_DICOMS))
def test_bad_dicoms_name_file_and_cause(tmp_path, name):
    make, cause = BAD_DICOMS[name]
    make(tmp_path / name)
    with pytest.raises(RadiographError) as caught:
        read_radiograph(tmp_path / name)
    assert str(caught.value).startswith(str(tmp_path / name)) and cause in caught.value.problem


def test_truncated_real_jpeg2000(tmp_path, real_dicoms):
    cut = factory.truncated(real_dicoms[0], tmp_path / "cut.dcm", keep_fraction=0.5)
    with pytest.raises(RadiographError, match="cut.dcm: truncated file"):
        read_radiograph(cut)


def test_large_dicom_respects_max_size(tmp_path):
    image = np.tile(factory.phantom(bits=12), (12, 15))  # 1152 x 1200
    path = factory.write(tmp_path / "large.dcm", image, bits_stored=12)
    small = read_radiograph(path, max_size=100).image
    assert max(small.shape) <= 100 and min(small.shape) >= 90
    _assert_unit_image(small)


# --- PNG / JPEG / ITK -------------------------------------------------------------------------------------


def test_real_png_is_read_exactly(unifesp):
    path = sorted((unifesp / "images").glob("*.png"))[0]
    expected = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    radiograph = read_radiograph(path)
    np.testing.assert_allclose(radiograph.image, expected, atol=1e-7)
    assert radiograph.meta["format"] == "png" and radiograph.meta["BitsStored"] == 8
    assert (radiograph.meta["Rows"], radiograph.meta["Columns"]) == expected.shape


def test_png_16bit_rgb_and_jpeg(tmp_path):
    Image.fromarray(factory.phantom(bits=16)).save(tmp_path / "deep.png")
    rgb = np.repeat(factory.phantom(bits=8)[..., None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    for name in ("deep.png", "colour.png", "photo.jpg"):
        radiograph = read_radiograph(tmp_path / name)
        assert radiograph.image.shape == (96, 80) and radiograph.image.dtype == np.float32
        assert factory.bone_contrast(radiograph.image) > 0.6, name
    assert read_radiograph(tmp_path / "deep.png").meta["BitsStored"] == 16
    assert read_metadata(tmp_path / "photo.jpg") == {"Rows": 96, "Columns": 80, "path": str(tmp_path / "photo.jpg"),
                                                      "format": "jpeg"}  # fmt: skip
    assert read_radiograph(tmp_path / "photo.jpg", max_size=40).image.shape[0] <= 40


def test_unreadable_png(tmp_path, unifesp):
    real = sorted((unifesp / "images").glob("*.png"))[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(real[: len(real) // 3])
    (tmp_path / "fake.png").write_bytes(b"not really a picture" * 10)
    for name in ("cut.png", "fake.png"):
        with pytest.raises(RadiographError) as caught:
            read_radiograph(tmp_path / name)
        assert name in str(caught.value) and "unreadable PNG image" in caught.value.problem


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii", ".nii.gz"])
def test_itk_formats_2d_and_middle_slice(tmp_path, suffix):
    itk = pytest.importorskip("itk")
    flat = factory.phantom(bits=12).astype(np.float32)
    image_2d = itk.image_from_array(flat)
    image_2d.SetSpacing([0.2, 0.3])
    itk.imwrite(image_2d, str(tmp_path / f"flat{suffix}"))
    radiograph = read_radiograph(tmp_path / f"flat{suffix}")
    _assert_unit_image(radiograph.image, (96, 80))
    assert factory.bone_contrast(radiograph.image) > 0.8
    assert radiograph.meta["PixelSpacing"] == pytest.approx([0.3, 0.2])
    assert read_metadata(tmp_path / f"flat{suffix}")["Rows"] == 96

    volume = np.stack([np.zeros_like(flat), flat, np.zeros_like(flat)])
    itk.imwrite(itk.image_from_array(volume), str(tmp_path / f"volume{suffix}"))
    middle = read_radiograph(tmp_path / f"volume{suffix}").image
    np.testing.assert_allclose(middle, radiograph.image, atol=1e-6)


# --- folder scan ------------------------------------------------------------------------------------------


def test_find_radiographs_reports_bad_files_and_goes_on(tmp_path, unifesp, real_dicoms):
    good_dicom = factory.write(tmp_path / "a" / "good.dcm")
    bare = factory.without_preamble(good_dicom, tmp_path / "a" / "IM0002")
    png = tmp_path / "b" / "xray.png"
    png.parent.mkdir()
    shutil.copy(sorted((unifesp / "images").glob("*.png"))[0], png)
    factory.colour_secondary_capture(tmp_path / "b" / "deep" / "screenshot.dcm")
    factory.truncated(good_dicom, tmp_path / "b" / "deep" / "cut.dcm", keep_fraction=0.5)
    factory.truncated(real_dicoms[0], tmp_path / "b" / "cut_j2k.dcm", keep_fraction=0.8)
    shutil.copy(real_dicoms[1], tmp_path / "b" / "j2k.dcm")
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "labels.csv").write_text("image,labels\n")
    (tmp_path / "README").write_text("an extension-less text file is not DICOM\n")
    factory.write(tmp_path / ".hidden" / "skip.dcm")
    factory.write(tmp_path / "a" / ".skip.dcm")

    paths, errors = find_radiographs(tmp_path)

    assert paths == sorted([good_dicom, bare, png, tmp_path / "b" / "j2k.dcm"])
    causes = {error.path: error.problem for error in errors}
    bad = ("deep/screenshot.dcm", "deep/cut.dcm", "broken.png", "cut_j2k.dcm")
    assert set(causes) == {str(tmp_path / "b" / name) for name in bad}
    assert causes[str(tmp_path / "b" / "cut_j2k.dcm")].startswith("truncated file")
    assert "colour secondary capture" in causes[str(tmp_path / "b" / "deep" / "screenshot.dcm")]
    assert "truncated" in causes[str(tmp_path / "b" / "deep" / "cut.dcm")]
    assert "unreadable PNG image" in causes[str(tmp_path / "b" / "broken.png")]


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(RadiographError, match="nothing.dcm: file not found"):
        read_radiograph(tmp_path / "nothing.dcm")
    with pytest.raises(RadiographError, match="not a folder"):
        find_radiographs(tmp_path / "nothing")
    assert not is_dicom(tmp_path / "nothing.dcm") and not is_dicom(tmp_path)


def test_pydicom_corpus_never_gives_a_traceback():
    """Every file of pydicom's test corpus is either usable or a RadiographError, scanning and reading."""
    folder = pydicom.data.get_testdata_file("CT_small.dcm")
    paths, errors = find_radiographs(Path(folder).parent)
    assert len(paths) > 30 and len(errors) > 30
    assert all(isinstance(e, RadiographError) and e.problem for e in errors)
    usable = {path.name for path in paths}
    assert {"CT_small.dcm", "image_dfl.dcm", "MR_small_RLE.dcm", "693_J2KI.dcm", "JPGExtended.dcm"} <= usable
    for path in paths:
        try:
            assert read_radiograph(path, max_size=64).image.dtype == np.float32
        except RadiographError as error:
            assert error.path == str(path) and error.problem


def test_unreadable_itk_file(tmp_path):
    pytest.importorskip("itk")
    (tmp_path / "bad.nrrd").write_text("garbage\n")
    with pytest.raises(RadiographError, match="bad.nrrd: unreadable NRRD file"):
        read_radiograph(tmp_path / "bad.nrrd")


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_uncompressed_dicom_read_strip_by_strip_equals_pydicom_decode(tmp_path, monkeypatch, signed):
    """Large native pixel data is read from the file a strip at a time (never whole in memory): the same image as
    pydicom's full decode, 12 stored bits with garbage above them included; a short file still says so."""
    from radregion import dicomread
    from radregion.dicomwrite import array_to_dicom

    rng = np.random.default_rng(3)
    values = rng.integers(0, 4096, (1500, 1300)).astype(np.int32) - (2048 if signed else 0)
    values[::7, ::5] = (values[::7, ::5] & 0x0FFF) | 0x7000  # bits above BitsStored: overlay garbage
    path = array_to_dicom(np.zeros((1500, 1300), np.uint16), tmp_path / "native.dcm", bits_stored=16)
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
    ds.PixelData = values.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path)
    header = dicomread.read_header(path, pixels=True, defer=True)  # as read_dicom_image parses it
    assert dict(header.items())[0x7FE00010].value is None, "the pixel data is left in the file"
    for max_size in (None, 672, 200):
        streamed = read_radiograph(path, max_size=max_size).image
        with monkeypatch.context() as patch:
            patch.setattr(dicomread, "DEFER_BYTES", 1 << 40)  # pydicom reads and decodes the whole pixel data
            decoded = read_radiograph(path, max_size=max_size).image
        assert streamed.shape == decoded.shape and np.array_equal(streamed, decoded), max_size
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(RadiographError, match="cut.dcm: truncated file: Pixel Data has 3899000 of 3900000 bytes"):
        read_radiograph(cut, max_size=672)
