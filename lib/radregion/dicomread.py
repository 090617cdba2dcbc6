"""DICOM side of reading: parse, check for every known bad case, decode, apply the LUTs."""

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.datadict import DicomDictionary
from pydicom.encaps import generate_pixel_data_frame
from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID, JPEG2000, JPEG2000Lossless

from radregion.errors import RadiographError
from radregion.pixels import (
    CHUNK_PIXELS,
    block_mean,
    block_mean_rows,
    check_content,
    check_dimensions,
    shrink_factors,
    to_unit_range,
)

PREAMBLE_MAGIC_OFFSET = 128
# First element tag of a preamble-less file: group 0x0002 (file meta) or 0x0008 (identifying), either byte order.
HEADER_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
CINE_MODALITIES = {"XA", "RF", "US", "ES", "XC"}
COLOUR_PHOTOMETRICS = ("RGB", "YBR", "PALETTE", "HSV", "ARGB", "CMYK")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
UNDEFINED_LENGTH = 0xFFFFFFFF
JPEG2000_SYNTAXES = (JPEG2000Lossless, JPEG2000)
DEFER_BYTES = 1 << 20  # read_dicom_image leaves larger values (the pixel data) in the file, read a strip at a time


def looks_like_dicom(path) -> bool:
    """True when the file has the DICM marker, or starts like a preamble-less DICOM data set."""
    with open(path, "rb") as handle:
        head = handle.read(PREAMBLE_MAGIC_OFFSET + 4)
    if head[PREAMBLE_MAGIC_OFFSET:] == b"DICM":
        return True
    if len(head) < 8 or head[:2] not in HEADER_STARTS:
        return False
    try:
        read_header(path)
    except RadiographError:
        return False
    return True


def read_header(path, *, pixels: bool = False, defer: bool = False) -> pydicom.Dataset:
    """Parse the file (header only unless `pixels`); truncated files and non-DICOM content raise. `defer`: values
    above DEFER_BYTES (native pixel data) stay on disk until used."""
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(
                path, force=True, stop_before_pixels=not pixels, defer_size=DEFER_BYTES if defer else None
            )
        except (PermissionError, FileNotFoundError, IsADirectoryError) as error:
            raise RadiographError(path, f"cannot read: {error.strerror or error}") from None
        except (EOFError, OSError) as error:  # pydicom's "No tag to read at file position ..."
            raise RadiographError(path, f"truncated file: the DICOM data ends early ({error})") from None
        except Exception as error:  # pydicom raises many types on garbage input
            raise RadiographError(path, f"not a DICOM file ({type(error).__name__}: {error})") from None
    if any("End of file" in str(w.message) for w in caught):
        raise RadiographError(path, "truncated file: the data ends inside an element")
    if len(ds) == 0 or not any(tag.group in (0x0008, 0x0010, 0x0020, 0x0028) for tag in ds.keys()):
        raise RadiographError(path, "not a DICOM file (no DICOM attributes found)")
    _check_last_element(ds, path, pixels)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if ds.is_implicit_VR
            else pydicom.uid.ExplicitVRLittleEndian
            if ds.is_little_endian
            else pydicom.uid.ExplicitVRBigEndian
        )
    return ds


def _check_last_element(ds, path: Path, whole_file: bool) -> None:
    """pydicom keeps a short final value without complaint: compare it with its declared length."""
    last = ds._dict[max(ds._dict)]
    if not isinstance(last, RawDataElement) or last.length == UNDEFINED_LENGTH or last.value is None:
        return
    if len(last.value) < last.length:
        name = pydicom.datadict.dictionary_description(last.tag) if last.tag in DicomDictionary else str(last.tag)
        raise RadiographError(path, f"truncated file: {name} has {len(last.value)} of {last.length} bytes")
    if whole_file:
        leftover = path.stat().st_size - (last.value_tell + last.length)
        if 0 < leftover < 8:
            raise RadiographError(path, "truncated file: it ends inside an element tag")


