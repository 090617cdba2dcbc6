"""Writing DICOM: new files from arrays and relabelled copies that keep the pixel data untouched."""

import numpy as np
import pydicom
import pytest

from radregion.dicomwrite import array_to_dicom, copy_with_body_part
from radregion.io import read_radiograph


def test_array_to_dicom_is_a_valid_cr_file(tmp_path):
    image = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 3) % 4096
    path = array_to_dicom(image, tmp_path / "sub" / "new.dcm", bits_stored=12, body_part="KNEE",
                          study_description="XR KNEE", series_description="AP", patient_id="P1",
                          ViewPosition="AP")  # fmt: skip
    ds = pydicom.dcmread(path)  # no force: a proper Part 10 file with preamble and file meta
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1" == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    described = (ds.BodyPartExamined, ds.StudyDescription, ds.SeriesDescription, ds.PatientID)
    assert described == ("KNEE", "XR KNEE", "AP", "P1")
    assert (ds.BitsStored, ds.HighBit, ds.ViewPosition) == (12, 11, "AP")
    np.testing.assert_array_equal(ds.pixel_array, image)
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left behind
    second = pydicom.dcmread(array_to_dicom(image, tmp_path / "b.dcm"))
    assert len({ds.SOPInstanceUID, second.SOPInstanceUID, ds.StudyInstanceUID, second.StudyInstanceUID}) == 4


def test_array_to_dicom_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2-D uint8 or uint16"):
        array_to_dicom(np.zeros((4, 4), np.float32), tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="does not fit in 8 stored bits"):
        array_to_dicom(np.full((4, 4), 300, np.uint16), tmp_path / "x.dcm", bits_stored=8)
    with pytest.raises(ValueError, match="unknown DICOM keyword 'BodyPart'"):
        array_to_dicom(np.zeros((4, 4), np.uint8), tmp_path / "x.dcm", BodyPart="KNEE")
    assert not list(tmp_path.iterdir())


def test_copy_with_body_part_keeps_compressed_pixels(tmp_path, real_dicoms):
    source = next(p for p in real_dicoms if p.name == "RG3_J2KI.dcm")
    before = source.read_bytes()
    copy = copy_with_body_part(source, tmp_path / "copy.dcm", "ANKLE", study_description="XR ANKLE")
    assert source.read_bytes() == before
    original, relabelled = pydicom.dcmread(source), pydicom.dcmread(copy)
    assert relabelled.BodyPartExamined == "ANKLE" and relabelled.StudyDescription == "XR ANKLE"
    assert relabelled.SOPInstanceUID != original.SOPInstanceUID
    assert relabelled.file_meta.MediaStorageSOPInstanceUID == relabelled.SOPInstanceUID
    assert relabelled.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert relabelled.PixelData == original.PixelData
    assert relabelled.StudyInstanceUID == original.StudyInstanceUID
    np.testing.assert_array_equal(read_radiograph(copy, max_size=96).image, read_radiograph(source, max_size=96).image)
    with pytest.raises(ValueError, match="never overwrites its source"):
        copy_with_body_part(copy, copy, "KNEE")
