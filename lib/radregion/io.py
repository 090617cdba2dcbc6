"""Read any radiograph an archive holds (DICOM, PNG/JPEG, NRRD/MHA/NIfTI) as float32 [0, 1], bone bright."""

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from radregion.dicomread import (
    MEDIA_DIRECTORY,
    check_image,
    dicom_meta,
    looks_like_dicom,
    read_dicom_image,
    read_header,
)
from radregion.errors import RadiographError
from radregion.pixels import (
    MAX_DECODED_BYTES,
    block_mean,
    block_mean_rows,
    check_content,
    check_dimensions,
    shrink_factors,
    to_unit_range,
)

META_FIELDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality",
               "BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName", "ViewPosition",
               "ImageLaterality", "PixelSpacing", "PhotometricInterpretation", "Manufacturer",
               "Rows", "Columns", "BitsStored")  # fmt: skip

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}
PILLOW_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
ITK_SUFFIXES = {".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage",
                ".nii": "NIfTI", ".nii.gz": "NIfTI"}  # fmt: skip
PILLOW_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
                b"BM": "BMP"}  # fmt: skip
NOT_IMAGES = {".txt", ".csv", ".tsv", ".json", ".yaml", ".yml", ".xml", ".html", ".htm", ".md", ".rst", ".log",
              ".py", ".ipynb", ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".zip", ".tar", ".gz", ".7z", ".npy",
              ".npz", ".pt", ".pth", ".safetensors", ".db", ".sqlite", ".ini", ".cfg", ".sh", ".bat",
              ".exe"}  # fmt: skip
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0, little endian
SKIPPED_NAMES = {"DICOMDIR", "Thumbs.db", "desktop.ini"}
# Pillow refuses above twice this many pixels before anything is decoded: check_dimensions' byte limit decides instead
if Image.MAX_IMAGE_PIXELS is not None:
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, MAX_DECODED_BYTES // 2)


@dataclass
class Radiograph:
    image: np.ndarray  # float32, 2-D, [0, 1], bone bright
    meta: dict  # META_FIELDS the file has, plus "path" and "format" (and "transfer_syntax" for DICOM)


def is_dicom(path) -> bool:
    """Decided by content (DICM marker or a parseable preamble-less header), never by the name."""
    try:
        return Path(path).is_file() and looks_like_dicom(path)
    except OSError:
        return False


def read_radiograph(path, max_size: int | None = None) -> Radiograph:
    """Decode one file. `max_size` shrinks while decoding (JPEG 2000 resolution levels, integer block mean):
    the long side ends between max_size / 2 and max_size."""
    path = Path(path)
    kind = _kind(path)
    if kind == "dicom":
        with _bad_header_is_an_error(path):
            image, meta = read_dicom_image(path, META_FIELDS, max_size)
    elif kind == "pillow":
        image, meta = _read_pillow(path, max_size)
    else:
        image, meta = _read_itk(path, max_size)
    return Radiograph(image=image, meta={**meta, "path": str(path), "format": _format_name(path, kind)})


def read_metadata(path) -> dict:
    """The metadata record alone (DICOM header only, image files' size), with "path" and "format"."""
    path = Path(path)
    kind = _kind(path)
    if kind == "dicom":
        with _bad_header_is_an_error(path):
            ds = read_header(path)
            meta = {**dicom_meta(ds, META_FIELDS), "transfer_syntax": ds.file_meta.TransferSyntaxUID.name}
    elif kind == "pillow":
        with _open_pillow(path) as img:
            meta = {"Rows": img.height, "Columns": img.width}
    else:
        meta = _read_itk(path, None)[1]
    return {**meta, "path": str(path), "format": _format_name(path, kind)}


