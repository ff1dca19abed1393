"""Users' own data: plain text, JSONL, and Hugging Face ``datasets`` objects.

Sources (``load_dataset("<name>:<path>")``):

- ``text:<path>``: a UTF-8 text file; one record per paragraph (blank lines separate
  paragraphs; lines within one are kept as they are). ``load_dataset("text:f.txt", unit="line")``
  makes one record per non-empty line instead. Kind ``"text"``.
- ``jsonl:<path>``: one JSON object per line (blank lines skipped). Every object must hold
  ``text_key`` (default ``"text"``); with ``label_key`` (default ``"label"``) present in the first
  object the dataset is ``"labelled"`` and every object must have an integer label. Other fields
  are kept.
- ``hf:<path>``: ``datasets.load_from_disk(path)`` (needs the ``datasets`` package); a
  ``DatasetDict`` keeps its split names (``validation`` stays ``validation``), a single
  ``Dataset`` is split like a single file. :func:`from_hf` takes an in-memory object.

A single file is split contiguously by ``fractions`` (default ``DEFAULT_FRACTIONS``:
calibration 10%, train 80%, test 10%, in that order). A folder is read as one file per split:
files named ``<split>.txt`` / ``<split>.jsonl`` (e.g. ``calibration.txt``, ``test.txt``) become
those splits unchanged, in sorted order. ``attnprune observe`` reads a single file whole
(``fractions={"all": 1.0}``: one split ``all``) unless ``--split`` asks for one of the default splits.

Errors name the file (and line): a missing path, an empty file, a malformed JSON line, a record
without its text or with a non-integer label.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import AttnPruneError, EmptyDatasetError, InvalidArgumentError, MissingDependencyError
from . import DEFAULT_FRACTIONS, SOURCES, Dataset, split_contiguous


class DataFileError(AttnPruneError):
    """A user's data file is missing, empty or malformed (the message names file and line)."""


def _need_path(arg: str | None, source: str) -> Path:
    if not arg:
        raise InvalidArgumentError(f"the {source!r} data source needs a path: {source}:<path>")
    p = Path(arg).expanduser()
    if not p.exists():
        raise DataFileError(f"data file {p} does not exist")
    return p


def _split_files(folder: Path, suffix: str) -> dict[str, Path]:
    files = {f.stem: f for f in sorted(folder.glob(f"*{suffix}")) if f.is_file()}
    if not files:
        raise DataFileError(f"data folder {folder} holds no *{suffix} file (expected e.g. train{suffix}, test{suffix})")
    return files