def check_image(ds, path) -> None:
    """Every problem the header alone reveals: no pixels, unsupported syntax, cine, colour, zero size."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS) and "Rows" not in ds:
        kind = UID(sop_class).name if sop_class else "no SOP class"
        raise RadiographError(path, f"no pixel data ({kind})")
    rows, columns = header_int(ds, "Rows", 0, path), header_int(ds, "Columns", 0, path)
    if rows == 0 or columns == 0:
        raise RadiographError(path, f"zero-size image (Rows {rows}, Columns {columns})")
    syntax = ds.file_meta.TransferSyntaxUID
    if not any(h.is_available() and h.supports_transfer_syntax(syntax) for h in pydicom.config.pixel_data_handlers):
        raise RadiographError(path, f"unsupported transfer syntax {syntax.name} ({syntax})")
    frames = header_int(ds, "NumberOfFrames", 1, path)
    modality = str(ds.get("Modality", "")).upper()
    if frames > 1:
        what = "multi-frame cine" if modality in CINE_MODALITIES else "multi-frame image"
        raise RadiographError(
            path, f"{what} ({frames} frames, Modality {modality or 'unknown'}): expected one radiograph"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = header_int(ds, "SamplesPerPixel", 1, path)
    if samples > 1 or photometric.startswith(COLOUR_PHOTOMETRICS):
        kind = "colour secondary capture" if sop_class.startswith("1.2.840.10008.5.1.4.1.1.7") else "colour image"
        raise RadiographError(
            path, f"{kind} (PhotometricInterpretation {photometric or '?'}, {samples} samples): not a radiograph"
        )


def header_int(ds, keyword: str, default: int, path) -> int:
    """An integer attribute, or RadiographError naming the attribute and its bad value."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RadiographError(path, f"invalid header: {keyword} is {str(value)!r}, not a number") from None


def check_pixel_length(ds, path) -> None:
    """For native (uncompressed) syntaxes the pixel data length is known in advance."""
    if "PixelData" not in ds:
        raise RadiographError(path, "no pixel data: the image attributes are there but Pixel Data is missing")
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    expected = ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel") or 1) * ds.BitsAllocated // 8
    expected *= int(ds.get("NumberOfFrames") or 1)
    raw = _pixel_element(ds)
    if _on_disk(raw):  # deferred: the file must hold the declared length
        have = max(0, min(raw.length, Path(path).stat().st_size - raw.value_tell))
    else:
        have = len(ds.PixelData)
    if have < expected:
        raise RadiographError(path, f"truncated file: Pixel Data has {have} of {expected} bytes")


def _pixel_element(ds):
    """The Pixel Data element as parsed: Dataset.items() leaves a deferred value on disk (get_item would read it)."""
    return next((element for tag, element in ds.items() if tag == 0x7FE00010), None)


def _on_disk(raw) -> bool:
    """A value pydicom left in the file (read_header's `defer`)."""
    return isinstance(raw, RawDataElement) and raw.value is None and raw.length != UNDEFINED_LENGTH


def read_dicom_image(path, fields, max_size: int | None = None) -> tuple[np.ndarray, dict]:
    """Decoded image, float32 [0, 1], bone bright; and the metadata `fields` the file has."""
    ds = read_header(path, pixels=True, defer=True)
    check_image(ds, path)
    full = ds.Rows * ds.Columns * max(1, (header_int(ds, "BitsAllocated", 16, path) + 7) // 8)
    level = _jpeg2000_level(ds, max_size)
    check_dimensions(ds.Rows, ds.Columns, path, full >> (2 * level))  # JPEG 2000 decodes 1/2^level of each side
    check_pixel_length(ds, path)
    syntax = ds.file_meta.TransferSyntaxUID
    stored = _read_native_reduced(ds, path, max_size)
    if stored is None:
        stored = _decode_jpeg2000_reduced(ds, level) if level else None
        if stored is None:
            check_dimensions(ds.Rows, ds.Columns, path, full)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    stored = ds.pixel_array
            except Exception as error:
                raise RadiographError(path, f"cannot decode pixel data ({syntax.name}): {error}") from None
        del ds.PixelData  # free the encoded bytes and pydicom's cached array; `stored` holds the pixels
        ds._pixel_array = None
        stored = _honour_bits_stored(stored, ds)
        stored = block_mean(stored, shrink_factors(stored.shape, max_size))
    image = _apply_luts(stored, ds)
    check_content(image, path, _lut_values(ds))
    image = to_unit_range(image)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if (photometric == "MONOCHROME1") != (str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"):
        np.subtract(1.0, image, out=image)
    return image, {**dicom_meta(ds, fields), "transfer_syntax": syntax.name}


def _read_native_reduced(ds, path, max_size: int | None) -> np.ndarray | None:
    """Uncompressed little-endian 8/16-bit pixel data read from the file a strip of rows at a time and averaged
    down (pydicom left it on disk: read_header's `defer`), so the full image is never in memory. None for what
    pydicom decodes itself (compressed, small, other depths)."""
    raw = _pixel_element(ds)
    syntax = ds.file_meta.TransferSyntaxUID
    bits = int(ds.get("BitsAllocated") or 0)
    if not _on_disk(raw) or syntax.is_compressed or syntax.is_deflated or not syntax.is_little_endian:
        return None
    if bits not in (8, 16):
        return None
    dtype = np.dtype(f"<{'i' if int(ds.get('PixelRepresentation') or 0) == 1 else 'u'}{bits // 8}")
    rows, columns = int(ds.Rows), int(ds.Columns)
    with open(path, "rb") as handle:

        def read_rows(start: int, stop: int) -> np.ndarray:
            handle.seek(raw.value_tell + start * columns * dtype.itemsize)
            strip = np.fromfile(handle, dtype=dtype, count=(stop - start) * columns).reshape(stop - start, columns)
            return _honour_bits_stored(strip.astype(dtype.newbyteorder("="), copy=False), ds)

        return block_mean_rows(
            read_rows, (rows, columns), dtype.newbyteorder("="), shrink_factors((rows, columns), max_size)
        )


def _jpeg2000_level(ds, max_size: int | None) -> int:
    """How many resolution levels a JPEG 2000 image can skip and keep its long side above `max_size`; 0 when
    the image is not JPEG 2000 Pillow can reduce."""
    if not max_size or ds.file_meta.TransferSyntaxUID not in JPEG2000_SYNTAXES:
        return 0
    if int(ds.get("PixelRepresentation") or 0) != 0 or int(ds.get("BitsAllocated") or 0) not in (8, 16):
        return 0
    return int(math.log2(max(ds.Rows, ds.Columns) / max_size)) if max(ds.Rows, ds.Columns) > max_size else 0


def _decode_jpeg2000_reduced(ds, level: int) -> np.ndarray | None:
    """JPEG 2000 decodes at 1/2, 1/4 ... resolution by skipping wavelet levels: several times faster.

    None when Pillow refuses; pydicom's full decode then takes over.
    """
    frame = next(generate_pixel_data_frame(ds.PixelData, 1))
    for reduce in range(level, 0, -1):  # Pillow rejects some levels for odd sizes at once; try the next
        try:
            with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as image:
                image.reduce = reduce
                image.load()
                array = np.array(image)
        except Exception:
            continue
        if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
            return None
        # Pillow scales N-bit samples up to 16 bits; undo it as pydicom's Pillow handler does.
        shift = int(ds.BitsAllocated) - int(ds.BitsStored or ds.BitsAllocated)
        if array.dtype == np.uint16 and shift > 0:
            np.right_shift(array, shift, out=array)
        return array
    return None


def _honour_bits_stored(array: np.ndarray, ds) -> np.ndarray:
    """Drop bits above BitsStored (overlays, garbage); sign-extend signed data."""
    bits = int(ds.get("BitsStored") or 0)
    if array.dtype.kind not in "iu" or not 0 < bits < array.dtype.itemsize * 8:
        return array
    if array.dtype.kind == "u":
        mask = (1 << bits) - 1
        return array & array.dtype.type(mask) if int(array.max()) > mask else array
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if int(array.min()) >= low and int(array.max()) <= high:
        return array
    shift = array.dtype.itemsize * 8 - bits
    return (array << shift) >> shift


def _apply_luts(stored: np.ndarray, ds) -> np.ndarray:
    """Modality LUT then VOI LUT (pydicom), row chunk by row chunk into one float32 array."""
    out = np.empty(stored.shape, dtype=np.float32)
    step = max(1, CHUNK_PIXELS // max(1, stored.shape[1]))
    for start in range(0, stored.shape[0], step):
        chunk = apply_modality_lut(stored[start : start + step], ds)
        out[start : start + step] = apply_voi_lut(chunk, ds)
    return out


def _lut_values(ds) -> str:
    """How check_content names the values of a DICOM image: after which LUT, with the rescale it used."""
    rescale = [f"{k} {ds.get(k)}" for k in ("RescaleSlope", "RescaleIntercept") if ds.get(k) is not None]
    return "pixel values after the modality/VOI LUT" + (f" ({', '.join(rescale)})" if rescale else "")


def dicom_meta(ds, fields) -> dict:
    """The requested attributes the data set has: text as str, PixelSpacing as floats, sizes as int."""
    meta = {}
    for keyword in fields:
        value = ds.get(keyword)
        if keyword == "PixelSpacing" and not value:
            value = ds.get("ImagerPixelSpacing")
        if value is None or value == "":
            continue
        if keyword == "PixelSpacing":
            meta[keyword] = [float(v) for v in value]
        elif keyword in ("Rows", "Columns", "BitsStored"):
            meta[keyword] = int(value)
        else:
            meta[keyword] = str(value).strip()
    return meta
