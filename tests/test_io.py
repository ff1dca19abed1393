import os
import stat

import pytest

from attnprune._io import atomic_path, write_text_atomic


def test_atomic_write_respects_umask_and_replaces(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "sub" / "f.txt"
        write_text_atomic(target, "one")
        write_text_atomic(target, "two")
    finally:
        os.umask(old)
    assert target.read_text() == "two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
