"""The models a server publishes: numbered generations and one atomic pointer.

    <state_dir>/models/g000007-<version>/   a complete bundle (bundle.json, model.safetensors) + published.json
    <state_dir>/model -> models/g000007-...   symbolic link: the served model

A publish writes the new bundle into `models/` under a temp name, fsyncs it, renames it to its generation
folder, then swaps the `model` link with one rename. A crash at any point leaves the link on the last published
model or on the new one, never on nothing; leftovers (temp folders, a generation folder the link never pointed
at) are removed at the next start. `published.json` says which generation a model is, what it replaced
(`previous`: what a rollback restores) and why it was published.

Every publish takes the next generation number under a file lock. A run that started from generation N publishes
only while N is still current (`expect_generation`), so a training that outlived a newer model, or a rollback,
never replaces it.
"""

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from radregion.atomic import atomic_write, fsync_dir, fsync_tree, remove_temp_files, replace_symlink

logger = logging.getLogger(__name__)

RECORD = "published.json"
GENERATION = re.compile(r"^g(\d{6,})-([0-9a-f]+)$")
KEEP = 5  # generations kept on disk: the current one and the rollback chain behind it
REPLACED = object()  # `previous` of a normal publish: the model it replaces


class PublishConflict(RuntimeError):
    """A newer model was published since the run started; its result is not published."""


class NothingToRollBack(RuntimeError):
    """The current model has no earlier published model to go back to."""


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def crash_point(name: str, crash_at):
    """Fault injection for the crash tests (a training request's `crash_at`, honoured only while the server runs
    with RADREGION_TEST_FAULTS=1): kill this process (SIGKILL) at that step of a publish."""
    if crash_at == name:
        logger.warning(f"crash_at {name}: killing this process")
        os.kill(os.getpid(), 9)


