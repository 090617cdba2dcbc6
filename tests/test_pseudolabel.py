"""Pseudo-labels (`radregion.pseudolabel`, `radregion pseudo-label`): which predictions become labels, and the
labels CSV the command writes from a real `radregion predict` run on unlabelled shared radiographs."""

import csv
import math
from pathlib import Path

import pytest

from radregion.cli import main
from radregion.datasets import read_labels_csv, write_labels_csv
from radregion.pseudolabel import confident, pseudo_label_rows


def test_confident_keeps_sure_in_domain_read_predictions():
    keep = confident([0.95, 0.9, 0.89, math.nan, 0.99], [False, False, False, False, True], 0.9)
    assert keep.tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, math.nan])
def test_confident_refuses_a_threshold_outside_0_1(bad):
    with pytest.raises(ValueError, match="minimum confidence"):
        confident([0.5], [False], bad)


def _prediction(path, region, confidence, ood=False, error="", score=math.nan):
    return {
        "path": path,
        "region": region,
        "confidence": confidence,
        "ood_score": score,
        "out_of_domain": ood,
        "error": error,
        "row": 2,
    }


def test_rows_skip_labelled_unsure_out_of_domain_and_unread_images():
    predictions = [
        _prediction("/a.png", "Chest", 0.99),
        _prediction("/b.png", "Knee", 0.95),
        _prediction("/c.png", "Hand", 0.50),
        _prediction("/d.png", "Skull", 0.99, ood=True),
        _prediction("/e.png", "", math.nan, ood=None, error="not an image"),
        _prediction("/f.png", "Chest", 0.97),
    ]
    rows, counts = pseudo_label_rows(predictions, 0.9, labelled=["/b.png"], source="from p.csv")
    assert [(r["image"], r["labels"]) for r in rows] == [("/a.png", "Chest"), ("/f.png", "Chest")]
    assert rows[0]["label_source"] == "pseudo-label from p.csv (confidence 0.9900)" and rows[0]["PatientID"] == ""
    assert counts == {
        "predicted": 5,
        "kept": 2,
        "already_labelled": 1,
        "out_of_domain": 1,
        "near_out_of_domain": 0,
        "unsure": 1,
        "unread": 1,
        "per_region": {"Chest": 2},
    }


def test_surest_out_of_domain_images_become_others_when_asked():
    predictions = [
        _prediction("/a.png", "Chest", 0.99, score=-1.0),
        _prediction("/b.png", "Pelvis", 0.50, ood=True, score=3.5),
        _prediction("/c.png", "Sinus", 0.40, ood=True, score=2.9),
        _prediction("/d.png", "Pelvis", 0.45, ood=True, score=4.0),
    ]
    rows, counts = pseudo_label_rows(predictions, 0.9, labelled=["/d.png"], out_of_domain_above=3.0)
    assert [(r["image"], r["labels"]) for r in rows] == [("/a.png", "Chest"), ("/b.png", "Others")]
    assert rows[1]["label_source"] == "pseudo-label (out-of-domain score 3.5000)"
    assert counts["out_of_domain"] == 1 and counts["per_region"] == {"Chest": 1, "Others": 1}
    rows, counts = pseudo_label_rows(predictions, 0.9, out_of_domain_label="Other")
    assert [r["labels"] for r in rows] == ["Chest"] and counts["out_of_domain"] == 3  # not asked: no Others


def test_a_margin_under_the_threshold_keeps_near_out_of_domain_images_unlabelled():
    predictions = [
        _prediction("/a.png", "Chest", 0.99, score=-2.5),
        _prediction("/b.png", "Abdomen", 0.99, score=-0.4),  # not flagged, but close to the threshold (0)
        _prediction("/c.png", "Knee", 0.95, score=math.nan),  # no score: not known to be clear of it
        _prediction("/d.png", "Hand", 0.50, score=-3.0),
    ]
    rows, counts = pseudo_label_rows(predictions, 0.9, in_domain_below=-1.0)
    assert [(r["image"], r["labels"]) for r in rows] == [("/a.png", "Chest")]
    assert counts["near_out_of_domain"] == 2 and counts["unsure"] == 1 and counts["kept"] == 1
    rows, counts = pseudo_label_rows(predictions, 0.9)
    assert len(rows) == 3 and counts["near_out_of_domain"] == 0


