"""Labels CSV, patient-grouped splits and folds, few-label sampling, on the real UNIFESP labels."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radregion.datasets import (
    LabelledImage,
    patient_folds,
    patient_split,
    read_labels_csv,
    sample_fraction,
    sample_per_class,
    scan_labelled_folder,
    write_labels_csv,
)
from radregion.errors import RadiographError
from radregion.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def items(unifesp):
    return read_labels_csv(unifesp / "labels.csv", taxonomy="unifesp22")


def test_read_real_labels(items, unifesp):
    assert len(items) == 1364
    assert len({it.patient_id for it in items}) == 617
    assert {lab for it in items for lab in it.labels} == set(load_taxonomy().names)
    assert all(it.path.is_file() and it.path.parent == unifesp / "images" for it in items)
    multi = [it for it in items if len(it.labels) > 1]
    assert len(multi) == 99 and any(it.labels == ("Hand", "Wrist") for it in multi)
    assert multi[0].label == multi[0].labels[0]


def _sides_by_patient(train, test):
    return {it.patient_id for it in train}, {it.patient_id for it in test}


def test_patient_split_keeps_patients_on_one_side(items):
    train, test = patient_split(items, test_fraction=0.2, seed=0)
    assert len(train) + len(test) == len(items)
    assert {it.path for it in train}.isdisjoint({it.path for it in test})
    train_patients, test_patients = _sides_by_patient(train, test)
    assert train_patients.isdisjoint(test_patients)
    assert train_patients | test_patients == {it.patient_id for it in items}
    assert 0.18 < len(test) / len(items) < 0.22


def test_patient_split_is_stratified(items):
    train, test = patient_split(items, test_fraction=0.2, seed=0)
    total, in_test = Counter(it.label for it in items), Counter(it.label for it in test)
    for label, n in total.items():
        if n >= 40:
            assert 0.12 <= in_test[label] / n <= 0.28, label
    assert in_test["Thigh"] >= 1  # 3 images of 3 patients: one goes to test
    assert set(Counter(it.label for it in train)) == set(total)  # every class can be trained


def test_patient_split_is_seeded(items):
    first = patient_split(items, 0.2, seed=3)
    assert patient_split(items, 0.2, seed=3) == first
    assert patient_split(list(reversed(items)), 0.2, seed=3)[1] == list(reversed(first[1]))  # order-independent
    assert {it.path for it in patient_split(items, 0.2, seed=4)[1]} != {it.path for it in first[1]}


def test_items_without_patient_are_their_own_group(tmp_path):
    items = [LabelledImage(tmp_path / f"{i}.png", ("Knee" if i % 2 else "Hand",), None) for i in range(20)]
    train, test = patient_split(items, 0.25, seed=0)
    assert len(test) == 5 and Counter(it.label for it in test) in (Counter(Knee=3, Hand=2), Counter(Knee=2, Hand=3))
    with pytest.raises(ValueError, match="test_fraction"):
        patient_split(items, 1.0)


def test_patient_folds(items):
    folds = patient_folds(items, k=5, seed=0)
    assert folds.shape == (len(items),) and set(folds) == set(range(5))
    by_patient = {}
    for it, fold in zip(items, folds):
        assert by_patient.setdefault(it.patient_id, fold) == fold  # a patient is in exactly one fold
    sizes = np.bincount(folds)
    assert sizes.min() > 0.8 * len(items) / 5
    assert np.array_equal(patient_folds(items, k=5, seed=0), folds)
    assert not np.array_equal(patient_folds(items, k=5, seed=1), folds)
    with pytest.raises(ValueError, match="at least k patients"):
        patient_folds(items[:3], k=5)


def test_sample_per_class(items):
    counts = Counter(it.label for it in items)
    sample = sample_per_class(items, 5, seed=0)
    got = Counter(it.label for it in sample)
    assert got == {label: min(5, n) for label, n in counts.items()}
    assert got["Clavicles"] == 4 and got["Chest"] == 5
    assert sample_per_class(items, 5, seed=0) == sample
    assert sample_per_class(items, 5, seed=1) != sample
    assert set(sample) <= set(sample_per_class(items, 10, seed=0))  # nested: more labels add, never swap
    assert sample_per_class(list(reversed(items)), 5, seed=0) == list(reversed(sample))


def test_sample_fraction(items):
    counts = Counter(it.label for it in items)
    sample = sample_fraction(items, 0.1, seed=0)
    got = Counter(it.label for it in sample)
    assert set(got) == set(counts)  # at least one per class
    assert got["Chest"] == round(0.1 * counts["Chest"]) and got["Thigh"] == 1
    assert sample_fraction(items, 0.1, seed=0) == sample and sample_fraction(items, 0.1, seed=2) != sample
    assert set(sample) <= set(sample_fraction(items, 0.3, seed=0))
    with pytest.raises(ValueError, match="fraction"):
        sample_fraction(items, 0)


def _csv(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    return path


BAD_CSV = [
    ("img,labels\na.png,Knee\n", "missing column\\(s\\) image \\(found: img, labels\\)"),
    ("image,PatientID\na.png,1\n", "missing column\\(s\\) labels"),
    ("image,labels\na.png,Knee\nb.png,\n", "row 3 \\(b.png\\): empty labels"),
    ("image,labels\na.png,Knee\nb.png, | \n", "row 3 \\(b.png\\): empty labels"),
    ("image,labels\na.png,Knee|Kne\n", "row 2 \\(a.png\\): unknown region\\(s\\) Kne \\(known: Abdomen"),
    ("image,labels\n,Knee\n", "row 2: empty image path"),
    ("image,labels\na.png,Knee\na.png,Hand\n", "row 3: image a.png already listed in row 2"),
    ("image,labels\n", "no rows below the header"),
    (
        "image,labels\na.png,Knee\nmissing.png,Knee\nother.png,Hand\n",
        "row 3: image not found: .*missing.png \\(and 1 more",
    ),
]


@pytest.mark.parametrize("text, message", BAD_CSV)
def test_bad_csv_names_file_and_row(tmp_path, text, message):
    _png(tmp_path / "a.png")
    path = _csv(tmp_path, text)
    with pytest.raises(RadiographError, match=message) as error:
        read_labels_csv(path, taxonomy="unifesp22")
    assert error.value.path == str(path)


def test_missing_csv(tmp_path):
    with pytest.raises(RadiographError, match="cannot read labels CSV"):
        read_labels_csv(tmp_path / "nope.csv")


def test_csv_options(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    path = _csv(tmp_path, "\ufeffimage;labels;PatientID\na.png;knee | wrist;\n")  # Excel: BOM and semicolons
    [item] = read_labels_csv(path, images_root=tmp_path / "imgs", taxonomy="unifesp22")
    assert item == LabelledImage(tmp_path / "imgs" / "a.png", ("Knee", "Wrist"), None)
    [raw] = read_labels_csv(path, images_root=tmp_path / "imgs")  # no taxonomy: labels as written
    assert raw.labels == ("knee", "wrist")
    assert read_labels_csv(_csv(tmp_path, "image,labels\ngone.png,Knee\n"), check_files=False)[0].label == "Knee"


def test_write_and_read_back(tmp_path, items):
    path = write_labels_csv(items[:50], tmp_path / "copy" / "labels.csv")
    again = read_labels_csv(path, check_files=False)
    assert [(it.labels, it.patient_id, it.path.name) for it in again] == [
        (it.labels, it.patient_id, it.path.name) for it in items[:50]
    ]
    assert list(path.parent.iterdir()) == [path]  # no temp file left


def test_write_relative_paths_and_extra_columns(tmp_path):
    image = _png(tmp_path / "images" / "x.png")
    rows = [
        {"image": image, "labels": ["Hand", "Wrist"], "PatientID": "7", "annotator": "rk"},
        LabelledImage(Path("images/x2.png"), ("Knee",), None),
        {"image": "images/x3.png", "labels": "Ankle|Feet"},
    ]  # a row as read from a labels CSV
    path = write_labels_csv(rows, tmp_path / "labels.csv")
    lines = path.read_text().splitlines()
    assert lines == [
        "image,labels,PatientID,annotator",
        "images/x.png,Hand|Wrist,7,rk",
        "images/x2.png,Knee,,",
        "images/x3.png,Ankle|Feet,,",
    ]


def test_write_is_atomic(tmp_path):
    path = _csv(tmp_path, "image,labels\nold.png,Knee\n")
    with pytest.raises(ValueError, match="labels must be non-empty"):
        write_labels_csv([LabelledImage(Path("a.png"), ("Knee",)), {"image": "b.png", "labels": "Hand||Wrist"}], path)
    with pytest.raises(ValueError, match="labels must be non-empty"):
        write_labels_csv([{"image": "b.png", "labels": []}], path)
    assert path.read_text() == "image,labels\nold.png,Knee\n"
    assert list(tmp_path.iterdir()) == [path]


def test_scan_labelled_folder(tmp_path):
    _png(tmp_path / "Knee" / "a.png")
    _png(tmp_path / "knee" / "deeper" / "b.png")
    _png(tmp_path / "Hand" / "c.png")
    _png(tmp_path / "Kne" / "d.png")
    _png(tmp_path / "loose.png")
    items, errors = scan_labelled_folder(tmp_path, taxonomy="unifesp22")
    assert sorted((it.path.name, it.label) for it in items) == [("a.png", "Knee"), ("b.png", "Knee"), ("c.png", "Hand")]
    problems = sorted(str(e) for e in errors)
    assert any("d.png: folder 'Kne': unknown region(s) Kne (known: Abdomen" in p for p in problems)
    assert any("loose.png: not inside a class folder" in p for p in problems)
