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


def test_safetensors_output_follows_umask(tmp_path):
    # safetensors swaps in a file of its own (mode 0600) under the temporary name
    from safetensors.torch import save_file
    import torch

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "t.safetensors") as tmp:
            save_file({"a": torch.zeros(3)}, str(tmp))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t.safetensors").stat().st_mode) == 0o644


def test_write_failure_is_one_clear_error(tmp_path):
    import errno

    from attnprune._io import OutputError

    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(OutputError, match="f.txt: No space left on device"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    (tmp_path / "plain").write_text("")
    with pytest.raises(OutputError, match="plain is a file, not a folder"):
        write_text_atomic(tmp_path / "plain" / "sub" / "g.txt", "x")


def test_check_output_paths(tmp_path, monkeypatch):
    from cli_helpers import make_full, make_read_only

    from attnprune._io import OutputError, check_output_dir, check_output_file

    (tmp_path / "plain").write_text("")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_file(tmp_path / "plain" / "x.safetensors")
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(tmp_path / "plain")
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path)
    check_output_file(tmp_path / "new" / "deeper" / "x.safetensors")  # fine, and creates nothing
    check_output_dir(tmp_path / "run")
    (tmp_path / "ro").mkdir()
    (tmp_path / "full").mkdir()
    make_read_only(monkeypatch, tmp_path / "ro")
    make_full(monkeypatch, tmp_path / "full")
    with pytest.raises(OutputError, match="Read-only file system"):
        check_output_file(tmp_path / "ro" / "sub" / "x.safetensors")
    with pytest.raises(OutputError, match="No space left on device"):
        check_output_dir(tmp_path / "full" / "run")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "plain", "ro"]
    assert not any((tmp_path / "full").iterdir()) and not any((tmp_path / "ro").iterdir())


SAVE_AND_WAIT = """
import sys, time
from attnprune._io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half of it")
    print("writing", flush=True)
    time.sleep(120)
"""


def test_sigterm_during_a_save_leaves_no_file(tmp_path):
    import signal
    import subprocess
    import sys

    target = tmp_path / "m.safetensors"
    p = subprocess.Popen([sys.executable, "-c", SAVE_AND_WAIT, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        assert len(list(tmp_path.iterdir())) == 1  # the temporary file, mid-save
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == -signal.SIGTERM  # still ends as SIGTERM ends a process
    finally:
        p.kill()
        p.wait()
    assert list(tmp_path.iterdir()) == []


def test_a_sigterm_handler_of_the_caller_is_kept(tmp_path):
    import signal

    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        write_text_atomic(tmp_path / "f.txt", "x")
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)
    write_text_atomic(tmp_path / "g.txt", "y")
    assert signal.getsignal(signal.SIGTERM) == old


def test_write_json_is_strict_atomic_and_converts(tmp_path):
    import dataclasses
    import json
    from pathlib import Path

    import torch

    from attnprune._io import OutputError, write_json

    @dataclasses.dataclass
    class Row:
        ms: float
        where: Path

    target = tmp_path / "r.json"
    write_json(target, {"a": float("nan"), "b": (1, float("inf")), 3: torch.tensor([1.5, 2.0]),
                        "row": Row(float("-inf"), Path("x/y")), "t": torch.tensor(2)})
    text = target.read_text()
    assert text.endswith("\n") and "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1, None], "3": [1.5, 2.0], "row": {"ms": None, "where": "x/y"},
                                "t": 2}
    with pytest.raises(TypeError, match="object"):
        write_json(target, {"x": object()})
    assert json.loads(target.read_text())["t"] == 2  # the failed write left the old file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    write_json(target, {"x": object()}, default=lambda o: "obj")
    assert json.loads(target.read_text()) == {"x": "obj"}
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        write_json(tmp_path / "f" / "r.json", {})
