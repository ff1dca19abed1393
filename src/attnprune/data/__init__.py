"""Data for observe / eval: named corpora, users' own files, and token batches.

Everything here is offline. A *source* builds a :class:`Dataset`: named splits, each a list of
records (plain dicts). Record shapes by ``Dataset.kind``:

- ``"text"``:     ``{"text": str, ...}`` (language modelling; e.g. one paragraph per record)
- ``"labelled"``: ``{"text": str, "label": int, ...}`` (classification)
- ``"parallel"``: ``{"ref": str, "source": str, "target": str}`` (translation pairs)
- ``"tokens"``:   ``{"input_ids": list[int]}`` (already tokenized, e.g. the ``random`` source)

Loading, by spec (the text after ``name:`` is the source's argument)::

    ds = load_dataset("austen")               # calibration / train / test, Jane Austen's novels
    ds = load_dataset("sentiment")            # calibration / train / test, labelled 0/1
    ds = load_dataset("bible-en-es")          # train / valid / test, English-Spanish verse pairs
    ds = load_dataset("text:notes.txt")       # a user's plain-text file (or folder, see below)
    ds = load_dataset("jsonl:reviews.jsonl")  # a user's JSONL file (or folder)
    ds = load_dataset("hf:./saved_dataset")   # datasets.load_from_disk(...) (needs ``datasets``)
    ds = from_hf(my_datasets_object)          # a datasets.Dataset / DatasetDict in memory
    ds["test"]                                # list of records
    ds.texts("calibration"), ds.labels("test")

Built-in corpora (fixed splits, no randomness; details in each module's docstring):

=============  ========  ==========================================  ====================================
source         kind      splits (records)                            from
=============  ========  ==========================================  ====================================
austen         text      train 8449, calibration 918, test 931       Debian r-cran-janeaustenr
                         paragraphs (574k / 74k / 69k words)
sentiment      labelled  train 7566, calibration 1000, test 2000     PyPI vaderSentiment 3.3.2 sdist
bible-en-es    parallel  train 28052, valid 1513, test 1512 verses   Debian sword-text-web, -sparv
=============  ========  ==========================================  ====================================

Batching, for a Hugging Face tokenizer (or none, for ``"tokens"`` records)::

    batches = lm_batches(ds["calibration"], tok, seq_len=256, batch_size=4, max_sequences=16)
    # -> list of {"input_ids": LongTensor[B, seq_len]}: the split's texts joined by blank lines,
    #    tokenized, cut into non-overlapping windows; the ragged tail is dropped. With
    #    max_sequences only as much text as needed is tokenized.
    batches = classification_batches(ds["test"], tok, batch_size=32, max_length=128)
    # -> list of {"input_ids": [B, L], "attention_mask": [B, L], "labels": [B]} (+ token_type_ids
    #    for BERT tokenizers), padded to the longest in the batch, or to ``max_length`` with
    #    ``padding="max_length"`` (a fixed length helps static masks).

Users' files (``files.py``): a single file is split contiguously into calibration / train / test
by ``DEFAULT_FRACTIONS`` (10% / 80% / 10%, in that order); a folder holding files named after
splits (``calibration.txt``, ``train.jsonl``, ``test.txt``, ...) gives those splits as they are.

Built corpora are cached as JSON under :func:`cache_dir` (``$ATTNPRUNE_CACHE`` or
``~/.cache/attnprune``), written atomically. Raw inputs (Debian packages, sdists) are put there
by ``bash scripts/setup_data.sh``; a missing one raises ``MissingDependencyError`` that says so.

Sources register in :data:`SOURCES`: ``@SOURCES.register("name")`` on a function
``(arg: str | None, **options) -> Dataset``. Modules holding sources are listed in
``SOURCE_MODULES`` and imported lazily; one that fails to import is a ``PluginImportError`` naming it,
not an unknown source.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .._io import write_json
from ..errors import EmptyDatasetError, InvalidArgumentError
from ..registry import Registry, import_modules

SOURCES: Registry[Callable[..., "Dataset"]] = Registry("data source")

# Modules that register sources on import.
SOURCE_MODULES = [
    "attnprune.data.random",
    "attnprune.data.files",
    "attnprune.data.austen",
    "attnprune.data.bible",
    "attnprune.data.sentiment",
]

KINDS = ("text", "labelled", "parallel", "tokens")

SETUP_HINT = "run `bash scripts/setup_data.sh` (it installs every data and model package)"


@dataclass
class Dataset:
    """Named splits of records (see the module docstring for record shapes per ``kind``).

    name: short identity (recorded in masks and reports), e.g. ``"austen"``.
    kind: ``"text"``, ``"labelled"``, ``"parallel"`` or ``"tokens"``.
    splits: split name -> list of records, in a fixed order.
    meta: free-form facts (source package, split rule, sizes, label rule).
    """

    name: str
    kind: str
    splits: dict[str, list[dict]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"dataset kind {self.kind!r} is not one of {KINDS}")

    def __getitem__(self, split: str) -> list[dict]:
        try:
            return self.splits[split]
        except KeyError:
            raise InvalidArgumentError(
                f"dataset {self.name!r} has no split {split!r}; splits: {', '.join(self.splits)}"
            ) from None

    def texts(self, split: str) -> list[str]:
        """The ``"text"`` field of every record of ``split`` (``"source"`` for parallel data)."""
        key = "source" if self.kind == "parallel" else "text"
        return [r[key] for r in self[split]]

    def labels(self, split: str) -> list[int]:
        """The integer ``"label"`` of every record of ``split`` (labelled datasets)."""
        if self.kind != "labelled":
            raise InvalidArgumentError(f"dataset {self.name!r} is {self.kind!r}, not labelled")
        return [int(r["label"]) for r in self[split]]

    def sizes(self) -> dict[str, int]:
        """Number of records per split."""
        return {k: len(v) for k, v in self.splits.items()}

    def describe(self, split: str | None = None) -> str:
        """One line naming the dataset (and split) for reports and mask metadata."""
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes().items())
        head = f"{self.name}[{split}]" if split else self.name
        return f"{head} ({self.kind}; {sizes})"

    # --- cache format -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically."""
        obj = {"format": "attnprune-dataset", "version": 1, "name": self.name, "kind": self.kind,
               "meta": self.meta, "splits": self.splits}
        write_json(path, obj, indent=None, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Dataset":
        """Read a file written by :meth:`save`."""
        from ..errors import CorruptFileError

        try:
            obj = json.loads(Path(path).read_text())
            if obj.get("format") != "attnprune-dataset":
                raise ValueError("not an attnprune dataset file")
            return cls(obj["name"], obj["kind"], obj["splits"], obj.get("meta", {}))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptFileError(f"cached dataset {path} is unreadable ({e}); delete it to rebuild") from e


# --- cache ---------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Root of attnprune's caches: ``$ATTNPRUNE_CACHE`` or ``~/.cache/attnprune`` (not created)."""
    env = os.environ.get("ATTNPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "attnprune"


def cached(name: str, build: Callable[[], Dataset], *, refresh: bool = False) -> Dataset:
    """Return the dataset cached as ``<cache>/data/<name>.json``, building and saving it if absent."""
    path = cache_dir() / "data" / f"{name}.json"
    if path.exists() and not refresh:
        return Dataset.load(path)
    ds = build()
    ds.save(path)
    return ds


# --- registry access -------------------------------------------------------------------------------
def _import_sources() -> None:
    import_modules(SOURCE_MODULES, "data source")


def load_dataset(spec: str, **options: Any) -> Dataset:
    """Build or load a dataset by spec: ``"<name>"`` or ``"<name>:<argument>"`` (``"jsonl:a.jsonl"``).

    ``options`` go to the source (e.g. ``refresh=True`` to rebuild a cached corpus).
    """
    _import_sources()
    name, _, arg = spec.partition(":")
    return SOURCES.get(name)(arg or None, **options)


def source_names() -> list[str]:
    """Names of all registered data sources."""
    _import_sources()
    return SOURCES.names()


def from_hf(obj: Any, *, name: str = "hf", kind: str | None = None, **options: Any) -> Dataset:
    """Wrap a ``datasets.Dataset`` / ``DatasetDict`` (or a path for ``load_from_disk``); see ``files.py``."""
    from .files import from_hf as _from_hf

    return _from_hf(obj, name=name, kind=kind, **options)


# --- splitting ---------------------------------------------------------------------------------------
DEFAULT_FRACTIONS = {"calibration": 0.1, "train": 0.8, "test": 0.1}


def split_contiguous(records: Sequence[dict], fractions: dict[str, float] | None = None) -> dict[str, list[dict]]:
    """Cut ``records`` into consecutive, non-overlapping runs, one per split, in ``fractions`` order.

    Sizes are ``floor(n * fraction)`` for every split but the last, which takes the rest. Every
    split gets at least one record when there are enough; fewer records than splits is an error.
    """
    fractions = fractions or DEFAULT_FRACTIONS
    n = len(records)
    names = list(fractions)
    if n < len(names):
        raise EmptyDatasetError(
            f"{n} record{'s' if n != 1 else ''} cannot be cut into the {len(names)} splits {', '.join(names)} "
            f"(each needs at least one); give more text, or a folder with one file per split")
    total = sum(fractions.values())
    sizes = [max(1, int(n * fractions[k] / total)) for k in names[:-1]]
    while sum(sizes) > n - 1:  # leave at least one for the last split
        sizes[sizes.index(max(sizes))] -= 1
    out, start = {}, 0
    for k, s in zip(names[:-1], sizes):
        out[k] = list(records[start:start + s])
        start += s
    out[names[-1]] = list(records[start:])
    return out


# --- batching ----------------------------------------------------------------------------------------
def _eos_id(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else None


def token_stream(records: Iterable[dict] | Iterable[str], tokenizer: Any = None, *,
                 separator: str = "newline", key: str = "text", max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize texts and join them into one id sequence: ``LongTensor[N]``.

    records: strings, text records (``key``), or ``{"input_ids": [...]}`` records (no tokenizer).
    separator: ``"newline"`` (default) joins the texts with a blank line and tokenizes the whole as
    one text (natural for prose: paragraphs stay paragraphs), ``"eos"`` puts the tokenizer's EOS id
    between separately tokenized texts (for unrelated documents), ``"none"`` concatenates the ids.
    max_tokens: stop after this many ids (the result is the start of the full stream; only as many
    texts as needed are tokenized, so a few sequences from a large split are quick).
    No BOS is added (the SmolLM2 tokenizer does not add one either).
    """
    items = list(records)
    if not items:
        raise EmptyDatasetError("no records to tokenize")
    if isinstance(items[0], dict) and "input_ids" in items[0]:
        ids: list[int] = []
        for r in items:
            ids.extend(int(i) for i in r["input_ids"])
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        return torch.tensor(ids[:max_tokens], dtype=torch.long)
    if tokenizer is None:
        raise InvalidArgumentError("text records need a tokenizer")
    if separator not in ("eos", "newline", "none"):
        raise InvalidArgumentError(f"separator must be 'eos', 'newline' or 'none', not {separator!r}")
    texts = [t if isinstance(t, str) else t[key] for t in items]
    eos = _eos_id(tokenizer) if separator == "eos" else None

    def encode(part: list[str]) -> list[int]:
        if separator == "newline":
            part = ["\n\n".join(part)]
        out: list[int] = []
        for i, seq in enumerate(tokenizer(part, add_special_tokens=False)["input_ids"]):
            if i and eos is not None:
                out.append(eos)
            out.extend(seq)
        return out

    if max_tokens is None:
        return torch.tensor(encode(texts), dtype=torch.long)
    # Tokenize a growing prefix of the texts until it yields max_tokens ids with a margin (the
    # last few ids of a prefix may merge differently with the text that follows it).
    margin = 16
    k, chars = 0, 0
    while k < len(texts) and chars < 6 * (max_tokens + margin):
        chars += len(texts[k]) + 2
        k += 1
    while True:
        ids = encode(texts[:k])
        if k >= len(texts) or len(ids) >= max_tokens + margin:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        k = min(len(texts), 2 * k)


def chunk_tokens(ids: torch.Tensor, seq_len: int, *, max_sequences: int | None = None) -> torch.Tensor:
    """Cut ``ids: LongTensor[N]`` into non-overlapping rows: ``LongTensor[n, seq_len]``, tail dropped."""
    if seq_len < 2:
        raise InvalidArgumentError(f"seq_len must be at least 2, not {seq_len}")
    n = ids.numel() // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise EmptyDatasetError(f"{ids.numel()} tokens do not fill one sequence of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def lm_batches(records: Iterable[dict] | Iterable[str], tokenizer: Any = None, *, seq_len: int,
               batch_size: int = 1, max_sequences: int | None = None,
               separator: str = "newline") -> list[dict[str, torch.Tensor]]:
    """Fixed-length batches for a causal LM: ``[{"input_ids": LongTensor[B, seq_len]}, ...]``.

    The texts are joined into one token stream (:func:`token_stream`) and cut into consecutive,
    non-overlapping windows of ``seq_len`` (:func:`chunk_tokens`); the first ``max_sequences``
    windows are kept; the last batch may be smaller than ``batch_size``. Deterministic. Labels are
    the inputs (shift inside the model / metric), so none are added.
    """
    if seq_len < 2:
        raise InvalidArgumentError(f"seq_len must be at least 2, not {seq_len}")
    limit = None if max_sequences is None else max_sequences * seq_len
    rows = chunk_tokens(token_stream(records, tokenizer, separator=separator, max_tokens=limit), seq_len,
                        max_sequences=max_sequences)
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be positive, not {batch_size}")
    return [{"input_ids": rows[i:i + batch_size]} for i in range(0, rows.shape[0], batch_size)]


def classification_batches(records: Sequence[dict], tokenizer: Any, *, batch_size: int = 32,
                           max_length: int = 128, padding: str = "longest", key: str = "text",
                           label_key: str = "label") -> list[dict[str, torch.Tensor]]:
    """Padded batches for a sequence classifier, in record order.

    Each batch: ``input_ids: LongTensor[B, L]``, ``attention_mask: LongTensor[B, L]`` (1 = real
    token), ``labels: LongTensor[B]`` (when the records have ``label_key``), and whatever else the
    tokenizer returns (``token_type_ids`` for BERT). Texts are truncated to ``max_length`` tokens
    (special tokens included); ``padding="longest"`` pads to the longest text of the batch,
    ``"max_length"`` to ``max_length`` always.
    """
    if padding not in ("longest", "max_length"):
        raise InvalidArgumentError(f"padding must be 'longest' or 'max_length', not {padding!r}")
    if not records:
        raise EmptyDatasetError("no records to batch")
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be positive, not {batch_size}")
    out = []
    for i in range(0, len(records), batch_size):
        part = records[i:i + batch_size]
        enc = tokenizer([r[key] for r in part], padding=padding, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batch = {k: v for k, v in enc.items()}
        if label_key in part[0]:
            batch["labels"] = torch.tensor([int(r[label_key]) for r in part], dtype=torch.long)
        out.append(batch)
    return out


__all__ = [
    "SOURCES", "SOURCE_MODULES", "Dataset", "DEFAULT_FRACTIONS", "cache_dir", "cached", "load_dataset",
    "source_names", "from_hf", "split_contiguous", "token_stream", "chunk_tokens", "lm_batches",
    "classification_batches",
]
