"""RadRegionLib (the Slicer extension's pure-Python half) driven against the real RadRegion server.

One module-scoped server: the tests run in file order and share its datastore (each labels different images).
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "slicer_module" / "RadRegion"))

from RadRegionLib import (  # noqa: E402
    QUEUES,
    RadRegionClient,
    RequestRejected,
    ReviewSession,
    ServerUnreachable,
    parse_infer,
    parse_summary,
    server_work_dir,
    train_status_text,
)
from RadRegionLib.review import Case, label_text  # noqa: E402

SCORING_WAIT_S = 240  # the scored queues answer once the server has scored its images


def server_token(server):
    """The write token of a test server that needs one (RADREGION_API_TOKEN), else None."""
    return getattr(server, "token", None) or os.environ.get("RADREGION_API_TOKEN") or None


def unlabel_all(server):
    """Remove every final label over REST, so a queue has cases whatever the module's earlier tests confirmed."""
    client = RadRegionClient(server.url, token=server_token(server), timeout=60)
    for path in sorted((Path(server.studies) / "labels" / "final").glob("*.json")):
        client.delete_label(path.stem)  # raises RequestRejected unless the server answers 2xx


def label_on_disk(server, image):
    path = Path(server.studies) / "labels" / "final" / f"{image}.json"
    return json.loads(path.read_text()) if path.exists() else None


def wait_for_scores(session):
    """Until the server has scored every image with its current model (GET /info/: models.radregion.scores)."""
    deadline = time.monotonic() + SCORING_WAIT_S
    while time.monotonic() < deadline:
        scores = (session.client.info().get("models", {}).get("radregion", {}) or {}).get("scores") or {}
        if (
            scores.get("model_version")
            and scores.get("images", 0) + scores.get("unreadable", 0) >= session.client.stats()["total"]
        ):
            return
        time.sleep(2)
    pytest.fail(f"the server did not score its images in {SCORING_WAIT_S} s")


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
    session.summary = parse_summary(
        CLOSED, {"models": {"radregion": {"labels": ["Chest", "Hand", "Knee"]}}}, {"total": 10, "completed": 4}
    )
    answer = {
        "prediction": [
            {"idx": 0, "label": "Hand", "score": 0.2},
            {"idx": 1, "label": "Chest", "score": 0.7},
            {"idx": 2, "label": "Knee", "score": 0.1},
        ],
        "pacs_label": "Knee",
        "agrees_with_pacs": False,
    }
    session.current = session._cases["img1"] = Case("img1", parse_infer(answer, "img1"))
    return session


def test_parse_infer_ranks_and_explains():
    result = parse_infer(
        {
            "prediction": [
                {"label": r, "score": s}
                for r, s in [("A", 0.1), ("B", 0.5), ("C", 0.05), ("D", 0.2), ("E", 0.1), ("F", 0.05)]
            ],
            "ood_score": 3.2,
            "out_of_domain": True,
            "pacs_label": None,
        },
        "x",
    )
    assert result.region == "B" and result.confidence == 0.5 and len(result.top) == 5
    assert [r for r, _ in result.top][:2] == ["B", "D"]
    assert result.agreement_text == "The archive has no region label for this image"
    assert result.ood_warning.startswith("Out of domain (score 3.20)")
    assert parse_infer({"prediction": [], "region": None}).prediction_text == "No prediction"
    assert train_status_text(None).startswith("Not trained")
    assert train_status_text({"status": "RUNNING", "start_ts": "t0"}) == "Training running since t0"
    assert (
        train_status_text({"status": "ERROR", "end_ts": "t1", "details": ["x", "CUDA out of memory", ""]})
        == "Last training error at t1: CUDA out of memory"
    )


def test_offline_decisions_wait_on_disk_and_undo_takes_them_back(tmp_path):
    session = offline_session(tmp_path)
    assert session.key_regions() == ["Chest", "Hand", "Knee"]  # the server's order, not the case's ranking
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
        assert session.key_regions() == session.summary.regions, "number keys mean the same for every case"
        assert case.source_text.startswith(f"queue: {QUEUES[queue]}")
        assert ("provisional: the server is still scoring" in case.source_text) == case.provisional
        print(f"{queue}: {case.image} {'provisional' if case.provisional else 'scored'}")
        assert len(result.regions) == len(session.regions), "the answer scores every region"

    # the disagreement queue holds only archive-labelled images whose prediction contradicts the archive (once
    # every image is scored: before that, queues hand out provisional choices)
    wait_for_scores(session)
    case = wait_for_case(session, "disagreement")
    print(f"disagreement queue: {case.image if case else 'empty'}")
    dicoms = ["RG1_J2KI", "RG3_J2KI", "RG3_J2KR"]
    if case is None:
        answers = [parse_infer(session.client.infer(image), image) for image in dicoms]
        assert all(a.agrees_with_pacs is not False for a in answers), "a disagreement was not queued"
    else:
        assert case.image in dicoms and case.result.pacs_label
        assert not case.provisional, "every image is scored: the queue's choice is not provisional"
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
    wrong = (
        truth
        if truth and truth != corrected.result.region
        else next(r for r in session.key_regions() if r != corrected.result.region)
    )
    number = session.key_of(wrong)
    for n, digit in enumerate(str(number)):  # typed as on the keyboard: 1 then 4 picks region 14
        session.type_digit(int(digit), now=1000.0 + 0.2 * n)
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
    if session.current.existing:  # an earlier test labelled it: the first Enter only asks to replace
        with pytest.raises(ValueError, match="Press Enter again to replace it with Nowhere"):
            session.submit()
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
    # the panel's Roll back: the server serves the model this training replaced (or says there is none)
    try:
        message = session.rollback()
    except RequestRejected as error:
        assert error.status == 409 and "no earlier published model" in str(error), str(error)
    else:
        assert message.startswith("Rolled back: the server serves model "), message


def test_slicer_self_test_runs_against_the_server(radregion_server, monkeypatch):
    """RadRegion.py's ScriptedLoadableModuleTest, with stand-in Slicer modules (images read with ITK)."""
    from test_slicer_module_import import import_radregion_module

    module = import_radregion_module(monkeypatch)
    monkeypatch.setenv(module.SERVER_URL_ENV, radregion_server.url)
    test = module.RadRegionTest("test_annotation_run")
    test.setUp()
    test.test_annotation_run()


def press(window, key, modifier=None):
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    QTest.keyClick(window, key, modifier or Qt.NoModifier)


def open_widget(monkeypatch, tmp_path):
    """RadRegionWidget on PySide6 offscreen (PythonQt-like stand-in), shown and active, its keys installed."""
    from PySide6.QtTest import QTest
    from test_slicer_module_import import import_radregion_module_with_pythonqt

    module, app, window = import_radregion_module_with_pythonqt(monkeypatch, tmp_path)
    widget = module.RadRegionWidget()
    widget.setup()
    window.show()
    window.activateWindow()
    assert QTest.qWaitForWindowActive(window, 5000)
    widget.enter()
    return module, app, window, widget


def close_widget(widget, window):
    widget.exit()
    widget.cleanup()
    window.close()


