"""Atomic, durable file writes: a temp file in the same folder, fsynced, then os.replace and an fsync of the
folder, so no reader sees half a file and a power cut after the write returns keeps the new file.

Temp files are named `.<name>.<12 hex>.tmp`; `remove_temp_files` deletes the ones a crash left behind.
"""

import contextlib
import os
import re
import uuid
from pathlib import Path

TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


@contextlib.contextmanager
def atomic_write(path, mode="wb", **open_kwargs):
    """Open a temp file next to `path`; on success it replaces `path` (file and folder fsynced), on error it is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder):
    """Make a rename or a new entry in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder):
    """fsync every file under `folder`, then the folders (before a rename publishes it)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def replace_symlink(link, target):
    """Point `link` at `target` (a path relative to the link's folder) with one atomic rename."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:12]}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def remove_temp_files(folder, recursive=True) -> list:
    """Delete the temp files of interrupted `atomic_write`s under `folder`; returns their paths.

    Only for a folder no other process is writing into right now (a server at start)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    candidates = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    for path in candidates:
        if TEMP_NAME.match(path.name) and (path.is_file() or path.is_symlink()):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed
