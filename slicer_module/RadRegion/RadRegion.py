"""RadRegion: review the anatomical-region predictions of a RadRegion server in 3D Slicer.

The widget only wires Qt to RadRegionLib (pure Python, tested outside Slicer) and shows the images.
"""

import logging
import os
import tempfile

import ctk  # noqa: F401  (Slicer's module loader expects the usual imports)
import qt
import slicer
import vtk  # noqa: F401
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from RadRegionLib import RadRegionClient, ReviewSession, ServerError, ServerUnreachable, server_work_dir
from RadRegionLib.panel import PanelView
from RadRegionLib.tasks import POLL_MS, BackgroundCalls

SERVER_URL_ENV = "RADREGION_SERVER_URL"  # used by the self-test
TOKEN_ENV = "RADREGION_API_TOKEN"  # the server's write token, when it needs one
SETTINGS_PREFIX = "RadRegion/"
TRAIN_POLL_MS = 5000
REQUEST_TIMEOUT_S = 15  # a plain request; inference gets longer (RadRegionClient.infer)


class RadRegion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RadRegion"
        self.parent.categories = ["Active Learning"]
        self.parent.dependencies = []
        self.parent.contributors = ["RadRegion team"]
        self.parent.helpText = (
            "Confirm or correct the anatomical region that the RadRegion server predicts for each radiograph. "
            "Keys: type a region's number (always the same region; 1 then 4 is region 14), A takes the archive's "
            "label, Enter submits, O marks out of domain, Ctrl+Z undoes, N loads the next case."
        )
        self.parent.acknowledgementText = (
            "Based on Langer et al., Self-Supervised Radiograph Anatomical Region Classification. "
            "Talks to a MONAI Label server running the RadRegion app."
        )


