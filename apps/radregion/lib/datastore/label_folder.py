"""Class labels of a remote datastore, kept locally: <root>/<tag>/<image id>.json, validated and written
(atomically) exactly as the folder datastore (local.py) does. Ids and tags are plain names (lib/names.py):
a label is never read, written or deleted outside <root>."""

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

from radregion.atomic import atomic_write

from ..names import BadNameError, check_name, check_tag, inside
from .local import LABEL_SUFFIX, parse_label

logger = logging.getLogger(__name__)


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _tag(tag) -> str:
    return str(getattr(tag, "value", tag))  # DefaultLabelTag.FINAL -> "final"


class LabelFolder:
    """Labels by image id and tag; `taxonomy_fn()` gives the taxonomy that validates them."""

    def __init__(self, root: Path, taxonomy_fn):
        self.root = Path(root)
        self.taxonomy_fn = taxonomy_fn

    def path(self, image_id: str, tag: str) -> Path:
        """BadNameError for an id or tag that is not a plain name or leads outside the label folder."""
        path = self.root / check_tag(tag) / f"{check_name(image_id)}{LABEL_SUFFIX}"
        if not inside(self.root, path):
            raise BadNameError(f"invalid image id {image_id!r}")
        return path

    def save(self, image_id: str, label_filename, tag: str, label_info: dict) -> str:
        label = parse_label(
            image_id, Path(label_filename).read_bytes(), self.taxonomy_fn(), annotator=(label_info or {}).get("user")
        )
        with atomic_write(self.path(image_id, tag), "w") as f:
            json.dump(label, f, indent=2)
        return image_id

    def read(self, image_id: str, tag: str) -> Optional[dict]:
        try:
            return json.loads(self.path(image_id, tag).read_text())
        except (FileNotFoundError, BadNameError):
            return None
        except ValueError:
            logger.warning("%s: unreadable label, ignored", self.path(image_id, tag))
            return None

    def info(self, image_id: str, tag: str) -> dict:
        label = self.read(image_id, tag)
        if label is None:
            return {}
        return {**read_json(self.root / ".label_info.json").get(f"{_tag(tag)}/{image_id}", {}), **label}

    def update_info(self, image_id: str, tag: str, info: dict):
        path = self.root / ".label_info.json"
        notes = read_json(path)
        notes.setdefault(f"{_tag(tag)}/{image_id}", {}).update(info or {})
        with atomic_write(path, "w") as f:
            json.dump(notes, f, indent=1)

    def uri(self, image_id: str, tag: str) -> str:
        try:
            path = self.path(image_id, tag)
        except BadNameError:
            return ""
        return str(path) if path.is_file() else ""

    def exists(self, image_id: str, tag: str) -> bool:
        return bool(self.uri(image_id, tag))

    def remove(self, image_id: str, tag: str):
        self.path(image_id, tag).unlink(missing_ok=True)

    def labelled(self, tag: str) -> List[str]:
        folder = self.root / _tag(tag)
        if not folder.is_dir():
            return []
        return sorted(
            p.name[: -len(LABEL_SUFFIX)]
            for p in folder.iterdir()
            if p.name.endswith(LABEL_SUFFIX) and not p.name.startswith(".")
        )

    def tags(self, image_id: str) -> Dict[str, str]:
        if not self.root.is_dir():
            return {}
        return {t.name: image_id for t in self.root.iterdir() if t.is_dir() and self.exists(image_id, t.name)}

    def tag_counts(self) -> Dict[str, int]:
        if not self.root.is_dir():
            return {}
        return {t.name: len(self.labelled(t.name)) for t in self.root.iterdir() if t.is_dir()}
