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

REGIONS = [
    "Abdomen",
    "Ankle",
    "Cervical Spine",
    "Chest",
    "Clavicles",
    "Elbow",
    "Feet",
    "Finger",
    "Forearm",
    "Hand",
    "Hip",
    "Knee",
    "Lower Leg",
    "Lumbar Spine",
    "Others",
    "Pelvis",
    "Shoulder",
    "Sinus",
    "Skull",
    "Thigh",
    "Thoracic Spine",
    "Wrist",
]
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


LONG_ID = "1.2.826.0.1.3680043.8.498." + "1005330952459549085281557905222533601612345678901234567890" * 3


def example_session(
    tmp_path, image="1.2.826.0.1.3680043.8.498.10053309524595490852815579052225336016", existing=True
) -> ReviewSession:
    session = ReviewSession(RadRegionClient("http://127.0.0.1:8000"), str(tmp_path), annotator="dr.example")
    info = {"name": "RadRegion", "models": {"radregion": {"labels": REGIONS, "model_version": "3f9c2a1e"}}}
    session.summary = parse_summary("http://127.0.0.1:8000", info, {"total": 1364, "completed": 212})
    rest = (1.0 - sum(SCORES.values())) / (len(REGIONS) - len(SCORES))
    answer = {
        "prediction": [{"idx": i, "label": r, "score": SCORES.get(r, rest)} for i, r in enumerate(REGIONS)],
        "ood_score": 0.71,
        "out_of_domain": True,
        "pacs_label": "Hand",
        "pacs_labels": ["Hand", "Wrist"],
        "agrees_with_pacs": True,
        "model_version": "3f9c2a1e",
        "header": {
            "BodyPartExamined": "HAND WRIST",
            "StudyDescription": "XR HAND LEFT 3 VIEWS",
            "SeriesDescription": "PA",
            "StudyDate": "20260412",
            "Modality": "CR",
        },
    }
    previous = (
        {
            "region": "Hand",
            "out_of_domain": False,
            "annotator": "dr.other",
            "comment": "",
            "saved_at": "2026-11-29T16:02:11Z",
        }
        if existing
        else None
    )
    session.current = Case(image=image, result=parse_infer(answer, image=image), source="uncertain", existing=previous)
    session.queue = "uncertain"
    session.history = [
        "14:02  1.2.82…000117: Knee",
        "14:03  1.2.82…000118: Chest (was Abdomen)",
        "14:03  1.2.82…000118: undo Chest, back to Abdomen",
    ]
    session.choose("Wrist")
    return session


def filled_panel(app, tmp_path, **kwargs):
    widget, ui = load_panel(app)
    session = example_session(tmp_path, **kwargs)
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
    return widget, ui, session, view


