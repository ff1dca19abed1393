"""Training tasks as plug-ins of the one loop: each owns its collate, forward keywords and loss.

:data:`TASKS` maps a name to a :class:`Task` instance; ``finetune(task=...)`` takes a name or an
instance (e.g. ``Seq2Seq(label_smoothing=0.1, pad_multiple=8)``). A task is used per micro-batch::

    batch = task.collate(examples, ids, pad_id)          # CPU tensors
    out = model(**task.forward_kwargs(model, batch))
    loss = task.loss(logits_of(out), batch)              # summed or averaged (task.reduction)

The loop divides by the number of targets of the whole global batch (``task.count_targets``,
summed over micro-batches and ranks): a ``"sum"`` task's loss is scaled by ``world / total``, a
``"mean"`` task's by ``world * count / total``, so both give the global mean over targets.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import AttnPruneError, InvalidArgumentError
from ..registry import Registry


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, an object with ``.logits`` or a tuple starting with them."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise AttnPruneError(f"cannot find logits in the model output of type {type(out).__name__}; "
                         f"the model must return a tensor, a tuple starting with one, or an object with .logits")


def _loss_dtype(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 for the loss (bf16 and float16 upcast), float64 kept as it is."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _pad(seqs: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    """Right-pad 1-D ``seqs`` with ``value`` into a ``[len(seqs), length]`` long tensor."""
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, :s.numel()] = s
    return out


def _ids(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long).reshape(-1)


def _signature(model: torch.nn.Module) -> tuple[dict, bool]:
    try:
        params = dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = {}
    return params, any(p.kind == p.VAR_KEYWORD for p in params.values())


class Task:
    """A training task. Subclasses set ``name`` and ``reduction`` and override what differs."""

    name = "task"
    reduction = "sum"  # "sum": loss() sums over targets; "mean": it averages over the micro-batch's targets
    uses_cache_arg = True  # pass use_cache=False when the model's forward takes it

    def example(self, ex: Any, idx: int) -> dict:
        """Example ``idx`` as a dict with at least ``input_ids`` (1-D token ids); raises ``InvalidArgumentError``."""
        if isinstance(ex, torch.Tensor):
            return {"input_ids": ex}
        if isinstance(ex, dict):
            if "input_ids" not in ex:
                raise InvalidArgumentError(f"example {idx} has no 'input_ids' (keys: {sorted(ex)})")
            return ex
        if isinstance(ex, (list, tuple)) and ex and isinstance(ex[0], int):
            return {"input_ids": torch.tensor(ex, dtype=torch.long)}
        raise InvalidArgumentError(
            f"example {idx} is a {type(ex).__name__}; expected a 1-D tensor of token ids or a dict")

    def sort_key(self, ex: dict) -> tuple:
        """Length key of one example (its dict): the length-bucketed order sorts by it."""
        return (int(_ids(ex["input_ids"]).numel()),)

    def preflight_ids(self, examples: Sequence) -> list[int]:
        """Examples to run once before training (the longest), so that too-long data fails early."""
        if isinstance(examples, torch.Tensor):
            return [0]
        return [max(range(len(examples)), key=lambda i: self.sort_key(self.example(examples[i], i)))]

    def _inputs(self, rows: list[dict], pad_id: int) -> dict:
        seqs = [_ids(r["input_ids"]) for r in rows]
        L = max(int(s.numel()) for s in seqs)
        attn = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, (s, r) in enumerate(zip(seqs, rows)):
            attn[b, :s.numel()] = _ids(r["attention_mask"]) if "attention_mask" in r else 1
        return {"input_ids": _pad(seqs, L, pad_id), "attention_mask": attn}

    def collate(self, examples: Sequence, ids: list[int], pad_id: int = 0) -> dict:
        """One micro-batch of ``examples[i] for i in ids`` (CPU tensors, ``labels`` included)."""
        raise NotImplementedError

    def forward_kwargs(self, model: torch.nn.Module, batch: dict) -> dict:
        """Keyword arguments of ``model``'s forward for ``batch``: ``input_ids`` and, when the forward
        takes them, ``attention_mask`` and ``use_cache=False``; a forward with neither ``input_ids``
        nor ``**kwargs`` gets the ids as its first parameter."""
        params, accepts_any = _signature(model)
        kw = {"input_ids": batch["input_ids"]}
        if "attention_mask" in params or accepts_any:
            kw["attention_mask"] = batch["attention_mask"]
        if self.uses_cache_arg and "use_cache" in params:
            kw["use_cache"] = False
        if "input_ids" not in params and not accepts_any and params:
            return {next(iter(params)): batch["input_ids"]}
        return kw

    def count_targets(self, batch: dict) -> int:
        """Number of targets the loss of ``batch`` is over."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The loss of ``batch`` (a scalar; summed or averaged over its targets, see ``reduction``)."""
        raise NotImplementedError