def test_slicer_widget_review_by_keyboard(radregion_server, monkeypatch, tmp_path):
    """RadRegionWidget: connect, Next, number keys, Enter, Ctrl+Z, O, Enter; every server call off the UI thread."""
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest
    from test_slicer_module_import import wait_for_panel

    module, app, window, widget = open_widget(monkeypatch, tmp_path)
    ui, client = widget.ui, RadRegionClient(radregion_server.url, token=server_token(radregion_server))

    ui.serverUrlEdit.setText(radregion_server.url)
    ui.tokenEdit.setText(server_token(radregion_server) or "")
    ui.annotatorEdit.setText("keyboard")
    ui.connectButton.click()
    wait_for_panel(widget)
    summary = widget.logic.session.summary
    assert summary is not None, ui.statusLabel.text
    assert summary.model_version in ui.serverInfoLabel.text
    assert ui.queueComboBox.count() == len(summary.queues)

    ui.queueComboBox.setCurrentIndex(ui.queueComboBox.findData("random"))
    ui.nextButton.setFocus()
    press(window, Qt.Key_N)
    assert ui.statusLabel.text == "Loading the next case…"
    wait_for_panel(widget)
    session = widget.logic.session
    case = session.current
    assert case is not None, ui.statusLabel.text
    assert ui.caseLabel.text.startswith(case.image[:20]) and ui.caseLabel.text.endswith("queue: Random")
    assert widget.logic.volume is not None and widget.logic.volume.path == case.image_path
    assert ui.regionListWidget.count() == len(summary.regions), "every region listed, in the server's order"
    assert ui.topRegionLabel1.text == f"[{session.key_of(case.result.region)}]  {case.result.region}"

    other = next(r for r in session.key_regions() if r != case.result.region)
    for digit in str(session.key_of(other)):
        press(window, getattr(Qt, f"Key_{digit}"))
    assert ui.submitButton.text == f"Correct to {other} (Enter)"
    ui.commentEdit.setFocus()
    QTest.keyClicks(ui.commentEdit.obj, "typed 2 O")  # typing in the comment is not a command
    assert ui.submitButton.text == f"Correct to {other} (Enter)"
    QTest.keyClick(ui.commentEdit.obj, Qt.Key_Return)
    wait_for_panel(widget)
    label = client.get_label(case.image)
    assert label["region"] == other and label["comment"] == "typed 2 O" and label["annotator"] == "keyboard"
    assert ui.commentEdit.text == "" and session.current.image != case.image
    assert ui.historyListWidget.item(0).text().endswith(f": {other}")

    press(window, Qt.Key_Z, Qt.ControlModifier)
    wait_for_panel(widget)
    assert client.get_label(case.image) is None, "it had no label before: undo removes it"
    assert session.current.image == case.image and widget.logic.volume.path == case.image_path
    assert ui.historyListWidget.item(0).text().endswith(f"undo {other}, label removed")
    press(window, Qt.Key_O)
    assert ui.submitButton.text == "Mark out of domain (Enter)"
    press(window, Qt.Key_Enter)
    wait_for_panel(widget)
    assert client.get_label(case.image)["out_of_domain"] is True
    confirmed, total = session.progress()
    assert ui.progressLabel.text.startswith(f"{confirmed} of {total} images confirmed")

    # an image opened by its id: no queue named; its header shown; A takes the archive's label
    ui.imageIdEdit.setText("RG1_J2KI")
    ui.openButton.click()
    wait_for_panel(widget)
    assert ui.caseLabel.text == "RG1_J2KI\nopened by id"
    assert ui.headerLabel.text.startswith("Body part: CHEST\nStudy: THORAX") and ui.headerLabel.isVisible()
    ui.nextButton.setFocus()
    press(window, Qt.Key_A)
    assert ui.pendingLabel.text in (
        "Enter: Confirm Chest",
        "Enter: Correct to Chest",
        f"Enter: Replace {label_text(session.current.existing)} with Chest",
    )
    close_widget(widget, window)


# -- issue 14: the panel under real conditions ---------------------------------------------------------------------