@pytest.fixture(scope="module")
def unlabelled_predictions(tiny_bundle, unifesp, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unlabelled")
    for png in sorted((unifesp / "unlabelled").glob("*.png"))[:12]:
        (folder / png.name).symlink_to(png)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = folder.parent / "predictions.csv"
    assert main(["predict", "--model", str(tiny_bundle), "--no-progress", "-o", str(out), str(folder)]) == 0
    return out


def test_pseudo_label_command_writes_labels_then_confident_predictions(
    unlabelled_predictions, unifesp, tmp_path, capsys
):
    labelled = read_labels_csv(unifesp / "labels.csv")[:5]
    labels_csv = write_labels_csv(labelled, tmp_path / "labels.csv")
    predicted = list(csv.DictReader(unlabelled_predictions.open()))
    confidences = sorted(float(r["confidence"]) for r in predicted if r["region"] and r["out_of_domain"] == "false")
    threshold = confidences[len(confidences) // 2]  # the surer half of the in-domain predictions
    out = tmp_path / "with-pseudo.csv"
    code = main(
        [
            "pseudo-label",
            str(unlabelled_predictions),
            "--labels",
            str(labels_csv),
            "--min-confidence",
            str(threshold),
            "-o",
            str(out),
        ]  # fmt: skip
    )
    assert code == 0
    items = read_labels_csv(out)
    sources = [r["label_source"] for r in csv.DictReader(out.open())]
    assert [it.path for it in items[:5]] == [it.path.resolve() for it in labelled]
    assert [it.labels for it in items[:5]] == [it.labels for it in labelled]
    assert sources[:5] == ["labels.csv"] * 5 and all(s.startswith("pseudo-label from") for s in sources[5:])
    expected = {
        str(Path(r["path"]).resolve()): r["region"]
        for r in predicted
        if r["region"] and r["out_of_domain"] == "false" and float(r["confidence"]) >= threshold
    }
    assert 0 < len(expected) < len(predicted)
    assert {str(it.path): it.label for it in items[5:]} == expected
    assert all(it.patient_id is None for it in items[5:])  # an unlabelled image is its own patient group
    err = capsys.readouterr().err
    assert f"{len(expected)} of 12 predicted images pseudo-labelled" in err and "1 unread" in err

    scores = {str(Path(r["path"]).resolve()): float(r["ood_score"]) for r in predicted if r["region"]}
    margin = sorted(scores[path] for path in expected)[len(expected) // 2]  # the half clearest of the threshold
    args = ["pseudo-label", str(unlabelled_predictions), "--min-confidence", str(threshold), "-o", str(out)]
    assert main(args + ["--in-domain-below", str(margin)]) == 0
    clear = {path: region for path, region in expected.items() if scores[path] < margin}
    assert 0 < len(clear) < len(expected)
    assert {str(it.path): it.label for it in read_labels_csv(out)} == clear
    assert f"{len(expected) - len(clear)} near out of domain" in capsys.readouterr().err


def _write_csv(path, columns, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def test_pseudo_label_errors_name_the_file_and_the_problem(unlabelled_predictions, tmp_path, capsys):
    out = tmp_path / "out.csv"
    not_predictions = tmp_path / "labels.csv"
    not_predictions.write_text("image,labels\na.png,Chest\n")
    assert main(["pseudo-label", str(not_predictions), "-o", str(out)]) == 2
    assert f"{not_predictions}: not a `radregion predict` CSV: missing column(s) path" in capsys.readouterr().err

    moved = tmp_path / "moved.csv"
    with unlabelled_predictions.open() as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames, list(reader)
    first = next(i for i, row in enumerate(rows) if not row["error"])
    rows[first]["path"] = "/nowhere/x.png"
    _write_csv(moved, columns, rows)
    assert main(["pseudo-label", str(moved), "-o", str(out)]) == 2
    assert f"row {first + 2}: image not found: /nowhere/x.png" in capsys.readouterr().err

    rows[first].update(path=rows[first + 1]["path"], confidence="high")
    _write_csv(moved, columns, rows)
    assert main(["pseudo-label", str(moved), "-o", str(out)]) == 2
    assert f"{moved}: row {first + 2}: confidence 'high' is not a number" in capsys.readouterr().err

    assert main(["pseudo-label", str(unlabelled_predictions), "--min-confidence", "1.5", "-o", str(out)]) == 2
    assert "minimum confidence must be in (0, 1]" in capsys.readouterr().err
    assert main(["pseudo-label", str(unlabelled_predictions), "--out-of-domain-above", "nan", "-o", str(out)]) == 2
    assert "--out-of-domain-above must be a number, not nan" in capsys.readouterr().err
    assert main(["pseudo-label", str(unlabelled_predictions), "--in-domain-below", "inf", "-o", str(out)]) == 2
    assert "--in-domain-below must be a number, not inf" in capsys.readouterr().err
    assert not out.exists()
