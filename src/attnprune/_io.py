"""Atomic file writes (a temporary file beside the target, then a rename) and output-path checks.

Write failures (read-only file system, a path under a file, a full disk, ...) raise
:class:`OutputError` naming the target, and the temporary file is removed, also when the process
gets SIGTERM during the write. :func:`check_output_file` / :func:`check_output_dir` make the same
checks before any long computation, so a bad ``-o`` fails at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import AttnPruneError, OutputError  # OutputError also importable from here (its old home)


class _Terminated(BaseException):
    """Raised by the SIGTERM handler of :func:`_sigterm_cleanup` inside an atomic write."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_cleanup() -> Iterator[None]:
    """While inside, SIGTERM raises ``_Terminated`` (so ``finally``/``except`` clean-up runs); on leaving
    with it, the default SIGTERM action is taken (the process ends as SIGTERM would have ended it).

    Only where SIGTERM has its default action and in the main thread: a handler someone else
    installed (or an enclosing atomic write's) is left alone."""
    try:
        install = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    except (ValueError, AttributeError):  # no signal support here
        install = False
    if not install:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise  # pragma: no cover - not reached: the default action ends the process
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _os_reason(exc: BaseException) -> str | None:
    """Why a write failed, when ``exc`` is an I/O failure (``None`` for other exceptions)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    m = re.search(r"os error (\d+)", text)  # safetensors' Rust I/O errors
    if m:
        return os.strerror(int(m.group(1)))
    if isinstance(exc, RuntimeError) and "write failed" in text:  # torch.save's stream writer
        return "the write failed (is the disk full?)"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``path``.

    The file gets the usual permissions (``0666`` less the umask), whatever created it. On any
    exception, and on SIGTERM, the temporary file is removed and ``path`` is left untouched, so a
    crash never leaves half a file behind. I/O failures raise :class:`OutputError`.
    """
    target = Path(path)
    with _sigterm_cleanup():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
        except OSError as e:
            raise OutputError(f"cannot write {target}: {_folder_problem(target.parent) or e.strerror}") from None
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            # after the writer: some writers (safetensors) replace the file with their own 0600 one
            os.chmod(tmp_path, 0o666 & ~_umask())
            os.replace(tmp_path, target)
        except BaseException as e:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
            reason = None if isinstance(e, AttnPruneError) else _os_reason(e)
            if reason is not None:
                raise OutputError(f"cannot write {target}: {reason}") from e
            raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _strict(o):
    """NaN / inf -> None (strict JSON), recursively; dict keys as strings; tuples as lists."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v) for v in o]
    return o


def _to_json(o, fallback=None):
    """The JSON form of what ``json`` cannot write itself: paths, tensors, dataclasses, numpy values."""
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist") and callable(o.tolist):  # torch / numpy tensors, arrays and scalars
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if fallback is not None:
        return fallback(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 1, default=None,
               ensure_ascii: bool = True) -> None:
    """Write ``obj`` as strict JSON (NaN and infinities become ``null``) to ``path`` atomically, with a
    final newline. Paths, tensors, numpy values and dataclasses are converted; anything else goes to
    ``default`` (e.g. ``str``) or raises ``TypeError``. ``ensure_ascii=False`` keeps non-ASCII text as is."""
    def convert(o):
        return _strict(_to_json(o, default))

    text = json.dumps(_strict(obj), indent=indent, default=convert, allow_nan=False, ensure_ascii=ensure_ascii)
    write_text_atomic(path, text + "\n")


# --- checks before long work -----------------------------------------------------------------------
def _folder_problem(folder: Path) -> str | None:
    """Why files cannot be created under ``folder`` when a part of its path is a file, else ``None``."""
    d = Path(folder)
    while not d.exists() and d.parent != d:
        d = d.parent
    if d.exists() and not d.is_dir():
        return f"{d} is a file, not a folder"
    return None


def _probe(folder: Path, what: Path) -> None:
    """Create, fill, sync and remove a small file in the nearest existing folder of ``folder``."""
    problem = _folder_problem(folder)
    if problem:
        raise OutputError(f"cannot write {what}: {problem}")
    d = Path(folder)
    while not d.exists() and d.parent != d:
        d = d.parent
    with _sigterm_cleanup():
        try:
            fd, tmp = tempfile.mkstemp(prefix=".attnprune-check.", suffix=".tmp", dir=d)
        except OSError as e:
            raise OutputError(f"cannot write {what}: {e.strerror} ({d})") from None
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        except OSError as e:
            raise OutputError(f"cannot write {what}: {e.strerror} ({d})") from None
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    try:
        st = os.statvfs(d)
    except (OSError, AttributeError):
        return
    if st.f_bavail == 0 and st.f_blocks > 0:
        raise OutputError(f"cannot write {what}: {os.strerror(errno.ENOSPC)} ({d})")


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail now, with an :class:`OutputError`, if ``path`` cannot be written later: it is a folder, a
    part of its folder is a file, or its (nearest existing) folder refuses a new file."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"output {p} is a folder; give a file name")
    _probe(p.parent, p)
    return p


def check_output_dir(path: str | os.PathLike) -> Path:
    """Like :func:`check_output_file`, for an output folder (which may exist or not yet)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"output folder {p} exists and is a file")
    _probe(p, p)
    return p
