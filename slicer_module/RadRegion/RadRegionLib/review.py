"""The review state of one annotator: queue, current case, pending decision, undo, and the on-disk outbox.

Every decision goes through the outbox (a JSON-lines file rewritten atomically) and leaves it only once the
server has it, so a decision made while the server is down is delivered when it is back, even after a restart.
"""

import getpass
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional
from urllib.parse import urlsplit

from .client import RadRegionClient, RequestRejected, ServerError, ServerUnreachable, atomic_write
from .results import CaseResult, ServerSummary, parse_infer, parse_summary, train_status_text

# MONAI Label active-learning strategies of the RadRegion app, with the words the panel shows
QUEUES = {
    "uncertain": "Uncertain predictions",
    "disagreement": "Disagrees with the archive",
    "ood": "Out-of-domain suspects",
    "diverse": "Uncertain and unlike those seen",
    "random": "Random",
}


@dataclass
class Decision:
    """One thing to send: a label for an image, or (action "delete") the removal of one."""

    image: str
    region: Optional[str] = None
    out_of_domain: bool = False
    comment: str = ""
    annotator: str = ""
    action: str = "label"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, data: dict) -> "Decision":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def text(self) -> str:
        if self.action == "delete":
            return f"remove the label of {self.image}"
        what = "out of domain" if self.out_of_domain else (self.region or "no region")
        return f"{self.image} = {what}"


@dataclass
class Case:
    image: str
    result: CaseResult
    image_path: Optional[str] = None


