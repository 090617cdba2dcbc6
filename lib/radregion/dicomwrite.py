"""Write radiograph DICOM files: new ones from arrays, and relabelled copies of existing ones."""

import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from radregion.atomic import atomic_write

SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
    "XA": "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image Storage
    "RF": "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic Image Storage
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def array_to_dicom(
    image,
    path,
    *,
    photometric="MONOCHROME2",
    bits_stored=None,
    modality="CR",
    body_part=None,
    study_description=None,
    series_description=None,
    patient_id="ANON",
    **extra_header,
) -> Path:
    """Write a 2-D uint8/uint16 array as a single-frame DICOM image (explicit VR little endian, atomic).

    `extra_header` sets further attributes by pydicom keyword (e.g. WindowCenter=2048, ViewPosition="PA").
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"array_to_dicom needs a 2-D uint8 or uint16 array, got {image.dtype} {image.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    bits_allocated = image.dtype.itemsize * 8
    bits_stored = bits_allocated if bits_stored is None else int(bits_stored)
    if not 1 <= bits_stored <= bits_allocated:
        raise ValueError(f"bits_stored must be 1..{bits_allocated} for {image.dtype}, got {bits_stored}")
    if image.size and int(image.max()) >= 2**bits_stored:
        raise ValueError(f"pixel value {int(image.max())} does not fit in {bits_stored} stored bits")

    sop_class = SOP_CLASSES.get(modality, SECONDARY_CAPTURE)
    sop_instance = generate_uid()
    now = datetime.datetime.now()
    ds = _new_dataset(sop_class, sop_instance)
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = sop_instance
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "RadRegion"
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if study_description is not None:
        ds.StudyDescription = study_description
    if series_description is not None:
        ds.SeriesDescription = series_description
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<")).tobytes()
    for keyword, value in extra_header.items():
        if pydicom.datadict.tag_for_keyword(keyword) is None:
            raise ValueError(f"unknown DICOM keyword {keyword!r}")
        setattr(ds, keyword, value)
    return _save_atomic(ds, path)


def copy_with_body_part(src, dst, body_part, *, study_description=None) -> Path:
    """Copy `src` to `dst` with BodyPartExamined set and a new SOPInstanceUID; pixel data kept as is."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: copy_with_body_part never overwrites its source")
    ds = pydicom.dcmread(src, force=True)
    meta = ds.file_meta if hasattr(ds, "file_meta") else FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if ds.is_implicit_VR else ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.BodyPartExamined = body_part
    if study_description is not None:
        ds.StudyDescription = study_description
    if not getattr(ds, "preamble", None):
        ds.preamble = b"\x00" * 128
    return _save_atomic(ds, dst)


DERIVED_SERIES_OFFSET = 1000  # a derived series is numbered 1000 above its original (1 -> 1001)


def mark_derived(ds, *, sop_uid, series_uid, source_sop, description, series_prefix="DERIVED"):
    """Make `ds` (a relabelled copy, changed in place) say what it is: ImageType DERIVED, a new instance in a
    new series with its own series number and description, what was changed (DerivationDescription) and the
    instance it was made from (SourceImageSequence). Pixel data untouched."""
    image_type = [str(v) for v in (ds.get("ImageType") or [])]
    ds.ImageType = ["DERIVED", image_type[1] if len(image_type) > 1 else "PRIMARY", *image_type[2:]]
    source = pydicom.Dataset()
    source.ReferencedSOPClassUID = ds.SOPClassUID
    source.ReferencedSOPInstanceUID = source_sop
    ds.SourceImageSequence = [source]
    ds.SOPInstanceUID = sop_uid
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    try:
        number = int(ds.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    ds.SeriesNumber = number + DERIVED_SERIES_OFFSET
    original = str(ds.get("SeriesDescription", "") or "")
    ds.SeriesDescription = f"{series_prefix} {original}".strip()[:64]
    ds.DerivationDescription = str(description)[:1024]
    return ds


def _new_dataset(sop_class: str, sop_instance: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    return ds


def _save_atomic(ds, path) -> Path:
    with atomic_write(path) as handle:
        ds.save_as(handle, write_like_original=False)
    return Path(path)
