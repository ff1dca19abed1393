"""Fine-tuning with a prune mask attached: causal language modelling and classification.

One call::

    result = finetune(model, examples, mask=mask, task="causal-lm", out_dir="runs/ft",
                      config=TrainConfig(steps=200, lr=1e-4, batch_size=8))

trains ``model`` in place with the mask attached (through :func:`attnprune.apply.apply`, so pruned
entries get exactly no attention, forward and backward), and writes to ``out_dir``:

- ``checkpoints/step-00000100.pt``: model, optimizer, scheduler, every rank's RNG states and the
  data position, every ``checkpoint_every`` steps and at the end (written atomically, the newest
  ``keep_checkpoints`` kept);
- ``metrics.jsonl``: one JSON object per logged step (step, loss, lr, grad_norm, tokens, ...);
- ``model.safetensors``: the final weights (``safetensors.torch.load_model`` reads them back);
- ``summary.json``: configuration and final numbers.

Resuming (``resume=True``) restores everything from the newest checkpoint, so an interrupted run
that is resumed ends with exactly the weights an uninterrupted run would have, having seen exactly
the same batches in the same order.

Data. ``examples`` is a sequence (indexable, with a length) of examples: a 1-D tensor of token ids,
or a dict of per-example tensors (``input_ids``, optional ``attention_mask``, and for
classification ``labels``: an int). Every epoch visits a permutation of the examples drawn from
``seed`` and the epoch number. One optimizer step consumes ``global_batch = batch_size *
grad_accum * world_size`` consecutive examples of that order; rank ``r``'s micro-batch ``a`` is
the ``(a * world_size + r)``-th slice of ``batch_size`` of them, so the ranks' shards are disjoint
and the examples a step sees do not depend on how the global batch is split over ranks and
accumulation. The tail of an epoch shorter than ``global_batch`` is skipped.

Loss. Token-level (causal LM) and example-level (classification) cross-entropy is summed and
divided by the number of targets in the whole global batch (all micro-batches, all ranks), so two
processes with batch ``b`` give the same update as one process with batch ``2 b`` (up to float
summation order).

Distributed. Under ``torchrun`` call :func:`init_distributed` first (the CLI does): NCCL on GPUs,
gloo on the CPU. The model is wrapped in ``DistributedDataParallel``; only rank 0 writes
checkpoints, logs and progress bars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._io import atomic_path, write_text_atomic
from .errors import AttnPruneError, CorruptFileError, InvalidArgumentError, MaskMismatchError

TASKS = ("causal-lm", "classification")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
CKPT_FORMAT = "attnprune-train-checkpoint"
CKPT_VERSION = 1
_CKPT_RE = re.compile(r"^step-(\d{8})\.pt$")

# Settings that must not change between a run and its resumption (they change which data is seen
# or how the weights move). ``steps`` may not change either: the learning-rate schedule depends on it.
_RESUME_KEYS = ("steps", "lr", "batch_size", "grad_accum", "warmup_steps", "weight_decay",
                "max_grad_norm", "schedule", "seed", "shuffle", "betas", "eps")


class CheckpointError(AttnPruneError):
    """A training checkpoint is missing, does not fit the run being resumed, or cannot be read."""


@dataclass
class TrainConfig:
    """Knobs of a fine-tuning run.

    steps: total optimizer steps of the run (across resumptions).
    lr: peak learning rate (AdamW).
    batch_size: examples per micro-batch on each rank.
    grad_accum: micro-batches accumulated per optimizer step.
        Global batch = ``batch_size * grad_accum * world_size`` examples.
    warmup_steps: linear warm-up from 0 to ``lr`` over this many steps.
    schedule: after warm-up, ``"linear"`` decay to 0 at ``steps``, ``"cosine"`` or ``"constant"``.
    weight_decay: AdamW decoupled weight decay, applied to parameters of two or more dimensions.
    betas, eps: AdamW constants.
    max_grad_norm: clip the global gradient norm to this (``None`` or 0: no clipping).
    precision: ``"auto"`` (bf16 autocast on a CUDA GPU that supports it, else fp32), ``"fp32"`` or
        ``"bf16"`` (autocast; on the CPU too when asked explicitly).
    checkpoint_every: write a checkpoint every this many steps (0: only at the end of the run).
    final_checkpoint: also write one when the run stops (at ``steps`` or ``max_steps_this_run``);
        turn off only for throw-away runs that will never be resumed.
    save_weights: write ``model.safetensors`` when the run finishes.
    keep_checkpoints: how many of the newest checkpoints to keep (>= 1).
    log_every: write a metrics line every this many steps (and at the last step).
    seed: seeds data order and, per rank (``seed + rank``), the random number generators
        (dropout) at the start of a fresh run.
    shuffle: visit examples in a seeded random order per epoch (``False``: in order).
    max_steps_this_run: stop after this many steps in this invocation (checkpointing first), for
        time-sliced jobs; ``None``: run to ``steps``.
    backend: attention backend for the mask (``"reference"``, ``"triton"``, ``"flex"``), or ``"auto"``:
        ``"triton"`` on a CUDA device when Triton is installed, else ``"reference"``.
    beyond: what the mask does on inputs longer than its calibrated length (``"error"``/``"dense"``).
    pad_id: token id used to pad ``input_ids`` in a micro-batch (padding is masked out).
    device: ``None``: ``cuda:<local rank>`` when a GPU is present, else the CPU.
    progress: show a tqdm progress bar (rank 0 only).
    find_unused_parameters: passed to DistributedDataParallel.
    """

    steps: int = 100
    lr: float = 5e-5
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "linear"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    precision: str = "auto"
    checkpoint_every: int = 0
    final_checkpoint: bool = True
    save_weights: bool = True
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    shuffle: bool = True
    max_steps_this_run: int | None = None
    backend: str = "auto"
    beyond: str = "error"
    pad_id: int = 0
    device: str | None = None
    progress: bool = True
    find_unused_parameters: bool = False

    def validate(self) -> None:
        """Raise ``InvalidArgumentError`` naming the first bad setting."""
        def bad(name: str, why: str) -> None:
            raise InvalidArgumentError(f"train config: {name}={getattr(self, name)!r} {why}")

        if self.steps < 1:
            bad("steps", "must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be a positive finite number")
        if self.batch_size < 1:
            bad("batch_size", "must be >= 1")
        if self.grad_accum < 1:
            bad("grad_accum", "must be >= 1")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            bad("precision", f"must be one of {', '.join(PRECISIONS)}")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            bad("max_grad_norm", "must be >= 0 or None")
        if self.checkpoint_every < 0:
            bad("checkpoint_every", "must be >= 0")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", "must be >= 1")
        if self.log_every < 1:
            bad("log_every", "must be >= 1")
        if self.max_steps_this_run is not None and self.max_steps_this_run < 1:
            bad("max_steps_this_run", "must be >= 1 or None")
        if self.beyond not in ("error", "dense"):
            bad("beyond", "must be 'error' or 'dense'")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class StepInfo:
    """What a callback sees after each optimizer step (on every rank).

    step: optimizer steps done (1 after the first).
    loss: mean loss of the step over the global batch.
    lr: learning rate used for the step.
    grad_norm: global gradient norm before clipping (``nan`` when not computed).
    example_ids: indices (into ``examples``) this rank trained on in this step, in order.
    tokens: number of targets (tokens or examples) in the global batch.
    epoch: epoch the step's data came from.
    """

    step: int
    loss: float
    lr: float
    grad_norm: float
    example_ids: list[int]
    tokens: int
    epoch: int


@dataclass
class TrainResult:
    """Outcome of :func:`finetune`.

    step: optimizer steps done in total; finished: whether ``config.steps`` was reached.
    last_loss: loss of the last step of this invocation (``nan`` if it ran none).
    out_dir / checkpoint / metrics / weights: where things were written (``weights`` only when
    finished; ``None`` on ranks other than 0).
    """

    step: int
    finished: bool
    last_loss: float
    out_dir: Path
    checkpoint: Path | None
    metrics: Path | None
    weights: Path | None
    history: list[StepInfo] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# distributed helpers

def init_distributed() -> tuple[int, int]:
    """Initialise ``torch.distributed`` when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Uses NCCL when CUDA is available, gloo otherwise. Returns ``(rank, world_size)``; ``(0, 1)``
    when not launched distributed. Safe to call when already initialised.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_available():
        raise AttnPruneError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------------------
