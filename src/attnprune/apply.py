"""apply / attach / detach: run a model with attention computed only where a PruneMask keeps it."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .backends import AUTO, BACKENDS, resolve_backend
from .capture import AttentionCall, Interceptor, allowed_entries
from .errors import InvalidArgumentError, MaskMismatchError
from .mask import BEYOND
from .softmax import dense_attention

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, _Patch]" = weakref.WeakKeyDictionary()
_LAST_COUNTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # after detach


class OutsideCalibrationWarning(UserWarning):
    """Attention entries were computed outside the mask's calibrated region (``beyond="dense"`` or
    ``"extend"``); given once per ``attach``. :func:`outside_counts` counts them."""


class _Patch:
    """The handler installed on a model: looks up the site's mask and calls the backend."""

    def __init__(self, model: nn.Module, mask, backend: str, beyond: str):
        if backend == AUTO:  # the fastest backend that loads on the model's device
            device = next((p.device for p in model.parameters()), None)
            backend = resolve_backend(backend, device)
        self.mask, self.beyond, self.backend_name = mask, beyond, backend
        self.backend = BACKENDS.get(backend)
        # a backend that reads Positions.padding_free (the block-sparse ones: under torch.compile it lets them
        # drop the key padding of a materialised causal mask); the registry's contract stays as documented
        self.takes_hint = getattr(self.backend, "takes_padding_hint", False)
        self.takes_window = getattr(self.backend, "takes_window", False)  # window= for sliding-window layers
        self.checked = False
        self.pruned_layers: dict = {}  # site -> the PrunedKVCache layer last used there (cache.py)
        self.decoder_pad_from: int | None = None  # queries from here on are padding (last causal site)
        self.counts: dict = {}  # site -> [calls, calls outside, entries, entries outside] (outside_counts)
        self.warned = False
        self.interceptor = Interceptor(model, self)
        self.interceptor.after_forward = self.after_forward

    def __call__(self, call: AttentionCall):
        if call.site not in self.mask:
            raise MaskMismatchError(
                f"the model has an attention site {call.site!r} ({call.kind}, {call.info.num_heads} heads) "
                f"that the mask does not know; the mask's sites: {', '.join(self.mask.sites[:5])}"
                f"{' ...' if len(self.mask.sites) > 5 else ''}. Make the mask from this model's stats")
        sm = self.mask.site(call.site)
        if sm.info.num_heads != call.info.num_heads:
            raise MaskMismatchError(f"site {call.site!r}: the mask has {sm.info.num_heads} heads, the model "
                                    f"{call.info.num_heads}; the mask was made for another model")
        layer = self.pruned_layers.get(call.site)
        if layer is not None and call.k is layer.keys and layer.held_before:
            out = self._pruned(call, sm, layer)
            self._count(call, sm)
            return out
        lq, lk = call.q.shape[2], call.k.shape[2]
        pos = call.positions
        beyond = self.beyond
        if pos.q_end is not None and pos.k_end is not None:
            # the forward says where its real tokens end: entries past the calibrated region that
            # belong to padding or empty cache slots only are computed densely (and masked out)
            if sm.check_length(pos.q_end, pos.k_end, beyond) and pos.simple:
                if pos.q_offset + lq > sm.q_len or lk > sm.k_len:
                    beyond = "dense"
        elif torch.compiler.is_compiling():  # no host read of the call's mask while tracing: every position
            sm.check_length(pos.q_offset + lq, lk, beyond)  # counts as real (LengthError at trace time)
        else:  # a model that passes no padding mask or cache: its call's attention mask decides
            outside = pos.q_offset + lq > sm.q_len or lk > sm.k_len
            if call.kind == "causal":
                self.decoder_pad_from = _first_unused_key(call) if beyond == "error" and outside else None
            if beyond == "error" and outside and _padding_only(call, sm, pos.q_offset, self.decoder_pad_from):
                beyond = "dense"  # only padding lies outside the calibrated region: nothing real runs dense
        hint = {"key_padding_free": pos.padding_free} if self.takes_hint and pos.padding_free else {}
        if call.sinks is not None:  # only for models with sinks / soft-capping: other backends need not take them
            hint["sinks"] = call.sinks
        if call.softcap is not None:
            hint["softcap"] = call.softcap
        if call.window is not None and self.takes_window:
            hint["window"] = call.window
        out = self.backend(call.q, call.k, call.v, sm, attn_mask=call.attn_mask, is_causal=call.is_causal,
                           scale=call.scale, dropout_p=call.dropout_p, q_offset=pos.q_offset, beyond=beyond,
                           positions=None if pos.simple else (pos.q, pos.k), **hint)
        self._count(call, sm, padding_only=beyond != self.beyond)  # after the backend: it raises LengthError
        return out

    def _pruned(self, call: AttentionCall, sm, layer):
        """A call over a ``PrunedKVCache`` layer's compacted keys: each head attends to its group's
        kept positions (``keep_at``), causal in positions, within the layer's sliding window. The
        query positions are the layer's (computed once per forward for all layers)."""
        if getattr(layer, "cross", False):  # an encoder-decoder cache's static cross-attention subset
            return layer.attend(call, sm, self.beyond)
        pos = call.positions
        sm.check_length(pos.q_end, pos.k_end, self.beyond)
        q_pos = layer.q_pos  # [B or 1, Lq], >= 0
        from .kernels import decode

        # positions inside the calibration (known on the host from layer.seen): the keep table
        # read directly; past it under beyond="extend", keep_at's length-free form
        inside = layer.seen <= min(sm.q_len, sm.k_len)
        if decode.usable(call.q) and (self.beyond != "extend" or inside):  # the Triton decode kernel (CUDA)
            keep = layer.decode_keep(call.q.device, torch.uint8)
            return decode.masked_decode(call.q, call.k, call.v, layer.pos, q_pos, keep, sm.block or 1,
                                        scale=call.scale, window=layer.window, q_len=sm.q_len, k_len=sm.k_len,
                                        sinks=call.sinks, softcap=call.softcap)
        allowed = _pruned_allowed(sm, layer, q_pos, self.beyond, inside)
        if call.sinks is not None or call.softcap is not None:  # what SDPA below cannot express
            return dense_attention(call.q, call.k, call.v, allowed, False, call.scale, sinks=call.sinks,
                                   softcap=call.softcap)
        out = F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=allowed, scale=call.scale,
                                             enable_gqa=call.q.shape[1] != layer.pos.shape[1])
        return torch.where(allowed.any(-1, keepdim=True), out, 0.0)  # a row with nothing kept: 0

    def _count(self, call: AttentionCall, sm, padding_only: bool = False) -> None:
        """Add the call's attention entries, and those outside the calibrated region, to
        ``self.counts`` (host arithmetic on shapes and host positions only: no tensor op, no sync).
        Not under ``torch.compile``: counters traced into a graph would recompile it on every call."""
        if torch.compiler.is_compiling():
            return
        pos, lq, lk = call.positions, call.q.shape[2], call.k.shape[2]
        if pos.simple:
            r0 = pos.q_offset
            r1 = r0 + lq if pos.q_end is None else min(r0 + lq, pos.q_end)
            kmax = lk if pos.k_end is None else min(lk, pos.k_end)
        else:  # positions differ between sequences: counted on the longest one
            r1 = pos.q_end if pos.q_end is not None else pos.q_offset + lq
            r0 = max(0, r1 - lq)
            kmax = pos.k_end if pos.k_end is not None else lk
        causal, batch = call.kind == "causal", call.q.shape[0]
        total = _entries(r0, r1, kmax, causal)
        out = 0 if padding_only else total - _entries(r0, min(r1, sm.q_len), min(kmax, sm.k_len), causal)
        c = self.counts.setdefault(call.site, [0, 0, 0, 0])
        c[0] += 1
        c[2] += batch * total
        if out > 0:
            c[1] += 1
            c[3] += batch * out
            if not self.warned:
                self.warned = True
                how = "densely" if self.beyond == "dense" else "by the mask's length-free form (sinks + band)"
                warnings.warn(
                    f"site {call.site!r}: attention entries past the mask's calibrated length "
                    f"({sm.q_len} x {sm.k_len}) are computed {how}; attnprune.outside_counts(model) "
                    f"counts them per site (warned once per attach)", OutsideCalibrationWarning, stacklevel=2)

    def after_forward(self, kwargs: dict) -> None:
        it = self.interceptor
        self.decoder_pad_from = None
        it.check_found()
        partial = any(kwargs.get(k) is not None for k in ("encoder_outputs", "past_key_values", "cache"))
        if not self.checked and not partial:
            self.mask.check_model(it.infos)
            self.checked = True