class RadRegionWidget(ScriptedLoadableModuleWidget):
    """Every server request runs on a worker thread (RadRegionLib.tasks); a QTimer on the UI thread collects the
    answers and updates the panel, so the panel and Slicer stay responsive while the server thinks."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        panel = slicer.util.loadUI(self.resourcePath("UI/RadRegion.ui"))
        self.layout.addWidget(panel)
        self.ui = slicer.util.childWidgetVariables(panel)
        self.view = PanelView(self.ui)
        self.view.fill_queues()
        self.logic = RadRegionLogic()
        self.shortcuts = []
        self.calls = BackgroundCalls()

        settings = qt.QSettings()
        self.ui.serverUrlEdit.setText(settings.value(SETTINGS_PREFIX + "url", "http://127.0.0.1:8000"))
        self.ui.annotatorEdit.setText(settings.value(SETTINGS_PREFIX + "annotator", ""))
        # the write token is a secret: taken from the environment, never stored in Slicer's settings
        self.ui.tokenEdit.setText(os.environ.get(TOKEN_ENV, ""))

        self.ui.connectButton.connect("clicked()", self.onConnect)
        self.ui.nextButton.connect("clicked()", self.onNext)
        self.ui.openButton.connect("clicked()", self.onOpen)
        # Enter in a text field reaches returnPressed only when the module's Enter shortcut is not installed
        self.ui.imageIdEdit.connect("returnPressed()", self.onOpen)
        self.ui.commentEdit.connect("returnPressed()", self.onSubmit)
        self.ui.submitButton.connect("clicked()", self.onSubmit)
        self.ui.acceptArchiveButton.connect("clicked()", self.onAcceptArchive)
        self.ui.outOfDomainButton.connect("clicked()", self.onOutOfDomain)
        self.ui.undoButton.connect("clicked()", self.onUndo)
        self.ui.regionListWidget.connect("itemClicked(QListWidgetItem*)", self.onRegionClicked)
        self.ui.trainButton.connect("clicked()", self.onTrain)
        self.ui.trainRefreshButton.connect("clicked()", self.onTrainRefresh)
        self.ui.rollbackButton.connect("clicked()", self.onRollback)

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_MS)
        self.pollTimer.connect("timeout()", self.calls.poll)
        self.pollTimer.start()
        self.trainTimer = qt.QTimer()
        self.trainTimer.setInterval(TRAIN_POLL_MS)
        self.trainTimer.connect("timeout()", self.onTrainRefresh)
        self.refresh()

    def enter(self):
        self._installShortcuts()

    def exit(self):
        self._removeShortcuts()

    def cleanup(self):
        self._removeShortcuts()
        self.trainTimer.stop()
        self.pollTimer.stop()
        self.calls.shutdown()
        if self.logic.session:
            self.logic.session.close()

    # -- keyboard: only while the module is shown, so Slicer's own keys work elsewhere --------------------------

    def _installShortcuts(self):
        if self.shortcuts:
            return
        keys = [(str(n), lambda n=n: self.onDigit(n)) for n in range(10)]
        keys += [
            ("Return", self.onSubmit),
            ("Enter", self.onSubmit),
            ("O", self.onOutOfDomain),
            ("A", self.onAcceptArchive),
            ("Ctrl+Z", self.onUndo),
            ("N", self.onNext),
        ]
        for key, handler in keys:
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", lambda handler=handler: self._onKey(handler))
            self.shortcuts.append(shortcut)

    def _onKey(self, handler):
        """Keys typed into a text field (the Python console, a search box) are not review commands."""
        focus = qt.QApplication.focusWidget()
        typing = isinstance(focus, (qt.QLineEdit, qt.QTextEdit, qt.QPlainTextEdit, qt.QAbstractSpinBox))
        if not typing or focus == self.ui.commentEdit:
            handler()
        elif handler == self.onSubmit:  # Enter in one of the panel's fields does what that field is for
            if focus == self.ui.imageIdEdit:
                self.onOpen()
            elif focus in (self.ui.serverUrlEdit, self.ui.tokenEdit, self.ui.annotatorEdit):
                self.onConnect()

    def _removeShortcuts(self):
        for shortcut in self.shortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self.shortcuts = []

    # -- actions: the ones that ask the server run in the background --------------------------------------------

    def onConnect(self):
        url, token = self.ui.serverUrlEdit.text.strip(), self.ui.tokenEdit.text.strip()
        annotator = self.ui.annotatorEdit.text.strip()
        settings = qt.QSettings()
        settings.setValue(SETTINGS_PREFIX + "url", url)
        settings.setValue(SETTINGS_PREFIX + "annotator", annotator)

        def connected():
            self.view.show_summary(self.logic.session.summary)
            self.view.fill_queues(self.logic.session.summary.queues)
            self.onTrainRefresh()

        self._call(
            lambda: self.logic.connect(url, token, annotator),
            then=connected,
            needs_session=False,
            waiting=f"Connecting to {url}…",
        )

    def onNext(self):
        queue = self.ui.queueComboBox.currentData
        self._call(lambda: self.logic.session.next_case(queue), show_image=True, waiting="Loading the next case…")

    def onOpen(self):
        image = self.ui.imageIdEdit.text.strip()
        if image:
            self._call(lambda: self.logic.session.open_case(image), show_image=True, waiting=f"Opening {image}…")

    def onSubmit(self):
        comment = self.ui.commentEdit.text.strip()
        self._call(
            lambda: self.logic.session.submit(comment=comment),
            show_image=True,
            then=self.ui.commentEdit.clear,
            waiting="Saving…",
        )

    def onUndo(self):
        self._call(lambda: self.logic.session.undo(), show_image=True, waiting="Undoing…")

    def onTrain(self):
        def started():
            self.trainTimer.start()
            self.onTrainRefresh()

        self._call(lambda: self.logic.session.train(), then=started, waiting="Starting training…")

    def onRollback(self):
        self._call(lambda: self.logic.session.rollback(), then=self.onTrainRefresh, waiting="Rolling back…")

    def onTrainRefresh(self):
        session = self.logic.session
        if not session or self.calls.busy:
            return  # the timer asks again later

        def status():
            try:
                return session.train_status()
            except ServerError as error:
                return str(error)

        def show(future):
            text = future.result()
            self.view.show_train_status(text)
            if self.trainTimer.isActive() and not text.startswith("Training"):
                self.trainTimer.stop()
                # a finished training brings a new model version
                self._call(lambda: session.connect(), then=lambda: self.view.show_summary(session.summary))

        self.calls.submit(status, show)

    # -- actions that only change the decision on screen: at once, on the UI thread ------------------------------

    def onDigit(self, digit):
        self._local(lambda: self.logic.session.type_digit(digit))

    def onRegionClicked(self, item):
        row = self.ui.regionListWidget.row(item)
        self._local(lambda: self.logic.session.choose(self.logic.session.key_regions()[row]))

    def onAcceptArchive(self):
        self._local(lambda: self.logic.session.accept_archive())

    def onOutOfDomain(self):
        self._local(lambda: self.logic.session.mark_out_of_domain())

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _call(self, action, show_image=False, needs_session=True, then=None, waiting="Asking the server…"):
        """Run a Lib call that talks to the server on the worker thread; its errors become words in the panel."""
        if needs_session and self.logic.session is None:
            self.view.show_status("Connect to a server first")
            return False
        if self.calls.busy:
            self.view.show_status(f"Still waiting for the server: {self.ui.statusLabel.text}")
            return False

        def work():
            result = action()
            if self.logic.session is not None:
                self.logic.session.progress()  # the counts, fetched here and not on the UI thread
            return result

        def done(future):
            error = future.exception()
            if isinstance(error, ServerUnreachable):
                self.view.show_status(f"{error}. Decisions are kept on this computer and sent when it is back.")
            elif isinstance(error, (ServerError, ValueError)):
                self.view.show_status(str(error))
            elif error is not None:  # a bug: say so in the panel and keep the traceback in the log
                self.view.show_status(f"Unexpected error: {error!r} (details in the Python console)")
                logging.error("RadRegion", exc_info=error)
            if show_image and self.logic.session is not None:
                self.logic.show_current_image()
            self.refresh(keep_status=error is not None)
            if error is None and then is not None:
                then()

        self.view.show_status(waiting)
        self.calls.submit(work, done)
        return True

    def _local(self, action):
        """A decision on the case on screen: no server involved, so at once; errors become words."""
        if self.logic.session is None:
            self.view.show_status("Connect to a server first")
            return False
        if self.calls.busy:
            self.view.show_status("Wait: the server is still answering")
            return False
        try:
            action()
        except ValueError as error:
            self.view.show_status(str(error))
            self.refresh(keep_status=True)
            return False
        self.refresh()
        return True

    def refresh(self, keep_status=False):
        session = self.logic.session
        for name in ("nextButton", "openButton", "trainButton", "trainRefreshButton"):
            getattr(self.ui, name).setEnabled(session is not None)
        self.view.show_case(session)
        if session is None:
            return
        confirmed, total = session.progress(fetch=False)
        self.view.show_progress(confirmed, total, len(session.outbox))
        if session.summary is not None:  # also when a request, not Connect, brought it after an outage
            self.view.show_summary(session.summary)
        if not keep_status:
            self.view.show_status(session.status_message)


class RadRegionLogic(ScriptedLoadableModuleLogic):
    """Owns the review session and the volume shown in the slice view."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = None
        self.volume = None

    def session_for(self, url, token="", annotator="", work_dir=None, prefetch=True):
        """The session for this server: the current one when it is the same server (token and annotator updated),
        else a new one (its outbox is this server's own)."""
        client = RadRegionClient(url, token=token or None, timeout=REQUEST_TIMEOUT_S)
        if self.session is not None and self.session.client.url == client.url:
            self.session.client.token = client.token
            self.session.annotator = annotator or self.session.annotator
            return self.session
        work_dir = work_dir or server_work_dir(os.path.join(slicer.app.cachePath, "RadRegion"), client.url)
        return ReviewSession(client, work_dir, annotator=annotator or None, prefetch=prefetch)

    def connect(self, url, token="", annotator="", work_dir=None, prefetch=True):
        """Connect; a failed Connect keeps the current session (its case, undo, outbox and regions)."""
        session = self.session_for(url, token, annotator, work_dir, prefetch)
        try:
            return session.connect()
        except ServerError:
            if self.session is None:
                self.session = session  # nothing to keep: the new one says what went wrong
            elif session is not self.session:
                self.session.status_message = session.status_message
                session.close()
            raise
        finally:
            if session.summary is not None and session is not self.session:
                if self.session is not None:
                    self.session.close()
                self.session = session

    def show_current_image(self):
        """Load the current case's file into the red slice view; drop the previous one."""
        case = self.session.current if self.session else None
        if case is None or not case.image_path:
            return None
        if self.volume is not None and self.volume.GetAttribute("RadRegion.path") == case.image_path:
            return self.volume
        if self.volume is not None and slicer.mrmlScene.IsNodePresent(self.volume):
            slicer.mrmlScene.RemoveNode(self.volume)
        try:
            self.volume = slicer.util.loadVolume(
                case.image_path, {"singleFile": True, "show": True, "name": case.image}
            )
        except RuntimeError as error:  # loadVolume raises when the reader fails
            self.session.status_message = f"{case.image_path}: Slicer cannot load this image ({error})"
            self.volume = None
            return None
        self.volume.SetAttribute("RadRegion.path", case.image_path)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
            slicer.util.resetSliceViews()
        return self.volume


