"""`radregion predict` on real folders: CSV columns, per-file errors, exit status, stdout, default model."""

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

from radregion.cli import main
from radregion.commands.predict import COLUMNS

REPO = Path(__file__).resolve().parents[1]


def _folder(tmp_path, unifesp, real_dicoms) -> Path:
    folder = tmp_path / "archive"
    (folder / "nested").mkdir(parents=True)
    png = sorted((unifesp / "unlabelled").glob("*.png"))[0]
    shutil.copy(png, folder / "image.png")
    shutil.copy(real_dicoms[0], folder / "nested" / "chest.dcm")
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI" + b"\xff" * 40)
    return folder


def _rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_predict_folder_with_a_corrupt_file(tiny_bundle, unifesp, real_dicoms, tmp_path, capsys):
    folder = _folder(tmp_path, unifesp, real_dicoms)
    out = tmp_path / "preds.csv"
    code = main(["predict", "--model", str(tiny_bundle), "--output", str(out), "--batch-size", "2", str(folder)])
    assert code == 0
    text = out.read_text()
    header = text.splitlines()[0].split(",")
    assert tuple(header[:8]) == COLUMNS and len(header) == 8 + 21 and "Chest" in header[8:]
    rows = {Path(r["path"]).name: r for r in _rows(text)}
    assert set(rows) == {"image.png", "chest.dcm", "broken.dcm"}
    assert rows["broken.dcm"]["error"] and rows["broken.dcm"]["region"] == ""
    for name in ("image.png", "chest.dcm"):
        row = rows[name]
        assert row["error"] == "" and row["region"] in header[8:]
        assert float(row["confidence"]) == max(float(row[r]) for r in header[8:])
        assert row["out_of_domain"] in ("true", "false") and float(row["ood_score"]) >= 0
    assert rows["chest.dcm"]["pacs_label"] == "Chest" and rows["chest.dcm"]["agrees_with_pacs"] in ("true", "false")
    assert rows["image.png"]["pacs_label"] == "" and rows["image.png"]["agrees_with_pacs"] == ""
    err = capsys.readouterr().err
    assert "2 of 3 images predicted, 1 unreadable" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the CSV was written atomically


def test_nothing_readable_exits_non_zero(tiny_bundle, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really")
    code = main(["predict", "--model", str(tiny_bundle), "--no-progress", str(bad), str(tmp_path / "missing.dcm")])
    captured = capsys.readouterr()
    assert code == 1 and "no image could be read" in captured.err
    rows = _rows(captured.out)
    assert len(rows) == 2 and all(r["error"] for r in rows)


def test_predict_to_stdout_as_a_real_process(tiny_bundle, real_dicoms, tmp_path):
    env = {**os.environ, "RADREGION_MODEL": str(tiny_bundle), "PYTHONPATH": str(REPO / "lib")}
    result = subprocess.run(
        [sys.executable, "-m", "radregion.cli", "predict", str(real_dicoms[0]), str(real_dicoms[1])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    assert [r["path"] for r in rows] == [str(real_dicoms[0]), str(real_dicoms[1])]
    assert all(r["region"] and not r["error"] for r in rows)
    assert "Traceback" not in result.stderr


def test_skipping_unused_imports_keeps_predictions(tiny_bundle, real_dicoms, tmp_path):
    """radregion.startup: the console run never loads MONAI's optional integrations, and predicts the same."""
    env = {**os.environ, "RADREGION_MODEL": str(tiny_bundle), "PYTHONPATH": str(REPO / "lib")}
    code = (
        "import sys{pre}; from radregion.cli import main; "
        f"code = main(['predict', {str(real_dicoms[0])!r}, '--output', sys.argv[1]], fresh_process=True); "
        "print('loaded:', sorted(m for m in ('ignite', 'mlflow', 'matplotlib') if sys.modules.get(m))); "
        "sys.exit(code)"
    )
    runs = {
        name: subprocess.run(
            [sys.executable, "-c", code.format(pre=pre), str(tmp_path / f"{name}.csv")],
            env=env,
            timeout=300,
            capture_output=True,
            text=True,
        )
        for name, pre in (("all", ", ignite, matplotlib"), ("fast", ""))
    }
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr[-2000:] for r in runs.values()]
    assert "loaded: ['ignite', 'matplotlib']" in runs["all"].stdout and "loaded: []" in runs["fast"].stdout
    assert (tmp_path / "all.csv").read_text() == (tmp_path / "fast.csv").read_text()


def test_predicting_with_the_shipped_model_imports_neither_monai_nor_sklearn(real_dicoms, tmp_path):
    """Their imports cost `radregion predict` seconds of start-up; inference with the shipped EfficientNet-Lite0
    bundle needs neither (MONAI's ResNets and all fitting do)."""
    code = (
        "import sys; from radregion.cli import main; "
        f"code = main(['predict', {str(real_dicoms[0])!r}, '--output', sys.argv[1]], fresh_process=True); "
        "print('loaded:', sorted(m for m in ('monai', 'sklearn', 'scipy') if sys.modules.get(m))); sys.exit(code)"
    )
    env = {k: v for k, v in os.environ.items() if k != "RADREGION_MODEL"}
    env["PYTHONPATH"] = str(REPO / "lib")
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "p.csv")], env=env, timeout=300, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded: []" in result.stdout
    assert _rows((tmp_path / "p.csv").read_text())[0]["region"] == "Chest"


def test_missing_default_model_is_a_clear_error(tmp_path, real_dicoms, monkeypatch, capsys):
    monkeypatch.setenv("RADREGION_MODEL", str(tmp_path / "no-model"))
    assert main(["predict", str(real_dicoms[0])]) == 2
    assert "no default model" in capsys.readouterr().err