def _entries(r0: int, r1: int, kmax: int, causal: bool) -> int:
    """Query rows ``r0 .. r1-1`` against keys ``0 .. kmax-1``: the entries they read (a causal row
    ``r`` reads ``min(r + 1, kmax)`` keys), in closed form."""
    if r1 <= r0 or kmax <= 0:
        return 0
    if not causal:
        return (r1 - r0) * kmax
    split = min(max(kmax, r0), r1)  # rows r < kmax read r + 1 keys, the rest kmax
    return (split * (split + 1) - r0 * (r0 + 1)) // 2 + (r1 - split) * kmax


def _pruned_allowed(sm, layer, q_pos: torch.Tensor, beyond: str, inside: bool) -> torch.Tensor:
    """bool ``[B, Hq, Lq, C]``: query ``q_pos`` may attend to slot ``c`` of ``layer`` (a PrunedKVCache
    layer): the slot holds a position (``>= 0``) at or before the query, within the window, kept by
    ``sm``. ``inside``: every position lies in the calibrated region, so the keep table is read
    directly (what ``keep_at`` reads there, in fewer ops)."""
    kp = layer.pos  # [B, Hkv, C], -1: an empty slot
    B, Hkv, C = kp.shape
    H, (Bq, n) = sm.info.num_heads, q_pos.shape
    G = H // Hkv
    qp, k4 = q_pos.view(Bq, 1, n, 1), kp.view(B, Hkv, 1, C)
    ok = (k4 <= qp) & (k4 >= 0)  # [B, Hkv, Lq, C]
    if layer.window is not None:
        ok = ok & (qp - k4 < layer.window)
    if not inside:
        return sm.keep_at(q_pos, kp, beyond=beyond, checked=True) & ok.repeat_interleave(G, dim=1)
    b = sm.block or 1
    keep = layer.decode_keep(kp.device, torch.bool)
    keep = keep.view(Hkv, G, *keep.shape[1:])  # [Hkv, G, Qt, Kt]
    hg, hi = _group_index(Hkv, G, kp.device)
    qi = layer.q_block(b).view(Bq, 1, 1, n, 1)  # q_pos // b, once per forward
    # empty slots (-1) read the last column (a valid index): ``ok`` masks them out
    ki = (kp if b == 1 else kp // b).view(B, Hkv, 1, 1, C)
    table = keep[hg, hi, qi, ki]  # [B, Hkv, G, Lq, C]
    return (table & ok.view(B, Hkv, 1, n, C)).view(B, H, n, C)


_GROUP_INDEX: dict = {}


def _group_index(hkv: int, g: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors ``[1, Hkv, 1, 1, 1]`` and ``[1, 1, G, 1, 1]`` (cached per shape and device)."""
    key = (hkv, g, device)
    if key not in _GROUP_INDEX:
        _GROUP_INDEX[key] = (torch.arange(hkv, device=device)[None, :, None, None, None],
                             torch.arange(g, device=device)[None, None, :, None, None])
    return _GROUP_INDEX[key]


def _used_keys(call: AttentionCall) -> torch.Tensor | None:
    """bool [Lk]: the keys some query of some sequence may attend to (None: no mask, all used)."""
    lq, lk = call.q.shape[2], call.k.shape[2]
    allowed = allowed_entries(call.attn_mask, call.is_causal, lq, lk, device=call.q.device)
    if allowed is None:
        return None
    return allowed.reshape(-1, *allowed.shape[-2:]).any(dim=-2).any(dim=0)


def _first_unused_key(call: AttentionCall) -> int | None:
    """For a self-attention call: the position from which on every key (so every query) is padding."""
    used = _used_keys(call)
    if used is None:
        return None
    idx = used.nonzero()
    return int(idx[-1]) + 1 if len(idx) else 0


def _padding_only(call: AttentionCall, sm, q_offset: int, decoder_pad_from: int | None = None) -> bool:
    """True when every key (and query) position beyond the calibrated lengths is padding: no query of
    any sequence may attend to it. Batches padded past the longest observed sequence then run without
    ``LengthError``. Cross-attention queries are the decoder's: their padding is what the decoder's
    causal self-attention site of the same forward found (``decoder_pad_from``)."""
    lq, lk = call.q.shape[2], call.k.shape[2]
    used = _used_keys(call)
    if used is None or bool(used[sm.k_len:].any()):
        return False
    if q_offset + lq <= sm.q_len:
        return True
    if call.kind == "cross":
        return q_offset == 0 and decoder_pad_from is not None and decoder_pad_from <= sm.q_len
    # queries past the calibrated length: fine only if they are padded tokens of a self-attention site
    return lq == lk and q_offset == 0 and not bool(used[sm.q_len:].any())


def attach(model: nn.Module, mask, *, backend: str = "auto", beyond: str = "error") -> nn.Module:
    """Patch ``model`` in place so that every attention site computes only the entries ``mask`` keeps.

    Args:
        model: the model the mask was made for (same site names and head counts).
        mask: a ``PruneMask``.
        backend: ``"auto"`` (default: ``"flash"`` on an sm90+ GPU with FlashAttention-4, else
            ``"triton"`` on a CUDA device, else ``"reference"``; decided on the model's device),
            ``"reference"`` (dense masked, any device), ``"triton"``, ``"flex"`` (CUDA) or ``"flash"``
            (sm90+, ``pip install 'attnprune[hopper]'``). ``attnprune.attached_backend(model)`` names
            the one in use.
        beyond: inputs longer than the calibrated lengths raise ``LengthError`` (``"error"``), run
            densely outside the calibrated region (``"dense"``), or use each head's sinks and band
            continued past it (``"extend"``, see ``attnprune.lengthfree``; not for cross-attention
            sites); shorter inputs use the top-left part.
            Positions past the calibrated lengths that are only padding (no query may attend to
            them, by the call's attention mask) are not "longer": they run without error.

    Works in training (gradients flow through the kept entries). The first full forward checks the
    mask against the model (``MaskMismatchError`` naming the differing sites or head counts); a
    model site unknown to the mask is an error on every call. Undo with :func:`detach`.
    Returns ``model``.
    """
    if beyond not in BEYOND:
        raise InvalidArgumentError(f"beyond must be one of {', '.join(map(repr, BEYOND))}, got {beyond!r}")
    if model in _ATTACHED:
        raise InvalidArgumentError("a mask is already attached to this model; detach(model) first")
    for attr in ("sites", "site", "check_model"):
        if not hasattr(mask, attr):
            raise InvalidArgumentError(f"mask must be a PruneMask, got {type(mask).__name__}")
    patch = _Patch(model, mask, backend, beyond)
    patch.interceptor.install()
    _ATTACHED[model] = patch
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove what :func:`attach` installed; the model computes dense attention again. Returns ``model``."""
    patch = _ATTACHED.pop(model, None)
    if patch is None:
        raise InvalidArgumentError("no mask is attached to this model")
    patch.interceptor.remove()
    _LAST_COUNTS[model] = (patch.beyond, patch.counts)
    return model


def outside_counts(model: nn.Module, *, reset: bool = False) -> dict:
    """How much attention the attached mask's run computed outside its calibrated region.

    Returns ``{"beyond", "calls", "entries", "total", "share", "sites"}``: ``entries`` are the
    query x key entries (per head, summed over the batch's sequences) whose query or key position
    lies past the mask's calibrated lengths, computed densely (``beyond="dense"``) or by the
    length-free form (``beyond="extend"``); ``total`` all entries the masked sites were asked for
    (causal sites: keys up to the query); ``share = entries / total``; ``calls`` the attention calls
    with some entry outside. ``sites[name]`` holds the same four per site. Entries of padding past
    the longest real sequence of a call are not counted; in a padded batch, each sequence counts as
    long as the call's longest one (an upper bound). Counted on the host, without synchronisation.

    Reads the attached mask's counts, or, after :func:`detach` (the end of ``with apply(...)``), the
    last attachment's. ``reset=True`` zeroes them after reading. ``InvalidArgumentError`` if no mask
    was ever attached to ``model``.
    """
    patch = _ATTACHED.get(model)
    if patch is not None:
        beyond, counts = patch.beyond, patch.counts
    elif model in _LAST_COUNTS:
        beyond, counts = _LAST_COUNTS[model]
    else:
        raise InvalidArgumentError("no mask is or was attached to this model")

    def row(calls, entries, total):
        return {"calls": calls, "entries": entries, "total": total, "share": entries / total if total else 0.0}

    sites = {name: row(c[1], c[3], c[2]) for name, c in counts.items()}
    out = {"beyond": beyond, **row(sum(s["calls"] for s in sites.values()),
                                   sum(s["entries"] for s in sites.values()),
                                   sum(s["total"] for s in sites.values())), "sites": sites}
    if reset:
        counts.clear()
    return out


def attached(model: nn.Module):
    """The ``PruneMask`` attached to ``model``, or None."""
    patch = _ATTACHED.get(model)
    return None if patch is None else patch.mask


def attached_backend(model: nn.Module) -> str | None:
    """The name of the backend computing ``model``'s masked attention (``"auto"`` resolved), or None."""
    patch = _ATTACHED.get(model)
    return None if patch is None else patch.backend_name


@contextlib.contextmanager
def apply(model: nn.Module, mask, *, backend: str = "auto", beyond: str = "error") -> Iterator[nn.Module]:
    """Context manager form of :func:`attach` / :func:`detach`::

        with attnprune.apply(model, mask):
            logits = model(**batch).logits
    """
    attach(model, mask, backend=backend, beyond=beyond)
    try:
        yield model
    finally:
        detach(model)
