"""Put the review state into the panel's widgets (the object names of Resources/UI/RadRegion.ui).

Imports no Qt: it only calls widget methods that Slicer's PythonQt and PySide6 share (setText, setValue...),
so the same code fills the panel in Slicer and in the offscreen screenshot test.
"""

from typing import List, Optional

from .results import ServerSummary
from .review import QUEUES, ReviewSession

TOP = 5
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
        for name in ("submitButton", "outOfDomainButton", "regionListWidget", "commentEdit"):
            getattr(ui, name).setEnabled(case is not None)
        ui.undoButton.setEnabled(bool(session and session.submitted))
        ui.regionListWidget.clear()
        if case is None:
            ui.caseLabel.setText("No case loaded: pick a queue and press Next case")
            ui.predictionLabel.setText("–")
            ui.archiveLabel.setText("")
            ui.oodWarningLabel.setVisible(False)
            ui.pendingLabel.setText("")
            ui.submitButton.setText("Confirm (Enter)")
            self._show_bars([])
            return
        result = case.result
        ui.caseLabel.setText(f"{case.image}\nqueue: {QUEUES.get(session.queue, session.queue)}")
        ui.predictionLabel.setText(f"Model: {result.prediction_text}")
        self._show_bars(result.top)
        ui.archiveLabel.setText(result.agreement_text)
        ui.archiveLabel.setStyleSheet(AGREEMENT_STYLES.get(result.agrees_with_pacs, ""))
        ui.oodWarningLabel.setText(result.ood_warning)
        ui.oodWarningLabel.setVisible(bool(result.ood_warning))
        for number, region in enumerate(session.ranked_regions(), start=1):
            score = result.scores.get(region)
            key = f"{number}" if number <= 9 else " "
            ui.regionListWidget.addItem(f"{key}   {region}" + (f"   {_percent(score)}" if score is not None else ""))
        pending = session.pending
        if pending is not None and pending.region in session.ranked_regions():
            ui.regionListWidget.setCurrentRow(session.ranked_regions().index(pending.region))
        ui.pendingLabel.setText(f"Enter: {session.pending_text}")
        ui.submitButton.setText(f"{session.pending_text} (Enter)")

    def show_progress(self, confirmed: int, total: int, waiting: int = 0) -> None:
        self.ui.progressBar.setMaximum(max(total, 1))
        self.ui.progressBar.setValue(min(confirmed, max(total, 1)))
        suffix = f" · {waiting} waiting to be sent" if waiting else ""
        self.ui.progressLabel.setText(f"{confirmed} of {total} images confirmed{suffix}")

    def show_status(self, text: str) -> None:
        self.ui.statusLabel.setText(text)

    def show_train_status(self, text: str) -> None:
        self.ui.trainStatusLabel.setText(text)

    def _show_bars(self, top) -> None:
        for i in range(TOP):
            label = getattr(self.ui, f"topRegionLabel{i + 1}")
            bar = getattr(self.ui, f"topScoreBar{i + 1}")
            score_label = getattr(self.ui, f"topScoreLabel{i + 1}")
            region, score = top[i] if i < len(top) else ("", 0.0)
            label.setText(f"{i + 1}.  {region}")
            bar.setValue(int(round(score * 1000)))
            score_label.setText(_percent(score) if region else "")


def _percent(score: float) -> str:
    return "<1%" if 0 < score < 0.005 else f"{score:.0%}"


def _summary_text(summary: ServerSummary) -> str:
    return (f"Model {summary.model_version or 'unknown'} · {len(summary.regions)} regions\n"
            f"{summary.confirmed} of {summary.total} images confirmed")
