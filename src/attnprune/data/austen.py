"""``austen``: Jane Austen's six novels (public domain), for language modelling.

Source: the Debian package ``r-cran-janeaustenr`` (the R package janeaustenr 1.0.0), read without
R: its lazy-load database (``data/Rdata.rdx`` index, gzip; ``data/Rdata.rdb`` objects, each a
4-byte big-endian length plus zlib data) holds one character vector of lines per novel, which the
PyPI package ``rdata`` parses. ``scripts/setup_data.sh`` fetches the .deb with ``apt-get download``
and unpacks it with ``dpkg-deb -x`` into ``<cache>/debs/r-cran-janeaustenr`` (no R is installed);
an installed ``/usr/lib/R/site-library/janeaustenr`` is used as well.

Records: one per paragraph (hard-wrapped lines joined by spaces; headings such as ``CHAPTER I``
are paragraphs too): ``{"text", "book", "index"}`` (index = paragraph number within the book).

Splits (fixed, no randomness): every novel is cut by word count into three contiguous parts:
the first 80% of its words -> ``train``, the next 10% -> ``calibration``, the last 10% ->
``test`` (a paragraph goes where its first word falls). So the splits never overlap and each has
all six novels. Sizes (janeaustenr 1.0.0): see ``SIZES`` / ``ds.meta["sizes"]``; about
725k words in all, ~73k words (~95k SmolLM2 tokens) each in calibration and test.
"""

from __future__ import annotations

import gzip
import struct
import warnings
import zlib
from pathlib import Path

from ..errors import CorruptFileError, MissingDependencyError
from . import SETUP_HINT, SOURCES, Dataset, cache_dir, cached

DEB = "r-cran-janeaustenr"
# janeaustenr's own order (publication order).
BOOKS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
FRACTIONS = {"train": 0.8, "calibration": 0.1, "test": 0.1}
VERSION = 1  # bump when the split rule or record format changes (renames the cache file)


# Where an installed R package would be (used when the cache holds no unpacked copy).
SYSTEM_DIRS = [
    Path("/usr/lib/R/site-library/janeaustenr/data"),
    Path("/usr/local/lib/R/site-library/janeaustenr/data"),
]


def data_dir() -> Path:
    """The janeaustenr ``data`` folder: unpacked under the cache, or an installed R package."""
    candidates = [cache_dir() / "debs" / DEB / "usr/lib/R/site-library/janeaustenr/data", *SYSTEM_DIRS]
    for c in candidates:
        if (c / "Rdata.rdx").exists() and (c / "Rdata.rdb").exists():
            return c
    raise MissingDependencyError(
        f"the Jane Austen corpus (Debian package {DEB}) is not unpacked: looked in "
        f"{', '.join(str(c) for c in candidates)}; {SETUP_HINT}, or by hand: "
        f"`apt-get download {DEB} && dpkg-deb -x {DEB}_*.deb {cache_dir() / 'debs' / DEB}`"
    )


def _rdata():
    try:
        import rdata
    except ImportError:
        raise MissingDependencyError(
            f"reading the Austen corpus needs the Python package 'rdata': `pip install rdata` or {SETUP_HINT}"
        ) from None
    return rdata


def _parse_r(blob: bytes):
    rdata = _rdata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
        return rdata.conversion.convert(rdata.parser.parse_data(blob))


def read_novels(path: Path | None = None) -> dict[str, list[str]]:
    """Each novel's lines, as janeaustenr stores them: ``{"emma": [line, ...], ...}`` in ``BOOKS`` order."""
    d = path or data_dir()
    try:
        index = _parse_r(gzip.decompress((d / "Rdata.rdx").read_bytes()))
        variables = index["variables"]
        rdb = (d / "Rdata.rdb").read_bytes()
        out = {}
        for key in BOOKS:
            off, length = (int(x) for x in variables[key])
            chunk = rdb[off:off + length]
            (size,) = struct.unpack(">I", chunk[:4])
            blob = zlib.decompress(chunk[4:])
            if len(blob) != size:
                raise ValueError(f"{key}: {len(blob)} bytes, index says {size}")
            out[key] = [str(x) for x in _parse_r(blob)]
    except MissingDependencyError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged/unknown file
        raise CorruptFileError(f"cannot read the janeaustenr data in {d}: {e}; {SETUP_HINT}") from e
    return out


def paragraphs(lines: list[str]) -> list[str]:
    """Join hard-wrapped lines into paragraphs (blank lines separate them)."""
    out, cur = [], []
    for line in lines:
        s = line.strip()
        if s:
            cur.append(s)
        elif cur:
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return out


def split_book(paras: list[str], fractions: dict[str, float] = FRACTIONS) -> dict[str, list[int]]:
    """Paragraph indices per split: contiguous runs by cumulative word count, in ``fractions`` order."""
    words = [len(p.split()) for p in paras]
    total = sum(words)
    bounds, acc = [], 0.0
    for f in fractions.values():
        acc += f
        bounds.append(acc * total)
    out: dict[str, list[int]] = {k: [] for k in fractions}
    names = list(fractions)
    start = 0
    for i, w in enumerate(words):
        k = next((j for j, b in enumerate(bounds) if start < b), len(names) - 1)
        out[names[k]].append(i)
        start += w
    return out


def build(path: Path | None = None) -> Dataset:
    """Build the ``austen`` dataset from the unpacked Debian package (about a second)."""
    novels = read_novels(path)
    splits: dict[str, list[dict]] = {k: [] for k in FRACTIONS}
    words = {k: 0 for k in FRACTIONS}
    for key, lines in novels.items():
        paras = paragraphs(lines)
        for split, idx in split_book(paras).items():
            for i in idx:
                splits[split].append({"text": paras[i], "book": BOOKS[key], "index": i})
                words[split] += len(paras[i].split())
    meta = {
        "source": f"Debian {DEB} (janeaustenr), six novels",
        "split_rule": "per novel, contiguous by words: first 80% train, next 10% calibration, last 10% test",
        "sizes": {k: len(v) for k, v in splits.items()},
        "words": words,
        "version": VERSION,
    }
    return Dataset("austen", "text", splits, meta)


@SOURCES.register("austen")
def load(arg: str | None = None, *, refresh: bool = False, **_ignored) -> Dataset:
    """The ``austen`` source: cached ``build()`` (``refresh=True`` rebuilds)."""
    return cached(f"austen-v{VERSION}", build, refresh=refresh)