class Outbox:
    """Decisions not yet delivered, oldest first, in a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def items(self) -> List[Decision]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as file:
            return [Decision.from_dict(json.loads(line)) for line in file if line.strip()]

    def append(self, decision: Decision) -> None:
        self._write(self.items() + [decision])

    def remove(self, decision_id: str) -> bool:
        items = self.items()
        kept = [d for d in items if d.id != decision_id]
        self._write(kept)
        return len(kept) < len(items)

    def __len__(self) -> int:
        return len(self.items())

    def _write(self, decisions: List[Decision]) -> None:
        text = "".join(json.dumps(asdict(d)) + "\n" for d in decisions)
        atomic_write(self.path, text.encode("utf-8"))


class ReviewSession:
    """What the panel drives: connect, next case, decide, submit, undo, train.

    `work_dir` holds `outbox.jsonl`, `rejected.jsonl` (decisions the server refused, kept for a person to read)
    and `images/` (the downloaded radiographs).
    """

    def __init__(self, client: RadRegionClient, work_dir: str, annotator: Optional[str] = None):
        self.client = client
        self.work_dir = work_dir
        self.annotator = annotator if annotator is not None else _user()
        self.outbox = Outbox(os.path.join(work_dir, "outbox.jsonl"))
        self.rejected_path = os.path.join(work_dir, "rejected.jsonl")
        self.image_dir = os.path.join(work_dir, "images")
        self.queue = "uncertain"
        self.summary: Optional[ServerSummary] = None
        self.current: Optional[Case] = None
        self.pending: Optional[Decision] = None
        self.submitted: List[Decision] = []  # this session's label decisions, for undo
        self._cases: Dict[str, Case] = {}
        self._refused: Dict[str, RequestRejected] = {}  # decision id -> the server's refusal
        self.online = False  # False after the server did not answer: no more waiting on it for counts
        self.status_message = "Not connected"

    # -- server ------------------------------------------------------------------------------------------------

    def connect(self) -> ServerSummary:
        """Read model version, regions and counts; deliver what is waiting in the outbox."""
        try:
            self.summary = parse_summary(self.client.url, self.client.info(), self.client.stats())
        except ServerError as error:
            self.status_message = f"Not connected: {error}"
            raise
        self.online = True
        self.status_message = self.summary.text
        self.flush()
        return self.summary

    @property
    def regions(self) -> List[str]:
        return self.summary.regions if self.summary else []

    def flush(self) -> int:
        """Send waiting decisions in order; stop at the first the server cannot take now. Returns how many went."""
        delivered = 0
        for decision in self.outbox.items():
            try:
                self._send(decision)
            except ServerUnreachable as error:
                self.online = False
                self.status_message = (f"Server unreachable: {len(self.outbox)} decision(s) saved on this computer, "
                                       f"sent when the server is back ({error})")
                return delivered
            except RequestRejected as error:
                if error.status >= 500:
                    self.status_message = f"Server error, {len(self.outbox)} decision(s) kept for later: {error}"
                    return delivered
                self._reject(decision, error)
            else:
                delivered += 1
                self.online = True
            self.outbox.remove(decision.id)
        if delivered:
            self.status_message = f"Delivered {delivered} saved decision(s) to the server"
        return delivered

    def progress(self):
        """(confirmed, total): the server's counts plus labels still waiting in the outbox."""
        try:
            stats = self.client.stats() if self.online else {}
            if self.summary and stats:
                self.summary.total = int(stats.get("total", self.summary.total))
                self.summary.confirmed = int(stats.get("completed", self.summary.confirmed))
        except ServerError:
            pass  # offline: the last known counts
        confirmed = self.summary.confirmed if self.summary else 0
        total = self.summary.total if self.summary else 0
        waiting = sum(1 for d in self.outbox.items() if d.action == "label")
        return confirmed + waiting, total

    def train(self) -> str:
        self.client.train()
        self.status_message = "Training started: the server retrains the head on the confirmed labels"
        return self.status_message

    def train_status(self) -> str:
        return train_status_text(self.client.train_status())

    # -- cases -------------------------------------------------------------------------------------------------

    def next_case(self, queue: Optional[str] = None) -> Optional[Case]:
        """Load the next case of a queue (the current one by default); None when the queue is empty."""
        if queue:
            self.queue = queue
        self.flush()
        if len(self.outbox):
            self.current = None
            return None  # the server is away: the status message says so
        image = self.client.next_case(self.queue)
        self.online = True
        if not image:
            self.current, self.pending = None, None
            self.status_message = (f"No case in the '{QUEUES.get(self.queue, self.queue)}' queue now: it is empty, "
                                   f"or the server is still scoring the images (try again in a minute)")
            return None
        return self.open_case(image)

    def open_case(self, image: str) -> Case:
        """Load a given image: prediction and file."""
        result = parse_infer(self.client.infer(image), image=image)
        path = self.client.download_image(image, self.image_dir)
        self.current = Case(image=image, result=result, image_path=path)
        self._cases[image] = self.current
        self.pending = None
        self.status_message = f"{image}: the model says {result.prediction_text}"
        return self.current

    def ranked_regions(self) -> List[str]:
        """All regions, the current case's most likely first: number keys 1-9 pick from this list."""
        if not self.current:
            return list(self.regions)
        scored = [name for name, _ in self.current.result.top]
        scores = self.current.result.scores
        rest = sorted((r for r in self.regions if r not in scored), key=lambda r: -scores.get(r, -1.0))
        return scored + rest

    # -- decisions ---------------------------------------------------------------------------------------------

    def confirm(self) -> Decision:
        """Agree with the model's prediction."""
        case = self._need_case()
        if case.result.out_of_domain and not case.result.region:
            return self.mark_out_of_domain()
        return self.choose(case.result.region)

    def choose(self, region: str) -> Decision:
        case = self._need_case()
        if self.regions and region not in self.regions:
            raise ValueError(f"unknown region {region!r}; valid regions: {', '.join(self.regions)}")
        self.pending = Decision(case.image, region=region, annotator=self.annotator)
        return self.pending

    @property
    def pending_text(self) -> str:
        """What Enter will send, in words."""
        if not self.current:
            return ""
        decision = self.pending
        if decision is None or (not decision.out_of_domain and decision.region == self.current.result.region):
            return f"Confirm {self.current.result.region or 'prediction'}"
        if decision.out_of_domain:
            return "Mark out of domain"
        return f"Correct to {decision.region}"

    def choose_number(self, number: int) -> Decision:
        """Number key 1-9: the n-th region of ranked_regions()."""
        ranked = self.ranked_regions()
        if not 1 <= number <= min(9, len(ranked)):
            raise ValueError(f"no region for key {number}")
        return self.choose(ranked[number - 1])

    def mark_out_of_domain(self) -> Decision:
        """The image shows no body region (bone-density scan, fluoroscopy, test object...)."""
        case = self._need_case()
        self.pending = Decision(case.image, region=None, out_of_domain=True, annotator=self.annotator)
        return self.pending

    def submit(self, comment: Optional[str] = None, load_next: bool = True) -> Optional[Case]:
        """Send the pending decision (the prediction when none was picked) and load the next case."""
        if not self.pending:
            self.confirm()
        decision, self.pending = self.pending, None
        if comment:
            decision.comment = comment
        self.outbox.append(decision)
        self.submitted.append(decision)
        self.flush()
        if decision.id in self._refused:  # the annotator is here: hand the decision back to fix it
            self.submitted.pop()
            self.pending = decision
            raise self._refused.pop(decision.id)
        if len(self.outbox):
            self.current = None
            return None
        self.status_message = f"Saved {decision.text}"
        return self.next_case() if load_next else None

    def undo(self) -> Decision:
        """Take back the last submission: unsent, it leaves the outbox; sent, the label is removed. Reopens the case."""
        if not self.submitted:
            raise ValueError("nothing to undo in this session")
        decision = self.submitted.pop()
        if not self.outbox.remove(decision.id):
            self.outbox.append(Decision(decision.image, action="delete", annotator=self.annotator))
            self.flush()
        self.current = self._cases.get(decision.image) or self.current
        if self.current and self.current.image != decision.image:
            self.current = None
        self.pending = Decision(decision.image, region=decision.region, out_of_domain=decision.out_of_domain,
                                comment=decision.comment, annotator=self.annotator)
        waiting = " (removal waits for the server)" if len(self.outbox) else ""
        self.status_message = f"Undone: {decision.text}{waiting}"
        return decision

    # -- helpers -----------------------------------------------------------------------------------------------

    def _need_case(self) -> Case:
        if not self.current:
            raise ValueError("no case loaded: pick a queue and press Next")
        return self.current

    def _send(self, decision: Decision) -> None:
        if decision.action == "delete":
            try:
                self.client.delete_label(decision.image)
            except RequestRejected as error:
                if error.status != 404:  # already gone is what we wanted
                    raise
            return
        self.client.submit_label(decision.image, decision.region, decision.out_of_domain, decision.annotator,
                                 decision.comment)

    def _reject(self, decision: Decision, error: RequestRejected) -> None:
        self._refused[decision.id] = error
        record = dict(asdict(decision), reason=str(error), rejected=time.time())
        old = open(self.rejected_path, "rb").read() if os.path.exists(self.rejected_path) else b""
        atomic_write(self.rejected_path, old + (json.dumps(record) + "\n").encode("utf-8"))
        self.status_message = f"The server refused {decision.text}: {error} (kept in {self.rejected_path})"


def server_work_dir(root: str, url: str) -> str:
    """One work folder per server, so that decisions never reach a server they were not made for."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    return os.path.join(root, re.sub(r"[^A-Za-z0-9.-]+", "_", parts.netloc + parts.path).strip("_") or "server")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some sandboxes
        return ""
