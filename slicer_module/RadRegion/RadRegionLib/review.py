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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple
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


TYPE_AHEAD_S = 1.0  # a second digit typed within this time makes a two-digit region number (1, 4 -> 14)
HISTORY_SIZE = 50  # decisions of this session kept for the panel's history list


@dataclass
class Decision:
    """One thing to send: a label for an image; after an undo, the restored earlier label (action "restore") or
    the removal of the label (action "delete")."""

    image: str
    region: Optional[str] = None
    out_of_domain: bool = False
    comment: str = ""
    annotator: str = ""
    action: str = "label"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    previous: Optional[dict] = None  # the label the image had before this decision (None: none): undo restores it
    undo_of: str = ""  # for the restore or removal an undo sends: the id of the decision taken back
    saved_at: str = ""  # a restore: the time of the restored label, kept as it was

    @classmethod
    def from_dict(cls, data: dict) -> "Decision":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def what(self) -> str:
        if self.action == "delete":
            return "no label"
        return "out of domain" if self.out_of_domain else (self.region or "no region")

    @property
    def text(self) -> str:
        if self.action == "delete":
            return f"remove the label of {self.image}"
        if self.action == "restore":
            return f"{self.image} = {self.what} again (undo)"
        return f"{self.image} = {self.what}"

    def same_label(self, label: Optional[dict]) -> bool:
        """True when `label` (a stored label) already says what this decision says."""
        if not label:
            return self.action == "delete"
        if self.out_of_domain or label.get("out_of_domain"):
            return bool(label.get("out_of_domain")) == self.out_of_domain and (label.get("region") or None) == (
                self.region or None
            )
        return label.get("region") == self.region


def label_text(label: Optional[dict]) -> str:
    """A stored label in words: "Knee", "out of domain"."""
    if not label:
        return "no label"
    if label.get("out_of_domain"):
        return "out of domain" + (f" ({label['region']})" if label.get("region") else "")
    return str(label.get("region") or "no region")


def label_owner_text(label: dict) -> str:
    """Who set a stored label and when: "by dr.x on 2026-11-30 00:41 UTC"."""
    who = label.get("annotator") or "an unknown annotator"
    when = str(label.get("saved_at") or "")
    if len(when) >= 16 and when[10] == "T":
        when = f"{when[:10]} {when[11:16]} UTC" if when.endswith("Z") else f"{when[:10]} {when[11:16]}"
    return f"by {who}" + (f" on {when}" if when else "")


@dataclass
class Case:
    image: str
    result: CaseResult
    image_path: Optional[str] = None
    source: str = ""  # the queue that served it; "" for an image opened by its id
    existing: Optional[dict] = None  # the label the server holds for it (region, annotator, saved_at...)
    provisional: bool = False  # the queue chose it before the server had scored every image

    @property
    def source_text(self) -> str:
        if not self.source:
            return "opened by id"
        provisional = " (provisional: the server is still scoring)" if self.provisional else ""
        return f"queue: {QUEUES.get(self.source, self.source)}{provisional}"

    @property
    def existing_text(self) -> str:
        if not self.existing:
            return ""
        return f"Labelled {label_text(self.existing)} {label_owner_text(self.existing)}"


