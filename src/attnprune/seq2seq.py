"""Sequence-to-sequence metrics: greedy decoding of an encoder-decoder and corpus BLEU.

    hyp_ids = greedy_decode(model, sources, bos_id=1, eos_id=2, pad_id=0, max_len=128)
    score = bleu(tokenizer.decode_batch(hyp_ids), references)        # sacreBLEU, 0-100

Decoding runs under whatever mask is attached to the model (``attnprune.apply`` / ``attach``).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from .errors import InvalidArgumentError, MissingDependencyError
from .runtime import autocast_policy


def _cache_arg(model) -> str:
    """The forward keyword for the key/value cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None) if "cache" in getattr(output, "__dataclass_fields__", {}) else None
    return cache if cache is not None else output.past_key_values


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)``, both ``[len(seqs), L]`` long, ``L`` the longest rounded up to ``multiple``."""
    n = max(len(s) for s in seqs)
    n = -(-n // multiple) * multiple
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    am = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        am[i, : len(s)] = 1
    return ids, am


@torch.no_grad()
def greedy_decode(model, sources: Sequence[Sequence[int]], *, bos_id: int, eos_id: int, pad_id: int,
                  max_len: int, batch_size: int = 256, precision: str = "auto", use_cache: bool = True,
                  pad_multiple: int = 8) -> list[list[int]]:
    """Greedy outputs (token ids, without ``bos_id`` / ``eos_id``) of an encoder-decoder for ``sources``.

    model: e.g. ``BartForConditionalGeneration``: ``model(input_ids [B, Ls], attention_mask [B, Ls],
        decoder_input_ids [B, Lt])`` returns ``.logits [B, Lt, V]`` and ``.encoder_last_hidden_state``.
    sources: encoded source sentences (each ending with its end token, as in training).
    The decoder starts from ``bos_id`` and stops at ``eos_id`` or after ``max_len - 1`` tokens (its
    position range). Sentences are decoded ``batch_size`` at a time, longest first, sources right-padded
    to a multiple of ``pad_multiple``. With ``use_cache`` the decoder reuses its key/value cache (one new
    position per step); without it every step recomputes the whole prefix (slow; for checking).
    ``precision``: as :func:`attnprune.runtime.autocast_policy`.
    """
    device = next(model.parameters()).device
    autocast, _ = autocast_policy(precision, device)
    cache_arg = _cache_arg(model)
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    out: list[list[int]] = [[] for _ in sources]
    for b in range(0, len(order), batch_size):
        ids = order[b:b + batch_size]
        src, am = pad_right([sources[i] for i in ids], pad_id, pad_multiple)
        src, am = src.to(device), am.to(device)
        n = len(ids)
        dec = torch.full((n, 1), bos_id, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        enc, past = None, None
        with autocast():
            for _ in range(max_len - 1):
                if enc is None:
                    o = model(input_ids=src, attention_mask=am, decoder_input_ids=dec, use_cache=use_cache)
                    enc = (o.encoder_last_hidden_state,)
                elif use_cache:
                    o = model(encoder_outputs=enc, attention_mask=am, decoder_input_ids=dec[:, -1:],
                              use_cache=True, **{cache_arg: past})
                else:
                    o = model(encoder_outputs=enc, attention_mask=am, decoder_input_ids=dec, use_cache=False)
                past = _cache_of(o) if use_cache else None
                nxt = o.logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                dec = torch.cat([dec, nxt[:, None]], 1)
                done |= nxt == eos_id
                if bool(done.all()):
                    break
        for row, i in zip(dec[:, 1:].tolist(), ids):
            toks = []
            for t in row:
                if t in (eos_id, pad_id):
                    break
                toks.append(t)
            out[i] = toks
    return out


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (``sacrebleu``, default 13a tokenization) of detokenized ``hypotheses`` against
    one reference each; 0-100."""
    try:
        import sacrebleu
    except ImportError:
        raise MissingDependencyError("BLEU needs 'sacrebleu': pip install sacrebleu") from None
    if len(hypotheses) != len(references):
        raise InvalidArgumentError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