class CausalLM(Task):
    """Next-token prediction. ``labels`` [B, L]: the example's ``labels`` or its ``input_ids``, -100
    on padding; position ``t`` predicts label ``t + 1``; the loss is summed over targets."""

    name = "causal-lm"

    def collate(self, examples: Sequence, ids: list[int], pad_id: int = 0) -> dict:
        rows = [self.example(examples[i], i) for i in ids]
        batch = self._inputs(rows, pad_id)
        B, L = batch["input_ids"].shape
        labels = torch.full((B, L), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            lab = _ids(r["labels"] if "labels" in r else r["input_ids"])
            labels[b, :lab.numel()] = lab
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch

    def count_targets(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Summed cross-entropy of ``logits`` [B, L, V] at positions ``:-1`` against ``labels[:, 1:]``."""
        shift = _loss_dtype(logits[:, :-1, :])
        return F.cross_entropy(shift.reshape(-1, shift.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")


class Classification(Task):
    """One class per example (``labels`` or ``label``: an int); logits [B, classes]; summed cross-entropy."""

    name = "classification"
    uses_cache_arg = False

    def example(self, ex: Any, idx: int) -> dict:
        if not isinstance(ex, dict):
            raise InvalidArgumentError(
                f"example {idx}: classification examples must be dicts with 'input_ids' and 'labels'")
        ex = super().example(ex, idx)
        if "labels" not in ex and "label" not in ex:
            raise InvalidArgumentError(f"example {idx} has no 'labels' for classification")
        return ex

    def collate(self, examples: Sequence, ids: list[int], pad_id: int = 0) -> dict:
        rows = [self.example(examples[i], i) for i in ids]
        batch = self._inputs(rows, pad_id)
        labels = [r.get("labels", r.get("label")) for r in rows]
        batch["labels"] = torch.tensor([int(torch.as_tensor(x).item()) for x in labels], dtype=torch.long)
        return batch

    def count_targets(self, batch: dict) -> int:
        return int(batch["labels"].numel())

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        return F.cross_entropy(_loss_dtype(logits).reshape(labels.shape[0], -1), labels, reduction="sum")


class Seq2Seq(Task):
    """Encoder-decoder training with teacher forcing, e.g. ``BartForConditionalGeneration``.

    Examples: dicts of 1-D token ids ``input_ids`` (the source), ``decoder_input_ids`` (what the
    decoder reads, e.g. ``[<s>] + target``) and ``labels`` (what it predicts at each of those
    positions, e.g. ``target + [</s>]``; same length). A batch holds ``input_ids``,
    ``attention_mask`` [B, Ls] and ``decoder_input_ids``, ``decoder_attention_mask``, ``labels``
    [B, Lt] (``labels`` -100 on padding); lengths are padded up to a multiple of ``pad_multiple``,
    with ``same_length`` both sides to one length (``Ls == Lt``): fewer distinct shapes, so a mask's
    per-shape keep tensors stay cached. Loss: cross-entropy with ``label_smoothing``, averaged over
    the micro-batch's targets (``reduction = "mean"``).
    """

    name = "seq2seq"
    reduction = "mean"
    _KEYS = ("input_ids", "decoder_input_ids", "labels")

    def __init__(self, label_smoothing: float = 0.0, pad_multiple: int = 1, same_length: bool = False):
        if not 0.0 <= label_smoothing < 1.0:
            raise InvalidArgumentError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if pad_multiple < 1:
            raise InvalidArgumentError(f"pad_multiple must be >= 1, got {pad_multiple!r}")
        self.label_smoothing = float(label_smoothing)
        self.pad_multiple = int(pad_multiple)
        self.same_length = bool(same_length)

    def example(self, ex: Any, idx: int) -> dict:
        if not isinstance(ex, dict) or any(k not in ex for k in self._KEYS):
            raise InvalidArgumentError(
                f"example {idx}: seq2seq examples must be dicts with {', '.join(self._KEYS)}")
        if _ids(ex["decoder_input_ids"]).numel() != _ids(ex["labels"]).numel():
            raise InvalidArgumentError(f"example {idx}: decoder_input_ids and labels differ in length")
        return ex

    def sort_key(self, ex: dict) -> tuple:
        return (int(_ids(ex["labels"]).numel()), int(_ids(ex["input_ids"]).numel()))

    def preflight_ids(self, examples: Sequence) -> list[int]:
        rows = [self.example(examples[i], i) for i in range(len(examples))]
        src = max(range(len(rows)), key=lambda i: _ids(rows[i]["input_ids"]).numel())
        tgt = max(range(len(rows)), key=lambda i: _ids(rows[i]["labels"]).numel())
        return sorted({src, tgt})

    def _padded(self, seqs: list[torch.Tensor], length: int, value: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = -(-length // self.pad_multiple) * self.pad_multiple
        am = torch.zeros((len(seqs), n), dtype=torch.long)
        for b, s in enumerate(seqs):
            am[b, :s.numel()] = 1
        return _pad(seqs, n, value), am

    def collate(self, examples: Sequence, ids: list[int], pad_id: int = 0) -> dict:
        rows = [self.example(examples[i], i) for i in ids]
        src = [_ids(r["input_ids"]) for r in rows]
        dec = [_ids(r["decoder_input_ids"]) for r in rows]
        lab = [_ids(r["labels"]) for r in rows]
        ls, lt = max(s.numel() for s in src), max(d.numel() for d in dec)
        if self.same_length:
            ls = lt = max(ls, lt)
        input_ids, am = self._padded(src, ls, pad_id)
        dec_ids, dam = self._padded(dec, lt, pad_id)
        labels, _ = self._padded(lab, lt, pad_id)
        return {"input_ids": input_ids, "attention_mask": am, "decoder_input_ids": dec_ids,
                "decoder_attention_mask": dam, "labels": labels.masked_fill(dam == 0, -100)}

    def forward_kwargs(self, model: torch.nn.Module, batch: dict) -> dict:
        params, accepts_any = _signature(model)
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")}
        if "use_cache" in params or accepts_any:
            kw["use_cache"] = False
        return kw

    def count_targets(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean label-smoothed cross-entropy of ``logits`` [B, Lt, V] against ``labels`` [B, Lt]."""
        x = _loss_dtype(logits)
        return F.cross_entropy(x.view(-1, x.shape[-1]), batch["labels"].view(-1), ignore_index=-100,
                               label_smoothing=self.label_smoothing)


TASKS: Registry[Task] = Registry("training task")
for _task in (CausalLM(), Classification(), Seq2Seq()):
    TASKS.add(_task.name, _task)


def get_task(task: str | Task) -> Task:
    """A :class:`Task` instance for a name of :data:`TASKS` (or the instance itself)."""
    return task if isinstance(task, Task) else TASKS.get(task)
