"""Export the ``bible-en-es`` splits to one JSONL file, for machines without the Debian-built corpus.

    python scripts/export_bible.py                      # -> .gpu/bible-en-es.jsonl (git-ignored)
    python scripts/export_bible.py -o other/path.jsonl

One record per line: ``{"split": "train"|"valid"|"test", "ref", "source", "target"}``, which
``attnprune translate --data-file`` reads.
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
    args = ap.parse_args()
    ds = load_dataset("bible-en-es")
    n = 0
    with atomic_path(args.out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for split in ("train", "valid", "test"):
                for rec in ds[split]:
                    f.write(json.dumps({"split": split, **rec}, ensure_ascii=False) + "\n")
                    n += 1
    os.chmod(args.out, 0o644)
    print(f"{args.out}: {n} records")


if __name__ == "__main__":
    main()
