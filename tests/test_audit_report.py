"""The audit report in a real browser (headless Debian Chromium): loads offline, no console errors, images render.

RADREGION_SCREENSHOT=docs/audit_report.png also keeps the screenshot there (how the docs image is made).
"""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from radregion.cli import main
from test_audit import FLIP_RATE, flipped_labels_csv, read_csv

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def report(tiny_bundle, unifesp, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    labels = folder / "labels.csv"
    flipped_labels_csv(unifesp, labels, seed=3)
    assert main(["audit", "--model", str(tiny_bundle), "--labels", str(labels), "--output", str(folder / "out")]) == 0
    return folder / "out" / "index.html"


@pytest.mark.skipif(not shutil.which("chromium") and not shutil.which(CHROMIUM), reason="needs Debian chromium")
def test_report_loads_offline_without_console_errors(report, tmp_path):
    text = report.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", text)
    sources = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    flagged = sum(r["is_issue"] == "true" for r in read_csv(report.parent / "label_issues.csv"))
    assert flagged >= FLIP_RATE * 150 / 2

    run = chromium(
        tmp_path, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", report.as_uri()
    )
    assert run.returncode == 0, run.stderr[-2000:]
    body = re.search(r"<body[^>]*>", run.stdout).group(0)
    assert 'data-ok="true"' in body, body  # every <img> complete with naturalWidth > 0
    assert f'data-images="{len(sources)}"' in body
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    assert run.stdout.count('alt="Grad-CAM"') == flagged


@pytest.mark.skipif(not shutil.which("chromium") and not shutil.which(CHROMIUM), reason="needs Debian chromium")
def test_report_screenshot(report, tmp_path):
    png = tmp_path / "audit_report.png"
    run = chromium(tmp_path, "--window-size=1400,2300", f"--screenshot={png}", report.as_uri())
    assert run.returncode == 0 and png.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert pixels.shape == (2300, 1400)
    assert pixels.std() > 20  # a rendered page, not a blank one
    header = pixels[:60].mean()
    assert header < 80  # the dark title bar is there: the CSS applied
    if os.environ.get("RADREGION_SCREENSHOT"):
        shutil.copy(png, os.environ["RADREGION_SCREENSHOT"])
