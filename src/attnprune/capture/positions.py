"""Where each query and key of an attention call sits in its own sequence.

A mask's rows and columns are token positions in a sequence (0 = its first real token). The
tensor index of a query or key is not that position when

* the batch is padded on the left (or in the middle): a token's position is the number of real
  tokens before it, from the batch's 2-D ``attention_mask`` (``decoder_attention_mask`` for the
  decoder side of encoder-decoder batches);
* a KV cache holds earlier tokens: queries start at the number of tokens already cached, read from
  the model's cache (``cache`` / ``past_key_values``: ``get_seq_length()``) or ``cache_position``;
* a sliding-window cache hands attention only the last ``Lk`` keys: with ``T`` tokens seen so far
  (cached + current), a call with ``Lk < T`` keys holds tokens ``T - Lk .. T - 1`` (transformers'
  dynamic and static sliding layers keep them in order); ``Lk >= T`` keys are slots ``0 .. Lk - 1``
  (slots past ``T`` are empty and masked out).

``ForwardContext`` reads all this once per model forward from the forward's keyword arguments,
so nothing is inferred per call from tensor shapes when the model says it. Models outside
transformers that keep their own cache and pass no such arguments fall back to the shape rule of
the past (``Lk - Lq`` cached keys before the queries of a causal call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ENC_DEC_KEYS = ("decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds", "labels")
_ENTRY_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "decoder_input_ids", "encoder_outputs")


@dataclass
class Positions:
    """Mask coordinates of one call's queries and keys.

    q_offset: when ``q`` is None, query ``i`` of every sequence sits at ``q_offset + i`` and key ``j``
        at ``j`` (the kernels' fast path).
    q: long ``[B, Lq]`` / k: long ``[B, Lk]``: each query's / key's position in its own sequence,
        when they differ between sequences or the keys do not start at 0 (padding tokens: 0; their
        entries are masked out by the call's attention mask).
    q_end, k_end: one past the last *real* query / key position of any sequence in the call (None:
        unknown; then only the call's attention mask can tell real tokens from padding).
    q_valid: bool ``[B, Lq]``, False for padded queries, when a 2-D mask says so.
    padding_free: the forward says every key of the call is a real token: a transformers model called
        without an attention mask for this side (by name or position) and without a cache, and the call's
        keys are its tokens (so its own attention mask, if any, encodes the model's structure, e.g.
        causality, never padding).
    """

    q_offset: int = 0
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    q_end: int | None = None
    k_end: int | None = None
    q_valid: torch.Tensor | None = None
    padding_free: bool = False

    @property
    def simple(self) -> bool:
        return self.q is None


class _Side:
    """One 2-D padding mask ``[B, T]`` and the positions it implies.

    ``valid`` and ``own`` stay on the mask's device (no synchronisation); ``shifted`` and ``end``
    are host values, computed together on first use: one GPU->CPU synchronisation per side and
    model forward (none for a mask on the CPU). While ``torch.compile`` traces: no read; the batch must be
    right-padded (``shifted`` False, asserted on the device) and ``end`` is the mask's full length."""

    def __init__(self, mask: torch.Tensor):
        self.valid = mask != 0
        self.length = int(mask.shape[1])
        self._count = self.valid.cumsum(1)
        self.own = ((self._count - 1).clamp_min(0) * self.valid).long()  # [B, T]; padding -> 0
        self._host: tuple[bool, int] | None = None

    def _read(self) -> tuple[bool, int]:
        if self._host is None and torch.compiler.is_compiling():
            # no host read in a traced forward: right padding is assumed (checked on the device: a count, not
            # .any(), see backends/_block_sparse._causal_form) and the real tokens may reach the full length
            if self.length and self.valid.shape[0]:
                later = self.valid.flip(1).cummax(1).values.flip(1)
                torch._assert_async((~self.valid & later).sum() == 0,
                                    "attnprune: a compiled masked model got a left-padded batch (padding before "
                                    "real tokens); under torch.compile pad on the right, or run it eagerly")
            self._host = (False, self.length)
        if self._host is None:
            if self.valid.is_cuda and torch.cuda.is_current_stream_capturing():
                from ..errors import GraphCaptureError

                raise GraphCaptureError(
                    "a 2-D attention_mask on the GPU reached a masked model during CUDA graph capture: where "
                    "its padding sits is read to the host once per forward, which a graph cannot do; capture "
                    "the forward without attention_mask (no padding), or run it eagerly")
            HOST_READS[0] += 1
            if not self.length or not self.valid.shape[0]:
                self._host = (False, 0)
            else:
                later = self.valid.flip(1).cummax(1).values.flip(1)  # a real token at or after this index
                shifted = (~self.valid & later).any()  # padding before a real token somewhere
                end = self._count[:, -1].max()
                sh, en = torch.stack([shifted.long(), end.long()]).tolist()
                self._host = (bool(sh), int(en))
        return self._host

    @property
    def shifted(self) -> bool:
        return self._read()[0]

    @property
    def end(self) -> int:
        return self._read()[1]


HOST_READS = [0]  # host reads of 2-D padding masks (tests count them)


def _past_length(kwargs: dict, trusted: bool, positional: int = 0) -> int | None:
    """Tokens already in the model's KV cache (None: the forward does not say). ``positional``: the number of
    positional arguments of the forward (one: ``input_ids``; more may hold a cache)."""
    cp = kwargs.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.numel():
        return int(cp.reshape(-1)[0])
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        fn = getattr(cache, "get_seq_length", None)
        if fn is None:
            return None  # a legacy tuple cache: unknown here
        return int(fn())
    if trusted and (any(k in kwargs for k in _ENTRY_KEYS) or positional == 1):
        return 0  # a fresh forward of a model that takes its inputs by these names: nothing cached
    return None


class ForwardContext:
    """What one model forward says about positions: its 2-D padding masks and its cache length.

    trusted: the model takes its cache as ``cache`` / ``past_key_values`` (transformers models), so
        a forward with inputs but no cache argument has nothing cached. Other models may keep a
        cache of their own: without a ``cache_position`` they get the shape rule.
    """

    def __init__(self, kwargs: dict | None = None, trusted: bool = False, positional: int = 0):
        kwargs = kwargs or {}
        self.enc_dec = any(k in kwargs for k in ENC_DEC_KEYS)
        self.past = _past_length(kwargs, trusted, positional)
        self._masks = {side: kwargs.get(name) for side, name in
                       (("encoder", "attention_mask"), ("decoder", "decoder_attention_mask"))}
        # no padding unless a mask says so: a transformers model called with at most its first argument
        # (input_ids) positionally and no cache (a mask may not hide among the positional arguments)
        self._fresh = trusted and positional <= 1 and all(kwargs.get(k) is None for k in ("cache", "past_key_values"))
        self._sides: dict[str, _Side | None] = {}
        self.decoder_offset = 0  # cross sites' query offset when the past is unknown: the last causal site's

    @staticmethod
    def starts_forward(kwargs: dict, is_root: bool) -> bool:
        """Whether a forward entered at a module outside any other forward is a new model forward
        (the model, or a sub-model such as its encoder called with inputs), rather than a layer
        recomputed by activation checkpointing, which keeps the context of its forward."""
        return is_root or any(k in kwargs for k in _ENTRY_KEYS)

    def _side(self, side: str, length: int) -> _Side | None:
        if side not in self._sides:
            m = self._masks.get(side)
            ok = isinstance(m, torch.Tensor) and m.dim() == 2 and not m.is_floating_point()
            self._sides[side] = _Side(m) if ok else None
        s = self._sides[side]
        return s if s is not None and s.length == length else None

    def own_positions(self, start: int, n: int, device, decoder: bool = False) -> torch.Tensor:
        """long ``[B or 1, n]``: positions of tokens ``start .. start+n-1`` of the forward's sequences in
        their own sequences, -1 for padding (no 2-D mask covering them: ``start + i``)."""
        s = self._side("decoder" if decoder else "encoder", start + n)
        if s is None:
            return torch.arange(start, start + n, device=device)[None]
        own = s.own[:, start:start + n].to(device)
        return torch.where(s.valid[:, start:start + n].to(device), own, -1)

    def positions(self, site: str, kind: str, lq: int, lk: int, is_causal: bool, device) -> Positions:
        """Positions of one call at ``site`` (of ``kind``) with ``lq`` queries and ``lk`` keys."""
        decoder = self.enc_dec and (kind == "cross" or any("decoder" in p.lower()
                                                           for p in site.split("#")[0].split(".")))
        side = "decoder" if decoder else "encoder"
        past = self.past if (decoder or not self.enc_dec) else 0
        known = past is not None
        if kind == "cross":  # queries: the decoder's tokens; keys: the encoder's, from 0
            past_q = self.decoder_offset if past is None else past
            tq, tk, k0 = past_q + lq, lk, 0
        else:
            if past is None:  # shape rule: a causal call's extra keys are cached tokens before its queries
                past_q = lk - lq if (kind == "causal" and not is_causal and lk > lq) else 0
            else:
                past_q = past
            tq = tk = past_q + lq
            k0 = tq - lk if (known and lk < tq) else 0  # a sliding window holds the last lk tokens
            if kind == "causal":
                self.decoder_offset = past_q
        sq = self._side(side, tq)
        sk = self._side("encoder" if kind == "cross" else side, tk)
        q_end = sq.end if sq is not None else (tq if known else None)
        k_end = sk.end if sk is not None else (tk if known else None)
        q_valid = sq.valid[:, past_q:past_q + lq] if sq is not None else None
        if k0 == 0 and not (sq is not None and sq.shifted) and not (sk is not None and sk.shifted):
            key_side = "encoder" if kind == "cross" else side
            free = self._fresh and lk == tk and self._masks[key_side] is None
            return Positions(past_q, None, None, q_end, k_end, q_valid, padding_free=free)
        if sq is not None:
            qp = sq.own[:, past_q:past_q + lq].to(device)
        else:
            qp = torch.arange(past_q, past_q + lq, device=device)[None]
        if sk is not None:
            kp = sk.own[:, k0:k0 + lk].to(device)
            if kp.shape[1] < lk:  # static-cache slots past the tokens seen: empty, masked out
                kp = torch.nn.functional.pad(kp, (0, lk - kp.shape[1]))
        else:
            kp = torch.arange(k0, k0 + lk, device=device)[None]
        return Positions(0, qp, kp, q_end, k_end, q_valid)
