"""Put the review state into the panel's widgets (the object names of Resources/UI/RadRegion.ui).

Imports no Qt: it only calls widget methods that Slicer's PythonQt and PySide6 share (setText, setValue...),
so the same code fills the panel in Slicer and in the offscreen screenshot test.
"""

from typing import List, Optional

from .results import ServerSummary
from .review import QUEUES, ReviewSession

TOP = 5
HISTORY_SHOWN = 20
BUTTON_CHARS = 26  # longer decisions are shortened on the button (the line above it has them in full)
AGREEMENT_STYLES = {True: "color: #1f6f2a;", False: "color: #a40000; font-weight: bold;"}


class PanelView:
    """`ui`: any object with the .ui's widgets as attributes (slicer.util.childWidgetVariables gives one)."""

    def __init__(self, ui):
        self.ui = ui

    def fill_queues(self, offered: Optional[List[str]] = None) -> None:
        """The queues the server offers (all known ones before connecting); keeps the current choice."""
        combo = self.ui.queueComboBox
        current = combo.currentData() if callable(combo.currentData) else combo.currentData
        names = [q for q in QUEUES if not offered or q in offered] + [q for q in offered or [] if q not in QUEUES]
        combo.clear()
        for name in names:
            combo.addItem(QUEUES.get(name, name), name)
        if current in names:
            combo.setCurrentIndex(names.index(current))

    def show_summary(self, summary: Optional[ServerSummary]) -> None:
        self.ui.serverInfoLabel.setText(_summary_text(summary) if summary else "Not connected")
        self.ui.serverInfoLabel.setToolTip("Regions: " + ", ".join(summary.regions) if summary else "")

    def show_case(self, session: Optional[ReviewSession]) -> None:
        """The current case of the session (the empty state when there is none, or no session yet)."""
        ui, case = self.ui, session.current if session else None
        for name in ("submitButton", "outOfDomainButton", "regionListWidget", "commentEdit", "acceptArchiveButton"):
            getattr(ui, name).setEnabled(case is not None)
        ui.undoButton.setEnabled(bool(session and session.submitted))
        self.show_history(session.history if session else [])
        ui.regionListWidget.clear()
        if case is None:
            ui.caseLabel.setText("No case loaded: pick a queue and press Next case")
            ui.caseLabel.setToolTip("")
            for name in ("headerLabel", "existingLabel"):
                getattr(ui, name).setText("")
                getattr(ui, name).setVisible(False)
            ui.predictionLabel.setText("–")
            ui.archiveLabel.setText("")
            ui.oodWarningLabel.setVisible(False)
            ui.pendingLabel.setText("")
            ui.submitButton.setText("Confirm (Enter)")
            self._show_bars([], session)
            return
        result = case.result
        ui.caseLabel.setText(f"{elide_middle(case.image)}\n{case.source_text}")
        ui.caseLabel.setToolTip(case.image)
        ui.headerLabel.setText(result.header_text)
        ui.headerLabel.setVisible(bool(result.header_text))
        ui.existingLabel.setText(case.existing_text)
        ui.existingLabel.setVisible(bool(case.existing_text))
        ui.predictionLabel.setText(f"Model: {result.prediction_text}")
        self._show_bars(result.top, session)
        ui.archiveLabel.setText(result.agreement_text)
        ui.archiveLabel.setStyleSheet(AGREEMENT_STYLES.get(result.agrees_with_pacs, ""))
        ui.acceptArchiveButton.setEnabled(bool(result.pacs_label))
        ui.oodWarningLabel.setText(result.ood_warning)
        ui.oodWarningLabel.setVisible(bool(result.ood_warning))
        regions = session.key_regions()
        for number, region in enumerate(regions, start=1):
            score = result.scores.get(region)
            shown = f"{number:>2}   {region}" + (f"   {_percent(score)}" if score is not None else "")
            ui.regionListWidget.addItem(shown)
        pending = session.pending
        if pending is not None and pending.region in regions:
            ui.regionListWidget.setCurrentRow(regions.index(pending.region))
        ui.pendingLabel.setText(f"Enter: {session.pending_text}")
        ui.submitButton.setText(f"{_button_text(session)} (Enter)")
        ui.submitButton.setToolTip(session.pending_text)

    def show_history(self, history: List[str]) -> None:
        """This session's decisions, newest first."""
        widget = self.ui.historyListWidget
        widget.clear()
        for line in reversed(history[-HISTORY_SHOWN:]):
            widget.addItem(line)

    def show_progress(self, confirmed: int, total: int, waiting: int = 0) -> None:
        self.ui.progressBar.setMaximum(max(total, 1))
        self.ui.progressBar.setValue(min(confirmed, max(total, 1)))
        suffix = f" · {waiting} waiting to be sent" if waiting else ""
        self.ui.progressLabel.setText(f"{confirmed} of {total} images confirmed{suffix}")

    def show_status(self, text: str) -> None:
        self.ui.statusLabel.setText(text)

    def show_train_status(self, text: str) -> None:
        self.ui.trainStatusLabel.setText(text)

    def _show_bars(self, top, session=None) -> None:
        """The top predictions, each with the number that picks it."""
        for i in range(TOP):
            label = getattr(self.ui, f"topRegionLabel{i + 1}")
            bar = getattr(self.ui, f"topScoreBar{i + 1}")
            score_label = getattr(self.ui, f"topScoreLabel{i + 1}")
            region, score = top[i] if i < len(top) else ("", 0.0)
            key = session.key_of(region) if session and region else None
            label.setText(f"[{key}]  {region}" if key else region)
            bar.setValue(int(round(score * 1000)))
            score_label.setText(_percent(score) if region else "")


def elide_middle(text: str, limit: int = 44) -> str:
    """Long ids shortened in the middle ("1.2.826.0.1.36…2225336016"), so they never widen the panel."""
    text = str(text)
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return f"{text[:head]}…{text[len(text) - (limit - 1 - head) :]}"


def _button_text(session: ReviewSession) -> str:
    """What Enter does, short enough for the button (the line above it says it in full)."""
    text = session.pending_text
    if len(text) <= BUTTON_CHARS:
        return text
    decision = session.enter_decision()
    verb = "Replace with" if text.startswith("Replace") else text.split(" ")[0]
    return f"{verb} {elide_middle(decision.what, 20)}"


def _percent(score: float) -> str:
    return "<1%" if 0 < score < 0.005 else f"{score:.0%}"


def _summary_text(summary: ServerSummary) -> str:
    return (
        f"Model {summary.model_version or 'unknown'} · {len(summary.regions)} regions\n"
        f"{summary.confirmed} of {summary.total} images confirmed"
    )
