"""Names a client sends (image ids, label tags): plain file names that stay inside the app's folders.

Every id or tag from a request becomes at most one path component under a folder the app owns. `check_name`
refuses anything else (separators, "..", hidden names, control characters); `inside` then checks the resolved
path (symlinks followed) against the resolved folder, so a link in the studies folder that points elsewhere
is treated as if it did not exist. Answers never say why an id is unknown: "not found" is the one message for
an id that is malformed, missing, or outside (no oracle for what exists on the server's disk).
"""

import os
import re
from pathlib import Path

from .errors import AppError

MAX_NAME = 200
TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class BadNameError(AppError):
    """An id or tag that cannot name a file of the app; 400 for writes."""

    http_status = 400


def is_plain_name(name) -> bool:
    """A single, visible path component without control characters."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        return False
    if name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name:
        return False
    return not any(ord(c) < 32 or ord(c) == 127 for c in name)


def check_name(name, what="image id") -> str:
    if not is_plain_name(name):
        raise BadNameError(
            f"invalid {what} {show(name)}: expected a plain file name (no folders, no leading "
            f"dot, no control characters, at most {MAX_NAME} characters)"
        )
    return name


def check_tag(tag) -> str:
    tag = str(getattr(tag, "value", tag))  # DefaultLabelTag.FINAL -> "final"
    if not TAG_PATTERN.match(tag):
        raise BadNameError(f"invalid label tag {show(tag)}: letters, digits, '_' and '-' (at most 64)")
    return tag


def inside(root, path) -> bool:
    """True when `path`, symlinks resolved, lies inside `root` (also resolved)."""
    try:
        real_root = os.path.realpath(root)
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return False
    return real != real_root and os.path.commonpath([real_root, real]) == real_root


def confined(root, name) -> Path | None:
    """root/name when `name` is a plain name and the file it resolves to lies inside `root`; else None."""
    if not is_plain_name(name):
        return None
    path = Path(root) / name
    return path if inside(root, path) else None


def show(value, limit=80) -> str:
    """A client's value for a message or a log line: control characters escaped, long values cut."""
    text = repr(value) if isinstance(value, str) else repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "...'"