# data

class BatchPlan:
    """Which examples every optimizer step uses: deterministic, shardable, resumable.

    ``len(examples) // global_batch`` steps per epoch; epoch ``e`` visits
    ``randperm(n, generator=seed + e)`` (or ``0..n-1`` without shuffling). Step ``s`` (0-based,
    counted across epochs) uses positions ``[i * G, (i + 1) * G)`` of its epoch's order, with
    ``i = s mod steps_per_epoch`` and ``G`` the global batch; within it, micro-batch ``a`` of rank
    ``r`` is the slice ``[(a * world + r) * b, (a * world + r + 1) * b)``.
    """

    def __init__(self, n: int, *, batch_size: int, grad_accum: int, world_size: int, seed: int,
                 shuffle: bool = True):
        self.n = n
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = batch_size * grad_accum * world_size
        if n < self.global_batch:
            raise InvalidArgumentError(
                f"the training data has {n} examples, fewer than one global batch "
                f"(batch_size {batch_size} x grad_accum {grad_accum} x world size {world_size} = "
                f"{self.global_batch}); use more data or a smaller batch")
        self.steps_per_epoch = n // self.global_batch
        self._order_epoch = -1
        self._order: torch.Tensor | None = None

    def order(self, epoch: int) -> torch.Tensor:
        """The visiting order of epoch ``epoch``: a permutation of ``range(n)``."""
        if epoch != self._order_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.n, generator=g)
            else:
                self._order = torch.arange(self.n)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def position(self, step: int) -> dict:
        """Data position before 0-based step ``step``: epoch, offset into its order, examples seen."""
        return {"epoch": step // self.steps_per_epoch,
                "offset": (step % self.steps_per_epoch) * self.global_batch,
                "examples_seen": step * self.global_batch}

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Example indices of rank ``rank``'s ``grad_accum`` micro-batches for 0-based step ``step``."""
        pos = self.position(step)
        order = self.order(pos["epoch"])
        out = []
        for a in range(self.grad_accum):
            start = pos["offset"] + (a * self.world_size + rank) * self.batch_size
            out.append(order[start:start + self.batch_size].tolist())
        return out


def _as_sequence(examples: Any) -> Sequence:
    if isinstance(examples, torch.Tensor):
        if examples.dim() != 2:
            raise InvalidArgumentError(
                f"a tensor of training examples must be [num_examples, seq_len] token ids, "
                f"got shape {tuple(examples.shape)}")
        return examples
    if hasattr(examples, "__len__") and hasattr(examples, "__getitem__"):
        return examples
    if isinstance(examples, Iterable):
        return list(examples)
    raise InvalidArgumentError(
        f"training examples must be a sequence of examples (tensor, list, dataset), "
        f"got {type(examples).__name__}")


def _example_dict(ex: Any, idx: int, task: str) -> dict:
    if isinstance(ex, torch.Tensor):
        if task == "classification":
            raise InvalidArgumentError(
                f"example {idx}: classification examples must be dicts with 'input_ids' and 'labels'")
        return {"input_ids": ex}
    if isinstance(ex, dict):
        if "input_ids" not in ex:
            raise InvalidArgumentError(f"example {idx} has no 'input_ids' (keys: {sorted(ex)})")
        if task == "classification" and "labels" not in ex and "label" not in ex:
            raise InvalidArgumentError(f"example {idx} has no 'labels' for classification")
        return ex
    if isinstance(ex, (list, tuple)) and ex and isinstance(ex[0], int):
        return {"input_ids": torch.tensor(ex, dtype=torch.long)}
    raise InvalidArgumentError(
        f"example {idx} is a {type(ex).__name__}; expected a 1-D tensor of token ids or a dict")


