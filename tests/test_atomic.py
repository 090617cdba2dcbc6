"""atomic_write: readers see the old file or the new one, never half of one, and no temp file stays; the file and
its folder are fsynced; a crash's temp files are recognised and removed."""

import os

import pytest

from radregion.atomic import atomic_write, remove_temp_files, replace_symlink


def test_replaces_on_success(tmp_path):
    target = tmp_path / "deep" / "label.json"
    with atomic_write(target, "w", encoding="utf-8") as handle:
        handle.write("new")
        assert not target.exists()  # nothing visible until the write is complete
    assert target.read_text() == "new" and list(target.parent.iterdir()) == [target]


def test_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write(b"half")
            raise RuntimeError("crash in the middle")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_label_writes_fsync_the_file_and_its_folder(tmp_path, monkeypatch):
    """After the rename, the folder is fsynced too (else a power cut can lose the new entry)."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "labels" / "final" / "x.json"
    with atomic_write(target, "w") as f:
        f.write("{}")
    assert synced[-1] == str(target.parent) and any(p.endswith(".tmp") for p in synced[:-1]), synced


def test_remove_temp_files_takes_only_what_atomic_write_leaves(tmp_path):
    (tmp_path / "labels" / "final").mkdir(parents=True)
    left = [tmp_path / ".datastore.json.0123456789ab.tmp", tmp_path / "labels" / "final" / ".x.json.abcdef012345.tmp"]
    kept = [tmp_path / "x.tmp", tmp_path / ".notes.tmp", tmp_path / "labels" / "final" / "y.json"]
    for path in left + kept:
        path.write_text("?")
    assert sorted(remove_temp_files(tmp_path)) == sorted(left)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in left)


def test_replace_symlink_swaps_the_target_in_one_rename(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    replace_symlink(tmp_path / "model", "a")
    replace_symlink(tmp_path / "model", "b")
    assert os.readlink(tmp_path / "model") == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "model"]