class ForwardingProxy:
    """A real HTTP forwarder on 127.0.0.1 in front of the real server. `.delay` seconds are added to requests whose
    path starts with one of `.slow` (a server slow to answer); `.stop()` closes the port (a server that is down),
    `.start()` opens the same port again. `.paths` lists the forwarded requests."""

    def __init__(self, target: str):
        import http.server

        self.target, self.delay, self.slow, self.paths = target.rstrip("/"), 0.0, ("/infer/",), []
        self.httpd = None
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                import urllib.error
                import urllib.request

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                outer.paths.append(f"{self.command} {self.path}")
                if self.path.startswith(outer.slow):
                    time.sleep(outer.delay)
                request = urllib.request.Request(outer.target + self.path, data=body, method=self.command)
                for key in ("Content-Type", "Authorization", "Accept"):
                    if self.headers.get(key):
                        request.add_header(key, self.headers[key])
                try:
                    with urllib.request.urlopen(request, timeout=300) as answer:
                        status, headers, data = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as error:
                    status, headers, data = error.code, error.headers, error.read()
                except OSError as error:  # the server behind it stopped (end of the module): a gateway's answer
                    status, headers, data = 502, {}, str(error).encode()
                self.send_response(status)
                for key in ("Content-Type", "Content-Disposition"):
                    if headers.get(key):
                        self.send_header(key, headers[key])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.handler = Handler
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self):
        import http.server
        import threading

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


@pytest.fixture
def proxy(radregion_server):
    forwarder = ForwardingProxy(radregion_server.url)
    forwarder.server = radregion_server
    yield forwarder
    forwarder.stop()


def test_number_keys_keep_their_region_and_take_two_digits(tmp_path):
    session = offline_session(tmp_path)
    assert session.accept_archive().region == "Knee"  # the archive's label of img1
    session.summary.regions = [f"R{n}" for n in range(1, 23)]  # 22 regions, as unifesp22
    assert session.type_digit(1, now=10.0).region == "R1"  # at once, no waiting for a second digit
    assert session.type_digit(4, now=10.4).region == "R14"  # 1 then 4 within a second: region 14
    assert session.type_digit(4, now=12.0).region == "R4"  # later: a new number
    assert session.type_digit(2, now=13.0).region == "R2"
    assert session.type_digit(5, now=13.3).region == "R5"  # 25 does not exist: 5
    assert session.type_digit(1, now=20.0).region == "R1" and session.type_digit(0, now=20.5).region == "R10"
    with pytest.raises(ValueError, match="no region for key 0"):
        session.type_digit(0, now=30.0)


def test_relabel_shows_who_and_when_and_undo_restores_the_earlier_label(radregion_server, tmp_path):
    token = server_token(radregion_server)
    first = ReviewSession(RadRegionClient(radregion_server.url, token=token), str(tmp_path / "a"), annotator="first")
    second = ReviewSession(RadRegionClient(radregion_server.url, token=token), str(tmp_path / "b"), annotator="second")
    first.connect()
    second.connect()
    image = sorted(i for i, r in radregion_server.truth.items() if r == "Pelvis")[-1]
    first.client.delete_label(image) if first.client.get_label(image) else None

    case = first.open_case(image)
    assert case.source_text == "opened by id" and case.existing is None
    first.choose("Knee")
    first.submit(comment="first look", load_next=False)
    earlier = first.client.get_label(image)
    assert earlier["region"] == "Knee" and earlier["annotator"] == "first" and earlier["saved_at"]

    case = second.open_case(image)  # another annotator: the label is shown with who and when
    assert case.existing["region"] == "Knee" and case.existing["annotator"] == "first"
    assert case.existing_text.startswith("Labelled Knee by first on 20") and case.existing_text.endswith("UTC")
    second.choose("Ankle")
    assert second.pending_text == "Replace Knee with Ankle"
    with pytest.raises(ValueError, match="already labelled Knee by first on .* Press Enter again to replace"):
        second.submit(load_next=False)
    assert second.client.get_label(image)["region"] == "Knee", "nothing replaced without the second Enter"
    second.submit(load_next=False)
    assert second.client.get_label(image)["region"] == "Ankle"
    assert second.client.get_label(image)["annotator"] == "second"

    second.undo()  # after a re-label, undo brings back the earlier label (not: no label)
    restored = second.client.get_label(image)
    assert restored == earlier, "region, out of domain, who, comment and when: as they were"
    assert second.current.image == image and second.current.existing["region"] == "Knee"
    assert second.pending.region == "Ankle", "the undone decision is back on screen, to change or send again"
    assert second.history[-2].endswith(": Ankle (was Knee)")
    assert second.history[-1].endswith(": undo Ankle, back to Knee")
    first.undo()  # the first annotator's own decision: the image had no label before
    assert first.client.get_label(image) is None
    for session in (first, second):
        session.close()