def collate(examples: Sequence, ids: list[int], task: str, pad_id: int = 0) -> dict:
    """Build one micro-batch from ``examples[i] for i in ids``.

    Returns ``input_ids`` [B, L] (right-padded with ``pad_id``), ``attention_mask`` [B, L]
    (1 = real token), and ``labels``: for causal LM [B, L] token ids with -100 at positions that
    are not predicted (padding; an example's own ``labels`` are used when it has them); for
    classification [B] class ids.
    """
    rows = [_example_dict(examples[i], i, task) for i in ids]
    seqs = [torch.as_tensor(r["input_ids"], dtype=torch.long).reshape(-1) for r in rows]
    L = max(int(s.numel()) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for b, (s, r) in enumerate(zip(seqs, rows)):
        input_ids[b, :s.numel()] = s
        if "attention_mask" in r:
            attn[b, :s.numel()] = torch.as_tensor(r["attention_mask"]).reshape(-1).long()
        else:
            attn[b, :s.numel()] = 1
    batch = {"input_ids": input_ids, "attention_mask": attn}
    if task == "classification":
        labels = [r.get("labels", r.get("label")) for r in rows]
        batch["labels"] = torch.tensor([int(torch.as_tensor(x).item()) for x in labels], dtype=torch.long)
    else:
        labels = torch.full((B, L), -100, dtype=torch.long)
        for b, (s, r) in enumerate(zip(seqs, rows)):
            if "labels" in r:
                lab = torch.as_tensor(r["labels"], dtype=torch.long).reshape(-1)
                labels[b, :lab.numel()] = lab
            else:
                labels[b, :s.numel()] = s
        labels[attn == 0] = -100
        batch["labels"] = labels
    return batch


# ---------------------------------------------------------------------------------------------
# loss

def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise AttnPruneError(f"cannot find logits in the model output of type {type(out).__name__}; "
                         f"the model must return a tensor, a tuple starting with one, or an object with .logits")


def _count_targets(batch: dict, task: str) -> int:
    if task == "classification":
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != -100).sum())


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Summed cross-entropy (float32) over the batch's targets."""
    if task == "classification":
        return F.cross_entropy(logits.float().reshape(labels.shape[0], -1), labels, reduction="sum")
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


# ---------------------------------------------------------------------------------------------
# optimizer, schedule, RNG

def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise InvalidArgumentError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    # the fused kernel is several times faster than the per-tensor loop (CPU included)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for 0-based optimizer step ``step`` (warm-up, then the schedule)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return 1.0 - t
    return 0.5 * (1.0 + math.cos(math.pi * t))


def _rng_state() -> dict:
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


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# checkpoints

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


def _model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def _mask_fingerprint(mask: Any) -> str | None:
    if mask is None:
        return None
    h = hashlib.sha256()
    for s in mask.sites:
        sm = mask.site(s)
        keep = sm.keep.detach().cpu().contiguous()
        h.update(f"{s}:{sm.block}:{sm.q_len}:{sm.k_len}:{tuple(keep.shape)};".encode())
        h.update(np.packbits(keep.numpy().astype(bool)).tobytes())
    return h.hexdigest()[:16]


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


# ---------------------------------------------------------------------------------------------
# the loop

def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given; else ``cuda:<local rank>`` when a GPU is present (rank 0 outside
    ``torchrun``), else the CPU. The one rule every command uses."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _resolve_device(cfg: TrainConfig) -> torch.device:
    return default_device(cfg.device)


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not use_bf16:
        return contextlib.nullcontext, False
    return (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)), True


