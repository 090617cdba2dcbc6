"""The command line refuses what it cannot mean, and says what went wrong on screen (issue 15).

Unknown region names (labels CSV rows, --exclude-regions) fail with the row and the known names; `split` without
patient ids refuses unless --by-image; `predict` and `evaluate` print the reasons of unreadable files; "nothing to
do" is exit 0 with a message.
"""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from radregion.bundle import load_bundle
from radregion.cli import main

REPO = Path(__file__).resolve().parents[1]


def _labels_csv(unifesp, path, rows, patient=True):
    """A labels CSV over real UNIFESP images: `rows` are label strings, one image each (absolute paths)."""
    images = sorted((unifesp / "images").glob("*.png"))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "labels"] + (["PatientID"] if patient else []))
        for i, labels in enumerate(rows):
            writer.writerow([images[i], labels] + ([f"p{i}"] if patient else []))
    return path


@pytest.mark.parametrize("fraction", ["1", "-0.1"])
def test_outlier_hold_back_outside_0_to_1_is_refused_before_any_work(fraction, tiny_bundle, unifesp, tmp_path, capsys):
    labels = _labels_csv(unifesp, tmp_path / "labels.csv", ["Knee", "Chest", "Others", "Others"])
    args = ["fit-head", "--model", str(tiny_bundle), "--labels", str(labels), "--fine-tune", "--outlier-exposure"]
    code = main(args + ["--outlier-hold-back", fraction, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "--outlier-hold-back must be at least 0 and below 1" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, message",
    [
        (["--mixup", "0"], "--mixup must be above 0"),
        (["--ema", "1"], "--ema must be between 0 and 1"),
        (["--sam", "-0.05"], "--sam must be above 0"),
        (["--layer-decay", "1.5"], "--layer-decay must be above 0 and at most 1"),
        (["--label-smoothing", "1"], "--label-smoothing must be at least 0 and below 1"),
        (["--outlier-loss", "energy"], "add --fine-tune --outlier-exposure"),
        (["--augment-workers", "-1"], "--augment-workers must be 0 or more"),
    ],
)
def test_mixup_and_moving_average_out_of_range_are_refused(option, message, tiny_bundle, unifesp, tmp_path, capsys):
    labels = _labels_csv(unifesp, tmp_path / "labels.csv", ["Knee", "Chest"])
    args = ["fit-head", "--model", str(tiny_bundle), "--labels", str(labels), "--fine-tune", *option]
    code = main(args + ["--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and message in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["fit-head", "evaluate"])
def test_unknown_region_in_labels_names_the_row_and_the_known_regions(command, tiny_bundle, unifesp, tmp_path, capsys):
    labels = _labels_csv(unifesp, tmp_path / "labels.csv", ["Knee", "Chest", "Kneee", "Hand"])
    code = main([command, "--model", str(tiny_bundle), "--labels", str(labels), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{labels}: row 4 (" in err and "unknown region(s) Kneee (known: Abdomen, Ankle" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["fit-head", "evaluate"])
def test_unknown_exclude_region_is_refused(command, tiny_bundle, unifesp, tmp_path, capsys):
    labels = _labels_csv(unifesp, tmp_path / "labels.csv", ["Knee", "Chest", "Others", "Hand"])
    code = main(
        [
            command,
            "--model",
            str(tiny_bundle),
            "--labels",
            str(labels),
            "--exclude-regions",
            "Other",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--exclude-regions: unknown region(s) Other (known: Abdomen" in err and "Others" in err
    assert not (tmp_path / "out").exists()


def test_exclude_regions_are_spelled_as_the_taxonomy_does(tiny_bundle, unifesp, tmp_path, capsys):
    labels = _labels_csv(unifesp, tmp_path / "labels.csv", ["Knee", "Chest", "Hand", "Knee", "Chest", "Hand"])
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_bundle),
                "--labels",
                str(labels),
                "--exclude-regions",
                "hand",
                "--output",
                str(out),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert "images: 4 in-domain" in capsys.readouterr().out  # the two Hand images are out of domain now


def test_split_without_patient_ids_refuses_unless_by_image(unifesp, tmp_path, capsys):
    labels = _labels_csv(unifesp, tmp_path / "labels.csv", ["Knee", "Chest"] * 5, patient=False)
    out = tmp_path / "split"
    assert main(["split", "--labels", str(labels), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{labels}: no PatientID in 10 of 10 rows (row 2, 3, 4, 5, 6 and 5 more)" in err and "--by-image" in err
    assert not out.exists()
    assert main(["split", "--labels", str(labels), "--output", str(out), "--by-image"]) == 0
    assert (out / "train.csv").is_file() and (out / "test.csv").is_file()


def test_split_with_patient_ids_needs_no_flag(unifesp, tmp_path):
    labels = _labels_csv(unifesp, tmp_path / "labels.csv", ["Knee", "Chest"] * 5)
    assert main(["split", "--labels", str(labels), "--output", str(tmp_path / "split")]) == 0


def test_predict_prints_the_reasons_of_wrong_paths(tiny_bundle, unifesp, tmp_path, capsys):
    good = shutil.copy(sorted((unifesp / "images").glob("*.png"))[0], tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    missing = [str(tmp_path / f"typo{i}.dcm") for i in range(6)]
    out = tmp_path / "preds.csv"
    code = main(
        [
            "predict",
            "--model",
            str(tiny_bundle),
            "--no-progress",
            "--output",
            str(out),
            str(good),
            str(tmp_path / "bad.png"),
            *missing,
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "1 of 8 images predicted, 7 unreadable" in err
    assert f"radregion predict: {missing[0]}: no such file or folder" in err  # on screen, not only in the CSV
    assert "... and 2 more (every reason is in the CSV's error column)" in err
    assert sum(line.startswith("radregion predict: /") for line in err.splitlines()) == 5


def test_predict_prints_why_a_file_is_unreadable(tiny_bundle, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["predict", "--model", str(tiny_bundle), "--no-progress", str(tmp_path / "bad.png")]) == 1
    err = capsys.readouterr().err
    assert f"radregion predict: {tmp_path / 'bad.png'}: " in err and "... and" not in err


def test_evaluate_prints_the_reasons_of_unreadable_images(tiny_bundle, unifesp, tmp_path, capsys):
    labels = _labels_csv(unifesp, tmp_path / "labels.csv", ["Knee", "Chest", "Hand"])
    with open(labels, "a", newline="") as handle:
        csv.writer(handle).writerow([tmp_path / "gone.png", "Knee", "p9"])
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_bundle),
                "--labels",
                str(labels),
                "--output",
                str(tmp_path / "eval"),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    assert f"radregion evaluate: {tmp_path / 'gone.png'}: " in capsys.readouterr().err


def test_apply_corrections_with_nothing_to_correct_is_not_an_error(unifesp, tmp_path, capsys):
    corrections = tmp_path / "corrections.csv"
    corrections.write_text("image,labels,PatientID\n")  # what `radregion audit` writes when it found nothing
    labels = _labels_csv(unifesp, tmp_path / "labels.csv", ["Knee", "Chest"])
    output = tmp_path / "fixed.csv"
    code = main(
        ["apply-corrections", "--corrections", str(corrections), "--labels", str(labels), "--output", str(output)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "nothing to do" in captured.out and not output.exists()


def test_apply_corrections_checks_the_labels_csv_too(unifesp, tmp_path, capsys):
    image = sorted((unifesp / "images").glob("*.png"))[0]
    corrections = tmp_path / "corrections.csv"
    corrections.write_text(f"image,labels\n{image},Knee\n")
    labels = _labels_csv(unifesp, tmp_path / "labels.csv", ["Knee", "Chest", "Chset"])
    assert (
        main(
            [
                "apply-corrections",
                "--corrections",
                str(corrections),
                "--labels",
                str(labels),
                "--output",
                str(tmp_path / "fixed.csv"),
            ]
        )
        == 2
    )
    assert "row 4 (" in capsys.readouterr().err


def test_evaluate_help_prints_a_plain_percent(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "95% CIs" in out and "%%" not in out


def _set_training(bundle_dir, **fields):
    """Rewrite a bundle copy's bundle.json (the weights, and so its version, stay as they are)."""
    meta_file = bundle_dir / "bundle.json"
    meta = json.loads(meta_file.read_text())
    meta.update(fields)
    meta_file.write_text(json.dumps(meta))


def test_fit_head_says_when_the_backbone_saw_the_labels(tiny_bundle_copy, unifesp, tmp_path, capsys):
    labels = unifesp / "labels.csv"
    args = ["fit-head", "--model", str(tiny_bundle_copy), "--labels", str(labels), "--per-class", "1"]
    assert main(args + ["--output", str(tmp_path / "plain")]) == 0
    assert "note:" not in capsys.readouterr().err  # random backbone: the figures are fair

    _set_training(
        tiny_bundle_copy,
        training={
            "data": f"{labels} (all, seed 0)",
            "head": {"fine_tune_epochs": 3},
            "backbone": {"method": "simclr", "data": [str(labels)]},
        },
    )
    assert main(args + ["--output", str(tmp_path / "tuned")]) == 0
    err = capsys.readouterr().err
    assert (
        f"note: the backbone was trained with labels from {labels}, which list 21 of these 21 in-domain "
        "images: the cross-validated figures above are optimistic" in err
    )

    _set_training(tiny_bundle_copy, training={"method": "supcon", "data": [str(tmp_path / "gone.csv")]})
    assert main(args + ["--output", str(tmp_path / "supcon")]) == 0
    # the CSV of another machine: the images of the training set stored with the head are known by content
    known = re.search(
        f"note: the backbone was trained with the labels of {re.escape(str(tmp_path / 'gone.csv'))}, which cannot "
        r"be read here; (\d+) of these 21 in-domain images trained it or are in the training set stored with its "
        r"head \(by content\)",
        capsys.readouterr().err,
    )
    assert known and int(known.group(1)) > 0


def test_evaluate_warns_when_the_model_saw_the_images(tiny_bundle_copy, unifesp, tmp_path, capsys):
    seen = _labels_csv(unifesp, tmp_path / "seen.csv", ["Knee", "Chest", "Hand"])
    _set_training(tiny_bundle_copy, training={"data": f"{seen} (all, seed 0)", "head": {"fine_tune_epochs": 0}})
    with open(seen, newline="") as handle:
        rows = list(csv.reader(handle))
    other = tmp_path / "other.csv"  # one image the head saw, one it did not
    other.write_text(
        f"image,labels,PatientID\n{rows[1][0]},Knee,p0\n{sorted((unifesp / 'images').glob('*.png'))[-1]},Chest,p9\n"
    )
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_bundle_copy),
                "--labels",
                str(other),
                "--output",
                str(out),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    assert (
        f"was trained with the labels of 1 of these 2 images (listed in {seen} or in the training set stored "
        "with its head): the figures are in-sample" in capsys.readouterr().err
    )
    fresh = tmp_path / "fresh.csv"
    fresh.write_text(f"image,labels,PatientID\n{sorted((unifesp / 'images').glob('*.png'))[-1]},Chest,p9\n")
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_bundle_copy),
                "--labels",
                str(fresh),
                "--output",
                str(out),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    assert "in-sample" not in capsys.readouterr().err


def test_evaluate_knows_the_heads_training_images_by_content(tiny_bundle_copy, unifesp, tmp_path, capsys):
    """A bundle made on another machine, whose training CSV is not here: the images of the training set stored with
    its head are still known, by their content."""
    from radregion.bundle import image_ids, load_bundle

    gone = tmp_path / "gone.csv"
    _set_training(tiny_bundle_copy, training={"data": f"{gone} (all, seed 0)", "head": {"fine_tune_epochs": 0}})
    images = sorted((unifesp / "images").glob("*.png"))
    stored = np.isin(image_ids(images), load_bundle(tiny_bundle_copy).training_set().images)
    assert stored.any() and not stored.all()
    trained, fresh = images[int(np.argmax(stored))], images[int(np.argmin(stored))]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"image,labels,PatientID\n{trained},Knee,p0\n{fresh},Chest,p9\n")
    args = ["evaluate", "--model", str(tiny_bundle_copy), "--labels", str(labels), "--bootstrap", "0"]
    assert main(args + ["--output", str(tmp_path / "eval")]) == 0
    assert (
        f"was trained with the labels of 1 of these 2 images (listed in {gone} or in the training set stored with "
        "its head)" in capsys.readouterr().err
    )


def test_licence_is_what_the_command_is_told(unifesp, tmp_path, tiny_bundle_copy, capsys):
    images = [str(unifesp / "labels.csv")]
    common = [
        "pretrain",
        "--method",
        "simclr",
        "--images",
        *images,
        "--arch",
        "resnet10",
        "--size",
        "64",
        "--epochs",
        "0",
    ]
    assert main(common + ["--output", str(tmp_path / "a")]) == 0
    assert main(common + ["--output", str(tmp_path / "b"), "--licence", "CC BY 4.0 (our archive)"]) == 0
    assert load_bundle(tmp_path / "a").meta["licence"] == "unknown"
    assert load_bundle(tmp_path / "b").meta["licence"] == "CC BY 4.0 (our archive)"

    _set_training(tiny_bundle_copy, licence="UNIFESP terms")
    fit = ["fit-head", "--model", str(tiny_bundle_copy), "--labels", str(unifesp / "labels.csv"), "--per-class", "1"]
    assert main(fit + ["--output", str(tmp_path / "same")]) == 0
    assert main(fit + ["--output", str(tmp_path / "ours"), "--licence", "internal use only"]) == 0
    assert load_bundle(tmp_path / "same").meta["licence"] == "UNIFESP terms"  # the backbone's terms carry over
    ours = load_bundle(tmp_path / "ours").meta
    assert ours["licence"] == "internal use only The backbone it started from: UNIFESP terms"
    assert "--licence 'internal use only'" in ours["training"]["command"]


def test_the_shipped_model_keeps_unifesp_terms():
    """The shipped bundle says UNIFESP's terms, and in `make model` every command that writes a bundle says its
    terms, UNIFESP's wherever the UNIFESP labels train it (fit-head)."""
    makefile = (REPO / "Makefile").read_text()
    unifesp = makefile.split("UNIFESP_LICENCE := ", 1)[1].split("\n", 1)[0]
    assert "CC BY-NC-SA 4.0" in unifesp and "non-commercial" in unifesp
    meta = json.loads((REPO / "apps" / "radregion" / "model" / "bundle.json").read_text())
    assert meta["licence"].startswith(unifesp)
    recipe = makefile[makefile.index("\nmodel:") : makefile.index("\nclean:")]
    lines = recipe.replace("\\\n", " ").splitlines()
    writers = [line for line in lines if " pretrain " in line or " fit-head " in line]
    assert writers and all("--licence " in line for line in writers)
    assert all('--licence "$(UNIFESP_LICENCE)"' in line for line in writers if " fit-head " in line)


def test_a_chain_of_fits_keeps_each_licence_once():
    from radregion.bundle import combined_licence

    start = combined_licence("ImageNet weights: Apache-2.0.", None)
    tuned = combined_licence("UNIFESP: non-commercial.", start)  # fit-head --fine-tune from the ImageNet start
    assert tuned == "UNIFESP: non-commercial. The backbone it started from: ImageNet weights: Apache-2.0."
    assert combined_licence("UNIFESP: non-commercial.", tuned) == tuned  # the head refitted on the same data
    assert combined_licence("unknown", tuned) == tuned and combined_licence("unknown", "unknown") == "unknown"
