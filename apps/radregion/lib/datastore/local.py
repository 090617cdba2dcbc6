"""Radiographs in a studies folder: DICOM (.dcm and extension-less), PNG, JPEG; class labels as JSON files.

MONAI Label's LocalDatastore with three changes: it lists radiographs (extension-less files only when they are
DICOM), labels are validated JSON, and every file it writes (labels, datastore_v2.json) is written atomically,
so a killed server never leaves half a label or an unreadable index behind.
"""

import json
import logging
import os
import threading
import time
from pathlib import Path

from monailabel.config import settings
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

from radregion.atomic import atomic_write
from radregion.errors import RadiographError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")
LABEL_SUFFIX = ".json"
LABEL_FIELDS = ("region", "out_of_domain", "annotator", "comment")


class InvalidLabelError(RadiographError):
    """A label that cannot be stored; answered with HTTP 422 and, for an unknown region, the valid names."""

    def __init__(self, image_id, problem, valid_regions=None):
        super().__init__(image_id, problem)
        self.valid_regions = list(valid_regions) if valid_regions else None


def parse_label(image_id, raw: bytes, taxonomy, annotator=None) -> dict:
    """Uploaded label bytes -> the stored label dict; InvalidLabelError saying what is wrong."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidLabelError(image_id, f"label is not JSON ({error})") from None
    if isinstance(data, str):
        data = {"region": data}
    if not isinstance(data, dict):
        raise InvalidLabelError(image_id, 'label must be a JSON object like {"region": "Chest"}')
    region = data.get("region")
    out_of_domain = data.get("out_of_domain")
    if out_of_domain is not None and not isinstance(out_of_domain, bool):
        raise InvalidLabelError(image_id, f"out_of_domain must be true or false, got {out_of_domain!r}")
    if region is None:
        if not out_of_domain:
            raise InvalidLabelError(image_id, "label has no region (give one, or out_of_domain: true)",
                                    taxonomy.names)
    else:
        try:
            entry = taxonomy.get(region) if isinstance(region, str) else None
        except KeyError:
            entry = None
        if entry is None:
            raise InvalidLabelError(image_id, f"unknown region {region!r}; valid regions: "
                                              f"{', '.join(taxonomy.names)}", taxonomy.names)
        region = entry.name
        if out_of_domain is None:
            out_of_domain = bool(entry.out_of_domain)
    for key in ("annotator", "comment"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise InvalidLabelError(image_id, f"{key} must be text")
    return {"region": region, "out_of_domain": bool(out_of_domain), "annotator": data.get("annotator") or annotator,
            "comment": data.get("comment") or "", "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def is_radiograph_file(path: Path) -> bool:
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    from radregion.io import is_dicom

    return path.suffix.lower() not in (LABEL_SUFFIX, ".lock", ".csv", ".txt", ".md") and is_dicom(path)


class RadRegionDatastore(LocalDatastore):
    def __init__(self, studies, taxonomy_fn, auto_reload=None, read_only=None):
        self._taxonomy_fn = taxonomy_fn  # the bundle's taxonomy, looked up when a label arrives
        self._dicom_names = {}
        # MONAI Label's file watcher reconciles the datastore on its own thread while requests change it: without
        # one lock a DELETE and the watcher iterate and resize the same dicts (a 500 "dictionary changed size")
        self._state_lock = threading.RLock()
        super().__init__(
            studies,
            extensions=[f"*{s}" for s in IMAGE_SUFFIXES] + [f"*{LABEL_SUFFIX}"],
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD if auto_reload is None else auto_reload,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY if read_only is None else read_only,
        )

    # ---- listing ------------------------------------------------------------------------------------
    def _list_files(self, path, patterns):
        folder = Path(path)
        if not folder.is_dir():
            return {}
        if folder.resolve() == Path(self._datastore.image_path()).resolve():
            return {p.name: p.name for p in sorted(folder.iterdir()) if is_radiograph_file(p)}
        return {p.name: p.name for p in sorted(folder.iterdir())
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == LABEL_SUFFIX}

    def _to_id(self, file: str):
        suffix = Path(file).suffix
        if suffix.lower() in IMAGE_SUFFIXES + (LABEL_SUFFIX,):
            return file[: -len(suffix)], suffix
        return file, ""  # extension-less DICOM (often named by its UID, dots included)

    # ---- state shared with the file watcher's thread -------------------------------------------------
    def refresh(self):
        with self._state_lock:
            super().refresh()

    def _init_from_datastore_file(self, *args, **kwargs):
        with self._state_lock:
            return super()._init_from_datastore_file(*args, **kwargs)

    # ---- writes -------------------------------------------------------------------------------------
    def _update_datastore_file(self, lock=True):
        from filelock import FileLock

        def write():
            self._ignore_event_config = True
            with atomic_write(self._datastore_config_path, "w") as f:
                f.write(json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def add_image(self, image_id, image_filename, image_info):
        path = Path(image_filename)
        if path.suffix.lower() not in IMAGE_SUFFIXES and not is_radiograph_file(path):
            raise RadiographError(image_id or path.name, "unsupported file: not DICOM, PNG or JPEG")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        from filelock import FileLock

        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"image {image_id} not found in the datastore")
        label = parse_label(image_id, Path(label_filename).read_bytes(), self._taxonomy_fn(),
                            annotator=(label_info or {}).get("user"))
        label_dir = Path(self._datastore.label_path(label_tag))
        name = self._filename(image_id, LABEL_SUFFIX)
        with self._state_lock, FileLock(self._lock_file):
            with atomic_write(label_dir / name, "w") as f:
                json.dump(label, f, indent=2)
            info = {**(label_info or {}), "ts": int(time.time()), "name": name, "region": label["region"]}
            obj.labels[label_tag] = DataModel(info=info, ext=LABEL_SUFFIX)
            self._update_datastore_file(lock=False)
        logger.info(f"label {label_tag} for {image_id}: {label['region']} by {label['annotator']}")
        return image_id

    def remove_label(self, label_id, label_tag):
        with self._state_lock:
            super().remove_label(label_id, label_tag)
            if self._auto_reload:
                self.refresh()  # at once, not when the file watcher gets to it
