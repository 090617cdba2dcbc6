"""Synthetic DICOM files for tests: good ones in every flavour and every known bad case."""

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_dataset
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless, generate_uid

from radregion.dicomwrite import array_to_dicom

MPEG2 = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile: no pixel handler can decode it here
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
XA_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"


def phantom(shape=(96, 80), bits=12) -> np.ndarray:
    """A radiograph-like array, high values = bone: dark soft tissue with a bright vertical 'bone' bar."""
    rows, cols = shape
    top = (1 << bits) - 1
    image = np.full(shape, int(0.15 * top), dtype=np.float64)
    yy, xx = np.mgrid[0:rows, 0:cols]
    image += 0.1 * top * (yy / rows)  # a gentle gradient so the image is not piecewise flat
    image[:, cols * 3 // 8 : cols * 5 // 8] = 0.85 * top  # the bone
    dtype = np.uint8 if bits <= 8 else np.uint16
    return np.rint(image).astype(dtype)


def bone_contrast(image: np.ndarray) -> float:
    """Mean of the central bone bar minus the mean of the soft tissue on both sides (positive: bone bright)."""
    cols = image.shape[1]
    centre = image[:, cols * 7 // 16 : cols * 9 // 16].mean()
    sides = np.concatenate([image[:, : cols // 4].ravel(), image[:, -cols // 4 :].ravel()]).mean()
    return float(centre - sides)


def write(path, image=None, **kwargs) -> Path:
    """array_to_dicom with a 12-bit phantom by default."""
    if image is None:
        image = phantom()
        kwargs.setdefault("bits_stored", 12)
    return array_to_dicom(image, path, **kwargs)


def monochrome1(path, bits=12) -> Path:
    """Stored inverted (high = dark) as CR plates do; readers must invert it back."""
    image = phantom(bits=bits)
    return write(path, ((1 << bits) - 1 - image).astype(image.dtype), photometric="MONOCHROME1", bits_stored=bits)


def with_high_bits(path) -> Path:
    """12 bits stored in 16 with junk in the high bits of one corner (an overlay plane of old scanners)."""
    image = phantom(bits=12)
    image[:20, :20] |= np.uint16(0xA000)
    path = array_to_dicom(image, path, bits_stored=16)
    return _rewrite(path, lambda ds: (setattr(ds, "BitsStored", 12), setattr(ds, "HighBit", 11)))


def with_rescale(path, center=-200, width=400) -> Path:
    """RescaleIntercept -1000 and a window given in rescaled units (stored 600..1000 for the defaults)."""
    return write(
        path, phantom(bits=12), bits_stored=12, RescaleSlope="1", RescaleIntercept="-1000",
        WindowCenter=str(center), WindowWidth=str(width),
    )  # fmt: skip


def with_window(path, center, width) -> Path:
    return write(path, phantom(bits=12), bits_stored=12, WindowCenter=str(center), WindowWidth=str(width))


def with_voi_lut_sequence(path) -> Path:
    """A VOI LUT that inverts the stored values: unmistakable when applied (bone turns dark)."""
    path = write(path, phantom(bits=12), bits_stored=12)

    def add_lut(ds):
        item = pydicom.Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        lut = (4095 - np.arange(4096)).astype(np.uint16)
        item.LUTData = lut.tolist()
        item["LUTData"].VR = "US"
        item.LUTExplanation = "inverse"
        ds.VOILUTSequence = [item]

    return _rewrite(path, add_lut)


def without_preamble(src, dst, keep_file_meta=True) -> Path:
    """The same file minus the 128-byte preamble and DICM marker (and, optionally, the file meta too)."""
    data = Path(src).read_bytes()
    if keep_file_meta:
        Path(dst).write_bytes(data[132:])
    else:
        ds = pydicom.dcmread(src)
        buffer = pydicom.filebase.DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, True
        write_dataset(buffer, ds)
        Path(dst).write_bytes(buffer.getvalue())
    return Path(dst)


def truncated(src, dst, keep_fraction=0.6) -> Path:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep_fraction)])
    return Path(dst)


def without_pixel_data(path) -> Path:
    return _rewrite(write(path), lambda ds: delattr(ds, "PixelData"))


def with_transfer_syntax(path, uid=MPEG2) -> Path:
    """Pixel data encapsulated under a transfer syntax named by `uid` (the bytes need not decode)."""
    return _encapsulated(write(path), [phantom().tobytes()], uid)


def multiframe_cine(path, frames=3, modality="XA") -> Path:
    stack = np.stack([phantom()] * frames)
    path = write(path, modality=modality)

    def make_cine(ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = XA_STORAGE
        ds.NumberOfFrames = frames
        ds.PixelData = stack.tobytes()

    return _rewrite(path, make_cine)


def colour_secondary_capture(path) -> Path:
    rgb = np.zeros((32, 40, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    path = write(path, modality="OT")

    def make_colour(ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
        ds.Rows, ds.Columns = rgb.shape[:2]
        ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "RGB"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = rgb.tobytes()

    return _rewrite(path, make_colour)


def zero_size(path) -> Path:
    def empty(ds):
        ds.Rows, ds.Columns = 0, 0
        ds.PixelData = b""

    return _rewrite(write(path), empty)


def jpeg_baseline(path, image_uint8) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(image_uint8).save(buffer, format="JPEG", quality=95)
    return _encapsulated(array_to_dicom(image_uint8, path), [buffer.getvalue()], JPEGBaseline8Bit)


def jpeg2000_lossless(path, image) -> Path:
    import openjpeg

    codestream = openjpeg.encode(np.ascontiguousarray(image))
    return _encapsulated(array_to_dicom(image, path), [codestream], JPEG2000Lossless)


def rle(path, image) -> Path:
    path = array_to_dicom(image, path)
    return _rewrite(path, lambda ds: ds.compress(RLELossless))


def _encapsulated(path, frames, uid) -> Path:
    def encapsulate_frames(ds):
        ds.file_meta.TransferSyntaxUID = uid
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True

    return _rewrite(path, encapsulate_frames)


def _rewrite(path, change) -> Path:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, write_like_original=False)
    return Path(path)
