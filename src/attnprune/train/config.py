"""What a training run is told and what it reports: :class:`TrainConfig`, :class:`StepInfo`,
:class:`TrainResult`, and the learning-rate schedule :func:`lr_factor`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..mask import BEYOND
from ..errors import InvalidArgumentError
from ..runtime import PRECISIONS

# schedule name -> its shape after warm-up, from 1 at t = 0 to its end value at t = 1
SCHEDULES = {
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
    "constant": lambda t: 1.0,
}

# Settings that must not change between a run and its resumption (they change which data is seen
# or how the weights move). ``steps`` may not change either: the learning-rate schedule depends on it.
# Checkpoints written before a key existed are compared with its default (RESUME_DEFAULTS).
RESUME_KEYS = ("steps", "lr", "batch_size", "grad_accum", "warmup_steps", "weight_decay",
               "max_grad_norm", "schedule", "seed", "shuffle", "betas", "eps", "min_lr_ratio", "order")
RESUME_DEFAULTS = {"min_lr_ratio": 0.0, "order": "random"}


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
    min_lr_ratio: the linear and cosine schedules decay to ``min_lr_ratio * lr`` instead of 0.
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
    order: with ``shuffle``, how an epoch's order is drawn (:data:`attnprune.train.batching.ORDERS`):
        ``"random"`` (a seeded permutation) or ``"length-bucketed"`` (shuffled, sorted by length within
        windows of 50 global batches, the batches in random order: less padding).
    max_steps_this_run: stop after this many steps in this invocation (checkpointing first), for
        time-sliced jobs; ``None``: run to ``steps``.
    backend: attention backend for the mask (``"reference"``, ``"triton"``, ``"flex"``), or ``"auto"``:
        ``"triton"`` on a CUDA device when Triton is installed, else ``"reference"``.
    beyond: what the mask does on inputs longer than its calibrated length (``"error"``/``"dense"``/``"extend"``).
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
    min_lr_ratio: float = 0.0
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
    order: str = "random"
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
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            bad("min_lr_ratio", "must be in [0, 1]")
        from .batching import ORDERS

        if self.order not in ORDERS:
            bad("order", f"must be one of {', '.join(ORDERS)}")
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
        if self.beyond not in BEYOND:
            bad("beyond", f"must be one of {', '.join(BEYOND)}")

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


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for 0-based optimizer step ``step``: linear warm-up ``(step + 1) /
    warmup_steps``, then ``constant`` 1, or ``linear`` / ``cosine`` decay from 1 at the end of the
    warm-up to ``min_lr_ratio`` at ``steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    shape = SCHEDULES[cfg.schedule](min(1.0, (step - cfg.warmup_steps) / span))
    r = cfg.min_lr_ratio
    return shape if r == 0.0 or shape == 1.0 else r + (1.0 - r) * shape
