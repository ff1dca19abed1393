"""Training checkpoints: one ``checkpoints/step-XXXXXXXX.pt`` per save (model, optimizer, scheduler,
every rank's RNG states, data position, config, model and mask fingerprints), written atomically by
rank 0, the newest ``keep_checkpoints`` kept; tensors only (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_path
from ..errors import AttnPruneError, CorruptFileError
from ..runtime import barrier
from .config import RESUME_DEFAULTS, RESUME_KEYS, TrainConfig

CKPT_FORMAT = "attnprune-train-checkpoint"
CKPT_VERSION = 1
_CKPT_RE = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(AttnPruneError):
    """A training checkpoint is missing, does not fit the run being resumed, or cannot be read."""


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    """The folder holding a run's checkpoints."""
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the run's checkpoints, oldest first."""
    d = checkpoint_dir(out_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """Path of the newest checkpoint in ``out_dir``, or ``None``."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the state dict's names, shapes and dtypes (not the values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def mask_fingerprint(mask: Any) -> str | None:
    """Hash of a ``PruneMask``'s sites, lengths, block size and keep tensors (``None`` for no mask)."""
    if mask is None:
        return None
    h = hashlib.sha256()
    for s in mask.sites:
        sm = mask.site(s)
        keep = sm.keep.detach().cpu().contiguous()
        h.update(f"{s}:{sm.block}:{sm.q_len}:{sm.k_len}:{tuple(keep.shape)};".encode())
        h.update(np.packbits(keep.numpy().astype(bool)).tobytes())
    return h.hexdigest()[:16]


def rng_state() -> dict:
    """This process's torch, Python, NumPy (and CUDA) RNG states, as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (tensors only, no pickled code). Raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / not a torch file
        raise CorruptFileError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                               f"delete it to resume from an older one") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CorruptFileError(f"{path} is not an attnprune training checkpoint")
    if ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {ckpt.get('version')}, "
                              f"this attnprune reads version {CKPT_VERSION}")
    return ckpt


def check_resume(ckpt: dict, cfg: TrainConfig, world: int, model_fp: str, mask_fp: str | None,
                 path: Path) -> None:
    """Raise ``CheckpointError`` unless ``ckpt`` was written by this run's settings, model and mask."""
    saved = ckpt.get("config", {})
    now = cfg.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k, RESUME_DEFAULTS.get(k))!r}, now {now[k]!r}" for k in RESUME_KEYS
             if saved.get(k, RESUME_DEFAULTS.get(k)) != now[k]]
    if int(ckpt.get("world_size", 1)) != world:
        diffs.append(f"world size: checkpoint {ckpt.get('world_size')}, now {world}")
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: the run's settings changed ("
                              + "; ".join(diffs) + "); resume with the original settings")
    if ckpt.get("model_fingerprint") != model_fp:
        raise CheckpointError(f"cannot resume from {path}: it was written for a different model "
                              f"(parameter names or shapes differ)")
    if ckpt.get("mask_fingerprint") != mask_fp:
        what = "no mask" if ckpt.get("mask_fingerprint") is None else "a different mask"
        raise CheckpointError(f"cannot resume from {path}: that run used {what}; "
                              f"resume with the mask it was started with")


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, position: dict, step: int,
                    cfg: TrainConfig, rank: int, world: int, model_fp: str, mask_fp: str | None) -> Path | None:
    """Gather every rank's RNG state and write ``step``'s checkpoint from rank 0 (collective: every
    rank calls it). Returns the path on rank 0, ``None`` elsewhere."""
    rng = rng_state()
    if world > 1:
        import torch.distributed as dist

        rngs: list[Any] = [None] * world
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    path = None
    if rank == 0:
        path = checkpoint_dir(out_dir) / f"step-{step:08d}.pt"
        state = {
            "format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step, "world_size": world,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rngs, "data": position, "config": cfg.to_dict(),
            "model_fingerprint": model_fp, "mask_fingerprint": mask_fp,
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        for _, old in list_checkpoints(out_dir)[:-cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
    barrier(world)
    return path
