"""The one training loop: :func:`finetune` (set-up, resume, the step loop, final files) and
:func:`train_step` (one optimizer step over the global batch)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .._io import atomic_path, write_text_atomic
from ..errors import AttnPruneError
from ..runtime import all_reduce_sum, autocast_policy, barrier, default_device, dist_info, resolve_backend
from .batching import BatchPlan, as_sequence
from .checkpoint import (CheckpointError, check_resume, checkpoint_dir, list_checkpoints, load_checkpoint,
                         mask_fingerprint, model_fingerprint, save_checkpoint, seed_all, set_rng_state)
from .config import StepInfo, TrainConfig, TrainResult, lr_factor
from .optim import make_optimizer
from .tasks import Task, get_task, logits_of


def finetune(model: torch.nn.Module, examples: Any, *, mask: Any = None, task: str | Task = "causal-lm",
             out_dir: str | os.PathLike | None, config: TrainConfig | None = None, resume: bool = False,
             callbacks: Sequence[Callable[[StepInfo], None]] = (), extra_meta: dict | None = None,
             desc: str = "finetune") -> TrainResult:
    """Fine-tune ``model`` in place on ``examples`` with ``mask`` attached.

    model: a Hugging Face model (``…ForCausalLM`` / ``…ForSequenceClassification`` /
        ``…ForConditionalGeneration``) or any module whose forward takes ``input_ids`` [B, L] (and
        optionally ``attention_mask``) and returns logits ([B, L, vocab] for ``"causal-lm"``,
        [B, classes] for ``"classification"``, [B, Lt, vocab] for ``"seq2seq"``), a tuple starting
        with them, or an object with ``.logits``.
    examples: a sequence of examples (see the package docstring and :mod:`attnprune.train.tasks`);
        ``[N, L]`` tensors of token ids are accepted for causal LM.
    mask: a ``PruneMask`` for this model (``None``: dense fine-tuning, the fair control). It is
        attached for the whole run and detached afterwards; a mask made for another model raises
        ``MaskMismatchError``.
    task: a name of :data:`attnprune.train.tasks.TASKS` (``"causal-lm"``, ``"classification"``,
        ``"seq2seq"``) or a :class:`~attnprune.train.tasks.Task` (e.g. ``Seq2Seq(label_smoothing=0.1)``).
    out_dir: where checkpoints, ``metrics.jsonl``, ``summary.json`` and ``model.safetensors`` go;
        ``None``: an in-memory run that writes nothing (no checkpoints, so no ``resume``).
    config: a :class:`TrainConfig` (defaults if ``None``).
    resume: continue from the newest checkpoint in ``out_dir``; raises ``CheckpointError`` if
        there is none, or if it was made with other settings, another model or another mask.
        Without ``resume``, an ``out_dir`` that already holds checkpoints is refused.
    callbacks: called with a :class:`StepInfo` after every optimizer step, on every rank (an
        exception raised there stops the run like a crash would).
    extra_meta: JSON-serialisable facts recorded in ``summary.json`` (model spec, data spec, ...).
    desc: the progress bar's label.

    Returns a :class:`TrainResult`. The model ends in the train/eval mode it started in.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    task = get_task(task)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is None and resume:
        raise CheckpointError("resume needs the out_dir of the run to resume")
    rank, world = dist_info()
    device = default_device(cfg.device)
    examples = as_sequence(examples)
    sort_key = None
    if cfg.shuffle and cfg.order == "length-bucketed":
        keys = [task.sort_key(task.example(examples[i], i)) for i in range(len(examples))]
        sort_key = keys.__getitem__
    plan = BatchPlan(len(examples), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, world_size=world,
                     seed=cfg.seed, shuffle=cfg.shuffle, order=cfg.order, sort_key=sort_key)
    model_fp = model_fingerprint(model)
    mask_fp = mask_fingerprint(mask)
    ckpts = list_checkpoints(out_dir) if out_dir is not None else []
    start_step = 0
    ckpt = None
    if resume:
        if not ckpts:
            raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir(out_dir)}; "
                                  f"start the run without --resume")
        ckpt = load_checkpoint(ckpts[-1][1])
        check_resume(ckpt, cfg, world, model_fp, mask_fp, ckpts[-1][1])
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
        run = _Run(model, examples, mask, task, out_dir, cfg, plan, rank, world, device, model_fp, mask_fp)
        return run.train(ckpt, start_step, callbacks, extra_meta, was_training, desc)


