"""`radregion apply-corrections`: corrected labels CSV, and relabelled DICOM copies that leave originals alone."""

import csv
import hashlib
import shutil

import pydicom
import pytest

from radregion.cli import main
from radregion.datasets import read_labels_csv
from radregion.taxonomy import body_part_term


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrections_update_a_labels_csv_and_keep_its_columns(unifesp, tmp_path, capsys):
    rows = read_csv(unifesp / "labels.csv")[:6]
    labels = tmp_path / "data" / "labels.csv"
    labels.parent.mkdir()
    for row in rows:  # the images next to the CSV, with relative paths, as in the shared data
        (labels.parent / "images").mkdir(exist_ok=True)
        shutil.copy(unifesp / row["image"], labels.parent / row["image"])
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:5])
    new_label = "Knee" if rows[0]["labels"] != "Knee" else "Chest"
    corrections = tmp_path / "audit" / "corrections.csv"
    corrections.parent.mkdir()
    corrections.write_text(
        "image,labels,PatientID\n"
        f"{labels.parent / rows[0]['image']},{new_label},{rows[0]['PatientID']}\n"
        f"{labels.parent / rows[5]['image']},Hand|wrist,{rows[5]['PatientID']}\n"
    )
    output = tmp_path / "out" / "corrected.csv"
    assert (
        main(["apply-corrections", "--corrections", str(corrections), "--labels", str(labels), "--output", str(output)])
        == 0
    )
    assert "6 images, 1 labels changed, 1 added" in capsys.readouterr().out

    written = read_csv(output)
    assert list(written[0])[:3] == ["image", "labels", "PatientID"] and "StudyInstanceUID" in written[0]
    assert [r["labels"] for r in written] == [new_label] + [r["labels"] for r in rows[1:5]] + ["Hand|Wrist"]
    assert written[1]["StudyInstanceUID"] == rows[1]["StudyInstanceUID"]  # other columns kept
    items = read_labels_csv(output)  # paths re-rooted: the output lives in another folder
    assert [it.path.resolve() for it in items] == [(labels.parent / r["image"]).resolve() for r in rows]
    assert read_csv(labels)[0]["labels"] == rows[0]["labels"]  # the input CSV is not touched


def test_drop_leaves_the_listed_images_out_and_keeps_the_rest(unifesp, tmp_path, capsys):
    rows = read_csv(unifesp / "labels.csv")[:6]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(dict(row, image=str(unifesp / row["image"])) for row in rows[:5])
    corrections = tmp_path / "corrections.csv"
    corrections.write_text(
        "image,labels\n"
        f"{unifesp / rows[1]['image']},Knee\n"
        f"{unifesp / rows[3]['image']},Chest\n"
        f"{unifesp / rows[5]['image']},Chest\n"  # not in the labels CSV: not added
    )
    output = tmp_path / "kept.csv"
    args = ["apply-corrections", "--corrections", str(corrections), "--labels", str(labels), "--output", str(output)]
    assert main(args + ["--drop"]) == 0
    assert "3 images, 2 dropped (1 listed images not in" in capsys.readouterr().out
    written = read_csv(output)
    assert [r["labels"] for r in written] == [rows[i]["labels"] for i in (0, 2, 4)]  # kept rows unchanged
    assert [r["StudyInstanceUID"] for r in written] == [rows[i]["StudyInstanceUID"] for i in (0, 2, 4)]
    assert [it.path for it in read_labels_csv(output)] == [(unifesp / rows[i]["image"]).resolve() for i in (0, 2, 4)]

    output.unlink()
    assert main(args[:3] + ["--output", str(output), "--drop"]) == 2  # nothing to drop from
    assert "--drop needs --labels" in capsys.readouterr().err and not output.exists()


def test_dicom_copies_get_body_part_and_originals_stay_unchanged(real_dicoms, tmp_path, capsys):
    before = {path: sha256(path) for path in real_dicoms}
    corrections = tmp_path / "corrections.csv"
    corrections.write_text(
        "image,labels\n" + "".join(f"{path},Lower Leg\n" for path in real_dicoms[1:]) + f"{real_dicoms[0]},Chest\n"
    )
    out = tmp_path / "relabelled"
    assert (
        main(
            [
                "apply-corrections",
                "--corrections",
                str(corrections),
                "--output",
                str(tmp_path / "fixed.csv"),
                "--dicom-out",
                str(out),
            ]
        )
        == 0
    )
    assert "3 relabelled DICOM copies" in capsys.readouterr().out
    assert {path: sha256(path) for path in real_dicoms} == before
    for path in real_dicoms:
        original, copy = pydicom.dcmread(path), pydicom.dcmread(out / path.name)
        assert copy.BodyPartExamined == body_part_term("Chest" if path.name.startswith("RG1") else "Lower Leg")
        assert copy.SOPInstanceUID != original.SOPInstanceUID
        assert copy.file_meta.MediaStorageSOPInstanceUID == copy.SOPInstanceUID
        assert copy.PixelData == original.PixelData and copy.PatientID == original.PatientID
    assert [it.labels for it in read_labels_csv(tmp_path / "fixed.csv")] == [("Lower Leg",), ("Lower Leg",), ("Chest",)]


def test_dicom_out_never_overwrites_the_original(real_dicoms, tmp_path, capsys):
    source = tmp_path / "pacs" / real_dicoms[0].name
    source.parent.mkdir()
    shutil.copy(real_dicoms[0], source)
    before = sha256(source)
    corrections = tmp_path / "corrections.csv"
    corrections.write_text(f"image,labels\n{source},Knee\n")
    assert (
        main(
            [
                "apply-corrections",
                "--corrections",
                str(corrections),
                "--output",
                str(tmp_path / "x.csv"),
                "--dicom-out",
                str(source.parent),
            ]
        )
        == 2
    )
    assert "overwrite the original" in capsys.readouterr().err
    assert sha256(source) == before


@pytest.mark.parametrize(
    "content, problem",
    [
        ("image,labels\n{image},Chset\n", "Chset"),
        ("image,region\n{image},Chest\n", "missing column"),
        ("image,labels\n{image},\n", "empty labels"),
    ],
)
def test_bad_corrections_are_clear_errors(unifesp, tmp_path, capsys, content, problem):
    image = next((unifesp / "images").glob("*.png"))
    corrections = tmp_path / "corrections.csv"
    corrections.write_text(content.format(image=image))
    output = tmp_path / "out.csv"
    assert main(["apply-corrections", "--corrections", str(corrections), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert str(corrections) in err and problem in err and "Traceback" not in err
    assert not output.exists()
