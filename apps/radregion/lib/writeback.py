"""Annotators' decisions on PACS images: the decision log an admin exports, and the opt-in write-back.

The decision log, <label_dir>/decisions.jsonl, is append-only (one JSON object a line, fsynced): every label set,
replaced, undone or removed is a line with who, when, the image (patient, study, series), what the archive says,
the model's answer, the decision, the label it replaced and what was written where (`event`: "label", "confirm"
for the same label again, "undo", "remove"); a finished STOW-RS adds a "written" line. `GET /radregion/decisions`
serves it (install_export_route). An undo restores the earlier label (a label save naming `undo_of` and
`undone_by`) or, for an image's first label, removes it (`DELETE /datastore/label?...&undo_of=&undone_by=`,
install_label_delete_route): either way an "undo" line whose `who` is `undone_by`.

Write-back (mode "stow" or "csv") of a decision that corrects the archive: the original instance is never touched.
The copy is a derived instance (ImageType DERIVED, a new series of the same study with its own series number,
DerivationDescription, SourceImageSequence; radregion.dicomwrite.mark_derived); its SOPInstanceUID comes from
(original SOPInstanceUID, region), so the same correction twice stores nothing new. A later decision on the image
supersedes the copies it contradicts (a "superseded" line, and in the decision log). Every step is a line of
<label_dir>/writeback.jsonl (queued, stored, failed, superseded); queued or failed ones are sent again.
"""

import csv
import hmac
import io
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from radregion.atomic import atomic_write

logger = logging.getLogger(__name__)

MODES = ("off", "stow", "csv")
DONE = ("stored", "exported", "skipped")
LIVE = ("stored", "queued", "failed", "exported")  # copies (or CSV rows) a later decision may supersede
WRITEBACK_MARKER = "RADREGION CORRECTED"
CSV_FIELDS = (
    "time",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "archive_BodyPartExamined",
    "archive_region",
    "region",
    "out_of_domain",
    "BodyPartExamined",
    "annotator",
    "comment",
    "status",
)
EXPORT_PATH = "/radregion/decisions"