def _mask_context(model: torch.nn.Module, mask: Any, cfg: TrainConfig, device: torch.device):
    if mask is None:
        return contextlib.nullcontext()
    from ..apply import apply as apply_mask

    return apply_mask(model, mask, backend=resolve_backend(cfg.backend, device), beyond=cfg.beyond)


def _preflight(model: torch.nn.Module, examples: Sequence, cfg: TrainConfig, task: Task,
               device: torch.device) -> None:
    """One no-grad forward (eval mode) of the longest training example(s) with the mask attached, so
    that a mask made for another model, or sequences longer than the mask's calibrated length, fail
    before anything is written rather than in the middle of the run."""
    batch = {k: v.to(device) for k, v in task.collate(examples, task.preflight_ids(examples), cfg.pad_id).items()}
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**task.forward_kwargs(model, batch))
    finally:
        model.train(was)


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


def train_step(train_model, model, examples, plan: BatchPlan, step: int, rank: int, world: int,
               cfg: TrainConfig, task: Task, optimizer, scheduler, device, autocast) -> StepInfo:
    """One optimizer step (0-based ``step``) over rank ``rank``'s micro-batches of the global batch.

    ``train_model`` is ``model`` or its DDP wrapper. Each micro-batch's loss is scaled so that the
    accumulated gradient is that of the global mean over targets (all micro-batches, all ranks).
    """
    micro_ids = plan.micro_batches(step, rank)
    batches = [task.collate(examples, ids, cfg.pad_id) for ids in micro_ids]
    counts = [task.count_targets(b) for b in batches]
    (total_targets,) = all_reduce_sum([float(sum(counts))], device, world)
    if total_targets <= 0:
        raise AttnPruneError(f"step {step + 1}: the global batch has no target tokens "
                             f"(sequences of length 1 or all padding)")
    lr = optimizer.param_groups[0]["lr"]
    loss_local = 0.0
    for a, (batch, n) in enumerate(zip(batches, counts)):
        batch = {k: v.to(device) for k, v in batch.items()}
        sync = a == len(batches) - 1
        ctx = train_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
        with ctx:
            with autocast():
                out = train_model(**task.forward_kwargs(model, batch))
            loss = task.loss(logits_of(out), batch)
            # DDP averages gradients over ranks; scale so the result is the mean over global targets.
            # A "mean" task's loss is already divided by this micro-batch's n targets.
            weight = n if task.reduction == "mean" else 1
            (loss * (world * weight / total_targets)).backward()
        loss_local += float(loss.detach()) * weight
    grad_norm = float("nan")
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    (loss_total,) = all_reduce_sum([loss_local], device, world)
    loss = loss_total / total_targets
    if not math.isfinite(loss):
        raise AttnPruneError(f"step {step + 1}: the loss is {loss}; lower the learning rate "
                             f"(now {lr:g}) or check the data")
    pos = plan.position(step)
    return StepInfo(step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm,
                    example_ids=[i for ids in micro_ids for i in ids], tokens=int(total_targets),
                    epoch=pos["epoch"])