def read_text_records(path: str | os.PathLike, *, unit: str = "paragraph") -> list[dict]:
    """Records ``{"text": ...}`` from a UTF-8 text file, one per paragraph (or per line)."""
    p = Path(path)
    if not p.is_file():
        raise DataFileError(f"data file {p} does not exist or is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(f"data file {p} is not UTF-8 text ({e})") from e
    if unit == "line":
        parts = [line.strip() for line in text.splitlines()]
    elif unit == "paragraph":
        parts, cur = [], []
        for line in text.splitlines():
            if line.strip():
                cur.append(line.rstrip())
            elif cur:
                parts.append("\n".join(cur))
                cur = []
        if cur:
            parts.append("\n".join(cur))
    else:
        raise InvalidArgumentError(f"unit must be 'paragraph' or 'line', not {unit!r}")
    records = [{"text": t} for t in parts if t]
    if not records:
        raise EmptyDatasetError(f"data file {p} holds no text")
    return records


def read_jsonl_records(path: str | os.PathLike, *, text_key: str = "text",
                       label_key: str | None = "label") -> tuple[list[dict], bool]:
    """Records from a JSONL file and whether they are labelled (``label_key`` in the first record)."""
    p = Path(path)
    if not p.is_file():
        raise DataFileError(f"data file {p} does not exist or is not a file")
    records: list[dict] = []
    labelled = False
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{p}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataFileError(f"{p}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            if not isinstance(obj.get(text_key), str):
                raise DataFileError(f"{p}, line {lineno}: no string field {text_key!r} (fields: {sorted(obj)})")
            if not records:
                labelled = label_key is not None and label_key in obj
            if labelled:
                lab = obj.get(label_key)
                if isinstance(lab, bool) or not isinstance(lab, int):
                    raise DataFileError(f"{p}, line {lineno}: field {label_key!r} must be an integer, got {lab!r}")
                obj = {**obj, "label": lab}
            if text_key != "text":
                obj = {**obj, "text": obj[text_key]}
            records.append(obj)
    if not records:
        raise EmptyDatasetError(f"data file {p} holds no records")
    return records, labelled


def _splits_for(p: Path, suffix: str, read, fractions) -> dict[str, list[dict]]:
    if p.is_dir():
        return {split: read(f) for split, f in _split_files(p, suffix).items()}
    records = read(p)
    try:
        return split_contiguous(records, fractions or DEFAULT_FRACTIONS)
    except EmptyDatasetError as e:
        raise EmptyDatasetError(f"data file {p}: {e}") from None


@SOURCES.register("text")
def text_source(arg: str | None = None, *, unit: str = "paragraph",
                fractions: dict[str, float] | None = None, **_ignored: Any) -> Dataset:
    """``text:<file or folder>``: plain text, one record per paragraph (``unit="line"``: per line)."""
    p = _need_path(arg, "text")
    splits = _splits_for(p, ".txt", lambda f: read_text_records(f, unit=unit), fractions)
    return Dataset(f"text:{p.name}", "text", splits, {"path": str(p), "unit": unit})


@SOURCES.register("jsonl")
def jsonl_source(arg: str | None = None, *, text_key: str = "text", label_key: str | None = "label",
                 fractions: dict[str, float] | None = None, **_ignored: Any) -> Dataset:
    """``jsonl:<file or folder>``: JSON objects with a text field (and optionally an integer label)."""
    p = _need_path(arg, "jsonl")
    flags: list[bool] = []

    def read(f: Path) -> list[dict]:
        recs, lab = read_jsonl_records(f, text_key=text_key, label_key=label_key)
        flags.append(lab)
        return recs

    splits = _splits_for(p, ".jsonl", read, fractions)
    if len(set(flags)) > 1:
        raise DataFileError(f"some files in {p} have labels ({label_key!r}) and some do not")
    kind = "labelled" if flags[0] else "text"
    return Dataset(f"jsonl:{p.name}", kind, splits, {"path": str(p), "text_key": text_key})


def from_hf(obj: Any, *, name: str = "hf", kind: str | None = None, text_key: str = "text",
            label_key: str = "label", fractions: dict[str, float] | None = None, **_ignored: Any) -> Dataset:
    """Wrap a ``datasets.Dataset`` / ``DatasetDict`` (or a path saved with ``save_to_disk``).

    Rows become records (all columns kept; ``text_key`` copied to ``"text"``). ``kind`` defaults to
    ``"labelled"`` when the rows have ``label_key``, else ``"text"``.
    """
    if isinstance(obj, (str, os.PathLike)):
        try:
            import datasets
        except ImportError:
            raise MissingDependencyError(
                "reading a saved Hugging Face dataset needs the Python package 'datasets': `pip install datasets`"
            ) from None
        p = Path(obj).expanduser()
        if not p.exists():
            raise DataFileError(f"dataset folder {p} does not exist")
        try:
            obj = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - whatever datasets raises for a bad folder
            raise DataFileError(f"cannot read {p} with datasets.load_from_disk: {e}") from e
        name = f"hf:{p.name}"

    def rows(d: Any) -> list[dict]:
        out = []
        for i, r in enumerate(d):
            r = dict(r)
            if not isinstance(r.get(text_key), str):
                raise DataFileError(f"{name}: row {i} has no string column {text_key!r} (columns: {sorted(r)})")
            r["text"] = r[text_key]
            if label_key in r and label_key != "label":
                r["label"] = r[label_key]
            out.append(r)
        if not out:
            raise EmptyDatasetError(f"{name}: no rows")
        return out

    if isinstance(obj, dict) or isinstance(getattr(obj, "column_names", None), dict):  # DatasetDict
        splits = {str(k): rows(obj[k]) for k in obj.keys()}
    else:
        splits = split_contiguous(rows(obj), fractions or DEFAULT_FRACTIONS)
    first = next(iter(splits.values()))[0]
    kind = kind or ("labelled" if label_key in first else "text")
    return Dataset(name, kind, splits, {"text_key": text_key})


@SOURCES.register("hf")
def hf_source(arg: str | None = None, **options: Any) -> Dataset:
    """``hf:<folder>``: a dataset saved with ``datasets``' ``save_to_disk``."""
    if not arg:
        raise InvalidArgumentError("the 'hf' data source needs a path: hf:<folder saved by save_to_disk>")
    return from_hf(arg, **options)
