"""Model inputs from a dataset split: one builder per (task, data kind), used by every command.

``inputs_for(loaded, ds)`` picks the builder registered in :data:`INPUTS` under
``"<task>:<kind>"`` (``"causal-lm:text"``, ``"classification:labelled"``, ...); with
``any_task=True`` (observation, which needs no labels) a model whose task has no builder for the
data kind reads it through ``"any:<kind>"`` (the texts as token windows). The builder then gives

* ``batches(records, tokenizer, seq_len=..., batch_size=..., max_items=..., max_length=...)``: padded
  batches to run the model on (observe, eval): ``[{"input_ids": [B, L], ...}, ...]``;
* ``examples(records, tokenizer, seq_len=..., max_items=..., max_length=...)``: training examples for
  :func:`attnprune.train.finetune`: ``LongTensor[n, seq_len]`` windows (causal LM) or unpadded
  ``{"input_ids", "attention_mask", "labels"}`` dicts (classification).

Add a task or a data kind by registering an :class:`Inputs` under its key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import InvalidArgumentError
from ..registry import Registry
from . import chunk_tokens, classification_batches, lm_batches, token_stream

ANY = "any"


@dataclass(frozen=True)
class Inputs:
    """How one (task, data kind) becomes model inputs. ``key``: the record field holding the text
    (``None``: records are already token ids); ``name``: what the inputs are, for messages."""

    key: str | None = "text"
    name: str = "inputs"

    @property
    def needs_tokenizer(self) -> bool:
        return self.key is not None

    def batches(self, records: Sequence[dict], tokenizer: Any, *, seq_len: int, batch_size: int,
                max_items: int | None = None, max_length: int = 128) -> list[dict]:
        raise NotImplementedError

    def examples(self, records: Sequence[dict], tokenizer: Any, *, seq_len: int, max_items: int | None = None,
                 max_length: int = 128):
        raise NotImplementedError


@dataclass(frozen=True)
class Windows(Inputs):
    """The split's texts (or token records) joined into one token stream, cut into ``seq_len`` windows."""

    name: str = "token windows"

    def _texts(self, records):
        return records if self.key is None else [r[self.key] for r in records]

    def batches(self, records, tokenizer, *, seq_len, batch_size, max_items=None, max_length=128):
        return lm_batches(self._texts(records), tokenizer, seq_len=seq_len, batch_size=batch_size,
                          max_sequences=max_items)

    def examples(self, records, tokenizer, *, seq_len, max_items=None, max_length=128) -> torch.Tensor:
        return chunk_tokens(token_stream(self._texts(records), tokenizer), seq_len, max_sequences=max_items)


@dataclass(frozen=True)
class Labelled(Inputs):
    """Labelled texts, each truncated to ``max_length`` tokens; the first ``max_items`` records."""

    name: str = "labelled examples"

    def batches(self, records, tokenizer, *, seq_len, batch_size, max_items=None, max_length=128):
        records = records[:max_items] if max_items else records
        return classification_batches(records, tokenizer, batch_size=batch_size, max_length=max_length)

    def examples(self, records, tokenizer, *, seq_len, max_items=None, max_length=128) -> list[dict]:
        records = records[:max_items] if max_items else records
        enc = tokenizer([r[self.key] for r in records], truncation=True, max_length=max_length)
        return [{"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(am), "labels": int(r["label"])}
                for ids, am, r in zip(enc["input_ids"], enc["attention_mask"], records)]


INPUTS: Registry[Inputs] = Registry("task and data kind")
INPUTS.add("causal-lm:text", Windows())
INPUTS.add("causal-lm:tokens", Windows(key=None))
INPUTS.add("classification:labelled", Labelled())
# any model reads text for observation: texts as token windows (a translation pair's source side)
INPUTS.add(f"{ANY}:text", Windows())
INPUTS.add(f"{ANY}:labelled", Windows())
INPUTS.add(f"{ANY}:parallel", Windows(key="source"))
INPUTS.add(f"{ANY}:tokens", Windows(key=None))


def tasks() -> list[str]:
    """The tasks with a builder (``any`` aside)."""
    return sorted({k.partition(":")[0] for k in INPUTS.names()} - {ANY})


def inputs_for(loaded, ds, *, any_task: bool = False) -> Inputs:
    """The builder for ``loaded`` (a ``LoadedModel``: ``task``, ``name``, ``tokenizer``) on ``ds`` (a
    ``Dataset``). ``InvalidArgumentError`` when the model's task has no builder, or none for that data
    kind, or the data needs a tokenizer the model lacks."""
    key = f"{loaded.task}:{ds.kind}"
    if key not in INPUTS and any_task:
        key = f"{ANY}:{ds.kind}"
    if key not in INPUTS:
        kinds = [k.partition(":")[2] for k in INPUTS.names() if k.startswith(f"{loaded.task}:")]
        if not kinds:
            raise InvalidArgumentError(f"{loaded.name} is a {loaded.task} model; this command handles "
                                       f"{' and '.join(tasks())} models")
        raise InvalidArgumentError(f"{loaded.name} is a {loaded.task} model; dataset {ds.name!r} is {ds.kind!r}, "
                                   f"not {' or '.join(kinds)}")
    inputs = INPUTS.get(key)
    if inputs.needs_tokenizer and loaded.tokenizer is None:
        raise InvalidArgumentError(f"model {loaded.name!r} has no tokenizer, so it cannot read the text data "
                                   f"{ds.name!r}; use --data random")
    return inputs


__all__ = ["ANY", "INPUTS", "Inputs", "Labelled", "Windows", "inputs_for", "tasks"]