def _now(seconds=None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _read_lines(path: Path) -> list:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            logger.warning("%s: skipping a damaged line", path)
    return out


def _append(path: Path, entry: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _label_summary(label) -> dict | None:
    if not label:
        return None
    return {k: label.get(k) for k in ("region", "out_of_domain", "annotator", "comment", "saved_at")}


def _same(a, b) -> bool:
    return (
        bool(a)
        and bool(b)
        and (a.get("region"), bool(a.get("out_of_domain"))) == (b.get("region"), bool(b.get("out_of_domain")))
    )


class WriteBack:
    """Logs every decision; sends (mode "stow") or exports (mode "csv") corrections; mode "off" writes nothing."""

    def __init__(self, mode, label_dir, client=None, url="", describe_error=str):
        """`describe_error`: exception -> the text logged for a failed write-back."""
        if mode not in MODES:
            raise ValueError(f"writeback must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.client = client
        self.url = url
        self.describe_error = describe_error
        self.label_dir = Path(label_dir)
        self.log_path = self.label_dir / "writeback.jsonl"
        self.csv_path = self.label_dir / "writeback.csv"
        self.decisions_path = self.label_dir / "decisions.jsonl"
        self._lock = threading.RLock()
        self._idle = threading.Condition()
        self._in_flight = set()
        self._superseded_in_flight = {}  # (image, region) -> the decision that superseded a copy being sent
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="radregion-writeback")

    # ---- the logs ----------------------------------------------------------------------------------------
    def entries(self) -> list:
        return _read_lines(self.log_path)

    def decisions(self, image=None) -> list:
        """The decision log, oldest first (of one image with `image`)."""
        return [e for e in _read_lines(self.decisions_path) if image is None or e.get("image") == image]

    def current_decisions(self) -> dict:
        """{image: its latest decision (label, confirm, undo or remove)}: what stands now."""
        return {e["image"]: e for e in self.decisions() if e.get("event") != "written"}

    def latest(self) -> dict:
        """{(image, region): its latest write-back log entry}."""
        return {(e["image"], e["region"]): e for e in self.entries()}

    def pending(self, queued_for_s: float = 120.0) -> list:
        """Write-backs that failed, or stayed queued (server stopped mid-way) for `queued_for_s`: to send again."""
        oldest = _now(time.time() - queued_for_s)
        return [
            e
            for e in self.latest().values()
            if e["status"] == "failed" or (e["status"] == "queued" and e["time"] <= oldest)
        ]

    def created_uids(self) -> set:
        """Every instance this product stored (superseded ones too): never listed as an image."""
        return {
            e["new_sop"]
            for e in self.entries()
            if e.get("new_sop") and (e.get("status") == "stored" or e.get("was") == "stored")
        }

    def wait(self, timeout=None) -> bool:
        """Block until every queued write-back has been tried; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._in_flight, timeout)

    def _log(self, entry: dict):
        _append(self.log_path, entry)

    # ---- a decision ----------------------------------------------------------------------------------------
    def record(self, image_id, label, info, fetch, taxonomy, *, previous=None, raw=None, model=None) -> dict:
        """Log a decision on `image_id` and write it back: `label` the stored label (None: removed), `previous`
        the label it replaced, `raw` what the client sent (the label JSON; for a removal, the query of
        `DELETE /datastore/label`): an undo names `undo_of` and `undone_by`, who is then the one recorded,
        `model` the model's answer. Returns the decision log line."""
        raw = raw or {}
        if raw.get("undo_of"):
            event = "undo"  # the earlier label restored, or (label None) the image's first label taken back
        elif label is None:
            event = "remove"
        elif _same(label, previous):
            event = "confirm"
        else:
            event = "label"
        who = raw.get("undone_by") if event == "undo" else (label or {}).get("annotator")
        decision = {
            "id": uuid.uuid4().hex,
            "time": _now(),
            "event": event,
            "who": who or None,
            "image": image_id,
            "patient": info.get("PatientID"),
            "study": info.get("StudyInstanceUID"),
            "series": info.get("SeriesInstanceUID"),
            "archive": {
                "region": info.get("pacs_label"),
                "regions": list(info.get("pacs_labels") or ()),
                "BodyPartExamined": info.get("BodyPartExamined"),
            },
            "model": model,
            "decision": _label_summary(label),
            "previous": _label_summary(previous),
            "undo_of": raw.get("undo_of") or None,
        }
        with self._lock:
            decision["supersedes"] = self._supersede(image_id, label, decision["id"])
            decision["written"] = self._write(image_id, label, info, fetch, taxonomy, decision["id"])
            _append(self.decisions_path, decision)
        return decision

    def _write(self, image_id, label, info, fetch, taxonomy, decision_id) -> dict:
        """What the write-back does for this decision, in words and UIDs (also when it does nothing)."""
        if self.mode == "off":
            return {"mode": "off"}
        where = {"mode": self.mode, "to": self.url if self.mode == "stow" else str(self.csv_path)}
        if label is None:
            return {**where, "status": "none", "why": "label removed"}
        region = label.get("region")
        if label.get("out_of_domain"):
            if self.mode == "csv":
                self._export_csv(self._entry(image_id, label, info, None, decision_id), status="current")
                return {**where, "status": "exported", "why": "out of domain"}
            return {**where, "status": "none", "why": "out of domain: no body part to write"}
        if region == info.get("pacs_label") or region in (info.get("pacs_labels") or ()):
            return {**where, "status": "none", "why": f"the archive already names {region}"}
        entry = self.submit(image_id, label, info, fetch, taxonomy, decision_id=decision_id)
        if entry is None:
            copy = self.latest().get((image_id, region), {})
            return {
                **where,
                "status": copy.get("status"),
                "why": "this copy is already written",
                **({"sop": copy["new_sop"], "series": copy.get("new_series")} if copy.get("new_sop") else {}),
            }
        out = {**where, "status": entry["status"]}
        for key, name in (("new_sop", "sop"), ("new_series", "series"), ("study", "study"), ("error", "error")):
            if entry.get(key):
                out[name] = entry[key]
        if entry.get("reinstated"):
            out["why"] = "the copy stored before is current again"
        return out

    def _supersede(self, image_id, label, decision_id) -> list:
        """Mark the image's copies (and CSV rows) that the new decision contradicts as superseded."""
        region = None if label is None or label.get("out_of_domain") else label.get("region")
        out = []
        for (image, copy_region), entry in self.latest().items():
            if image != image_id or copy_region == region or entry["status"] not in LIVE:
                continue
            line = {
                **entry,
                "time": _now(),
                "status": "superseded",
                "was": entry["status"],
                "superseded_by": decision_id,
                "error": None,
            }
            self._log(line)
            if (image, copy_region) in self._in_flight:
                self._superseded_in_flight[(image, copy_region)] = decision_id
            out.append({"region": copy_region, "was": entry["status"], "sop": entry.get("new_sop")})
        if self.mode == "csv" and self.csv_path.exists():
            self._mark_csv(image_id, keep=region)
        return out

    def submit(self, image_id: str, label: dict, info: dict, fetch, taxonomy, decision_id=None):
        """Write back a `final` label if it corrects the archive; returns the write-back log entry or None.

        CSV rows are written at once; STOW-RS runs in a background thread so a slow PACS never holds up a save.
        """
        if self.mode == "off":
            return None
        region = label.get("region")
        archive = info.get("pacs_label")
        if not region or label.get("out_of_domain") or region == archive or region in (info.get("pacs_labels") or ()):
            return None  # the archive already says so ("HAND WRIST" covers a Wrist label)
        entry = self._entry(image_id, label, info, taxonomy.body_part_term(region), decision_id)
        with self._lock:
            previous = self.latest().get((image_id, region))
            if (image_id, region) in self._in_flight or (previous and previous["status"] in DONE):
                return None
            if previous and previous["status"] == "superseded" and previous.get("was") == "stored":
                entry.update(
                    status="stored", reinstated=True, new_sop=previous["new_sop"], new_series=previous.get("new_series")
                )  # the copy is in the PACS already
            elif not entry["body_part"]:
                entry.update(status="skipped", error=f"region {region} has no BodyPartExamined term")
            elif self.mode == "csv":
                self._export_csv(entry, status="current")
                entry["status"] = "exported"
            else:
                entry.update(self._copy_uids(image_id, entry), status="queued")
                with self._idle:
                    self._in_flight.add((image_id, region))
            self._log(entry)
        if entry["status"] == "queued":
            self._executor.submit(self._send, dict(entry), fetch)
        return entry

    def _entry(self, image_id, label, info, body_part, decision_id) -> dict:
        return {
            "time": _now(),
            "mode": self.mode,
            "image": image_id,
            "decision": decision_id,
            "study": info.get("StudyInstanceUID"),
            "series": info.get("SeriesInstanceUID"),
            "patient": info.get("PatientID"),
            "archive_region": info.get("pacs_label"),
            "archive_body_part": info.get("BodyPartExamined"),
            "region": label.get("region"),
            "out_of_domain": bool(label.get("out_of_domain")),
            "body_part": body_part,
            "annotator": label.get("annotator"),
            "comment": label.get("comment"),
        }

    @staticmethod
    def _copy_uids(image_id, entry) -> dict:
        """The copy's UIDs, from the original's: one derived series per original series, one copy per region."""
        return {
            "new_series": generate_uid(entropy_srcs=["radregion-writeback-series", entry["series"] or image_id]),
            "new_sop": generate_uid(entropy_srcs=["radregion-writeback", image_id, entry["region"]]),
        }

    def _send(self, entry, fetch):
        key = (entry["image"], entry["region"])
        try:
            self._stow(entry["image"], entry, fetch)
            entry.update(status="stored", error=None)
        except Exception as error:  # the label is saved; the write-back is logged and tried again later
            text = self.describe_error(error)
            logger.warning("write-back of %s to %s failed: %s", entry["image"], self.url, text)
            entry.update(status="failed", error=text)
        entry["time"] = _now()
        with self._lock:
            self._log(entry)
            superseded_by = self._superseded_in_flight.pop(key, None)
            if superseded_by:  # a later decision came while it was on its way: superseded as soon as it lands
                self._log(
                    {
                        **entry,
                        "time": _now(),
                        "status": "superseded",
                        "was": entry["status"],
                        "superseded_by": superseded_by,
                        "error": None,
                    }
                )
            _append(
                self.decisions_path,
                {
                    "event": "written",
                    "time": entry["time"],
                    "image": entry["image"],
                    "decision": entry.get("decision"),
                    "status": entry["status"],
                    "to": self.url,
                    "study": entry.get("study"),
                    "series": entry.get("new_series"),
                    "sop": entry.get("new_sop"),
                    "error": entry.get("error"),
                    "superseded_by": superseded_by,
                },
            )
        with self._idle:
            self._in_flight.discard(key)
            self._idle.notify_all()

    # ---- the two ways out ----------------------------------------------------------------------------------
    def _stow(self, image_id, entry, fetch):
        from radregion.dicomwrite import copy_with_body_part, mark_derived

        src = Path(fetch())
        self.label_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.label_dir) as tmp:
            dst = Path(tmp) / f"{entry['new_sop']}.dcm"
            copy_with_body_part(src, dst, entry["body_part"])
            ds = pydicom.dcmread(dst)
        mark_derived(
            ds,
            sop_uid=entry["new_sop"],
            series_uid=entry["new_series"],
            source_sop=image_id,
            series_prefix=WRITEBACK_MARKER,
            description=(
                f"RadRegion: BodyPartExamined corrected to {entry['body_part']} ({entry['region']}) from {image_id}"
            ),
        )
        response = self.client.store_instances([ds])
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise RuntimeError(f"{self.url}: STOW-RS refused the instance (FailureReason {reason})")

    def _csv_rows(self) -> list:
        if not self.csv_path.exists():
            return []
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    def _export_csv(self, entry, status):
        rows = self._csv_rows()
        rows.append(
            {
                "time": entry["time"],
                "SOPInstanceUID": entry["image"],
                "StudyInstanceUID": entry["study"],
                "SeriesInstanceUID": entry["series"],
                "PatientID": entry["patient"],
                "archive_BodyPartExamined": entry["archive_body_part"],
                "archive_region": entry["archive_region"],
                "region": entry["region"],
                "out_of_domain": "true" if entry["out_of_domain"] else "false",
                "BodyPartExamined": entry["body_part"],
                "annotator": entry["annotator"],
                "comment": entry["comment"],
                "status": status,
            }
        )
        self._write_csv(rows)

    def _mark_csv(self, image_id, keep):
        """Rows of an image that the latest decision contradicts: status superseded."""
        rows = self._csv_rows()
        for row in rows:
            same = row.get("region") == keep and row.get("out_of_domain") != "true"
            if row["SOPInstanceUID"] == image_id and row.get("status", "current") == "current" and not same:
                row["status"] = "superseded"
        self._write_csv(rows)

    def _write_csv(self, rows):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_write(self.csv_path, "w", newline="") as f:
            f.write(buffer.getvalue())


DELETE_LABEL_PATH = "/datastore/label"


def install_label_delete_route(app_instance):
    """`DELETE /datastore/label?id=&tag=[&undo_of=DECISION&undone_by=NAME]`: MONAI Label's label removal, taking
    also what an undo of an image's first label sends (a removal has no body), so the decision log says it was an
    undo and who undid it. Put before MONAI Label's route of that path and method (same permission), so it
    answers instead."""
    from fastapi import Depends
    from monailabel.app import app
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC, User

    def remove_label(
        id: str,
        tag: str,
        undo_of: str = "",
        undone_by: str = "",
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
    ):
        undo = f" (undo of {undo_of} by {undone_by})" if undo_of else ""
        logger.info(f"Removing Label: {id} by {user.username}{undo}")
        sent = {"undo_of": undo_of, "undone_by": undone_by} if undo_of else None
        app_instance.datastore().remove_label(id, tag, sent=sent)
        return {}

    remove_label.radregion_label_delete = True
    routes = app.router.routes
    routes[:] = [r for r in routes if not getattr(getattr(r, "endpoint", None), "radregion_label_delete", False)]
    app.add_api_route(DELETE_LABEL_PATH, remove_label, methods=["DELETE"], summary="Remove Label (RadRegion)")
    routes.insert(0, routes.pop())  # matched before MONAI Label's router (its route takes id and tag only)


def install_export_route(app_instance, token: str):
    """`GET /radregion/decisions[?image=ID][&current=true]`: the decision log as JSON lines, for the admin
    (it names patients: the server's API token is required, also on loopback). 404 when the datastore keeps
    no log (a studies folder)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from monailabel.app import app

    def export(request: Request, image: str = "", current: bool = False):
        given = request.headers.get("authorization", "")
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return JSONResponse(
                {"detail": "the decision log needs the API token (Authorization: Bearer ...)"}, status_code=401
            )
        writeback = getattr(app_instance.datastore(), "writeback", None)
        if writeback is None:
            return JSONResponse(
                {"detail": "this datastore keeps no decision log (it is kept for a PACS)"}, status_code=404
            )
        lines = list(writeback.current_decisions().values()) if current else writeback.decisions()
        lines = [e for e in lines if not image or e.get("image") == image]
        body = "".join(json.dumps(e, sort_keys=True) + "\n" for e in lines)
        return Response(
            body,
            media_type="application/x-ndjson",
            headers={"Content-Disposition": 'attachment; filename="decisions.jsonl"'},
        )

    if not any(getattr(r, "path", None) == EXPORT_PATH for r in app.routes):
        app.add_api_route(EXPORT_PATH, export, methods=["GET"], summary="RadRegion decision log (JSON lines)")
