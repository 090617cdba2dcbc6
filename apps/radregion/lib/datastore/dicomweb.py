"""A MONAI Label datastore over a DICOMweb PACS (QIDO-RS list, WADO-RS fetch, STOW-RS write-back).

Image id = SOPInstanceUID. Images are fetched on first use and cached as .dcm; class labels stay local,
keyed by SOPInstanceUID. See docs/pacs.md.
"""

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pydicom
import pydicom.errors
import requests
from dicomweb_client.api import DICOMwebClient
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from radregion.atomic import atomic_write
from radregion.errors import RadiographError

from ..names import check_name
from .label_folder import LabelFolder, read_json
from .pacs_http import PACSError, describe, pacs_session
from ..writeback import WRITEBACK_MARKER, WriteBack

logger = logging.getLogger(__name__)

QIDO_FIELDS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "ViewPosition",
    "ImageLaterality",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
)
PAGE_SIZE = 500
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)  # the stored bytes, never a server-side transcode


def _sent_json(path) -> dict:
    """The label JSON as the client sent it (an undo's `undo_of` and `undone_by` are not part of the label)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _meta(item: dict) -> dict:
    """A QIDO-RS answer's instance as {keyword: value} (numbers kept, the rest as text, missing ones left out)."""
    meta = {k: _value(item, k) for k in QIDO_FIELDS}
    return {k: (v if isinstance(v, (int, float)) else str(v)) for k, v in meta.items() if v is not None}


def _value(item: dict, keyword: str):
    tag = pydicom.datadict.tag_for_keyword(keyword)
    element = item.get(f"{tag:08X}", {})
    values = element.get("Value")
    if not values:
        return None
    value = values[0]
    if isinstance(value, dict):  # PN
        value = value.get("Alphabetic")
    return value


class RadRegionDICOMwebDatastore(Datastore):
    """Radiographs of a DICOMweb PACS.

    RadRegionDICOMwebDatastore(url, cache_dir, *, label_dir=None, modalities=("CR", "DX"), username=None,
    password=None, token=None, writeback="off" | "stow" | "csv", taxonomy="unifesp22", timeout=(3.05, 30.0),
    retries=2, backoff=0.5, list_ttl=60.0, model_answer=None)

    `taxonomy`: a name, a path, a Taxonomy or a function returning one (looked up when needed).
    `model_answer`: image id -> the model's answer for the decision log (None when unknown).
    label_dir defaults to cache_dir/labels. With the PACS down, listing and cached images keep working.
    """

    def __init__(
        self,
        url,
        cache_dir,
        *,
        label_dir=None,
        modalities=("CR", "DX"),
        username=None,
        password=None,
        token=None,
        writeback="off",
        taxonomy="unifesp22",
        timeout=(3.05, 30.0),
        retries=2,
        backoff=0.5,
        list_ttl=60.0,
        model_answer=None,
    ):
        if not str(url).startswith(("http://", "https://")):
            raise PACSError(url, "a DICOMweb URL must start with http:// or https://")
        self.url = str(url).rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.image_dir = self.cache_dir / "images"
        self.index_path = self.cache_dir / "index.json"
        self.notes_path = self.cache_dir / "image_info.json"
        self.label_dir = Path(label_dir) if label_dir else self.cache_dir / "labels"
        if isinstance(modalities, str):
            modalities = [m for m in modalities.replace(",", " ").split() if m]
        self.modalities = tuple(m.upper() for m in (modalities or ()))
        self._taxonomy = taxonomy
        self.model_answer = model_answer or (lambda image_id: None)
        self.list_ttl = float(list_ttl)
        self.retries = int(retries)
        self._file_meta: Dict[str, dict] = {}
        self.session = pacs_session(username, password, token, timeout, retries, backoff)
        self.client = DICOMwebClient(self.url, session=self.session)
        self.client.set_http_retry_params(retry=False)  # retries live in the session (connection errors too)
        self.labels = LabelFolder(self.label_dir, lambda: self.taxonomy)
        self.writeback = WriteBack(writeback, self.label_dir, self.client, self.url, describe_error=self._describe)
        self._name = f"PACS {self.url}"
        self._description = "Radiographs of a DICOMweb PACS"
        self._lock = threading.RLock()
        self._refreshing = threading.Lock()
        self._index: Dict[str, dict] = self._load_index()
        self._listed_at = 0.0
        self.last_error: Optional[str] = None
        self.image_dir.mkdir(parents=True, exist_ok=True)

    @property
    def taxonomy(self):
        from radregion.taxonomy import load_taxonomy

        value = self._taxonomy() if callable(self._taxonomy) else self._taxonomy
        return load_taxonomy(value)

    # ---- PACS access -------------------------------------------------------------------------------------
    def _call(self, what: str, url: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (requests.RequestException, ValueError, pydicom.errors.InvalidDicomError) as exc:
            error = PACSError(url, f"{what}: {describe(exc, self.retries + 1)}")
            self.last_error = str(error)
            raise error from exc

    def _describe(self, exc: Exception) -> str:
        """A failed write-back in words: `<url>: STOW-RS: cannot connect ...` for network errors."""
        if isinstance(exc, requests.RequestException):
            return f"{self.url}: STOW-RS: {describe(exc, self.retries + 1)}"
        return str(exc)

    def _query(self) -> Dict[str, dict]:
        found: Dict[str, dict] = {}
        own = self.writeback.created_uids()
        for modality in self.modalities or (None,):
            filters = {"Modality": modality} if modality else {}
            offset = 0
            while True:
                page = self._call(
                    f"QIDO-RS search for {modality or 'all'} instances",
                    f"{self.url}/instances",
                    self.client.search_for_instances,
                    search_filters=filters,
                    fields=list(QIDO_FIELDS),
                    limit=PAGE_SIZE,
                    offset=offset,
                )
                for item in page:
                    meta = _meta(item)
                    if meta.get("SOPInstanceUID") and not self._is_own(meta, own):
                        found[meta["SOPInstanceUID"]] = meta
                if len(page) < PAGE_SIZE:
                    break
                offset += PAGE_SIZE
        return found

    @staticmethod
    def _is_own(meta: dict, created_uids: set) -> bool:
        """Instances this product wrote back are never listed again."""
        return meta.get("SeriesDescription", "").startswith(WRITEBACK_MARKER) or meta["SOPInstanceUID"] in created_uids

    def refresh(self) -> None:
        try:
            found = self._query()
        except PACSError as error:
            logger.warning("%s; serving the %d cached instances", error, len(self._index))
            self._listed_at = time.monotonic()  # do not hammer a PACS that is down
            return
        with self._lock:
            if found != self._index:
                self._index = found
                self._save_index()
            self._listed_at = time.monotonic()
            self.last_error = None
        self.retry_writebacks()

    def retry_writebacks(self):
        """Send again the write-backs that failed while the PACS was away (label unchanged since)."""
        for image_id in sorted({e["image"] for e in self.writeback.pending()}):
            label = self.labels.read(image_id, DefaultLabelTag.FINAL)
            if label:
                self.writeback.submit(
                    image_id, label, self.get_image_info(image_id), lambda: self.fetch(image_id), self.taxonomy
                )

    def _load_index(self) -> Dict[str, dict]:
        try:
            return json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            logger.warning("%s: unreadable listing cache, starting empty", self.index_path)
            return {}

    def _save_index(self):
        with atomic_write(self.index_path, "w") as handle:
            json.dump(self._index, handle, indent=1)

    def _listing(self) -> Dict[str, dict]:
        """The listing; a stale one is refreshed in the background, so a slow PACS never holds up a request."""
        if self._listed_at and time.monotonic() - self._listed_at <= self.list_ttl:
            return self._index
        if not self._listed_at and not self._index:
            self.refresh()  # nothing to show yet: wait for the PACS
        elif self._refreshing.acquire(blocking=False):

            def refresh_in_background():
                try:
                    self.refresh()
                finally:
                    self._refreshing.release()

            threading.Thread(target=refresh_in_background, name="radregion-qido", daemon=True).start()
        return self._index

    def cached_path(self, image_id: str) -> Path:
        return self.image_dir / f"{check_name(image_id)}.dcm"  # a plain name: no path out of the cache, no URL

    def fetch(self, image_id: str) -> Path:
        """The cached .dcm of an instance; WADO-RS on the first call."""
        path = self.cached_path(image_id)
        if path.exists():
            return path
        meta = self._index.get(image_id) or self._listing().get(image_id) or self._lookup(image_id)
        url = f"{self.url}/studies/{meta['StudyInstanceUID']}/series/{meta['SeriesInstanceUID']}/instances/{image_id}"
        ds = self._call(
            "WADO-RS retrieve",
            url,
            self.client.retrieve_instance,
            meta["StudyInstanceUID"],
            meta["SeriesInstanceUID"],
            image_id,
            media_types=ANY_TRANSFER_SYNTAX,
        )
        with atomic_write(path) as handle:
            ds.save_as(handle, write_like_original=True)
        return path

    def _lookup(self, image_id: str) -> dict:
        """One instance the listing does not have (yet): asked of the PACS by its UID. PACSError 404 when the PACS
        says there is no such instance; 502 with the PACS's reason when it cannot say (down, refusing)."""
        found = {}
        for modality in self.modalities or (None,):
            filters = {"SOPInstanceUID": image_id, **({"Modality": modality} if modality else {})}
            for item in self._call(
                f"QIDO-RS search for instance {image_id}",
                f"{self.url}/instances",
                self.client.search_for_instances,
                search_filters=filters,
                fields=list(QIDO_FIELDS),
            ):
                meta = _meta(item)
                if meta.get("SOPInstanceUID") == image_id and not self._is_own(meta, self.writeback.created_uids()):
                    found = meta
        if not found:
            raise PACSError(
                self.url, f"no {'/'.join(self.modalities) or 'DICOM'} instance {image_id} in this PACS", http_status=404
            )
        with self._lock:
            self._index[image_id] = found
            self._save_index()
        return found

    # ---- images ------------------------------------------------------------------------------------------
    def list_images(self) -> List[str]:
        return sorted(self._listing())

    def get_image_uri(self, image_id: str) -> str:
        return str(self.fetch(image_id))

    def get_image(self, image_id: str, params=None) -> Any:
        return self.fetch(image_id).read_bytes()

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        meta = dict(self._index.get(image_id, {}))
        notes = read_json(self.notes_path).get(image_id, {})
        path = self.cached_path(image_id)
        if path.exists():
            meta.update(self._cached_header(image_id, path))
        if not meta:
            return notes
        archive = self.taxonomy.archive_label(meta)
        meta.update(
            pacs_label=archive.region,
            pacs_labels=list(archive.regions),
            pacs_label_field=archive.field,
            cached=path.exists(),
            name=image_id,
            id=image_id,
            source=self.url,
        )
        return {**notes, **meta}

    def _cached_header(self, image_id: str, path: Path) -> dict:
        """The cached file's own header (it outranks the QIDO attributes), read once."""
        if image_id not in self._file_meta:
            from radregion.io import read_metadata

            try:
                header = {k: v for k, v in read_metadata(path).items() if v is not None}
            except RadiographError as error:
                header = {"error": str(error)}
            self._file_meta[image_id] = header
        return self._file_meta[image_id]

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        raise PACSError(self.url, "images are added in the PACS, not through RadRegion", http_status=405)

    def remove_image(self, image_id: str) -> None:
        raise PACSError(self.url, "images are removed in the PACS, not through RadRegion", http_status=405)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        """Local notes on an image (e.g. MONAI Label's strategy timestamps); the PACS is not touched."""
        with self._lock:
            notes = read_json(self.notes_path)
            notes.setdefault(image_id, {}).update(info or {})
            with atomic_write(self.notes_path, "w") as f:
                json.dump(notes, f, indent=1)

    # ---- labels (local, keyed by SOPInstanceUID) -----------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        if image_id not in self._index and image_id not in self._listing():
            raise PACSError(self.url, f"no instance {image_id} in this PACS", http_status=404)
        previous = self.labels.read(image_id, label_tag)
        label_id = self.labels.save(image_id, label_filename, label_tag, label_info)
        if label_tag == DefaultLabelTag.FINAL:
            self.writeback.record(
                image_id,
                self.labels.read(image_id, label_tag),
                self.get_image_info(image_id),
                lambda: self.fetch(image_id),
                self.taxonomy,
                previous=previous,
                raw=_sent_json(label_filename),
                model=self._model_answer(image_id),
            )
        return label_id

    def _model_answer(self, image_id: str):
        try:
            return self.model_answer(image_id)
        except Exception as error:  # the log says "unknown" rather than losing the decision
            logger.warning("model answer for %s unknown: %s", image_id, error)
            return None

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return self.labels.uri(label_id, label_tag)

    def get_label(self, label_id: str, label_tag: str, params=None) -> Any:
        return self.labels.read(label_id, label_tag)

    def get_labels_by_image_id(self, image_id: str) -> Dict[str, str]:
        return self.labels.tags(image_id)

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return image_id if self.labels.exists(image_id, tag) else ""

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        return self.labels.info(label_id, label_tag)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        self.labels.update_info(label_id, label_tag, info)

    def remove_label(self, label_id: str, label_tag: str, sent: Optional[dict] = None) -> None:
        """`sent`: what the client sent with the removal (an undo's `undo_of` and `undone_by`), for the log."""
        previous = self.labels.read(label_id, label_tag)
        self.labels.remove(label_id, label_tag)
        if previous is not None and label_tag == DefaultLabelTag.FINAL:
            self.writeback.record(
                label_id,
                None,
                self.get_image_info(label_id),
                lambda: self.fetch(label_id),
                self.taxonomy,
                previous=previous,
                raw=sent,
                model=self._model_answer(label_id),
            )

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        listed = set(self._listing())
        return [i for i in self.labels.labelled(label_tag or DefaultLabelTag.FINAL) if i in listed]

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        labelled = set(self.get_labeled_images(label_tag))
        return [i for i in self.list_images() if i not in labelled]

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        """Training items: the cached image and the label file; `full_path=False` (what GET /datastore/?output=train
        answers) names them without the server's folders and fetches nothing."""
        items = []
        for image_id in self.get_labeled_images(DefaultLabelTag.FINAL):
            try:
                image = self.get_image_uri(image_id) if full_path else self.cached_path(image_id).name
            except PACSError as error:
                logger.warning("%s: left out of training", error)
                continue
            label = self.labels.uri(image_id, DefaultLabelTag.FINAL)
            items.append(
                {
                    "image": image,
                    "label": label if full_path else Path(label).name,
                    "region": self.labels.read(image_id, DefaultLabelTag.FINAL).get("region"),
                }
            )
        return items

    def get_dataset_archive(self, limit_cases: Optional[int]) -> str:
        raise PACSError(self.url, "no dataset archive for a PACS; export from the PACS itself", http_status=405)

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def name(self) -> str:
        return self._name

    def set_name(self, name: str):
        self._name = name

    def description(self) -> str:
        return self._description

    def set_description(self, description: str):
        self._description = description

    def status(self) -> Dict[str, Any]:
        images = self.list_images()
        tags = self.labels.tag_counts()
        return {
            "total": len(images),
            "completed": len(self.get_labeled_images()),
            "label_tags": tags,
            "pacs": {
                "url": self.url,
                "reachable": self.last_error is None,
                "error": self.last_error,
                "cached_images": sum(1 for _ in self.image_dir.glob("*.dcm")),
                "writeback": self.writeback.mode,
            },
        }

    def json(self):
        return {i: {"image": self._index.get(i, {}), "labels": self.labels.tags(i)} for i in self.list_images()}
