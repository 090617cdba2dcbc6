"""`radregion inspect`: metadata, archive label, size, crop box; bad files get one line and the rest go on."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

import dicom_factory as factory
from radregion.cli import main


def test_inspect_text_and_png(tmp_path, real_dicoms, capsys):
    chest = next(p for p in real_dicoms if p.name == "RG1_J2KI.dcm")
    bad = factory.multiframe_cine(tmp_path / "cine.dcm")
    code = main(["inspect", str(bad), str(chest), "--size", "64", "--save-png", str(tmp_path / "png")])
    out, err = capsys.readouterr()
    assert code == 1
    cause = "multi-frame cine (3 frames, Modality XA): expected one radiograph"
    assert err.strip().splitlines() == [f"error: {bad}: {cause}"]
    assert "BodyPartExamined          CHEST" in out
    assert "archive label             Chest (BodyPartExamined: 'CHEST')" in out
    assert "image size                1955 rows x 1841 columns" in out
    assert "cleaned                   64 x 64" in out
    saved = np.asarray(Image.open(tmp_path / "png" / "RG1_J2KI.png"))
    assert saved.shape == (64, 64) and saved.dtype == np.uint8 and saved.max() == 255


def test_inspect_json(tmp_path, real_dicoms, capsys):
    tibia = next(p for p in real_dicoms if p.name == "RG3_J2KR.dcm")
    described = factory.write(tmp_path / "knee.dcm", study_description="XR KNEE 2 VIEWS LEFT")
    code = main(["inspect", str(tibia), str(described), str(tmp_path / "missing.dcm"), "--json", "--size", "32"])
    records = json.loads(capsys.readouterr().out)
    assert code == 1 and [r["path"] for r in records] == [str(tibia), str(described), str(tmp_path / "missing.dcm")]
    tibia_record, knee_record, missing = records
    assert tibia_record["image_size"] == [1760, 1760] and tibia_record["metadata"]["BitsStored"] == 10
    top, bottom, left, right = tibia_record["crop_box"]
    assert 0.15 * 1760 < left and right < 0.85 * 1760  # collimator shutters excluded
    assert knee_record["archive_label"]["region"] == "Knee"
    assert knee_record["archive_label"]["field"] == "StudyDescription"
    assert missing == {"path": str(tmp_path / "missing.dcm"), "error": "file not found"}


def test_inspect_console_command_all_good(tmp_path):
    image = factory.write(tmp_path / "IM0001", body_part="CHEST")
    result = subprocess.run(
        [sys.executable, "-m", "radregion.cli", "inspect", str(image), "--size", "32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert str(image) in result.stdout and "Chest" in result.stdout