class _Run:
    """The state of one invocation of :func:`finetune` (after its checks)."""

    def __init__(self, model, examples, mask, task: Task, out_dir: Path | None, cfg: TrainConfig,
                 plan: BatchPlan, rank: int, world: int, device: torch.device, model_fp: str,
                 mask_fp: str | None):
        self.model, self.examples, self.mask, self.task = model, examples, mask, task
        self.out_dir, self.cfg, self.plan, self.rank, self.world = out_dir, cfg, plan, rank, world
        self.device, self.model_fp, self.mask_fp = device, model_fp, mask_fp
        self.writes = out_dir is not None and rank == 0

    def _restore(self, ckpt, optimizer, scheduler) -> None:
        if ckpt is None:
            seed_all(self.cfg.seed + self.rank)
            return
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"][self.rank])

    def train(self, ckpt, start_step: int, callbacks, extra_meta, was_training: bool, desc: str) -> TrainResult:
        model, cfg, plan, world = self.model, self.cfg, self.plan, self.world
        if ckpt is not None:
            try:
                model.load_state_dict(ckpt["model"])
            except RuntimeError as e:
                raise CheckpointError(f"checkpoint does not fit the model: {e}") from None
        optimizer = make_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        self._restore(ckpt, optimizer, scheduler)
        resuming = ckpt is not None
        del ckpt

        metrics_path = self.out_dir / "metrics.jsonl" if self.out_dir is not None else None
        if self.writes:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # drop metric lines of steps after the checkpoint: they will be redone
            rows = [r for r in _read_metrics(metrics_path) if int(r.get("step", 0)) <= start_step] if resuming else []
            write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        barrier(world)

        train_model: torch.nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                              find_unused_parameters=cfg.find_unused_parameters)

        autocast, bf16 = autocast_policy(cfg.precision, self.device)
        end_step = cfg.steps
        if cfg.max_steps_this_run is not None:
            end_step = min(cfg.steps, start_step + cfg.max_steps_this_run)

        bar = None
        if self.rank == 0 and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                       leave=self.out_dir is not None)

        history: list[StepInfo] = []
        last_ckpt: Path | None = None
        last_loss = float("nan")
        t0 = time.perf_counter()
        step = start_step
        model.train()
        log_f = open(metrics_path, "a") if self.writes else None
        try:
            while step < end_step:
                info = train_step(train_model, model, self.examples, plan, step, self.rank, world, cfg,
                                  self.task, optimizer, scheduler, self.device, autocast)
                step += 1
                last_loss = info.loss
                history.append(info)
                if log_f is not None and (step % cfg.log_every == 0 or step == end_step):
                    row = {"step": step, "loss": info.loss, "lr": info.lr, "grad_norm": info.grad_norm,
                           "targets": info.tokens, "epoch": info.epoch,
                           "examples_seen": step * plan.global_batch,
                           "elapsed_s": round(time.perf_counter() - t0, 3),
                           "masked": self.mask is not None, "bf16": bf16}
                    log_f.write(json.dumps(row) + "\n")
                    log_f.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}")
                for cb in callbacks:
                    cb(info)
                if self.out_dir is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (
                        cfg.final_checkpoint and step == end_step)):
                    last_ckpt = save_checkpoint(self.out_dir, model, optimizer, scheduler, plan.position(step),
                                                step, cfg, self.rank, world, self.model_fp, self.mask_fp)
        finally:
            if log_f is not None:
                log_f.close()
            if bar is not None:
                bar.close()
            model.train(was_training)

        finished = step >= cfg.steps
        weights = self._finish(step, finished, last_loss, last_ckpt, bf16, extra_meta)
        barrier(world)
        return TrainResult(step=step, finished=finished, last_loss=last_loss, out_dir=self.out_dir,
                           checkpoint=last_ckpt if self.rank == 0 else None,
                           metrics=metrics_path if self.writes else None, weights=weights, history=history)

    def _finish(self, step: int, finished: bool, last_loss: float, last_ckpt: Path | None, bf16: bool,
                extra_meta: dict | None) -> Path | None:
        """Rank 0 with an ``out_dir``: the final weights (when finished) and ``summary.json``."""
        if not self.writes:
            return None
        cfg, plan, out_dir = self.cfg, self.plan, self.out_dir
        weights = None
        if finished and cfg.save_weights:
            from safetensors.torch import save_model

            weights = out_dir / "model.safetensors"
            with atomic_path(weights) as tmp:
                save_model(self.model, str(tmp))
        summary = {"task": self.task.name, "finished": finished, "step": step, "steps": cfg.steps,
                   "last_loss": last_loss, "global_batch": plan.global_batch, "world_size": self.world,
                   "steps_per_epoch": plan.steps_per_epoch, "num_examples": len(self.examples),
                   "masked": self.mask is not None, "mask_fingerprint": self.mask_fp, "device": str(self.device),
                   "backend": resolve_backend(cfg.backend, self.device) if self.mask is not None else None,
                   "bf16": bf16, "config": cfg.to_dict(), "torch": torch.__version__,
                   "checkpoint": str(last_ckpt) if last_ckpt else None, **(extra_meta or {})}
        write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return weights
