"""atomic_write: readers see the old file or the new one, never half of one, and no temp file stays."""

import pytest

from radregion.atomic import atomic_write


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