def test_header_context_archive_key_and_multi_region_archive(radregion_server, tmp_path):
    session = ReviewSession(
        RadRegionClient(radregion_server.url, token=server_token(radregion_server)), str(tmp_path), annotator="pytest"
    )
    session.connect()
    case = session.open_case("RG1_J2KI")
    header = case.result.header
    assert header["BodyPartExamined"] == "CHEST" and header["StudyDescription"] == "THORAX"
    assert case.result.header_text.splitlines()[:2] == ["Body part: CHEST", "Study: THORAX"]
    assert "2004-08-26" in case.result.header_text
    assert session.accept_archive().region == "Chest"
    assert session.pending_text.endswith(" Chest")  # confirm, correct or replace what an earlier test set
    assert case.result.pacs_labels == ["Chest"]
    png = next(iter(radregion_server.truth))
    assert session.open_case(png).result.header == {}, "a PNG has no header"
    with pytest.raises(ValueError, match="the archive has no region label"):
        session.accept_archive()


def test_failed_connect_keeps_the_session_and_the_full_region_list_comes_back(proxy, monkeypatch, tmp_path):
    """Connect while the server is down keeps the session; after it returns, every region is listed again."""
    from PySide6.QtCore import Qt
    from test_slicer_module_import import wait_for_panel

    unlabel_all(proxy.server)

    module, app, window, widget = open_widget(monkeypatch, tmp_path)
    ui = widget.ui
    ui.serverUrlEdit.setText(proxy.url)
    ui.tokenEdit.setText(server_token(proxy) or os.environ.get("RADREGION_API_TOKEN", ""))
    ui.connectButton.click()
    wait_for_panel(widget)
    session = widget.logic.session
    regions = list(session.summary.regions)
    ui.queueComboBox.setCurrentIndex(ui.queueComboBox.findData("random"))
    ui.nextButton.click()
    wait_for_panel(widget)
    ui.nextButton.setFocus()  # keys go to the panel, not into a text field
    first = session.current
    assert first is not None, ui.statusLabel.text
    press(window, Qt.Key_Return)
    wait_for_panel(widget)
    assert session.current and session.current.image != first.image, ui.statusLabel.text
    confirmed, total = session.progress(fetch=False)

    proxy.stop()  # the server goes away
    ui.connectButton.click()
    wait_for_panel(widget)
    assert widget.logic.session is session, "a failed Connect keeps the session"
    assert "cannot reach the RadRegion server" in ui.statusLabel.text
    assert session.summary.regions == regions and ui.regionListWidget.count() == len(regions)
    assert [d.image for d in session.submitted] == [first.image], "undo history kept"
    assert ui.progressLabel.text.startswith(f"{confirmed} of {total} images confirmed") and total > 0
    press(window, Qt.Key_Return)  # a decision made while it is away waits in the outbox
    wait_for_panel(widget)
    assert len(session.outbox) == 1 and "1 waiting to be sent" in ui.progressLabel.text

    proxy.start()
    ui.nextButton.click()  # no Connect: the next request delivers the outbox and lists every region
    wait_for_panel(widget)
    assert len(session.outbox) == 0, ui.statusLabel.text
    assert session.current is not None and ui.regionListWidget.count() == len(regions)

    # Slicer started while the server was down: the first request after it returns brings the full list
    widget.logic.session = None
    proxy.stop()
    ui.connectButton.click()
    wait_for_panel(widget)
    fresh = widget.logic.session
    assert fresh is not session and fresh.summary is None and fresh.outbox.items() == []
    proxy.start()
    ui.imageIdEdit.setText(first.image)
    ui.openButton.click()
    wait_for_panel(widget)
    assert fresh.current.image == first.image and fresh.summary is not None, ui.statusLabel.text
    assert ui.regionListWidget.count() == len(regions), "the full region list, not the top 5"
    assert fresh.summary.model_version in ui.serverInfoLabel.text
    assert ui.caseLabel.text.endswith("opened by id"), "an image opened by id is not from a queue"
    session.close()
    close_widget(widget, window)