class ModelStore:
    def __init__(self, state_dir):
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "models"
        self.link = self.state_dir / "model"
        self._lock_path = self.state_dir / ".publish.lock"

    # ---- reading ------------------------------------------------------------------------------------
    def current_folder(self) -> Path | None:
        """The generation folder the link points at (resolved once: a reader uses this, not the link)."""
        try:
            target = os.readlink(self.link)
        except OSError:
            return None
        folder = (self.link.parent / target).resolve()
        return folder if (folder / "bundle.json").is_file() else None

    def current(self) -> dict:
        """published.json of the served model ({} when there is none)."""
        folder = self.current_folder()
        return self.record(folder) if folder else {}

    def generation(self) -> int:
        return int(self.current().get("generation", 0))

    @staticmethod
    def record(folder) -> dict:
        try:
            return json.loads((Path(folder) / RECORD).read_text())
        except (OSError, ValueError):
            match = GENERATION.match(Path(folder).name)
            return {"generation": int(match.group(1)), "folder": Path(folder).name} if match else {}

    def history(self) -> list:
        """Records of the generation folders on disk, newest first."""
        out = []
        for folder in self.root.glob("g*"):
            if GENERATION.match(folder.name) and (folder / "bundle.json").is_file():
                out.append(self.record(folder))
        return sorted(out, key=lambda r: -int(r.get("generation", 0)))

    # ---- writing ------------------------------------------------------------------------------------
    @contextmanager
    def locked(self):
        """Exclusive lock of the publish state (across the server and its task processes)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def staging(self) -> Path:
        """An empty temp folder inside `models/` (same file system) to write a new bundle into."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))

    def publish(self, folder, reason: str, expect_generation: int | None = None, crash_at=None, **details) -> dict:
        """Publish the complete bundle in `folder` (moved, not copied) as the next generation; returns its
        record. PublishConflict when `expect_generation` is given and no longer current."""
        with self.locked():
            return self._publish(Path(folder), reason, expect_generation, REPLACED, details, crash_at)

    def _publish(self, folder: Path, reason, expect_generation, previous, details, crash_at=None) -> dict:
        from radregion.bundle import load_bundle

        current = self.current()
        generation = int(current.get("generation", 0))
        if expect_generation is not None and generation != expect_generation:
            shutil.rmtree(folder, ignore_errors=True)
            raise PublishConflict(
                f"a newer model (generation {generation}, {current.get('version')}) was published "
                f"since this run started from generation {expect_generation}"
            )
        try:
            bundle = load_bundle(folder)  # never publish something the server cannot load
            name = f"g{generation + 1:06d}-{bundle.version}"
            record = {
                "generation": generation + 1,
                "version": bundle.version,
                "folder": name,
                "previous": current.get("folder") if previous is REPLACED else previous,
                "replaced": current.get("folder"),
                "reason": reason,
                "published_at": _now(),
                **details,
            }
            with atomic_write(folder / RECORD, "w") as f:
                json.dump(record, f, indent=2)
            fsync_tree(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        crash_point("publish:written", crash_at)
        target = self.root / name
        if target.exists():
            shutil.rmtree(target)  # left by a crash between this rename and the link swap: never served
        os.replace(folder, target)
        fsync_dir(self.root)
        crash_point("publish:renamed", crash_at)
        replace_symlink(self.link, os.path.join("models", name))
        crash_point("publish:linked", crash_at)
        logger.info(f"published model {bundle.version} as generation {generation + 1} ({reason})")
        self._prune()
        return record

    def rollback(self, reason="rollback") -> dict:
        """Publish again the model the current one replaced (as a new generation: runs that started before the
        rollback cannot undo it). NothingToRollBack when there is none on disk."""
        with self.locked():
            current = self.current()
            previous = current.get("previous")
            source = self.root / previous if previous else None
            if not source or not (source / "bundle.json").is_file():
                raise NothingToRollBack(
                    f"model {current.get('version')} (generation {current.get('generation')}) "
                    f"has no earlier published model to go back to"
                )
            restored = self.record(source)
            staging = self.staging()
            os.rmdir(staging)
            # the generation folders never change once published: hard links cost no space
            shutil.copytree(source, staging, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(RECORD))
            return self._publish(
                staging,
                reason,
                None,
                restored.get("previous"),
                {"rolled_back_from": current.get("version"), "restores": restored.get("folder")},
            )

    def _prune(self):
        """Keep the current generation and the chain of `previous` behind it (KEEP in all); delete the rest."""
        keep, folder = set(), self.current().get("folder")
        while folder and len(keep) < KEEP and folder not in keep:
            keep.add(folder)
            folder = self.record(self.root / folder).get("previous")
        for path in self.root.glob("g*"):
            if GENERATION.match(path.name) and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---- start-up -----------------------------------------------------------------------------------
    def recover(self) -> list:
        """At server start (nothing else writes): settle what a crash left. Returns what was done, in words.

        - `model` a plain folder (the layout before generations): adopted as a generation;
        - no `model` link, or a dangling one: the newest complete generation (or a bundle stranded in
          `.model.old-*` by the old layout's two-rename publish) is linked;
        - temp folders and files, generation folders newer than the linked one (never served) are removed.
        """
        done = []
        with self.locked():
            self.root.mkdir(parents=True, exist_ok=True)
            if self.link.is_dir() and not self.link.is_symlink():
                adopted = self.root / f".adopt-{os.getpid()}"
                os.replace(self.link, adopted)
                fsync_dir(self.state_dir)
                done.append(f"adopted the model folder {self.link} as a generation")
            if self.current_folder() is None:
                done += self._relink()
            current = self.generation()
            for path in list(self.root.iterdir()):
                match = GENERATION.match(path.name)
                stale = path.name.startswith((".staging-", ".adopt-")) or (match and int(match.group(1)) > current)
                if stale and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                    done.append(f"removed {path.name} (never published)")
            for path in list(self.state_dir.iterdir()):
                if path.name.startswith((".train-", ".model.", ".staging-")) and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                    done.append(f"removed {path.name}")
            removed = remove_temp_files(self.state_dir)
            if removed:
                done.append(f"removed {len(removed)} temp file(s) of interrupted writes")
        return done

    def _relink(self) -> list:
        from radregion.bundle import load_bundle
        from radregion.errors import RadiographError

        if self.link.is_symlink():
            self.link.unlink()
        history = self.history()
        if history:
            replace_symlink(self.link, os.path.join("models", history[0]["folder"]))
            return [f"linked the newest complete generation {history[0]['folder']}"]
        candidates = sorted(
            list(self.root.glob(".adopt-*")) + list(self.state_dir.glob(".model.old-*")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for folder in candidates:
            try:
                load_bundle(folder)
            except RadiographError:
                continue
            staging = self.staging()
            os.rmdir(staging)
            os.replace(folder, staging)
            record = self._publish(staging, "recovered at start", None, REPLACED, {"recovered_from": folder.name})
            return [f"recovered the model in {folder.name} as generation {record['generation']}"]
        return []


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
