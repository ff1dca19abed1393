"""``sentiment``: movie-review sentences labelled positive / negative (SST-2-like).

Source: the VADER paper's ground truth (Hutto & Gilbert, ICWSM 2014), shipped in the source
distribution of the PyPI package ``vaderSentiment`` 3.3.2: inside
``vaderSentiment-3.3.2.tar.gz``, ``additional_resources/hutto_ICWSM_2014.tar.gz`` holds
``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``: 10,605 lines ``id <TAB> score <TAB>
sentence``, the score being the mean of human ratings in [-4, 4]. ``scripts/setup_data.sh`` fetches
the sdist (``pip download --no-binary :all: --no-deps vaderSentiment==3.3.2``) into
``<cache>/pypi/``; it is read in place (nothing is installed or imported).

Labels: ``1`` if the score is > 0, ``0`` if < 0; the 37 sentences scored exactly 0 are dropped,
and so is any later repeat of a sentence already seen (2), leaving 10,566 sentences
(about half positive).

Records: ``{"text", "label", "score", "id"}``.

Splits (fixed, no randomness): sentences ordered by SHA-256 of their id; the first 2,000 ->
``test``, the next 1,000 -> ``calibration``, the rest (7,566) -> ``train``; each split is then
put back in id order.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from ..errors import CorruptFileError, MissingDependencyError
from . import SETUP_HINT, SOURCES, Dataset, cache_dir, cached

SDIST = "vaderSentiment-3.3.2.tar.gz"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SIZES = {"test": 2000, "calibration": 1000}  # train: the rest
VERSION = 1


def sdist_path() -> Path:
    """The vaderSentiment 3.3.2 source distribution in ``<cache>/pypi/``."""
    p = cache_dir() / "pypi" / SDIST
    if not p.exists():
        raise MissingDependencyError(
            f"the sentiment sentences come from the PyPI source distribution of vaderSentiment==3.3.2, "
            f"not found at {p}: {SETUP_HINT}, or `pip download --no-binary :all: --no-deps "
            f"vaderSentiment==3.3.2 -d {p.parent}`"
        )
    return p


def read_ground_truth(path: Path | None = None) -> list[tuple[int, float, str]]:
    """``(id, score, sentence)`` rows of ``movieReviewSnippets_GroundTruth.txt`` from the sdist."""
    p = path or sdist_path()
    try:
        with tarfile.open(p, "r:gz") as outer:
            inner_bytes = outer.extractfile(INNER).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            text = inner.extractfile(MEMBER).read().decode("utf-8")
    except (tarfile.TarError, KeyError, AttributeError, OSError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"cannot read {MEMBER} from {p}: {e}; delete it and {SETUP_HINT}") from e
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise CorruptFileError(f"{p}: {MEMBER} line {lineno} does not have 3 tab-separated fields")
        rows.append((int(parts[0]), float(parts[1]), parts[2].strip()))
    return rows


def binarise(rows: list[tuple[int, float, str]]) -> list[dict]:
    """Records with ``label = score > 0``; zero scores and repeated sentences dropped."""
    seen: set[str] = set()
    out = []
    for i, score, text in rows:
        if score == 0 or text in seen:
            continue
        seen.add(text)
        out.append({"text": text, "label": int(score > 0), "score": score, "id": i})
    return out


def _order_key(rec: dict) -> bytes:
    return hashlib.sha256(str(rec["id"]).encode()).digest()


def build(path: Path | None = None) -> Dataset:
    """Build the ``sentiment`` dataset from the sdist (about a second)."""
    records = binarise(read_ground_truth(path))
    shuffled = sorted(records, key=_order_key)
    n_test, n_cal = SIZES["test"], SIZES["calibration"]
    parts = {
        "calibration": shuffled[n_test:n_test + n_cal],
        "train": shuffled[n_test + n_cal:],
        "test": shuffled[:n_test],
    }
    splits = {k: sorted(v, key=lambda r: r["id"]) for k, v in parts.items()}
    meta = {
        "source": "PyPI vaderSentiment 3.3.2 sdist: hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
        "label_rule": "1 if mean human score > 0, 0 if < 0; score 0 and repeated sentences dropped",
        "split_rule": "order by sha256(id): first 2000 test, next 1000 calibration, rest train",
        "sizes": {k: len(v) for k, v in splits.items()},
        "positive": {k: sum(r["label"] for r in v) for k, v in splits.items()},
        "version": VERSION,
    }
    return Dataset("sentiment", "labelled", splits, meta)


@SOURCES.register("sentiment")
def load(arg: str | None = None, *, refresh: bool = False, **_ignored) -> Dataset:
    """The ``sentiment`` source: cached ``build()`` (``refresh=True`` rebuilds)."""
    return cached(f"sentiment-v{VERSION}", build, refresh=refresh)