def test_panel_stays_responsive_while_the_server_delays_and_prefetches_the_next_case(proxy, monkeypatch, tmp_path):
    """A UI-thread QTimer keeps ticking while the server takes 3 s to answer; the next case is loaded meanwhile."""
    from PySide6.QtCore import QTimer, Qt
    from PySide6.QtTest import QTest
    from test_slicer_module_import import wait_for_panel

    unlabel_all(proxy.server)
    module, app, window, widget = open_widget(monkeypatch, tmp_path)
    ui = widget.ui
    ui.serverUrlEdit.setText(proxy.url)
    ui.tokenEdit.setText(os.environ.get("RADREGION_API_TOKEN", ""))
    ui.annotatorEdit.setText("responsive")
    ui.connectButton.click()
    wait_for_panel(widget)
    session = widget.logic.session
    assert session.summary is not None, ui.statusLabel.text

    import itk  # the stand-in's loadVolume reads with ITK: its first import (seconds) is not the panel's doing

    itk.imread(str(next(Path(proxy.server.studies).glob("*.png"))))
    ticks = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start()
    answered = []  # when the answer reached the UI thread (then the image is loaded there, as Slicer requires)
    show_image = widget.logic.show_current_image
    monkeypatch.setattr(widget.logic, "show_current_image", lambda: answered.append(time.monotonic()) or show_image())
    proxy.delay = 3.0
    ui.queueComboBox.setCurrentIndex(ui.queueComboBox.findData("random"))
    ui.nextButton.setFocus()  # keys go to the panel, not into a text field
    pressed = time.monotonic()
    press(window, Qt.Key_N)
    returned = time.monotonic()
    ui.imageIdEdit.setFocus()
    QTest.keyClicks(ui.imageIdEdit.obj, "typed while waiting")  # the panel takes input meanwhile
    wait_for_panel(widget)
    done = time.monotonic()
    case = session.current
    assert case is not None, ui.statusLabel.text
    assert ui.imageIdEdit.text == "typed while waiting"
    waited = answered[0]
    during = [t for t in ticks if pressed <= t <= waited]
    gaps = [b - a for a, b in zip([pressed] + during, during + [waited])]
    print(
        f"Next through a 3 s server: key handler {returned - pressed:.3f} s, {len(during)} ticks of 20 ms in "
        f"the {waited - pressed:.1f} s until the answer, longest gap {max(gaps):.3f} s; case shown after "
        f"{done - pressed:.1f} s"
    )
    assert waited - pressed >= proxy.delay, "the answer did come through the slow server"
    assert max(gaps) < proxy.delay / 3, "the UI thread was blocked while the server thought"
    assert len(during) >= 10

    # meanwhile the next case of the queue is fetched (prediction, label, file) in the background
    deadline = time.monotonic() + 120
    while session.prefetched is None and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.05)
    upcoming = session.prefetched
    assert upcoming and upcoming != case.image, "no case was prefetched"
    ui.nextButton.setFocus()
    press(window, Qt.Key_Return)
    wait_for_panel(widget)
    assert session.current.image == upcoming, ui.statusLabel.text
    asked = [p for p in proxy.paths if p.startswith("POST /infer/") and f"image={upcoming}&" in p + "&"]
    assert len(asked) == 1, f"the next case was shown from the prefetch, not asked for again: {asked}"
    timer.stop()
    proxy.delay = 0.0
    close_widget(widget, window)
