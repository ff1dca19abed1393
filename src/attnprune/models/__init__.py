"""Model loaders, by name: ``load_model("tiny-gpt2")``, ``load_model("hf:/path/to/dir")``, ``load_model("smollm2")``.

A loader takes the text after ``name:`` (or ``None``) and returns a ``LoadedModel``. Loaders
register themselves in ``MODELS``; modules holding loaders (``LOADER_MODULES``) are imported lazily by
``load_model``; one that fails to import is a ``PluginImportError`` naming it, not an unknown model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..registry import Registry, import_modules


@dataclass
class LoadedModel:
    """A model ready for observe/apply/eval.

    model: the ``torch.nn.Module`` (eval mode, on the CPU).
    tokenizer: a Hugging Face tokenizer, or ``None`` for models fed token ids directly.
    task: ``"causal-lm"``, ``"classification"``, ``"seq2seq"`` or ``"encoder"``.
    name: a short identity string recorded in masks (architecture and size).
    vocab_size / max_length: for building batches.
    """

    model: torch.nn.Module
    tokenizer: Any
    task: str
    name: str
    vocab_size: int
    max_length: int
    extra: dict = field(default_factory=dict)


MODELS: Registry[Callable[[str | None], LoadedModel]] = Registry("model")

# Modules that register loaders on import. Add yours here.
LOADER_MODULES = ["attnprune.models.tiny", "attnprune.models.real"]


def _import_loaders() -> None:
    import_modules(LOADER_MODULES, "model loader")


def load_model(spec: str) -> LoadedModel:
    """Load a model by spec: ``"<name>"`` or ``"<name>:<argument>"`` (e.g. ``hf:./my-model``)."""
    _import_loaders()
    name, _, arg = spec.partition(":")
    return MODELS.get(name)(arg or None)


def model_names() -> list[str]:
    _import_loaders()
    return MODELS.names()
