"""Radiographs in a studies folder: DICOM (.dcm and extension-less), PNG, JPEG; class labels as JSON files.

MONAI Label's LocalDatastore with these changes: it lists radiographs (extension-less files only when they are
DICOM), labels are validated JSON, and every file it writes (labels, datastore_v2.json) is written atomically,
so a killed server never leaves half a label or an unreadable index behind. Nothing outside the studies folder
is listed, served, written or deleted (ids and tags are plain names, checked again after resolving symlinks:
lib/names.py); an upload is decoded by the engine before it is stored and never replaces an image; `x.png`
and `x.dcm` side by side are two images (the second one by its full name); MONAI Label's temp copy of an
upload is removed whether or not the upload is accepted.
"""

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from monailabel.config import settings
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

from radregion.atomic import atomic_write
from radregion.errors import RadiographError

from ..errors import AppError, ConflictError
from ..names import BadNameError, check_name, check_tag, inside, is_plain_name, show

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")
UPLOAD_SUFFIX = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}  # by decoded content, not by the sender's name
LABEL_SUFFIX = ".json"
LABEL_FIELDS = ("region", "out_of_domain", "annotator", "comment")
MAX_TEXT = {"annotator": 200, "comment": 4000}
UPLOAD_CHECK_SIZE = 512  # uploads are decoded at this long side to prove they are usable radiographs


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
    except RecursionError:
        raise InvalidLabelError(image_id, "label JSON is nested too deeply") from None
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
            raise InvalidLabelError(image_id, "label has no region (give one, or out_of_domain: true)", taxonomy.names)
    else:
        try:
            entry = taxonomy.get(region) if isinstance(region, str) else None
        except KeyError:
            entry = None
        if entry is None:
            raise InvalidLabelError(
                image_id, f"unknown region {region!r}; valid regions: {', '.join(taxonomy.names)}", taxonomy.names
            )
        region = entry.name
        if out_of_domain is None:
            out_of_domain = bool(entry.out_of_domain)
    for key in ("annotator", "comment"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise InvalidLabelError(image_id, f"{key} must be text")
        if len(data.get(key) or "") > MAX_TEXT[key]:
            raise InvalidLabelError(image_id, f"{key} too long ({len(data[key])} characters; at most {MAX_TEXT[key]})")
    return {
        "region": region,
        "out_of_domain": bool(out_of_domain),
        "annotator": data.get("annotator") or annotator,
        "comment": data.get("comment") or "",
        "saved_at": _restored_time(data) or _now(),
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _restored_time(data: dict):
    """An undo (the panel names the decision it takes back in `undo_of`) restores the earlier label as it was,
    its time included; any other label gets the time it is saved."""
    value = data.get("saved_at") if data.get("undo_of") else None
    if isinstance(value, str) and len(value) == 20 and value[4] == "-" and value[10] == "T" and value.endswith("Z"):
        try:
            time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
            return value
        except ValueError:
            return None
    return None


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
            return {
                p.name: p.name
                for p in sorted(folder.iterdir())
                if is_plain_name(p.name) and inside(folder, p) and is_radiograph_file(p)
            }
        return {
            p.name: p.name
            for p in sorted(folder.iterdir())
            if is_plain_name(p.name) and inside(folder, p) and p.is_file() and p.suffix.lower() == LABEL_SUFFIX
        }

    def _to_id(self, file: str):
        suffix = Path(file).suffix
        if suffix.lower() == LABEL_SUFFIX:
            return file[: -len(suffix)], suffix
        if suffix.lower() in IMAGE_SUFFIXES:
            stem = file[: -len(suffix)]
            datastore = getattr(self, "_datastore", None)
            taken = datastore.objects.get(stem) if datastore is not None else None
            if taken is not None and self._filename(stem, taken.image.ext) != file:
                return file, ""  # x.png holds the id x: x.dcm next to it is the image "x.dcm"
            return stem, suffix
        return file, ""  # extension-less DICOM (often named by its UID, dots included)

    # ---- paths: never outside the studies folder ------------------------------------------------------
    def get_image_uri(self, image_id: str) -> str:
        if not is_plain_name(image_id):
            return ""
        uri = super().get_image_uri(image_id)
        return uri if uri and inside(self._datastore.image_path(), uri) and os.path.isfile(uri) else ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        if not is_plain_name(label_id) or not is_plain_name(str(getattr(label_tag, "value", label_tag))):
            return ""
        uri = super().get_label_uri(label_id, label_tag)
        return uri if uri and inside(self._datastore.label_path(label_tag), uri) and os.path.isfile(uri) else ""

    # ---- answers name files relative to the studies folder, never by their path on the server ----------
    def get_image_info(self, image_id: str):
        """MONAI Label's info with the file's name in the studies folder ("name") instead of its path."""
        info = super().get_image_info(image_id)
        path = info.pop("path", None)
        if path:
            info["name"] = os.path.basename(path)
        return info

    def datalist(self, full_path=True):
        """Training items; `full_path=False` (what GET /datastore/?output=train answers): paths relative to the
        studies folder (MONAI Label's own stripping looks for os.pathsep and leaves them whole)."""
        items = super().datalist(full_path=True)
        if full_path:
            return items
        root = os.path.realpath(self._datastore_path)
        return [{k: os.path.relpath(v, root) if k in ("image", "label") else v for k, v in i.items()} for i in items]

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
        try:
            return self._add_image(image_id, image_filename, image_info)
        finally:
            _remove_upload(image_filename)

    def _add_image(self, image_id, image_filename, image_info):
        from filelock import FileLock

        from radregion.io import read_radiograph

        _check_info(image_info)
        upload = Path(image_filename)
        image_id = check_name(image_id or self._to_id(upload.name)[0])
        try:
            radiograph = read_radiograph(upload, max_size=UPLOAD_CHECK_SIZE)
        except RadiographError as error:  # named by the id: the temp file's path means nothing to the sender
            raise RadiographError(image_id, error.problem) from None
        suffix = UPLOAD_SUFFIX.get(radiograph.meta.get("format"))
        if suffix is None:
            raise RadiographError(image_id, f"unsupported format {radiograph.meta.get('format')}: DICOM, PNG or JPEG")
        root = Path(self._datastore.image_path())
        name = self._filename(image_id, suffix)
        dest = root / name
        if not is_plain_name(name) or not inside(root, dest):
            raise BadNameError(f"invalid image id {show(image_id)}")
        with self._state_lock, FileLock(self._lock_file):
            if image_id in self._datastore.objects or os.path.lexists(dest):
                raise ConflictError(
                    f"image {show(image_id)} already exists: an upload never replaces an image "
                    f"(delete it first, or upload under another id)"
                )
            _place_new(upload, dest)
            info = {**(image_info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=suffix))
            self._update_datastore_file(lock=False)
        logger.info(f"added image {show(image_id)} ({radiograph.meta.get('format')}, {name})")
        return image_id

    def remove_image(self, image_id):
        check_name(image_id)
        with self._state_lock:
            obj = self._datastore.objects.get(image_id)
            root = Path(self._datastore.image_path())
            path = root / self._filename(image_id, obj.image.ext) if obj else None
            if path is None or not is_plain_name(path.name) or not inside(root, path):
                raise ImageNotFoundException(f"image {show(image_id)} not found in the datastore")
            for tag in list(obj.labels):
                self.remove_label(image_id, tag)
            path.unlink(missing_ok=True)  # a link in the folder: the link itself, never what it points to
            self.refresh()

    def save_label(self, image_id, label_filename, label_tag, label_info):
        try:
            return self._save_label(image_id, label_filename, label_tag, label_info)
        finally:
            _remove_upload(label_filename)

    def _save_label(self, image_id, label_filename, label_tag, label_info):
        from filelock import FileLock

        label_tag = check_tag(label_tag)
        _check_info(label_info)
        obj = self._datastore.objects.get(image_id) if is_plain_name(image_id) else None
        if not obj or not self.get_image_uri(image_id):
            raise ImageNotFoundException(f"image {show(image_id)} not found in the datastore")
        label = parse_label(
            image_id, Path(label_filename).read_bytes(), self._taxonomy_fn(), annotator=(label_info or {}).get("user")
        )
        label_dir = Path(self._datastore.label_path(label_tag))
        name = self._filename(image_id, LABEL_SUFFIX)
        with self._state_lock, FileLock(self._lock_file):
            with atomic_write(label_dir / name, "w") as f:
                json.dump(label, f, indent=2)
            info = {**(label_info or {}), "ts": int(time.time()), "name": name, "region": label["region"]}
            obj.labels[label_tag] = DataModel(info=info, ext=LABEL_SUFFIX)
            self._update_datastore_file(lock=False)
        logger.info(f"label {label_tag} for {show(image_id)}: {label['region']} by {show(label['annotator'])}")
        return image_id

    def remove_label(self, label_id, label_tag, sent=None):
        """`sent` (an undo's `undo_of`, `undone_by`): a studies folder keeps no decision log, so unused here."""
        check_name(label_id)
        check_tag(label_tag)
        with self._state_lock:
            uri = self.get_label_uri(label_id, label_tag)  # "" when missing or outside the labels folder
            if uri:
                os.unlink(uri)
            self.refresh()  # at once, not when the file watcher gets to it

    def update_label_info(self, label_id, label_tag, info):
        check_tag(label_tag)
        _check_info(info)
        return super().update_label_info(label_id, label_tag, info)

    def update_image_info(self, image_id, info):
        _check_info(info)
        return super().update_image_info(image_id, info)


def _check_info(info):
    if info is not None and not isinstance(info, dict):
        raise AppError(f"params must be a JSON object, got {type(info).__name__}")


def _place_new(upload: Path, dest: Path):
    """Copy the upload next to `dest`, then link it into place: never over an existing file, never half."""
    tmp = dest.parent / f".upload-{os.getpid()}-{threading.get_ident()}-{dest.name}"
    try:
        with open(upload, "rb") as source, open(tmp, "xb") as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)
            target.flush()
            os.fsync(target.fileno())
        try:
            os.link(tmp, dest)  # fails when dest exists, even if it appeared a moment ago
        except FileExistsError:
            raise ConflictError(f"image {dest.name} already exists") from None
        except OSError:  # a file system without hard links
            if os.path.lexists(dest):
                raise ConflictError(f"image {dest.name} already exists") from None
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_upload(path):
    """MONAI Label's temp copy of an upload (system temp folder): removed whatever became of the upload."""
    try:
        path = Path(path)
        if path.parent.resolve() == Path(tempfile.gettempdir()).resolve():
            path.unlink(missing_ok=True)
    except (OSError, TypeError):
        pass