def test_panel_loads_fills_and_is_saved_as_screenshot(app, tmp_path):
    widget, ui = load_panel(app)
    for name in [
        "serverUrlEdit",
        "tokenEdit",
        "connectButton",
        "queueComboBox",
        "nextButton",
        "imageIdEdit",
        "regionListWidget",
        "commentEdit",
        "submitButton",
        "outOfDomainButton",
        "undoButton",
        "acceptArchiveButton",
        "historyListWidget",
        "headerLabel",
        "existingLabel",
        "progressBar",
        "trainButton",
        "trainStatusLabel",
        "statusLabel",
        "oodWarningLabel",
    ]:
        assert hasattr(ui, name), f"RadRegion.ui has no widget named {name}"
    widget.close()

    widget, ui, session, view = filled_panel(app, tmp_path)
    assert ui.queueComboBox.count() == 5
    ui.queueComboBox.setCurrentIndex(4)  # random
    view.fill_queues(["random", "uncertain", "first"])  # what a server offers
    assert [ui.queueComboBox.itemText(i) for i in range(3)] == ["Uncertain predictions", "Random", "first"]
    assert ui.queueComboBox.currentData() == "random", "refilling keeps the chosen queue"
    view.fill_queues(session.summary.queues)  # no strategies in the example info: all known queues
    ui.queueComboBox.setCurrentIndex(0)

    # every region, in the server's fixed order: the number of a region is the same for every case
    assert ui.regionListWidget.count() == len(REGIONS)
    assert ui.regionListWidget.item(0).text().startswith(" 1   Abdomen")
    assert ui.regionListWidget.item(9).text().startswith("10   Hand   46%")
    assert ui.regionListWidget.currentRow() == REGIONS.index("Wrist")
    # the top predictions beside it, each with the number that picks it
    assert ui.topRegionLabel1.text() == "[10]  Hand" and ui.topScoreLabel1.text() == "46%"
    assert ui.topRegionLabel2.text() == "[22]  Wrist" and ui.topScoreBar2.value() == 380
    # the header an annotator reads, the label someone already set (who, when), what Enter does
    assert ui.headerLabel.text().splitlines() == [
        "Body part: HAND WRIST",
        "Study: XR HAND LEFT 3 VIEWS",
        "Series: PA",
        "2026-04-12 · CR",
    ]
    assert ui.existingLabel.text() == "Labelled Hand by dr.other on 2026-11-29 16:02 UTC"
    assert ui.submitButton.text() == "Replace Hand with Wrist (Enter)"
    assert ui.pendingLabel.text() == "Enter: Replace Hand with Wrist"
    assert ui.archiveLabel.text() == "Archive: Hand / Wrist, agrees with the model"
    assert ui.acceptArchiveButton.isEnabled()
    assert ui.caseLabel.text().splitlines()[1] == "queue: Uncertain predictions"
    assert [ui.historyListWidget.item(i).text() for i in range(3)] == list(reversed(session.history))
    assert ui.progressLabel.text() == "213 of 1364 images confirmed · 1 waiting to be sent"
    assert "Out of domain" in ui.oodWarningLabel.text()

    widget.resize(430, widget.sizeHint().height())
    widget.show()
    app.processEvents()
    assert not ui.oodWarningLabel.isHidden() and not ui.existingLabel.isHidden()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    temp = SCREENSHOT.with_name(".slicer_panel.tmp.png")
    assert widget.grab().save(str(temp)), "could not save the panel screenshot"
    os.replace(temp, SCREENSHOT)
    widget.close()


def test_long_ids_never_widen_the_panel_or_clip_the_confirm_button(app, tmp_path):
    """A 200-character image id, a long annotator name and a long decision: the panel keeps a sensible width."""
    widget, ui, session, view = filled_panel(app, tmp_path, image=LONG_ID)
    session.current.existing["annotator"] = "dr.annotator-with-a-very-long-name@radiology.example.org"
    session.choose("Thoracic Spine")
    session.history.append("14:05  " + LONG_ID + ": Thoracic Spine (was Lumbar Spine)")
    view.show_case(session)
    ui.statusLabel.setText(f"{LONG_ID}: the model says Hand (46%); Labelled Hand by someone")
    assert len(LONG_ID) > 150
    assert ui.caseLabel.toolTip() == LONG_ID and len(ui.caseLabel.text().splitlines()[0]) <= 44
    session.current.provisional = True  # a queue's choice while the server is still scoring says so
    view.show_case(session)
    assert (
        ui.caseLabel.text().splitlines()[1] == "queue: Uncertain predictions (provisional: the server is still scoring)"
    )
    assert ui.submitButton.toolTip() == "Replace Hand with Thoracic Spine"
    assert ui.submitButton.text() == "Replace with Thoracic Spine (Enter)"
    assert widget.minimumSizeHint().width() <= 380, "something in the panel insists on a wide layout"
    assert widget.sizeHint().width() <= 460
    for width in (380, 430):
        widget.resize(width, widget.sizeHint().height())
        widget.show()
        app.processEvents()
        assert widget.width() == width, f"the panel cannot be {width} px wide"
        button = ui.submitButton
        left = button.mapTo(widget, button.rect().topLeft()).x()
        assert left >= 0 and left + button.width() <= widget.width(), "the confirm button is clipped"
        assert button.width() >= button.fontMetrics().horizontalAdvance(button.text()), "its text is cut"
    widget.close()
