"""Which examples every optimizer step uses (:class:`BatchPlan`) and how a micro-batch is built
(:func:`collate`, through the task's own collate).

Orders (:data:`ORDERS`, name -> function ``(n, global_batch, seed, epoch, sort_key) -> order``): an
epoch's order is a list of example indices whose consecutive slices of ``global_batch`` are the
epoch's steps.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Sequence

import torch

from ..errors import InvalidArgumentError
from ..registry import Registry

ORDERS: Registry[Callable[..., torch.Tensor]] = Registry("example order")
_BUCKET_WINDOW = 50  # global batches per length-sorted window


@ORDERS.register("sequential")
def sequential_order(n: int, global_batch: int, seed: int, epoch: int, sort_key=None) -> torch.Tensor:
    """``0 .. n-1`` every epoch."""
    return torch.arange(n)


@ORDERS.register("random")
def random_order(n: int, global_batch: int, seed: int, epoch: int, sort_key=None) -> torch.Tensor:
    """``randperm(n)`` from a generator seeded with ``seed * 1_000_003 + epoch``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@ORDERS.register("length-bucketed")
def length_bucketed_order(n: int, global_batch: int, seed: int, epoch: int,
                          sort_key: Callable[[int], Any] | None = None) -> torch.Tensor:
    """Shuffle (``random.Random(seed * 1_000_003 + epoch)``), sort by ``sort_key(index)`` within
    windows of 50 global batches, cut each window into global batches (a window's tail shorter
    than one is dropped) and shuffle the batches. Similar lengths share a batch: little padding.
    Returns the concatenated batches (``(n // global_batch) * global_batch`` indices)."""
    if sort_key is None:
        raise InvalidArgumentError("the length-bucketed order needs the examples' lengths (a task's sort key)")
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(n))
    rng.shuffle(idx)
    window = global_batch * _BUCKET_WINDOW
    batches = []
    for w in range(0, n, window):
        chunk = sorted(idx[w:w + window], key=sort_key)
        batches += [chunk[b:b + global_batch] for b in range(0, len(chunk) - global_batch + 1, global_batch)]
    rng.shuffle(batches)
    return torch.tensor([i for b in batches for i in b], dtype=torch.long)


class BatchPlan:
    """Which examples every optimizer step uses: deterministic, shardable, resumable.

    ``len(examples) // global_batch`` steps per epoch; epoch ``e`` visits ``ORDERS[order](n, G,
    seed, e)`` (``"random"``: ``randperm(n, generator=seed * 1_000_003 + e)``; without shuffling
    ``0..n-1``). Step ``s`` (0-based, counted across epochs) uses positions ``[i * G, (i + 1) * G)``
    of its epoch's order, with ``i = s mod steps_per_epoch`` and ``G`` the global batch; within it,
    micro-batch ``a`` of rank ``r`` is the slice ``[(a * world + r) * b, (a * world + r + 1) * b)``.
    sort_key: ``index -> key`` for the length-bucketed order (the task's :meth:`Task.sort_key`).
    """

    def __init__(self, n: int, *, batch_size: int, grad_accum: int, world_size: int, seed: int,
                 shuffle: bool = True, order: str = "random", sort_key: Callable[[int], Any] | None = None):
        self.n = n
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.order_name = order if shuffle else "sequential"
        self._order_fn = ORDERS.get(self.order_name)
        self._sort_key = sort_key
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
        """The visiting order of epoch ``epoch``: ``[>= steps_per_epoch * global_batch]`` example indices."""
        if epoch != self._order_epoch:
            self._order = self._order_fn(self.n, self.global_batch, self.seed, epoch, self._sort_key)
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


def as_sequence(examples: Any) -> Sequence:
    """``examples`` as an indexable sequence: a ``[N, L]`` tensor of token ids, a list or a dataset."""
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


def collate(examples: Sequence, ids: list[int], task: Any = "causal-lm", pad_id: int = 0) -> dict:
    """Build one micro-batch from ``examples[i] for i in ids`` with the task's collate
    (:mod:`attnprune.train.tasks`; ``task``: a name or a :class:`~attnprune.train.tasks.Task`).

    Causal LM: ``input_ids`` [B, L] (right-padded with ``pad_id``), ``attention_mask`` [B, L]
    (1 = real token), ``labels`` [B, L] token ids with -100 where nothing is predicted (padding; an
    example's own ``labels`` are used when it has them). Classification: the same inputs and
    ``labels`` [B] class ids. Seq2seq: see :class:`~attnprune.train.tasks.Seq2Seq`.
    """
    from .tasks import get_task

    return get_task(task).collate(examples, ids, pad_id)