def _forward_kwargs(model: torch.nn.Module, batch: dict, task: str) -> dict:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    kw = {"input_ids": batch["input_ids"]}
    if "attention_mask" in params or accepts_any:
        kw["attention_mask"] = batch["attention_mask"]
    if task == "causal-lm" and "use_cache" in params:
        kw["use_cache"] = False
    if "input_ids" not in params and not accepts_any and params:
        first = next(iter(params))
        return {first: batch["input_ids"]}
    return kw


def resolve_backend(name: str, device: torch.device) -> str:
    """``"auto"``: ``"triton"`` on a CUDA device when the Triton backend can load, else ``"reference"``."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "reference"
    from .backends import BACKENDS
    from .errors import MissingDependencyError

    try:
        BACKENDS.get("triton")
    except MissingDependencyError:
        return "reference"
    return "triton"


def _mask_context(model: torch.nn.Module, mask: Any, cfg: TrainConfig, device: torch.device):
    if mask is None:
        return contextlib.nullcontext()
    from .apply import apply as apply_mask

    return apply_mask(model, mask, backend=resolve_backend(cfg.backend, device), beyond=cfg.beyond)


def _read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash
    return rows


def finetune(model: torch.nn.Module, examples: Any, *, mask: Any = None, task: str = "causal-lm",
             out_dir: str | os.PathLike, config: TrainConfig | None = None, resume: bool = False,
             callbacks: Sequence[Callable[[StepInfo], None]] = (), extra_meta: dict | None = None
             ) -> TrainResult:
    """Fine-tune ``model`` in place on ``examples`` with ``mask`` attached.

    model: a Hugging Face model (``…ForCausalLM`` / ``…ForSequenceClassification``) or any module
        whose forward takes ``input_ids`` [B, L] (and optionally ``attention_mask``) and returns
        logits ([B, L, vocab] for ``"causal-lm"``, [B, classes] for ``"classification"``), a tuple
        starting with them, or an object with ``.logits``.
    examples: a sequence of examples (see the module docstring); ``[N, L]`` tensors of token ids
        are accepted for causal LM.
    mask: a ``PruneMask`` for this model (``None``: dense fine-tuning, the fair control). It is
        attached for the whole run and detached afterwards; a mask made for another model raises
        ``MaskMismatchError``.
    task: ``"causal-lm"`` or ``"classification"``.
    out_dir: where checkpoints, ``metrics.jsonl``, ``summary.json`` and ``model.safetensors`` go.
    config: a :class:`TrainConfig` (defaults if ``None``).
    resume: continue from the newest checkpoint in ``out_dir``; raises ``CheckpointError`` if
        there is none, or if it was made with other settings, another model or another mask.
        Without ``resume``, an ``out_dir`` that already holds checkpoints is refused.
    callbacks: called with a :class:`StepInfo` after every optimizer step, on every rank (an
        exception raised there stops the run like a crash would).
    extra_meta: JSON-serialisable facts recorded in ``summary.json`` (model spec, data spec, ...).

    Returns a :class:`TrainResult`. The model ends in the train/eval mode it started in.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    if task not in TASKS:
        raise InvalidArgumentError(f"task {task!r} is not supported by finetune; use one of {', '.join(TASKS)}")
    out_dir = Path(out_dir)
    rank, world = _dist_info()
    device = _resolve_device(cfg)
    examples = _as_sequence(examples)
    plan = BatchPlan(len(examples), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                     world_size=world, seed=cfg.seed, shuffle=cfg.shuffle)
    model_fp = _model_fingerprint(model)
    mask_fp = _mask_fingerprint(mask)
    ckpts = list_checkpoints(out_dir)
    start_step = 0
    ckpt = None
    if resume:
        if not ckpts:
            raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir(out_dir)}; "
                                  f"start the run without --resume")
        ckpt = load_checkpoint(ckpts[-1][1])
        _check_resume(ckpt, cfg, world, model_fp, mask_fp, ckpts[-1][1])
        start_step = int(ckpt["step"])
    elif ckpts:
        raise CheckpointError(f"{out_dir} already holds checkpoints (newest: {ckpts[-1][1].name}); "
                              f"pass --resume to continue that run, or choose another output folder")

    was_training = model.training
    model.to(device)
    # attached for the whole run; a mask for another model or too-long data fails in the
    # preflight forward, before anything is written
    with _mask_context(model, mask, cfg, device):
        if mask is not None:
            _preflight(model, examples, cfg, task, device)
        return _run(model, examples, mask, task, out_dir, cfg, ckpt, start_step, plan, rank, world,
                    device, model_fp, mask_fp, callbacks, extra_meta, was_training)


