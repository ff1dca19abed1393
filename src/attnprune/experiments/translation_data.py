"""The translation experiment's configuration, data and model: presets, the ``bible-en-es`` pairs, a
shared BPE tokenizer, encoded pairs as :class:`attnprune.train.Seq2Seq` examples, and the BART model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InvalidArgumentError, MissingDependencyError
from ..train.tasks import Seq2Seq

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = 0, 1, 2, 3

# attention type -> site kinds it covers (site kinds as ``SiteInfo.kind`` names them)
ATTENTION_TYPES = {
    "encoder": ("self",),      # encoder self-attention
    "decoder": ("causal",),    # decoder (causal) self-attention
    "cross": ("cross",),       # decoder-encoder cross-attention
    "all": ("self", "causal", "cross"),
}
TYPE_LABELS = {"encoder": "encoder self-attention", "decoder": "decoder self-attention",
               "cross": "cross-attention", "all": "all attention"}


@dataclass
class TranslationConfig:
    """Knobs of the experiment (see :data:`PRESETS`).

    Model: ``vocab_size`` (shared BPE vocabulary), ``d_model``, ``layers`` (encoder and decoder
    each), ``heads``, ``ffn_dim``, ``dropout``; ``max_len`` truncates source and target to this
    many tokens (including the end / start token) and is the model's position range.
    Dense training: ``train_steps`` optimizer steps of ``batch_size`` pairs, peak ``lr`` after
    ``warmup_steps``, cosine decay to 10%; ``label_smoothing``.
    Masks: ``sparsities``, ``types`` (keys of :data:`ATTENTION_TYPES`), ``policies`` (``layer``
    = AP, ``random`` = control), ``observe_examples`` training pairs observed.
    Retraining: ``retrain_steps`` from the dense weights at peak ``retrain_lr`` (warm-up
    ``retrain_warmup``); ``zero_shot`` also scores every mask before retraining.
    ``time_budget_s``: if set, after dense training the experiment times a short masked probe
    (and one masked evaluation) and lowers ``retrain_steps`` (for every run alike, the control
    included) so that the whole experiment should end within this many seconds; the steps used
    are recorded as ``retrain_steps_used``.
    Data: ``max_train_examples`` / ``max_test_examples`` cut the splits (``None``: all).
    Evaluation: ``eval_batch_size`` sentences decoded at once.
    ``precision``: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"fp32"`` or ``"bf16"``.
    ``backend``: the masked attention's backend in retraining and decoding (``"reference"``, the
    default, reproduces the recorded results; ``"triton"`` / ``"flex"`` / ``"auto"``: the fast
    kernels on a GPU).
    """

    vocab_size: int = 8000
    d_model: int = 256
    layers: int = 3
    heads: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1
    max_len: int = 128
    train_steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 200
    label_smoothing: float = 0.1
    weight_decay: float = 0.01
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
    types: tuple[str, ...] = ("encoder", "decoder", "cross", "all")
    policies: tuple[str, ...] = ("layer", "random")
    observe_examples: int | None = 4096
    observe_batch_size: int = 256
    retrain_steps: int = 200
    retrain_lr: float = 3e-4
    retrain_warmup: int = 20
    zero_shot: bool = True
    time_budget_s: float | None = None
    max_train_examples: int | None = None
    max_test_examples: int | None = None
    eval_batch_size: int = 512
    seed: int = 0
    precision: str = "auto"
    device: str | None = None
    backend: str = "reference"

    def validate(self) -> None:
        """Raise ``InvalidArgumentError`` on an unusable setting."""
        for t in self.types:
            if t not in ATTENTION_TYPES:
                raise InvalidArgumentError(f"unknown attention type {t!r}; choose from {', '.join(ATTENTION_TYPES)}")
        for s in self.sparsities:
            if not 0.0 <= float(s) < 1.0:
                raise InvalidArgumentError(f"sparsity must be in [0, 1), got {s!r}")
        if self.d_model % self.heads:
            raise InvalidArgumentError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        if self.max_len < 4:
            raise InvalidArgumentError(f"max_len must be at least 4, got {self.max_len}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise InvalidArgumentError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        for name in ("train_steps", "batch_size", "eval_batch_size", "observe_batch_size"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be at least 1")
        if self.retrain_steps < 0:
            raise InvalidArgumentError("retrain_steps must be >= 0")


PRESETS: dict[str, TranslationConfig] = {
    # CPU smoke run of the whole pipeline (a couple of minutes on 2 cores); BLEU is near zero.
    "tiny": TranslationConfig(vocab_size=1000, d_model=64, layers=2, heads=4, ffn_dim=128, max_len=48,
                              train_steps=150, batch_size=32, lr=2e-3, warmup_steps=20,
                              observe_examples=256, observe_batch_size=64, retrain_steps=10,
                              retrain_lr=1e-3, retrain_warmup=2, max_train_examples=3000,
                              max_test_examples=64, eval_batch_size=64),
    # The real experiment, sized for about 8 minutes on one H100 (see docs/translation.md).
    "gpu": TranslationConfig(vocab_size=8000, d_model=256, layers=3, heads=4, ffn_dim=1024, max_len=128,
                             train_steps=2200, batch_size=256, lr=1e-3, warmup_steps=300,
                             observe_examples=None, observe_batch_size=256, retrain_steps=400,
                             retrain_lr=5e-4, retrain_warmup=25, eval_batch_size=768, time_budget_s=420),
}


# ---------------------------------------------------------------------------------------------
# data


def load_pairs(data_file: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """The ``bible-en-es`` splits: ``{"train": [...], "valid": [...], "test": [...]}`` of
    ``{"ref", "source", "target"}`` records.

    data_file: a JSONL file written by ``scripts/export_bible.py`` (one record per line with a
        ``"split"`` key), for machines without the Debian-built corpus; ``None``: ``load_dataset``.
    """
    if data_file is None:
        from ..data import load_dataset

        ds = load_dataset("bible-en-es")
        return {name: list(ds[name]) for name in ("train", "valid", "test")}
    p = Path(data_file)
    if not p.is_file():
        raise InvalidArgumentError(f"{p}: no such data file; write it with `python scripts/export_bible.py`")
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                splits.setdefault(rec.pop("split"), []).append(rec)
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise InvalidArgumentError(f"{p}:{n}: not a JSON record with a 'split' key") from None
    if not splits["train"] or not splits["test"]:
        raise InvalidArgumentError(f"{p}: needs records of the 'train' and 'test' splits")
    return splits


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A BPE ``tokenizers.Tokenizer`` trained on ``texts`` (NFKC, Metaspace pre-tokenizer).

    Ids 0-3 are ``<pad> <s> </s> <unk>``. ``decode`` restores the spacing of the text.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    except ImportError:
        raise MissingDependencyError("the translation experiment needs 'tokenizers': pip install tokenizers") from None
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_pairs(tok, pairs: Sequence[dict], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Token ids per pair: ``(source + [</s>], target)``, source and target cut to ``max_len - 1``
    tokens (the decoder sees ``[<s>] + target``, predicts ``target + [</s>]``)."""
    src = tok.encode_batch([p["source"] for p in pairs])
    tgt = tok.encode_batch([p["target"] for p in pairs])
    return [(s.ids[: max_len - 1] + [EOS], t.ids[: max_len - 1]) for s, t in zip(src, tgt)]

