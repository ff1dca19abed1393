"""``bible-en-es``: verse-aligned English-Spanish Bible text, for translation-style data.

Source: the SWORD modules of two public-domain Bibles, from Debian: ``sword-text-web`` (World
English Bible, module ``engWEB2015eb``) and ``sword-text-sparv`` (Reina-Valera 1909, module
``spaRV1909eb``), dumped with ``diatheke`` (Debian package ``diatheke``) in its default format.
Each verse line holds optional heading markup, then ``<Book> <chapter>:<verse>: `` and the text;
headings (``<title>``), speaker labels and all other markup are removed, whitespace collapsed.

Alignment: verses are joined on their reference (book, chapter, verse), never on their position:
the English module has the deuterocanonical books and the two differ in some verses. Only the 66
books both share are kept; a verse empty in either language is dropped. About 31k pairs.

Records: ``{"ref": "John 3:16", "source": <English>, "target": <Spanish>}`` in canonical order.

Splits (fixed, no randomness): whole chapters, chosen by a hash of ``"<book> <chapter>"``
(SHA-256, first 8 bytes mod 100): < 90 -> ``train``, 90-94 -> ``valid``, 95-99 -> ``test``; a
chapter never straddles two splits. Sizes: ``ds.meta["sizes"]``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess

from ..errors import MissingDependencyError
from . import SETUP_HINT, SOURCES, Dataset, cached

MODULES = {"en": ("engWEB2015eb", "sword-text-web"), "es": ("spaRV1909eb", "sword-text-sparv")}
VERSION = 1

# The 66 books as diatheke names them (English locale), in canonical order.
BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "I Samuel", "II Samuel", "I Kings", "II Kings", "I Chronicles", "II Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
    "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah",
    "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "I Corinthians", "II Corinthians",
    "Galatians", "Ephesians", "Philippians", "Colossians", "I Thessalonians", "II Thessalonians",
    "I Timothy", "II Timothy", "Titus", "Philemon", "Hebrews", "James", "I Peter", "II Peter",
    "I John", "II John", "III John", "Jude", "Revelation of John",
]
BOOK_ORDER = {b: i for i, b in enumerate(BOOKS)}
# Longest names first so "I John" wins over "John"; a letter may not precede the name.
_MARKER = re.compile(
    r"(?<![A-Za-z])(" + "|".join(re.escape(b) for b in sorted(BOOKS, key=len, reverse=True))
    + r") (\d+):(\d+): "
)
_ANY_MARKER = re.compile(r" \d+:\d+: ")  # any verse, also of books not kept (deuterocanon)
_DROP = re.compile(r"<(title|speaker|note)\b[^>]*>.*?</\1>", re.S)
# Word-level markup joins its neighbours ("<w>world</w>," -> "world,"); other tags (lines, line
# groups, paragraphs, quotes, milestones) separate words.
_INLINE = re.compile(r"</?(?:w|transChange|seg|name|hi|foreign|divineName|catchWord|rdg)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")
# The end of a book or the start of the WEB glossary (appended to Rev 22:21 in the dump).
_END = re.compile(r'<div\b[^>]*\btype="(?:book|glossary)"[^>]*>')
_WS = re.compile(r"\s+")
SPLITS = (("train", 90), ("valid", 95), ("test", 100))


def _diatheke() -> str:
    exe = shutil.which("diatheke")
    if exe is None:
        raise MissingDependencyError(
            f"the Bible corpus needs the Debian package 'diatheke' (and sword-text-web, sword-text-sparv): "
            f"{SETUP_HINT}, or `apt-get install diatheke sword-text-web sword-text-sparv`"
        )
    return exe


def dump(module: str, package: str, key: str = "Gen 1:1-Rev 22:21") -> str:
    """Raw ``diatheke`` output of ``module`` for ``key`` (default: the whole Bible, ~10-20 s)."""
    return dump_all({module: package}, key)[module]


def dump_all(modules: dict[str, str], key: str = "Gen 1:1-Rev 22:21") -> dict[str, str]:
    """``{module: raw diatheke output}`` for several modules (``{module: Debian package}``), in parallel."""
    exe = _diatheke()
    procs = {m: subprocess.Popen([exe, "-b", m, "-k", key], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, encoding="utf-8")
             for m in modules}
    outs = {m: p.communicate()[0] for m, p in procs.items()}
    for m, out in outs.items():
        if not _MARKER.search(out):
            raise MissingDependencyError(
                f"diatheke returned no verses from the SWORD module {m} (Debian package {modules[m]}): "
                f"{SETUP_HINT}, or `apt-get install {modules[m]}`"
            )
    return outs


def clean(text: str) -> str:
    """Verse text without markup: headings/speakers/notes dropped, tags removed, spaces collapsed.

    Text after an end-of-book or glossary marker is cut off.
    """
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    text = _INLINE.sub("", _DROP.sub(" ", text))
    return _WS.sub(" ", _TAG.sub(" ", text)).strip()


def parse(raw: str) -> dict[tuple[int, int, int], str]:
    """Verses of a diatheke dump: ``{(book index, chapter, verse): text}`` (the 66 books only).

    A line without a verse marker continues the previous verse; anything before a marker on its
    line (repeated section or psalm headings) is dropped; verses of other books are skipped.
    """
    verses: dict[tuple[int, int, int], str] = {}
    cur = None
    for line in raw.split("\n"):
        line = _DROP.sub(" ", line)
        blanked = _TAG.sub(lambda t: " " * len(t.group(0)), line)
        m = _MARKER.search(blanked)
        if m:
            cur = (BOOK_ORDER[m.group(1)], int(m.group(2)), int(m.group(3)))
            verses[cur] = clean(line[m.end():])
        elif _ANY_MARKER.search(blanked):  # a verse of a book we do not keep
            cur = None
        elif cur is not None and line.strip() and not re.fullmatch(r"\s*\(\w+\)\s*", line):
            verses[cur] = (verses[cur] + " " + clean(line)).strip()
    return verses


def ref_name(key: tuple[int, int, int]) -> str:
    """``(42, 3, 16)`` -> ``"John 3:16"``."""
    b, c, v = key
    return f"{BOOKS[b]} {c}:{v}"


def chapter_split(book: str, chapter: int) -> str:
    """The split a chapter belongs to (stable hash of ``"<book> <chapter>"``)."""
    h = int.from_bytes(hashlib.sha256(f"{book} {chapter}".encode()).digest()[:8], "big") % 100
    return next(name for name, bound in SPLITS if h < bound)


def join(en: dict, es: dict) -> list[dict]:
    """Pairs of verses present and non-empty in both, by reference, in canonical order."""
    return [{"ref": ref_name(k), "source": en[k], "target": es[k]}
            for k in sorted(en.keys() & es.keys()) if en[k] and es[k]]


def build(key: str = "Gen 1:1-Rev 22:21") -> Dataset:
    """Dump both modules with diatheke, join by reference, split by chapter (~20-40 s for all).

    ``key``: a diatheke verse range; a smaller one (``"John 3"``) builds a slice quickly.
    """
    raw = dump_all(dict(MODULES.values()), key)
    pairs = join(parse(raw[MODULES["en"][0]]), parse(raw[MODULES["es"][0]]))
    splits: dict[str, list[dict]] = {name: [] for name, _ in SPLITS}
    for p in pairs:
        book, _, cv = p["ref"].rpartition(" ")
        splits[chapter_split(book, int(cv.split(":")[0]))].append(p)
    meta = {
        "source": "Debian sword-text-web (engWEB2015eb, World English Bible) and sword-text-sparv "
                  "(spaRV1909eb, Reina-Valera 1909), dumped with diatheke",
        "languages": {"source": "en", "target": "es"},
        "split_rule": "whole chapters by sha256('<book> <chapter>') % 100: <90 train, <95 valid, else test",
        "sizes": {k: len(v) for k, v in splits.items()},
        "key": key,
        "version": VERSION,
    }
    return Dataset("bible-en-es", "parallel", splits, meta)


@SOURCES.register("bible-en-es")
def load(arg: str | None = None, *, refresh: bool = False, **_ignored) -> Dataset:
    """The ``bible-en-es`` source: cached ``build()`` (``refresh=True`` rebuilds)."""
    return cached(f"bible-en-es-v{VERSION}", build, refresh=refresh)
