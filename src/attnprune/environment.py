"""The one environment record every result file carries: :func:`environment` (fixed keys, :data:`ENV_KEYS`).

Versions, hardware (no host name), the device used, the date and the git commit, so a number in a
result file can be traced to where and with what it was made. ``attnprune.report`` re-exports both.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

ENV_KEYS = ("date_utc", "python", "platform", "cpu", "cpu_count", "torch_threads", "torch", "cuda", "cudnn",
            "gpu", "gpu_count", "gpu_memory_gib", "triton", "transformers", "numpy", "attnprune", "device",
            "git_commit", "git_tree", "switches")
"""The keys of :func:`environment`, always all present (``None`` where a value does not apply or is unknown)."""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "?")
    except Exception:  # noqa: BLE001 - optional packages (missing, or broken on this machine)
        return None


def _git_commit(where: Path | None = None) -> str | None:
    """The commit of the source tree this package runs from, ``+dirty`` when tracked files differ from it
    (``None`` outside a git checkout). ``where``: a folder of the checkout (default: this package's)."""
    where = where or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", sha):
        return None
    try:  # tracked files that differ from that commit (a copied work tree, local edits): say so
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=where, capture_output=True, timeout=5).returncode == 1
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return sha + "+dirty" if dirty else sha


def _git_tree(where: Path | None = None) -> str | None:
    """The git tree id of the checkout's files as they are on disk (tracked and untracked, not ignored): equal to
    ``git rev-parse C^{tree}`` for the commit ``C`` whose files these are, so a run from a copied or edited tree
    (``git_commit`` ends in ``+dirty``) can still be traced: ``git log --all --format='%H %T' | grep TREE``.
    Hashed through a throwaway index and object folder: the checkout is not written to. ``None`` outside git,
    and by default (``where`` None) unless this package is the checkout's ``src/attnprune``: an installed copy
    inside some other repository (a virtual environment in a project) must not hash that project."""
    package = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "--absolute-git-dir"], cwd=where or package,
                             capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        top, gitdir = out.stdout.split("\n")[:2]
        if where is None and Path(top).resolve() / "src" / "attnprune" != package:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, GIT_INDEX_FILE=os.path.join(tmp, "index"), GIT_OBJECT_DIRECTORY=tmp,
                       GIT_ALTERNATE_OBJECT_DIRECTORIES=os.path.join(gitdir, "objects"))
            if subprocess.run(["git", "add", "-A"], cwd=top, env=env, capture_output=True, timeout=30).returncode:
                return None
            out = subprocess.run(["git", "write-tree"], cwd=top, env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    tree = out.stdout.strip()
    return tree if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", tree) else None


_AT_IMPORT: dict = {}


def remember_commit() -> None:
    """Read the source tree's commit and tree id now (``import attnprune`` calls this): the record of a run names
    the code the process loaded, not the commit the tree has moved on to when a long run writes its results."""
    if "commit" not in _AT_IMPORT:
        _AT_IMPORT["commit"] = _git_commit()
        _AT_IMPORT["tree"] = _git_tree()


def environment(device=None) -> dict:
    """The one record of where and with what a result was made, stored in every result file.

    Fixed keys (:data:`ENV_KEYS`, all always present; ``None`` when unknown or not applicable):
    ``date_utc`` ("YYYY-MM-DD HH:MM:SS UTC"), ``python``, ``platform`` (OS and architecture, no host
    name), ``cpu`` (model), ``cpu_count``, ``torch_threads``, ``torch``, ``cuda`` (torch's CUDA
    version), ``cudnn``, ``gpu`` (name of the GPU used, or of GPU 0), ``gpu_count``, ``gpu_memory_gib``,
    ``triton``, ``transformers``, ``numpy``, ``attnprune``, ``device`` (the device the run used:
    ``device`` if given, else ``cuda`` when a GPU is there, else ``cpu``) and ``git_commit`` (the commit when
    this process imported attnprune, see :func:`remember_commit`; ``+dirty`` when tracked files differ from it),
    ``git_tree`` (the git tree id of the files as they were then, tracked and untracked: the commit they match
    is ``git log --all --format='%H %T' | grep <git_tree>``, also when ``git_commit`` is a stale ``+dirty`` one,
    as on a machine that got a copy of the tree) and ``switches``: the ``ATTNPRUNE_*``
    environment variables that change how attention is computed (``ATTNPRUNE_FA4_PARTIAL``,
    ``ATTNPRUNE_TRITON_BITS``, ...; all but ``ATTNPRUNE_CACHE``) as set for this process, ``{}`` when none
    is (every default then holds).
    """
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    gpu = gpu_mem = None
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpu_count:
        idx = dev.index if dev.type == "cuda" and dev.index is not None else 0
        props = torch.cuda.get_device_properties(idx)
        gpu, gpu_mem = props.name, round(props.total_memory / 2**30, 1)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "gpu": gpu,
        "gpu_count": gpu_count,
        "gpu_memory_gib": gpu_mem,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "attnprune": _version("attnprune"),
        "device": str(dev),
        "git_commit": _AT_IMPORT["commit"] if "commit" in _AT_IMPORT else _git_commit(),
        "git_tree": _AT_IMPORT["tree"] if "tree" in _AT_IMPORT else _git_tree(),
        "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ATTNPRUNE_") and k != "ATTNPRUNE_CACHE"},
    }
    return env