def seq2seq_examples(examples: Sequence[tuple[list[int], list[int]]]) -> list[dict]:
    """Encoded pairs as :class:`attnprune.train.Seq2Seq` examples: ``input_ids`` = source,
    ``decoder_input_ids`` = ``[<s>] + target``, ``labels`` = ``target + [</s>]``."""
    return [{"input_ids": s, "decoder_input_ids": [BOS] + t, "labels": t + [EOS]} for s, t in examples]


def collate(examples: Sequence[tuple[list[int], list[int]]], *, pad_multiple: int = 8,
            same_length: bool = False) -> dict:
    """A training batch of encoded pairs (:class:`attnprune.train.Seq2Seq`'s collate): ``input_ids``,
    ``attention_mask`` [B, Ls]; ``decoder_input_ids``, ``decoder_attention_mask``, ``labels`` [B, Lt]
    (``labels`` -100 on padding). Lengths are padded up to a multiple of ``pad_multiple``; with
    ``same_length`` both sides to the same length (``Ls == Lt``)."""
    task = Seq2Seq(pad_multiple=pad_multiple, same_length=same_length)
    rows = seq2seq_examples(examples)
    return task.collate(rows, list(range(len(rows))), PAD)


def build_model(cfg: TranslationConfig, vocab_size: int, seed: int = 0):
    """A randomly initialised ``BartForConditionalGeneration`` (shared, tied embeddings)."""
    import transformers as t

    config = t.BartConfig(
        vocab_size=vocab_size, d_model=cfg.d_model, encoder_layers=cfg.layers, decoder_layers=cfg.layers,
        encoder_attention_heads=cfg.heads, decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim, max_position_embeddings=cfg.max_len,
        dropout=cfg.dropout, attention_dropout=0.0, activation_dropout=0.0, activation_function="gelu",
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
        forced_eos_token_id=None, scale_embedding=True, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = t.BartForConditionalGeneration(config)
    return model