class ReplaceNeedsConfirmation(ValueError):
    """Enter on an image someone already labelled differently: the panel says so; Enter again replaces it."""


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
    and `images/` (the downloaded radiographs). With `prefetch`, the next case of the queue (prediction, label,
    file) is loaded on a background thread while the annotator looks at the current one.

    The methods block on the server: a UI calls them off its own thread (RadRegionLib.tasks), one at a time.
    """

    def __init__(self, client: RadRegionClient, work_dir: str, annotator: Optional[str] = None, prefetch: bool = False):
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
        self.history: List[str] = []  # this session's decisions and undos in words, oldest first
        self._cases: Dict[str, Case] = {}
        self._refused: Dict[str, RequestRejected] = {}  # decision id -> the server's refusal
        self._replace_armed: Optional[str] = None  # the pending decision the annotator was warned about
        self._typed, self._typed_at = "", 0.0  # number keys typed so far (two-digit region numbers)
        self._prefetcher = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="radregion-prefetch") if prefetch else None
        )
        self._prefetch: Optional[Tuple[str, Future]] = None  # (queue, future of the next Case or None)
        self.online = False  # False after the server did not answer: no more waiting on it for counts
        self.status_message = "Not connected"

    # -- server ------------------------------------------------------------------------------------------------

    def connect(self) -> ServerSummary:
        """Read model version, regions and counts; deliver what is waiting in the outbox.

        A failure changes nothing but the status: the summary (regions), the case, undo and outbox stay.
        """
        try:
            summary = parse_summary(self.client.url, self.client.info(), self.client.stats())
        except ServerError as error:
            kept = " (session, regions and saved decisions kept)" if self.summary else ""
            self.status_message = f"Not connected: {error}{kept}"
            raise
        if self.summary and not summary.regions:
            summary.regions = self.summary.regions
        self.summary = summary
        self.online = True
        self.status_message = self.summary.text
        self.flush()
        return self.summary

    @property
    def regions(self) -> List[str]:
        """Every region, in the server's fixed order (that of the number keys)."""
        if self.summary and self.summary.regions:
            return self.summary.regions
        if self.current and self.current.result.regions:
            return self.current.result.regions
        return []

    def flush(self) -> int:
        """Send waiting decisions in order; stop at the first the server cannot take now. Returns how many went."""
        delivered = 0
        for decision in self.outbox.items():
            try:
                self._send(decision)
            except ServerUnreachable as error:
                self.online = False
                self.status_message = (
                    f"Server unreachable: {len(self.outbox)} decision(s) saved on this computer, "
                    f"sent when the server is back ({error})"
                )
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

    def progress(self, fetch: bool = True):
        """(confirmed, total): the server's counts (asked again with `fetch`) plus labels waiting in the outbox."""
        try:
            stats = self.client.stats() if self.online and fetch else {}
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

    def rollback(self) -> str:
        """Undo the last published training: the server serves the model it replaced again."""
        answer = self.client.rollback()
        self.status_message = (
            f"Rolled back: the server serves model {answer['model_version']} again "
            f"(generation {answer['generation']}; replaced {answer.get('rolled_back_from')})"
        )
        return self.status_message

    def close(self) -> None:
        """Stop the prefetch thread (a request in flight finishes on its own)."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False)
            self._prefetcher = None  # the session goes on without prefetching

    # -- cases -------------------------------------------------------------------------------------------------

    def next_case(self, queue: Optional[str] = None) -> Optional[Case]:
        """Load the next case of a queue (the current one by default); None when the queue is empty."""
        if queue:
            self.queue = queue
        self.flush()
        if len(self.outbox):
            self.current = None
            return None  # the server is away: the status message says so
        case = self._take_prefetched()
        if case is None:
            sample = self._next_sample(self.queue)
            self.online = True
            if not sample.get("id"):
                self.current, self.pending = None, None
                self.status_message = (
                    f"No case in the '{QUEUES.get(self.queue, self.queue)}' queue now: it is "
                    f"empty, or the server is still scoring the images (try again in a minute)"
                )
                return None
            case = self._load_case(sample["id"], source=self.queue, provisional=bool(sample.get("provisional")))
        return self._show(case)

    def open_case(self, image: str) -> Case:
        """Load a given image: prediction, the label it has, and the file."""
        return self._show(self._load_case(image, source=""))

    @property
    def prefetched(self) -> Optional[str]:
        """The image id loaded in the background for the next case (None while loading or when there is none)."""
        if not self._prefetch or not self._prefetch[1].done() or self._prefetch[1].exception():
            return None
        case = self._prefetch[1].result()
        return case.image if case else None

    def key_regions(self) -> List[str]:
        """The regions in the fixed order of the number keys (the server's order, the same for every case)."""
        return list(self.regions)

    def key_of(self, region: str) -> Optional[int]:
        regions = self.key_regions()
        return regions.index(region) + 1 if region in regions else None

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

    def choose_number(self, number: int) -> Decision:
        """Region number `number` of key_regions() (1 = the first)."""
        regions = self.key_regions()
        if not 1 <= number <= len(regions):
            raise ValueError(f"no region for key {number}")
        return self.choose(regions[number - 1])

    def type_digit(self, digit: int, now: Optional[float] = None) -> Decision:
        """A number key: picks region `digit` at once; a second digit within TYPE_AHEAD_S makes a two-digit
        number when there is such a region (1 then 4 picks region 14; 2 then 5 with 22 regions picks 5)."""
        now = time.monotonic() if now is None else now
        regions = self.key_regions()
        typed = self._typed + str(digit) if self._typed and now - self._typed_at <= TYPE_AHEAD_S else ""
        if not typed or not 1 <= int(typed) <= len(regions):
            typed = str(digit)
        self._typed, self._typed_at = typed, now
        if not 1 <= int(typed) <= len(regions):
            self._typed = ""
            raise ValueError(f"no region for key {digit}")
        return self.choose(regions[int(typed) - 1])

    def accept_archive(self) -> Decision:
        """Take the archive's label (of a header naming two regions, the one the model predicts, else the first)."""
        case = self._need_case()
        names = case.result.pacs_labels or ([case.result.pacs_label] if case.result.pacs_label else [])
        if not names:
            raise ValueError(f"{case.image}: the archive has no region label to accept")
        return self.choose(case.result.region if case.result.region in names else names[0])

    def mark_out_of_domain(self) -> Decision:
        """The image shows no body region (bone-density scan, fluoroscopy, test object...)."""
        case = self._need_case()
        self.pending = Decision(case.image, region=None, out_of_domain=True, annotator=self.annotator)
        return self.pending

    def enter_decision(self) -> Optional[Decision]:
        """What Enter sends: the pending decision, or the model's prediction when none was picked."""
        if not self.current:
            return None
        if self.pending is not None:
            return self.pending
        result = self.current.result
        if result.out_of_domain and not result.region:
            return Decision(self.current.image, out_of_domain=True)
        return Decision(self.current.image, region=result.region)

    @property
    def pending_text(self) -> str:
        """What Enter will send, in words."""
        decision = self.enter_decision()
        if decision is None:
            return ""
        existing = self.current.existing
        if existing and not decision.same_label(existing):
            return f"Replace {label_text(existing)} with {decision.what}"
        if decision.out_of_domain:
            return "Mark out of domain"
        if decision.region == self.current.result.region:
            return f"Confirm {decision.region or 'prediction'}"
        return f"Correct to {decision.region}"

    def submit(self, comment: Optional[str] = None, load_next: bool = True) -> Optional[Case]:
        """Send the pending decision (the prediction when none was picked) and load the next case.

        An image that already has a different label is replaced only at the second call for the same decision
        (the first raises ReplaceNeedsConfirmation saying whose label it is).
        """
        if not self.pending:
            self.confirm()
        decision, case = self.pending, self.current
        existing = case.existing if case and case.image == decision.image else None
        if existing and not decision.same_label(existing) and self._replace_armed != decision.id:
            self._replace_armed = decision.id
            raise ReplaceNeedsConfirmation(
                f"{decision.image} is already labelled {label_text(existing)} {label_owner_text(existing)}. "
                f"Press Enter again to replace it with {decision.what}."
            )
        self.pending, self._replace_armed = None, None
        if comment:
            decision.comment = comment
        decision.previous = dict(existing) if existing else None
        self.outbox.append(decision)
        self.submitted.append(decision)
        self.flush()
        if decision.id in self._refused:  # the annotator is here: hand the decision back to fix it
            self.submitted.pop()
            self.pending = decision
            raise self._refused.pop(decision.id)
        if case and case.image == decision.image:
            case.existing = {
                "region": decision.region,
                "out_of_domain": decision.out_of_domain,
                "annotator": decision.annotator,
                "comment": decision.comment,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        was = f" (was {label_text(existing)})" if existing else ""
        self._remember(f"{_short(decision.image)}: {decision.what}{was}")
        if len(self.outbox):
            self.current = None
            return None
        self.status_message = f"Saved {decision.text}"
        return self.next_case() if load_next else None

    def undo(self) -> Decision:
        """Take back the last submission and reopen its case: unsent, it leaves the outbox; sent, the label the
        image had before is restored (who set it, when, its comment), or removed when it had none."""
        if not self.submitted:
            raise ValueError("nothing to undo in this session")
        decision = self.submitted.pop()
        previous = decision.previous
        if not self.outbox.remove(decision.id):
            if previous:
                back = Decision(
                    decision.image,
                    region=previous.get("region"),
                    out_of_domain=bool(previous.get("out_of_domain")),
                    comment=previous.get("comment") or "",
                    annotator=previous.get("annotator") or "",
                    action="restore",
                    undo_of=decision.id,
                    saved_at=previous.get("saved_at") or "",
                )
            else:
                back = Decision(decision.image, action="delete", annotator=self.annotator, undo_of=decision.id)
            self.outbox.append(back)
            self.flush()
        self.current = self._cases.get(decision.image) or self.current
        if self.current and self.current.image != decision.image:
            self.current = None
        if self.current:
            self.current.existing = dict(previous) if previous else None
        self.pending = Decision(
            decision.image,
            region=decision.region,
            out_of_domain=decision.out_of_domain,
            comment=decision.comment,
            annotator=self.annotator,
        )
        self._replace_armed = None
        waiting = " (waits for the server)" if len(self.outbox) else ""
        back_to = f"back to {label_text(previous)}" if previous else "label removed"
        self._remember(f"{_short(decision.image)}: undo {decision.what}, {back_to}{waiting}")
        self.status_message = f"Undone: {decision.text}, {back_to}{waiting}"
        return decision

    # -- helpers -----------------------------------------------------------------------------------------------

    def _need_case(self) -> Case:
        if not self.current:
            raise ValueError("no case loaded: pick a queue and press Next")
        return self.current

    def _remember(self, text: str) -> None:
        self.history.append(f"{time.strftime('%H:%M')}  {text}")
        del self.history[:-HISTORY_SIZE]

    def _decided(self) -> set:
        return {d.image for d in self.submitted}

    def _next_sample(self, queue: str, exclude=()) -> dict:
        """The queue's next image ({"id", "provisional"...}), skipping the one on screen and this session's decided
        ones (a queue that picks at random may hand out the same image again)."""
        skip = set(exclude) | self._decided() | ({self.current.image} if self.current else set())
        sample = {}
        for _ in range(3):
            sample = self.client.next_sample(queue)
            if not sample.get("id") or sample["id"] not in skip:
                return sample
        return sample

    def _load_case(self, image: str, source: str, provisional: bool = False) -> Case:
        result = parse_infer(self.client.infer(image), image=image)
        existing = self.client.get_label(image)
        path = self.client.download_image(image, self.image_dir)
        return Case(
            image=image, result=result, image_path=path, source=source, existing=existing, provisional=provisional
        )

    def _show(self, case: Case) -> Case:
        self.current = case
        self._cases[case.image] = case
        self.pending, self._replace_armed, self._typed = None, None, ""
        if not (self.summary and self.summary.regions):
            self._read_summary()
        owner = f"; {case.existing_text}" if case.existing else ""
        self.status_message = f"{case.image}: the model says {case.result.prediction_text}{owner}"
        self._start_prefetch()
        return case

    def _read_summary(self) -> None:
        """After the server came back: the full region list and counts without another Connect."""
        try:
            summary = parse_summary(self.client.url, self.client.info(), self.client.stats())
        except ServerError:
            return
        if summary.regions:
            self.summary = summary

    def _start_prefetch(self) -> None:
        if self._prefetcher is None or not self.current or not self.current.source:
            return
        queue, exclude = self.current.source, {self.current.image} | self._decided()
        if self._prefetch and self._prefetch[0] == queue and not self._prefetch[1].done():
            return  # one is on its way
        self._prefetch = (queue, self._prefetcher.submit(self._fetch_next, queue, exclude))

    def _fetch_next(self, queue: str, exclude: set) -> Optional[Case]:
        sample = self._next_sample(queue, exclude)
        image = sample.get("id")
        if not image or image in exclude:
            return None
        return self._load_case(image, source=queue, provisional=bool(sample.get("provisional")))

    def _take_prefetched(self) -> Optional[Case]:
        """The case loaded in the background for this queue, if it is still worth showing."""
        if not self._prefetch:
            return None
        queue, future = self._prefetch
        self._prefetch = None
        if queue != self.queue:
            return None
        try:
            case = future.result()
        except Exception:  # the server went away meanwhile: ask again now, which says why
            return None
        if case is None or case.image in self._decided() or (self.current and case.image == self.current.image):
            return None
        try:
            case.existing = self.client.get_label(case.image)  # someone may have labelled it since
        except ServerError:
            return None
        return case

    def _send(self, decision: Decision) -> None:
        if decision.action == "delete":
            try:
                self.client.delete_label(decision.image, undo_of=decision.undo_of, undone_by=decision.annotator)
            except RequestRejected as error:
                if error.status != 404:  # already gone is what we wanted
                    raise
            return
        extra = (
            {"undo_of": decision.undo_of, "undone_by": self.annotator, "saved_at": decision.saved_at}
            if decision.action == "restore"
            else None
        )
        self.client.submit_label(
            decision.image, decision.region, decision.out_of_domain, decision.annotator, decision.comment, extra=extra
        )

    def _reject(self, decision: Decision, error: RequestRejected) -> None:
        self._refused[decision.id] = error
        record = dict(asdict(decision), reason=str(error), rejected=time.time())
        old = open(self.rejected_path, "rb").read() if os.path.exists(self.rejected_path) else b""
        atomic_write(self.rejected_path, old + (json.dumps(record) + "\n").encode("utf-8"))
        self.status_message = f"The server refused {decision.text}: {error} (kept in {self.rejected_path})"


def _short(image: str, keep: int = 6) -> str:
    """A long image id shortened for a history line: "1.2.82…336016"."""
    return image if len(image) <= 2 * keep + 1 else f"{image[:keep]}…{image[-keep:]}"


def server_work_dir(root: str, url: str) -> str:
    """One work folder per server, so that decisions never reach a server they were not made for."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    return os.path.join(root, re.sub(r"[^A-Za-z0-9.-]+", "_", parts.netloc + parts.path).strip("_") or "server")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some sandboxes
        return ""