def find_radiographs(folder) -> tuple[list[Path], list[RadiographError]]:
    """Every usable radiograph under `folder` (recursive, sorted) and an error for each unusable one.

    Hidden files, DICOMDIRs and obvious non-images are skipped silently; a file without an image extension
    is kept when its content is DICOM (or PNG/JPEG/TIFF/BMP) and skipped otherwise.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RadiographError(folder, "not a folder")
    paths, errors = [], []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.name in SKIPPED_NAMES:
            continue
        if not path.is_file() or _suffix(path) in NOT_IMAGES:
            continue
        try:
            if _scan(path):
                paths.append(path)
        except RadiographError as error:
            errors.append(error)
        except OSError as error:
            errors.append(RadiographError(path, f"cannot read: {error.strerror or error}"))
    return paths, errors


def _scan(path: Path) -> bool:
    """True for a usable radiograph, False for a file that is not one; raises for a broken one."""
    known = _suffix(path) in DICOM_SUFFIXES or _suffix(path) in PILLOW_SUFFIXES or _suffix(path) in ITK_SUFFIXES
    try:
        kind = _kind(path)
    except RadiographError:
        if known:
            raise
        return False
    if kind == "dicom":
        with _bad_header_is_an_error(path):
            ds = read_header(path)
            if str(ds.get("SOPClassUID", "")) == MEDIA_DIRECTORY:
                return False
            check_image(ds, path)
            _check_complete(ds, path)
    elif kind == "pillow":
        with _open_pillow(path) as img:
            try:
                img.verify()
            except Exception as error:
                raise RadiographError(path, f"unreadable {_pillow_name(path)} image ({error})") from None
    return True


@contextlib.contextmanager
def _bad_header_is_an_error(path: Path):
    """Malformed values surface lazily in pydicom as assorted exceptions: report them as bad input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns per odd value; the error below says what matters
        try:
            yield
        except RadiographError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as error:
            raise RadiographError(path, f"invalid DICOM header ({type(error).__name__}: {error})") from None