def _run(model, examples, mask, task, out_dir: Path, cfg: TrainConfig, ckpt, start_step: int,
         plan: BatchPlan, rank: int, world: int, device: torch.device, model_fp: str,
         mask_fp: str | None, callbacks, extra_meta, was_training: bool) -> TrainResult:
    resuming = ckpt is not None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint does not fit the model: {e}") from None
    optimizer = _make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        rngs = ckpt["rng"]
        _set_rng_state(rngs[rank])
        del ckpt
    else:
        _seed_all(cfg.seed + rank)

    metrics_path = out_dir / "metrics.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # drop metric lines of steps after the checkpoint: they will be redone
        rows = [r for r in _read_metrics(metrics_path) if int(r.get("step", 0)) <= start_step] if resuming else []
        write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    _barrier(world)

    train_model: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=cfg.find_unused_parameters)

    autocast, bf16 = _autocast(cfg, device)
    end_step = cfg.steps
    if cfg.max_steps_this_run is not None:
        end_step = min(cfg.steps, start_step + cfg.max_steps_this_run)

    bar = None
    if rank == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="finetune", unit="step", dynamic_ncols=True)

    history: list[StepInfo] = []
    last_ckpt: Path | None = None
    last_loss = float("nan")
    t0 = time.perf_counter()
    step = start_step
    model.train()
    log_f = open(metrics_path, "a") if rank == 0 else None
    try:
        while step < end_step:
            info = _train_step(train_model, model, examples, plan, step, rank, world, cfg, task,
                               optimizer, scheduler, device, autocast)
            step += 1
            last_loss = info.loss
            history.append(info)
            if log_f is not None and (step % cfg.log_every == 0 or step == end_step):
                row = {"step": step, "loss": info.loss, "lr": info.lr, "grad_norm": info.grad_norm,
                       "targets": info.tokens, "epoch": info.epoch,
                       "examples_seen": step * plan.global_batch,
                       "elapsed_s": round(time.perf_counter() - t0, 3),
                       "masked": mask is not None, "bf16": bf16}
                log_f.write(json.dumps(row) + "\n")
                log_f.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}")
            for cb in callbacks:
                cb(info)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (
                    cfg.final_checkpoint and step == end_step):
                last_ckpt = _save_checkpoint(out_dir, model, optimizer, scheduler, plan, step, cfg,
                                             rank, world, model_fp, mask_fp)
    finally:
        if log_f is not None:
            log_f.close()
        if bar is not None:
            bar.close()
        model.train(was_training)

    finished = step >= cfg.steps
    weights = None
    if rank == 0:
        if finished and cfg.save_weights:
            from safetensors.torch import save_model

            weights = out_dir / "model.safetensors"
            with atomic_path(weights) as tmp:
                save_model(model, str(tmp))
        summary = {"task": task, "finished": finished, "step": step, "steps": cfg.steps,
                   "last_loss": last_loss, "global_batch": plan.global_batch, "world_size": world,
                   "steps_per_epoch": plan.steps_per_epoch, "num_examples": len(examples),
                   "masked": mask is not None, "mask_fingerprint": mask_fp, "device": str(device),
                   "backend": resolve_backend(cfg.backend, device) if mask is not None else None,
                   "bf16": bf16, "config": cfg.to_dict(), "torch": torch.__version__,
                   "checkpoint": str(last_ckpt) if last_ckpt else None, **(extra_meta or {})}
        write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    _barrier(world)
    return TrainResult(step=step, finished=finished, last_loss=last_loss, out_dir=out_dir,
                       checkpoint=last_ckpt if rank == 0 else None,
                       metrics=metrics_path if rank == 0 else None, weights=weights, history=history)


