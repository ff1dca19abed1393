"""Export the ``bible-en-es`` splits to one JSONL file, for machines without the Debian-built corpus.

    python scripts/export_bible.py                      # -> .gpu/bible-en-es.jsonl (git-ignored)
    python scripts/export_bible.py -o other/path.jsonl
    python scripts/export_bible.py --english-text .gpu/bible-en.txt   # English side as plain text

One record per line: ``{"split": "train"|"valid"|"test", "ref", "source", "target"}``, which
``attnprune translate --data-file`` reads. ``--english-text`` instead writes the English verses in
canonical order, one chapter per paragraph, for language-model data (``--data text:<file>`` or
``attnprune eval --ood-data text:<file>``: text of another domain than the Austen novels).
"""

from __future__ import annotations

import argparse
import json
import os

from attnprune._io import atomic_path
from attnprune.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default=".gpu/bible-en-es.jsonl", help="output file")
    ap.add_argument("--english-text", default=None, metavar="FILE",
                    help="write the English verses as plain text (one chapter per paragraph) to FILE instead")
    args = ap.parse_args()
    ds = load_dataset("bible-en-es")
    if args.english_text:
        return english_text(ds, args.english_text)
    n = 0
    with atomic_path(args.out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for split in ("train", "valid", "test"):
                for rec in ds[split]:
                    f.write(json.dumps({"split": split, **rec}, ensure_ascii=False) + "\n")
                    n += 1
    os.chmod(args.out, 0o644)
    print(f"{args.out}: {n} records")


def english_text(ds, out: str) -> None:
    from attnprune.data.bible import BOOKS

    def key(rec):  # canonical order from the reference "<Book> <chapter>:<verse>" (the splits are hashed)
        book, cv = rec["ref"].rsplit(" ", 1)
        ch, v = cv.split(":")
        return BOOKS.index(book), int(ch), int(v)

    recs = sorted((r for split in ("train", "valid", "test") for r in ds[split]), key=key)
    chapters: dict[str, list[str]] = {}
    for r in recs:
        chapters.setdefault(r["ref"].rsplit(":", 1)[0], []).append(r["source"])
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n\n".join(" ".join(v) for v in chapters.values()) + "\n")
    os.chmod(out, 0o644)
    print(f"{out}: {len(chapters)} chapters, {sum(len(v) for v in chapters.values())} verses")


if __name__ == "__main__":
    main()
