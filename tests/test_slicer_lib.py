"""RadRegionLib (the Slicer extension's pure-Python half) driven against the real RadRegion server.

One module-scoped server: the tests run in file order and share its datastore (each labels different images).
"""

import json
import socket
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "slicer_module" / "RadRegion"))

from RadRegionLib import (  # noqa: E402
    QUEUES, RadRegionClient, RequestRejected, ReviewSession, ServerUnreachable, parse_infer, parse_summary,
    server_work_dir, train_status_text,
)
from RadRegionLib.review import Case  # noqa: E402

SCORING_WAIT_S = 240  # the scored queues answer once the server has scored its images


def label_on_disk(server, image):
    path = Path(server.studies) / "labels" / "final" / f"{image}.json"
    return json.loads(path.read_text()) if path.exists() else None


def wait_for_case(session, queue):
    """The scored queues are empty until the server has scored the studies once after starting."""
    deadline = time.monotonic() + SCORING_WAIT_S
    while True:
        case = session.next_case(queue)
        if case is not None or time.monotonic() > deadline:
            return case
        time.sleep(2)


# -- without a server (a closed port is a real unreachable server) ------------------------------------------------

CLOSED = "http://127.0.0.1:9"


def offline_session(work):
    session = ReviewSession(RadRegionClient(CLOSED, timeout=5), str(work), annotator="pytest")
    session.summary = parse_summary(CLOSED, {"models": {"radregion": {"labels": ["Chest", "Hand", "Knee"]}}},
                                    {"total": 10, "completed": 4})
    answer = {"prediction": [{"idx": 0, "label": "Hand", "score": 0.2}, {"idx": 1, "label": "Chest", "score": 0.7},
                             {"idx": 2, "label": "Knee", "score": 0.1}],
              "pacs_label": "Knee", "agrees_with_pacs": False}
    session.current = session._cases["img1"] = Case("img1", parse_infer(answer, "img1"))
    return session


def test_parse_infer_ranks_and_explains():
    result = parse_infer({"prediction": [{"label": r, "score": s} for r, s in
                                         [("A", 0.1), ("B", 0.5), ("C", 0.05), ("D", 0.2), ("E", 0.1), ("F", 0.05)]],
                          "ood_score": 3.2, "out_of_domain": True, "pacs_label": None}, "x")
    assert result.region == "B" and result.confidence == 0.5 and len(result.top) == 5
    assert [r for r, _ in result.top][:2] == ["B", "D"]
    assert result.agreement_text == "The archive has no region label for this image"
    assert result.ood_warning.startswith("Out of domain (score 3.20)")
    assert parse_infer({"prediction": [], "region": None}).prediction_text == "No prediction"
    assert train_status_text(None).startswith("Not trained")
    assert train_status_text({"status": "RUNNING", "start_ts": "t0"}) == "Training running since t0"
    assert train_status_text({"status": "ERROR", "end_ts": "t1", "details": ["x", "CUDA out of memory", ""]}) == \
        "Last training error at t1: CUDA out of memory"