def _preflight(model: torch.nn.Module, examples: Sequence, cfg: TrainConfig, task: str,
               device: torch.device) -> None:
    """One no-grad forward (eval mode) of the longest training example with the mask attached, so
    that a mask made for another model, or sequences longer than the mask's calibrated length, fail
    before anything is written rather than in the middle of the run."""
    if isinstance(examples, torch.Tensor):
        longest = 0
    else:
        longest = max(range(len(examples)),
                      key=lambda i: int(torch.as_tensor(_example_dict(examples[i], i, task)["input_ids"]).numel()))
    batch = {k: v.to(device) for k, v in collate(examples, [longest], task, cfg.pad_id).items()}
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**_forward_kwargs(model, batch, task))
    finally:
        model.train(was)


def _check_resume(ckpt: dict, cfg: TrainConfig, world: int, model_fp: str, mask_fp: str | None,
                  path: Path) -> None:
    saved = ckpt.get("config", {})
    now = cfg.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in _RESUME_KEYS
             if saved.get(k) != now[k]]
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


def _train_step(train_model, model, examples, plan: BatchPlan, step: int, rank: int, world: int,
                cfg: TrainConfig, task: str, optimizer, scheduler, device, autocast) -> StepInfo:
    micro_ids = plan.micro_batches(step, rank)
    batches = [collate(examples, ids, task, cfg.pad_id) for ids in micro_ids]
    local_targets = sum(_count_targets(b, task) for b in batches)
    (total_targets,) = _all_reduce_sum([float(local_targets)], device, world)
    if total_targets <= 0:
        raise AttnPruneError(f"step {step + 1}: the global batch has no target tokens "
                             f"(sequences of length 1 or all padding)")
    lr = optimizer.param_groups[0]["lr"]
    loss_local = 0.0
    for a, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        sync = a == len(batches) - 1
        ctx = train_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
        with ctx:
            with autocast():
                out = train_model(**_forward_kwargs(model, batch, task))
            loss_sum = _loss_sum(_logits(out), batch["labels"], task)
            # DDP averages gradients over ranks; scale so the result is sum / global targets
            (loss_sum * (world / total_targets)).backward()
        loss_local += float(loss_sum.detach())
    grad_norm = float("nan")
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    (loss_total,) = _all_reduce_sum([loss_local], device, world)
    loss = loss_total / total_targets
    if not math.isfinite(loss):
        raise AttnPruneError(f"step {step + 1}: the loss is {loss}; lower the learning rate "
                             f"(now {lr:g}) or check the data")
    pos = plan.position(step)
    return StepInfo(step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm,
                    example_ids=[i for ids in micro_ids for i in ids], tokens=int(total_targets),
                    epoch=pos["epoch"])


def _save_checkpoint(out_dir: Path, model, optimizer, scheduler, plan: BatchPlan, step: int,
                     cfg: TrainConfig, rank: int, world: int, model_fp: str, mask_fp: str | None) -> Path | None:
    rng = _rng_state()
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
            "rng": rngs, "data": plan.position(step), "config": cfg.to_dict(),
            "model_fingerprint": model_fp, "mask_fingerprint": mask_fp,
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        for _, old in list_checkpoints(out_dir)[:-cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
    _barrier(world)
    return path
