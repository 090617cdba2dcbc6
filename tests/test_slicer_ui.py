"""The panel layout: RadRegion.ui loads offscreen with PySide6, is filled by PanelView, and is saved to docs/."""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from PySide6 import QtWidgets  # noqa: E402  (a dev dependency: a broken install must fail, not skip)
from PySide6.QtCore import QFile  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "slicer_module" / "RadRegion"
UI_FILE = MODULE / "Resources" / "UI" / "RadRegion.ui"
SCREENSHOT = REPO / "docs" / "slicer_panel.png"
sys.path.insert(0, str(MODULE))

from RadRegionLib import RadRegionClient, ReviewSession, parse_infer, parse_summary  # noqa: E402
from RadRegionLib.panel import PanelView  # noqa: E402
from RadRegionLib.review import Case  # noqa: E402

REGIONS = ["Abdomen", "Ankle", "Cervical Spine", "Chest", "Clavicles", "Elbow", "Feet", "Finger", "Forearm",
           "Hand", "Hip", "Knee", "Lower Leg", "Lumbar Spine", "Others", "Pelvis", "Shoulder", "Sinus", "Skull",
           "Thigh", "Thoracic Spine", "Wrist"]
SCORES = {"Hand": 0.46, "Wrist": 0.38, "Finger": 0.07, "Forearm": 0.04, "Elbow": 0.02}


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def load_panel(app):
    file = QFile(str(UI_FILE))
    assert file.open(QFile.ReadOnly), f"cannot open {UI_FILE}"
    widget = QUiLoader().load(file)
    file.close()
    assert widget is not None, f"QUiLoader could not build {UI_FILE}"
    names = {child.objectName(): child for child in widget.findChildren(QtWidgets.QWidget) if child.objectName()}
    return widget, SimpleNamespace(**names)


def example_session(tmp_path) -> ReviewSession:
    session = ReviewSession(RadRegionClient("http://127.0.0.1:8000"), str(tmp_path), annotator="dr.example")
    info = {"name": "RadRegion", "models": {"radregion": {"labels": REGIONS, "model_version": "3f9c2a1e"}}}
    session.summary = parse_summary("http://127.0.0.1:8000", info, {"total": 1364, "completed": 212})
    rest = (1.0 - sum(SCORES.values())) / (len(REGIONS) - len(SCORES))
    answer = {"prediction": [{"idx": i, "label": r, "score": SCORES.get(r, rest)} for i, r in enumerate(REGIONS)],
              "ood_score": 0.71, "out_of_domain": True, "pacs_label": "Forearm", "agrees_with_pacs": False,
              "model_version": "3f9c2a1e"}
    image = "1.2.826.0.1.3680043.8.498.10053309524595490852815579052225336016"
    session.current = Case(image=image, result=parse_infer(answer, image=image))
    session.queue = "uncertain"
    session.choose_number(2)
    return session


def test_panel_loads_fills_and_is_saved_as_screenshot(app, tmp_path):
    widget, ui = load_panel(app)
    for name in ["serverUrlEdit", "tokenEdit", "connectButton", "queueComboBox", "nextButton", "imageIdEdit",
                 "regionListWidget", "commentEdit", "submitButton", "outOfDomainButton", "undoButton",
                 "progressBar", "trainButton", "trainStatusLabel", "statusLabel", "oodWarningLabel"]:
        assert hasattr(ui, name), f"RadRegion.ui has no widget named {name}"

    session = example_session(tmp_path)
    view = PanelView(ui)
    view.fill_queues()
    view.show_summary(session.summary)
    session.submitted.append(session.pending)  # so that Undo shows enabled
    view.show_case(session)
    view.show_progress(213, 1364, waiting=1)
    view.show_train_status("Last training finished at 2026-11-25 14:02:11")
    view.show_status("Saved 1.2.826...0016 = Wrist; server unreachable, 1 decision saved on this computer")
    ui.annotatorEdit.setText("dr.example")
    ui.commentEdit.setText("wrist fracture follow-up")

    assert ui.queueComboBox.count() == 5
    ui.queueComboBox.setCurrentIndex(4)  # random
    view.fill_queues(["random", "uncertain", "first"])  # what a server offers
    assert [ui.queueComboBox.itemText(i) for i in range(3)] == ["Uncertain predictions", "Random", "first"]
    assert ui.queueComboBox.currentData() == "random", "refilling keeps the chosen queue"
    view.fill_queues(session.summary.queues)  # no strategies in the example info: all known queues
    ui.queueComboBox.setCurrentIndex(0)
    assert ui.regionListWidget.count() == len(REGIONS)
    assert ui.regionListWidget.item(0).text().startswith("1   Hand")
    assert ui.regionListWidget.currentRow() == 1
    assert ui.topRegionLabel2.text() == "2.  Wrist" and ui.topScoreBar2.value() == 380
    assert ui.topScoreLabel1.text() == "46%"
    assert ui.submitButton.text() == "Correct to Wrist (Enter)"
    assert ui.archiveLabel.text() == "Archive: Forearm, DISAGREES with the model"
    assert ui.progressLabel.text() == "213 of 1364 images confirmed · 1 waiting to be sent"
    assert "Out of domain" in ui.oodWarningLabel.text()

    widget.resize(430, widget.sizeHint().height())
    widget.show()
    app.processEvents()
    assert not ui.oodWarningLabel.isHidden()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    temp = SCREENSHOT.with_name(".slicer_panel.tmp.png")
    assert widget.grab().save(str(temp)), "could not save the panel screenshot"
    os.replace(temp, SCREENSHOT)
    widget.close()
