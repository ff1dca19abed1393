"""Random token-id batches for tiny models (no tokenizer, no corpus).

``RandomTokens(vocab_size, num_seqs, seq_len, batch_size)`` is a re-iterable of batches
``{"input_ids": long [B, L], "attention_mask": long [B, L]}``; the same seed gives the same batches.
With ``min_len < seq_len`` every sequence gets a random length in ``[min_len, seq_len]`` and is
right-padded with ``pad_id`` (``attention_mask`` 0 on padding); ``L`` is the longest in the batch.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import InvalidArgumentError


class RandomTokens:
    """Seeded random token batches; ``len()`` is the number of batches.

    Token ids are drawn uniformly from ``[low, vocab_size)`` (``low`` skips special ids).
    """

    def __init__(self, vocab_size: int, num_seqs: int, seq_len: int, batch_size: int = 8, *,
                 seed: int = 0, min_len: int | None = None, pad_id: int = 0, low: int = 3):
        for name, v in (("vocab_size", vocab_size), ("num_seqs", num_seqs), ("seq_len", seq_len),
                        ("batch_size", batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {v!r}")
        min_len = seq_len if min_len is None else min_len
        if not 1 <= min_len <= seq_len:
            raise InvalidArgumentError(f"min_len must be in [1, seq_len={seq_len}], got {min_len}")
        if not 0 <= low < vocab_size:
            raise InvalidArgumentError(f"low must be in [0, vocab_size={vocab_size}), got {low}")
        self.vocab_size, self.num_seqs, self.seq_len, self.batch_size = vocab_size, num_seqs, seq_len, batch_size
        self.seed, self.min_len, self.pad_id, self.low = seed, min_len, pad_id, low

    def __len__(self) -> int:
        return -(-self.num_seqs // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.num_seqs, self.batch_size):
            b = min(self.batch_size, self.num_seqs - start)
            lens = torch.randint(self.min_len, self.seq_len + 1, (b,), generator=gen)
            width = int(lens.max())
            ids = torch.randint(self.low, self.vocab_size, (b, width), generator=gen)
            mask = (torch.arange(width)[None, :] < lens[:, None]).long()
            ids = torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_id))
            yield {"input_ids": ids, "attention_mask": mask}

    def describe(self) -> str:
        lens = f"{self.seq_len}" if self.min_len == self.seq_len else f"{self.min_len}-{self.seq_len}"
        return f"random tokens: {self.num_seqs} sequences of length {lens}, vocab {self.vocab_size}, seed {self.seed}"


def random_batches(vocab_size: int, num_seqs: int, seq_len: int, batch_size: int = 8, **kw) -> RandomTokens:
    """Shorthand for ``RandomTokens(...)``."""
    return RandomTokens(vocab_size, num_seqs, seq_len, batch_size, **kw)


def _register() -> None:
    """Register the ``random`` data source (a ``"tokens"`` Dataset) in ``attnprune.data.SOURCES``."""
    from . import SOURCES, Dataset

    @SOURCES.register("random")
    def random_source(arg: str | None = None, *, vocab_size: int = 128, num_seqs: int = 16, seq_len: int = 64,
                      min_len: int | None = None, seed: int = 0, **_ignored) -> Dataset:
        """Random token sequences: splits calibration / train / test (``num_seqs`` each, own seeds).

        ``arg`` may give the vocabulary size (``random:1000``). Records: ``{"input_ids": list[int]}``
        (unpadded; lengths in ``[min_len, seq_len]``).
        """
        vocab = int(arg) if arg else vocab_size
        splits = {}
        for i, split in enumerate(("calibration", "train", "test")):
            records = []
            for batch in RandomTokens(vocab, num_seqs, seq_len, num_seqs, seed=seed + 1000 * i, min_len=min_len):
                for ids, m in zip(batch["input_ids"], batch["attention_mask"]):
                    records.append({"input_ids": ids[m.bool()].tolist()})
            splits[split] = records
        return Dataset("random", "tokens", splits, {"vocab_size": vocab, "seed": seed, "seq_len": seq_len})


_register()
