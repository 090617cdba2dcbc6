"""Opt-in write-back of accepted corrections to the PACS: a new instance via STOW-RS, or a CSV for the admin.

The original instance is never touched. The copy goes into a new series of the same study (one derived series
per original series, SeriesDescription starting with WRITEBACK_MARKER) with a new SOPInstanceUID derived from
(original SOPInstanceUID, region), so sending the same correction twice stores nothing new. Every step is one
line of <label_dir>/writeback.jsonl (queued, then stored or failed); queued or failed ones are sent again.
"""

import csv
import io
import json
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from radregion.atomic import atomic_write

logger = logging.getLogger(__name__)

MODES = ("off", "stow", "csv")
DONE = ("stored", "exported", "skipped")
WRITEBACK_MARKER = "RADREGION CORRECTED"
CSV_FIELDS = ("time", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
              "archive_BodyPartExamined", "archive_region", "region", "BodyPartExamined", "annotator", "comment")


def _now(seconds=None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class WriteBack:
    """Sends (mode "stow") or exports (mode "csv") corrections; mode "off" does nothing."""

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
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._in_flight = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="radregion-writeback")

    # ---- the log -----------------------------------------------------------------------------------------
    def entries(self) -> list:
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                logger.warning("%s: skipping a damaged line", self.log_path)
        return out

    def latest(self) -> dict:
        """{(image, region): its latest log entry}."""
        return {(e["image"], e["region"]): e for e in self.entries()}

    def pending(self, queued_for_s: float = 120.0) -> list:
        """Write-backs that failed, or stayed queued (server stopped mid-way) for `queued_for_s`: to send again."""
        oldest = _now(time.time() - queued_for_s)
        return [e for e in self.latest().values()
                if e["status"] == "failed" or (e["status"] == "queued" and e["time"] <= oldest)]

    def created_uids(self) -> set:
        return {e["new_sop"] for e in self.entries() if e.get("new_sop") and e.get("status") == "stored"}

    def wait(self, timeout=None) -> bool:
        """Block until every queued write-back has been tried; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._in_flight, timeout)

    def _log(self, entry: dict):
        self.label_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ---- the decision --------------------------------------------------------------------------------------
    def submit(self, image_id: str, label: dict, info: dict, fetch, taxonomy):
        """Write back a `final` label if it corrects the archive; returns the log entry or None.

        CSV rows are written at once; STOW-RS runs in a background thread so a slow PACS never holds up a save.
        """
        if self.mode == "off":
            return None
        region = label.get("region")
        archive = info.get("pacs_label")
        if not region or region == archive or region in (info.get("pacs_labels") or ()):
            return None  # the archive already says so ("HAND WRIST" covers a Wrist label)
        entry = {
            "time": _now(), "mode": self.mode, "image": image_id,
            "study": info.get("StudyInstanceUID"), "series": info.get("SeriesInstanceUID"),
            "patient": info.get("PatientID"), "archive_region": archive,
            "archive_body_part": info.get("BodyPartExamined"), "region": region,
            "body_part": taxonomy.body_part_term(region),
            "annotator": label.get("annotator"), "comment": label.get("comment"),
        }
        with self._lock:
            previous = self.latest().get((image_id, region))
            if (image_id, region) in self._in_flight or (previous and previous["status"] in DONE):
                return None
            if not entry["body_part"]:
                entry.update(status="skipped", error=f"region {region} has no BodyPartExamined term")
            elif self.mode == "csv":
                self._export_csv(entry)
                entry["status"] = "exported"
            else:
                entry["status"] = "queued"
                with self._idle:
                    self._in_flight.add((image_id, region))
            self._log(entry)
        if entry["status"] == "queued":
            self._executor.submit(self._send, dict(entry), fetch)
        return entry

    def _send(self, entry, fetch):
        try:
            entry.update(self._stow(entry["image"], entry, fetch), status="stored", error=None)
        except Exception as error:  # the label is saved; the write-back is logged and tried again later
            text = self.describe_error(error)
            logger.warning("write-back of %s to %s failed: %s", entry["image"], self.url, text)
            entry.update(status="failed", error=text)
        entry["time"] = _now()
        with self._lock:
            self._log(entry)
        with self._idle:
            self._in_flight.discard((entry["image"], entry["region"]))
            self._idle.notify_all()

    # ---- the two ways out ----------------------------------------------------------------------------------
    def _stow(self, image_id, entry, fetch) -> dict:
        from radregion.dicomwrite import copy_with_body_part

        src = Path(fetch())
        new_series = generate_uid(entropy_srcs=["radregion-writeback-series", entry["series"] or image_id])
        new_sop = generate_uid(entropy_srcs=["radregion-writeback", image_id, entry["region"]])
        self.label_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.label_dir) as tmp:
            dst = Path(tmp) / f"{new_sop}.dcm"
            copy_with_body_part(src, dst, entry["body_part"])
            ds = pydicom.dcmread(dst)
        original_description = str(ds.get("SeriesDescription", "") or "")
        ds.SOPInstanceUID = new_sop
        ds.file_meta.MediaStorageSOPInstanceUID = new_sop
        ds.SeriesInstanceUID = new_series
        ds.SeriesDescription = f"{WRITEBACK_MARKER} {original_description}".strip()[:64]
        ds.BodyPartExamined = entry["body_part"]
        ds.DerivationDescription = (f"RadRegion: BodyPartExamined corrected to {entry['body_part']} "
                                    f"({entry['region']}) from {image_id}")[:1024]
        source = pydicom.Dataset()
        source.ReferencedSOPClassUID = ds.SOPClassUID
        source.ReferencedSOPInstanceUID = image_id
        ds.SourceImageSequence = [source]
        response = self.client.store_instances([ds])
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise RuntimeError(f"{self.url}: STOW-RS refused the instance (FailureReason {reason})")
        return {"new_sop": new_sop, "new_series": new_series}

    def _export_csv(self, entry):
        rows = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        rows.append({
            "time": entry["time"], "SOPInstanceUID": entry["image"], "StudyInstanceUID": entry["study"],
            "SeriesInstanceUID": entry["series"], "PatientID": entry["patient"],
            "archive_BodyPartExamined": entry["archive_body_part"], "archive_region": entry["archive_region"],
            "region": entry["region"], "BodyPartExamined": entry["body_part"], "annotator": entry["annotator"],
            "comment": entry["comment"],
        })
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        with atomic_write(self.csv_path, "w", newline="") as f:
            f.write(buffer.getvalue())
