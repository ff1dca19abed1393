"""Fine-tuning with a prune mask attached: one training loop, tasks as plug-ins (causal language
modelling, classification, sequence-to-sequence).

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
classification ``labels``: an int; for seq2seq ``decoder_input_ids`` and ``labels``). Every epoch
visits a permutation of the examples drawn from ``seed`` and the epoch number (``order``: random, or
length-bucketed). One optimizer step consumes ``global_batch = batch_size *
grad_accum * world_size`` consecutive examples of that order; rank ``r``'s micro-batch ``a`` is
the ``(a * world_size + r)``-th slice of ``batch_size`` of them, so the ranks' shards are disjoint
and the examples a step sees do not depend on how the global batch is split over ranks and
accumulation. The tail of an epoch shorter than ``global_batch`` is skipped.

Loss. Token-level (causal LM, seq2seq) and example-level (classification) cross-entropy is
divided by the number of targets in the whole global batch (all micro-batches, all ranks), so two
processes with batch ``b`` give the same update as one process with batch ``2 b`` (up to float
summation order). Each task (:mod:`.tasks`) owns its collate, forward keywords and loss.

Distributed. Under ``torchrun`` call :func:`init_distributed` first (the CLI does): NCCL on GPUs,
gloo on the CPU. The model is wrapped in ``DistributedDataParallel``; only rank 0 writes
checkpoints, logs and progress bars.

Modules: :mod:`.config` (TrainConfig, StepInfo, TrainResult, the schedule), :mod:`.batching`
(BatchPlan, orders, collate), :mod:`.tasks` (the task registry), :mod:`.optim` (AdamW and the
decay / no-decay split), :mod:`.checkpoint`, :mod:`.loop` (finetune). Device, distributed set-up,
autocast and backend choice live in :mod:`attnprune.runtime` (re-exported here).
"""

from ..runtime import default_device, init_distributed, resolve_backend
from .batching import ORDERS, BatchPlan, collate
from .checkpoint import (CKPT_FORMAT, CKPT_VERSION, CheckpointError, checkpoint_dir, latest_checkpoint,
                         list_checkpoints, load_checkpoint)
from .config import SCHEDULES, StepInfo, TrainConfig, TrainResult, lr_factor
from .loop import finetune, train_step
from .optim import make_optimizer, param_groups
from .tasks import TASKS, CausalLM, Classification, Seq2Seq, Task, get_task

__all__ = ["BatchPlan", "CKPT_FORMAT", "CKPT_VERSION", "CausalLM", "CheckpointError", "Classification", "ORDERS",
           "SCHEDULES", "Seq2Seq", "StepInfo", "TASKS", "Task", "TrainConfig", "TrainResult", "checkpoint_dir",
           "collate", "default_device", "finetune", "get_task", "init_distributed", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "lr_factor", "make_optimizer", "param_groups",
           "resolve_backend", "train_step"]