def _check_complete(ds, path: Path) -> None:
    """Cheap truncation check for a scan: uncompressed pixels need their bytes on disk; encapsulated pixel
    data ends with a sequence delimiter (only when it does not is the whole file parsed to be sure)."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 8))
            if handle.read(8) != SEQUENCE_DELIMITER:
                read_header(path, pixels=True)  # raises when the pixel data is cut short
        return
    if ds.file_meta.TransferSyntaxUID.is_deflated:
        return  # the whole data set is zlib-compressed: sizes say nothing
    needed = ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel") or 1) * int(ds.get("BitsAllocated") or 8) // 8
    size = path.stat().st_size
    if size < needed:
        raise RadiographError(path, f"truncated file: {size} bytes on disk, the pixel data alone needs {needed}")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _kind(path: Path) -> str:
    """'dicom', 'pillow' or 'itk', by content first; RadiographError when nothing fits."""
    if not path.exists():
        raise RadiographError(path, "file not found")
    if path.is_dir():
        raise RadiographError(path, "is a folder, not a file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as error:
        raise RadiographError(path, f"cannot read: {error.strerror or error}") from None
    if not head:
        raise RadiographError(path, "empty file (0 bytes)")
    suffix = _suffix(path)
    if looks_like_dicom(path):
        return "dicom"
    if head.startswith(tuple(PILLOW_MAGIC)):
        return "pillow"
    if suffix in ITK_SUFFIXES:
        return "itk"
    if suffix in PILLOW_SUFFIXES:
        name = PILLOW_SUFFIXES[suffix]
        raise RadiographError(path, f"unreadable {name} image: the content is not {name}")
    if suffix in DICOM_SUFFIXES:
        _raise_dicom_problem(path)
    raise RadiographError(path, "unknown format: not DICOM, PNG, JPEG, TIFF, NRRD, MetaImage or NIfTI")


def _raise_dicom_problem(path: Path) -> None:
    """A *.dcm whose content failed the DICOM check: report the parser's reason when it has one."""
    with open(path, "rb") as handle:
        head = handle.read(132)
    if len(head) >= 8 and (head[128:] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")):
        read_header(path)  # raises the specific problem
    raise RadiographError(path, "not a DICOM file (no DICM marker and no DICOM header at the start)")


def _format_name(path: Path, kind: str) -> str:
    if kind == "dicom":
        return "dicom"
    if kind == "pillow":
        return _pillow_name(path).lower()
    return ITK_SUFFIXES[_suffix(path)].lower()


def _pillow_name(path: Path) -> str:
    """PNG, JPEG, TIFF or BMP: by content when it says, else by the name."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        head = b""
    by_content = next((name for magic, name in PILLOW_MAGIC.items() if head.startswith(magic)), None)
    return by_content or PILLOW_SUFFIXES.get(_suffix(path), "image")


def _open_pillow(path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_dimensions has the last word
            return Image.open(path)
    except Image.DecompressionBombError:
        with open(path, "rb") as handle:
            size = _png_size(handle.read(24))
        limit = f"the limit is {MAX_DECODED_BYTES / 2**20:.0f} MiB of decoded pixels"
        raise RadiographError(path, f"image too large: {size} pixels; {limit}" if size else "image too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise RadiographError(path, f"unreadable {_pillow_name(path)} image ({error})") from None


def _read_pillow(path: Path, max_size: int | None) -> tuple[np.ndarray, dict]:
    """Decoded at the file's own depth (Pillow: 1 byte a pixel for 8-bit grey, 2 for 16-bit), JPEGs already
    shrunk by the decoder; then averaged down one strip at a time, so the float image is only ever small."""
    with _open_pillow(path) as img:
        meta = {"Rows": img.height, "Columns": img.width}
        try:
            if max_size and img.format == "JPEG":
                img.draft("L", (max_size, max_size))  # the JPEG decoder shrinks by 1/2..1/8 for free
            mode, (width, height) = img.mode, img.size
            dtype, bits = _PILLOW_ARRAYS.get(mode, (np.uint8, 8))
            # before decoding: a PNG bomb never reaches memory
            check_dimensions(meta["Rows"], meta["Columns"], path, _pillow_pixel_bytes(mode) * width * height)
            img.load()

            def read_rows(start: int, stop: int) -> np.ndarray:
                strip = img.crop((0, start, width, stop))
                return np.asarray(strip if mode in _PILLOW_ARRAYS else strip.convert("L"), dtype=dtype)

            array = block_mean_rows(read_rows, (height, width), dtype, shrink_factors((height, width), max_size))
        except RadiographError:
            raise
        except Exception as error:
            raise RadiographError(path, f"unreadable {_pillow_name(path)} image ({error})") from None
    meta["BitsStored"] = bits
    check_content(array, path)
    image = array.astype(np.float32) / 255.0 if bits == 8 else to_unit_range(array)
    return image, meta


# Pillow modes read as they are (dtype, bits); every other mode is converted to 8-bit grey ("L") strip by strip
_PILLOW_ARRAYS = {"L": (np.uint8, 8), "I;16": (np.uint16, 16), "I;16L": (np.uint16, 16), "I;16B": (np.uint16, 16),
                  "I;16N": (np.uint16, 16), "I": (np.int32, 32), "F": (np.float32, 32)}  # fmt: skip


def _pillow_pixel_bytes(mode: str) -> int:
    """Bytes a pixel of `mode` takes in Pillow's memory: 1 for 1/L/P, 2 for I;16*, 4 for the rest."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def _read_itk(path: Path, max_size: int | None) -> tuple[np.ndarray, dict]:
    import itk  # slow to import; only ITK formats need it

    name = ITK_SUFFIXES[_suffix(path)]
    try:
        itk_image = itk.imread(str(path))
        array = itk.array_from_image(itk_image)
        spacing = [float(s) for s in itk_image.GetSpacing()]
        components = itk_image.GetNumberOfComponentsPerPixel()
    except Exception as error:
        raise RadiographError(path, f"unreadable {name} file ({str(error).strip().splitlines()[-1]})") from None
    if components > 1:
        array = array.mean(axis=-1)
    if array.ndim == 3:
        array = array[array.shape[0] // 2]  # ITK arrays are (slice, row, column): take the middle slice
    if array.ndim != 2:
        raise RadiographError(path, f"{name} file has {array.ndim} dimensions; expected a 2-D or 3-D image")
    if array.size == 0:
        raise RadiographError(path, f"zero-size image ({array.shape[0]} x {array.shape[1]})")
    meta = {"Rows": int(array.shape[0]), "Columns": int(array.shape[1]), "PixelSpacing": [spacing[1], spacing[0]]}
    check_dimensions(array.shape[0], array.shape[1], path, array.nbytes)
    array = block_mean(np.ascontiguousarray(array), shrink_factors(array.shape, max_size))
    check_content(array, path)
    return to_unit_range(array.astype(np.float32)), meta


def _png_size(head: bytes) -> str:
    """'W x H' from a PNG's IHDR (the first 24 bytes), '' for anything else."""
    if len(head) < 24 or not head.startswith(b"\x89PNG"):
        return ""
    return f"{int.from_bytes(head[20:24], 'big')} x {int.from_bytes(head[16:20], 'big')}"