class RadRegionTest(ScriptedLoadableModuleTest):
    """The annotation run inside Slicer, against the server at $RADREGION_SERVER_URL (e.g. one from make serve).

    It writes labels: point it at a test server. Outage and recovery are simulated by switching the client to a
    closed port and back.
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_annotation_run()

    def test_annotation_run(self):
        url = os.environ.get(SERVER_URL_ENV)
        if not url:
            self.delayDisplay(f"Set {SERVER_URL_ENV} to a RadRegion test server to run the annotation test")
            return
        logic = RadRegionLogic()
        summary = logic.connect(url, annotator="slicer-selftest", work_dir=tempfile.mkdtemp(prefix="radregion-"))
        self.assertTrue(summary.regions, "the server lists no regions")
        session, client = logic.session, logic.session.client

        for queue in ("disagreement", "uncertain", "ood", "random"):
            case = session.next_case(queue)
            if case is None and queue == "disagreement":
                self.delayDisplay("No disagreement with the archive to review")  # a legitimate empty queue
                continue
            self.assertIsNotNone(case, f"queue {queue} gave no case: {session.status_message}")
            self.assertIsNotNone(logic.show_current_image(), f"{case.image_path} did not load")
        self.delayDisplay("A case from each queue loaded")

        confirmed = session.current
        session.submit()
        self.assertEqual(client.get_label(confirmed.image)["region"], confirmed.result.region)

        corrected = session.current
        other = [r for r in session.key_regions() if r != corrected.result.region][0]
        session.choose(other)
        session.submit(comment="self-test correction")
        self.assertEqual(client.get_label(corrected.image)["region"], other)

        session.undo()
        self.assertIsNone(client.get_label(corrected.image))
        self.assertEqual(session.current.image, corrected.image)

        session.mark_out_of_domain()
        real_url = client.url
        client.url = "http://127.0.0.1:9"  # nothing listens there: the server is "down"
        session.submit()
        self.assertEqual(len(session.outbox), 1)
        client.url = real_url
        self.assertEqual(session.flush(), 1)
        self.assertTrue(client.get_label(corrected.image)["out_of_domain"])
        self.delayDisplay("Annotation run passed")