def test_offline_decisions_wait_on_disk_and_undo_takes_them_back(tmp_path):
    session = offline_session(tmp_path)
    assert session.ranked_regions() == ["Chest", "Hand", "Knee"]
    session.choose_number(3)
    assert session.pending_text == "Correct to Knee"
    assert session.submit(comment="archive was right") is None
    assert "Server unreachable: 1 decision(s) saved on this computer" in session.status_message
    assert session.progress() == (5, 10)
    lines = (tmp_path / "outbox.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["region"] == "Knee"

    reopened = offline_session(tmp_path)  # Slicer restarted: the decision is still waiting
    assert [(d.image, d.region, d.comment) for d in reopened.outbox.items()] == [("img1", "Knee", "archive was right")]

    session.undo()  # not sent yet: it just leaves the outbox
    assert len(session.outbox) == 0 and session.current.image == "img1" and session.pending.region == "Knee"
    with pytest.raises(ValueError, match="nothing to undo"):
        session.undo()
    with pytest.raises(ValueError, match="no region for key 4"):
        session.choose_number(4)
    with pytest.raises(ServerUnreachable, match=r"cannot reach the RadRegion server at http://127\.0\.0\.1:9"):
        session.next_case("uncertain")
    assert server_work_dir("/cache", "http://127.0.0.1:8000/") == "/cache/127.0.0.1_8000"
    assert server_work_dir("/cache", "pacs.example.org:8000") != server_work_dir("/cache", "127.0.0.1:8000")


def test_a_server_that_does_not_answer_is_reported_in_words():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        client = RadRegionClient(f"127.0.0.1:{silent.getsockname()[1]}", timeout=1)
        with pytest.raises(ServerUnreachable, match=r"no answer from the RadRegion server at .* within 1 s"):
            client.stats()


@pytest.fixture
def session(radregion_server, tmp_path):
    return ReviewSession(RadRegionClient(radregion_server.url), str(tmp_path / "work"), annotator="pytest")


def test_connect_shows_model_version_regions_and_counts(session, radregion_server):
    summary = session.connect()
    assert summary.model_version, "the server reports no model version"
    assert {"Chest", "Knee", "Abdomen", "Pelvis"} <= set(summary.regions)
    assert summary.total == len(radregion_server.truth) + 3  # 12 PNGs + the 3 real DICOMs
    assert summary.confirmed == 0
    assert set(QUEUES) <= set(summary.queues)
    assert summary.model_version in session.status_message and "0 of 15" in session.status_message


def test_next_case_from_each_queue_loads_prediction_and_image(session, radregion_server):
    session.connect()
    for queue in ("random", "uncertain", "ood"):  # each queue its own order: two may hand out the same image
        case = wait_for_case(session, queue)
        assert case is not None, f"queue {queue} gave no case in {SCORING_WAIT_S} s"
        result = case.result
        assert result.region in session.regions and 0 < result.confidence <= 1
        assert 1 <= len(result.top) <= 5 and result.top[0][0] == result.region
        assert [s for _, s in result.top] == sorted((s for _, s in result.top), reverse=True)
        assert result.model_version == session.summary.model_version
        assert Path(case.image_path).stat().st_size > 1000, f"{case.image_path} is not the image file"
        assert session.ranked_regions()[:len(result.top)] == [name for name, _ in result.top]

    # the disagreement queue holds only archive-labelled images whose prediction contradicts the archive
    case = wait_for_case(session, "disagreement")
    print(f"disagreement queue: {case.image if case else 'empty'}")
    dicoms = ["RG1_J2KI", "RG3_J2KI", "RG3_J2KR"]
    if case is None:
        answers = [parse_infer(session.client.infer(image), image) for image in dicoms]
        assert all(a.agrees_with_pacs is not False for a in answers), "a disagreement was not queued"
    else:
        assert case.image in dicoms and case.result.pacs_label
        assert case.result.agrees_with_pacs is False and "DISAGREES" in case.result.agreement_text
        assert case.image_path.endswith(".dcm")  # extension-less RG3_J2KR too: Slicer needs the extension


def test_confirm_correct_out_of_domain_and_undo(session, radregion_server):
    client = session.client
    session.connect()
    confirmed = wait_for_case(session, "random")
    assert session.pending_text == f"Confirm {confirmed.result.region}"
    corrected = session.submit(comment="looks right")  # Enter with nothing picked confirms the prediction
    assert label_on_disk(radregion_server, confirmed.image)["region"] == confirmed.result.region
    label = client.get_label(confirmed.image)
    assert label["region"] == confirmed.result.region and label["out_of_domain"] is False
    assert label["annotator"] == "pytest" and label["comment"] == "looks right"
    assert session.progress() == (1, 15)

    truth = radregion_server.truth.get(corrected.image)  # None for the DICOMs
    wrong = truth if truth and truth != corrected.result.region else session.ranked_regions()[1]
    number = session.ranked_regions().index(wrong) + 1
    if number <= 9:
        session.choose_number(number)
    else:
        session.choose(wrong)
    assert session.pending_text == f"Correct to {wrong}"
    outlier = session.submit()
    assert client.get_label(corrected.image)["region"] == wrong

    session.mark_out_of_domain()
    assert session.pending_text == "Mark out of domain"
    session.submit(comment="calibration phantom")
    stored = label_on_disk(radregion_server, outlier.image)
    assert stored["out_of_domain"] is True and stored["comment"] == "calibration phantom"
    assert session.progress() == (3, 15)

    undone = session.undo()
    assert undone.image == outlier.image and undone.out_of_domain
    assert client.get_label(outlier.image) is None and label_on_disk(radregion_server, outlier.image) is None
    assert session.current.image == outlier.image, "undo reopens the case"
    assert session.pending.out_of_domain, "undo keeps the decision to edit"
    assert session.progress() == (2, 15)
    assert "Undone" in session.status_message

    session.choose(session.regions[0])
    session.submit(load_next=False)
    assert client.get_label(outlier.image)["region"] == session.regions[0]
    assert client.stats()["completed"] == 3


def test_server_stopped_mid_run_keeps_the_decision_and_delivers_it_after_restart(radregion_server, tmp_path):
    work = str(tmp_path / "work")
    session = ReviewSession(RadRegionClient(radregion_server.url, timeout=10), work, annotator="pytest")
    session.connect()
    case = wait_for_case(session, "random")
    region = [r for r in session.regions if r != case.result.region][0]
    session.choose(region)

    radregion_server.stop()
    try:
        assert session.submit(comment="sent later") is None  # no next case while the server is away
        assert session.current is None
        assert len(session.outbox) == 1
        assert "Server unreachable" in session.status_message and "saved on this computer" in session.status_message
        assert session.progress() == (3 + 1, 15)  # last known counts plus the waiting decision
        with pytest.raises(ServerUnreachable, match="cannot reach the RadRegion server"):
            session.client.info()
        # Slicer closed and reopened while the server is down: the outbox is on disk
        session = ReviewSession(RadRegionClient(radregion_server.url, timeout=10), work, annotator="pytest")
        assert [d.image for d in session.outbox.items()] == [case.image]
    finally:
        radregion_server.start()

    session.connect()  # delivers the outbox
    assert len(session.outbox) == 0 and "Delivered 1" in session.status_message
    stored = label_on_disk(radregion_server, case.image)
    assert stored["region"] == region and stored["comment"] == "sent later"
    assert session.client.get_label(case.image)["region"] == region


def test_refused_decision_is_explained_and_kept(session, radregion_server):
    client = session.client
    before = client.get_label("RG1_J2KI")  # an earlier test may have confirmed it (queue order varies)
    with pytest.raises(RequestRejected, match=r"refused \(HTTP 422\).*Nowhere.*valid regions: .*Chest") as error:
        client.submit_label("RG1_J2KI", "Nowhere")
    assert error.value.status == 422
    with pytest.raises(RequestRejected, match=r"HTTP 404"):
        client.infer("no-such-image")

    session.connect()
    case = session.open_case("RG1_J2KI")
    assert case.result.pacs_label == "Chest"
    with pytest.raises(ValueError, match="unknown region 'Nowhere'; valid regions: .*Chest"):
        session.choose("Nowhere")
    session.choose("Chest")
    session.pending.region = "Nowhere"  # as if the server's taxonomy changed since connecting
    with pytest.raises(RequestRejected, match="refused"):
        session.submit()
    assert session.pending.region == "Nowhere" and session.current.image == "RG1_J2KI"
    assert len(session.outbox) == 0, "a refused decision must not block the outbox"
    assert "Nowhere" in Path(session.rejected_path).read_text()
    assert client.get_label("RG1_J2KI") == before, "a refused decision must not change the stored label"


def test_bearer_token_is_sent_and_bad_urls_are_explained(radregion_server):
    assert RadRegionClient(radregion_server.url, token="t0ken").info()["name"] == "RadRegion"
    with pytest.raises(ValueError, match="no server URL"):
        RadRegionClient("  ")
    with pytest.raises(ValueError, match="not a server URL"):
        RadRegionClient("ftp://x")


def test_train_and_its_status(session, radregion_server):
    # its own confirmed labels (true regions, 3 images of each of 2 regions), whatever earlier tests left
    for region in ("Chest", "Knee"):
        for image in [i for i, r in sorted(radregion_server.truth.items()) if r == region]:
            session.client.submit_label(image, region)
    session.connect()
    assert session.train().startswith("Training started")
    deadline = time.monotonic() + 300
    text = session.train_status()
    while text.startswith("Training") and time.monotonic() < deadline:
        time.sleep(3)
        text = session.train_status()
    assert text.startswith("Last training finished"), f"training did not finish: {text}"


def test_slicer_self_test_runs_against_the_server(radregion_server, monkeypatch):
    """RadRegion.py's ScriptedLoadableModuleTest, with stand-in Slicer modules (images read with ITK)."""
    from test_slicer_module_import import import_radregion_module

    module = import_radregion_module(monkeypatch)
    monkeypatch.setenv(module.SERVER_URL_ENV, radregion_server.url)
    test = module.RadRegionTest("test_annotation_run")
    test.setUp()
    test.test_annotation_run()


def test_slicer_widget_review_by_keyboard(radregion_server, monkeypatch, tmp_path):
    """RadRegionWidget on PySide6 (PythonQt-like stand-in): connect, Next, number key, Enter, Ctrl+Z, O, Enter."""
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest
    from test_slicer_module_import import import_radregion_module_with_pythonqt

    module, app, window = import_radregion_module_with_pythonqt(monkeypatch, tmp_path)
    widget = module.RadRegionWidget()
    widget.setup()
    window.show()
    window.activateWindow()
    assert QTest.qWaitForWindowActive(window, 5000)
    widget.enter()
    ui, client = widget.ui, RadRegionClient(radregion_server.url)

    ui.serverUrlEdit.setText(radregion_server.url)
    ui.annotatorEdit.setText("keyboard")
    ui.connectButton.click()
    summary = widget.logic.session.summary
    assert summary is not None, ui.statusLabel.text
    assert summary.model_version in ui.serverInfoLabel.text
    assert ui.queueComboBox.count() == len(summary.queues)

    ui.queueComboBox.setCurrentIndex(ui.queueComboBox.findData("random"))
    ui.nextButton.setFocus()
    QTest.keyClick(window, Qt.Key_N)
    case = widget.logic.session.current
    assert case is not None, ui.statusLabel.text
    assert ui.caseLabel.text.startswith(case.image)
    assert widget.logic.volume is not None and widget.logic.volume.path == case.image_path
    second = widget.logic.session.ranked_regions()[1]
    assert ui.topRegionLabel1.text.endswith(case.result.region)

    QTest.keyClick(window, Qt.Key_2)
    assert ui.submitButton.text == f"Correct to {second} (Enter)"
    ui.commentEdit.setFocus()
    QTest.keyClicks(ui.commentEdit.obj, "typed 2 O")  # typing in the comment is not a command
    assert ui.submitButton.text == f"Correct to {second} (Enter)"
    QTest.keyClick(ui.commentEdit.obj, Qt.Key_Return)
    label = client.get_label(case.image)
    assert label["region"] == second and label["comment"] == "typed 2 O" and label["annotator"] == "keyboard"
    assert ui.commentEdit.text == "" and widget.logic.session.current.image != case.image

    QTest.keyClick(window, Qt.Key_Z, Qt.ControlModifier)
    assert client.get_label(case.image) is None
    assert widget.logic.session.current.image == case.image and widget.logic.volume.path == case.image_path
    QTest.keyClick(window, Qt.Key_O)
    assert ui.submitButton.text == "Mark out of domain (Enter)"
    QTest.keyClick(window, Qt.Key_Enter)
    assert client.get_label(case.image)["out_of_domain"] is True
    confirmed, total = widget.logic.session.progress()
    assert ui.progressLabel.text.startswith(f"{confirmed} of {total} images confirmed")
    widget.exit()
    widget.cleanup()
    window.close()
