"""The block-sparse backend factory shared by ``backend="triton"`` and ``backend="flex"``.

:func:`block_sparse_backend` turns a kernel that runs a :class:`~attnprune.kernels.BlockLayout` into a
backend (the contract in :mod:`attnprune.backends`): it reads the site's layout from its ``SiteMask``,
expresses ``attn_mask`` as key padding plus causality (:func:`split_attn_mask`), and hands every call
the kernel cannot express (shifted positions, dropout while training, another mask, a kernel's own
``unsupported`` reason) to the reference backend, warning once per (site, reason, backend).
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict

import torch

from . import BACKENDS

__all__ = ["block_sparse_backend", "split_attn_mask"]

_warned: set[tuple[str, str, str]] = set()


def split_attn_mask(attn_mask, B: int, Lq: int, Lk: int, is_causal: bool, q_offset: int, kind: str | None = None,
                    window: int | None = None):
    """Express ``attn_mask`` as (key padding, causal, causal offset), or ``None`` if impossible.

    attn_mask: None, bool (True = may attend) or additive float, broadcastable to [B, H, Lq, Lk].
    Returns ``(key_padding bool [B, Lk] | None, causal: bool, offset: int)``: the allowed set is
    ``key_padding[b, j] and (not causal or j <= i + offset)``, intersected with ``is_causal``'s
    own rule (``j <= i + q_offset``). With a sliding ``window`` (the model's), the causal forms also
    hold ``j > i + offset - window``: a caller that gets ``causal`` True must apply that edge too
    (:meth:`~attnprune.kernels.BlockLayout.windowed`); keys no query's window reaches count as real.

    The analysis of a mask tensor needs one GPU->CPU synchronisation; it is memoised per (tensor,
    its in-place version, the call's shapes), so the layers of one forward, which receive the same
    mask tensor, share one analysis (a weak reference: the memo keeps no mask alive).

    During CUDA graph capture there is no synchronisation: the form found by an eager call of the
    same shapes is checked on the device and its key padding passed on (:func:`_analyse_captured`);
    with no such eager call, the form of the site's ``kind`` (``"causal"``: key padding + causality
    from the last query, as transformers builds it; else key padding alone), or ``GraphCaptureError``
    when ``kind`` is not given.
    """
    if attn_mask is None:
        return None, is_causal, q_offset
    key = (id(attn_mask), attn_mask._version, B, Lq, Lk, bool(is_causal), int(q_offset), window)
    hit = _split_memo.get(key)
    if hit is not None and hit[0]() is attn_mask:
        _split_memo.move_to_end(key)
        return hit[1]
    form_key = (tuple(attn_mask.shape), attn_mask.dtype, str(attn_mask.device), B, Lq, Lk, bool(is_causal),
                int(q_offset), window)
    ANALYSES[0] += 1
    if _capturing():
        out = _analyse_captured(attn_mask, form_key, B, Lq, Lk, is_causal, q_offset, kind, window)
    else:
        out, f = _analyse(attn_mask, B, Lq, Lk, is_causal, q_offset, window)
        _form_memo[form_key] = f
        while len(_form_memo) > _MEMO_SIZE:
            _form_memo.pop(next(iter(_form_memo)))
    try:
        ref = weakref.ref(attn_mask)
    except TypeError:  # pragma: no cover - tensors support weak references
        return out
    _split_memo[key] = (ref, out)
    while len(_split_memo) > _MEMO_SIZE:
        _split_memo.popitem(last=False)
    return out


_MEMO_SIZE = 16
_split_memo: "OrderedDict[tuple, tuple]" = OrderedDict()
_form_memo: dict = {}  # (mask shape, dtype, device, call shapes) -> index of the form an eager analysis found
ANALYSES = [0]  # number of mask analyses run (tests count them)


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph (no host reads allowed)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _compiled_split(attn_mask, B: int, Lq: int, Lk: int, is_causal: bool, q_offset: int, kind: str | None,
                    padding_free: bool = False, window: int | None = None):
    """:func:`split_attn_mask` while ``torch.compile`` traces: no memo (tensor ids and versions mean nothing
    there) and no host read. The form is the one of the site's ``kind`` (as under CUDA graph capture:
    ``"causal"``: key padding + causality from the last query, else key padding alone); the mask is
    checked against it on the device (``torch._assert_async``) and its key padding is passed on, unless
    ``padding_free`` (the forward says no key is padding: ``Positions.padding_free``): then the check also
    asserts that every key is kept and no key padding is passed (the kernels' unpadded, natively causal
    path). ``window``: the causal form holds the sliding window's edge too (as in :func:`split_attn_mask`)."""
    from ..errors import GraphCaptureError

    if attn_mask is None:
        return None, is_causal, q_offset
    if kind is None:
        raise GraphCaptureError(
            f"an attention mask of shape {list(attn_mask.shape)} reached a block-sparse backend under "
            f"torch.compile for a site of unknown kind: its form (key padding, causal) cannot be read "
            f"without a host synchronisation; compile with backend='reference' or pass no attention mask")
    causal = kind == "causal"
    if causal and is_causal and Lk - Lq != q_offset:
        return None
    pre, m = _normalised(attn_mask, B, Lq, Lk)
    if causal:
        kp, off, same = _causal_form(m, Lq, Lk, Lk - Lq, window)
    else:
        kp, off = m.any(dim=1), q_offset
        same = (m == kp[:, None, :]).all()
    if padding_free:  # (a count, not .all(): see _causal_form)
        same = same & ((~kp).sum() == 0)
    torch._assert_async(torch.stack(pre + [same]).all(),
                        "attnprune: a compiled model got an attention mask that is not key padding (+ causal)"
                        + (" or that pads keys of a forward without padding" if padding_free else ""))
    return None if padding_free else kp, causal or is_causal, off


def _normalised(attn_mask, B: int, Lq: int, Lk: int):
    """``(pre, m)``: ``m`` the allowed set bool ``[B, Lq, Lk]`` of ``attn_mask`` (its first head),
    ``pre`` 0-d bool tensors that must all hold for it to be key padding (+ causal) at all (no real
    additive bias, the same for all heads)."""
    m = attn_mask
    pre = []
    if m.dtype != torch.bool:
        finite = torch.isfinite(m) & (m > torch.finfo(m.dtype).min / 2)
        pre.append(((m == 0) | ~finite).all())  # else a real additive bias: not expressible
        m = finite
    while m.dim() < 4:
        m = m[None]
    if m.shape[1] != 1:
        pre.append((m == m[:, :1]).all())  # else it differs between heads
        m = m[:, :1]
    return pre, m.expand(B, 1, Lq, Lk)[:, 0]


def _causal_form(m, Lq: int, Lk: int, off: int, window: int | None = None):
    """``(key padding [B, Lk], off, same)`` of the causal form ``j <= i + off`` (and ``j > i + off - window``
    with a window) of ``m`` [B, Lq, Lk]: keys no query can reach are not "padding", so without a window
    the padding comes from the last row, with one from all rows; ``same``: 0-d bool, ``m`` is exactly
    that form."""
    # The form is built with integer arithmetic on the index grid (0/1 by clamping), not comparisons, and
    # tested by counting mismatches, not with ``.all()``: inductor on torch 2.11 fails to generate kernels
    # where bools come from comparisons of index expressions ("A Boolean argument can only be used in Eq
    # and Ne", pytorch/pytorch#188231).
    i = torch.arange(Lq, device=m.device)[:, None]
    j = torch.arange(Lk, device=m.device)[None, :]
    tri = (i + (off + 1) - j).clamp(0, 1)  # [Lq, Lk] int: 1 where j <= i + off
    if window is not None:
        tri = tri * (j - (i + off - window)).clamp(0, 1)  # and j > i + off - window
        kp_c = m.any(dim=1) | (tri.sum(dim=0) == 0)[None, :]
    else:
        kp_c = m[:, -1, :] | (tri[-1] == 0)[None, :] if Lq else m.any(dim=1)
    want = kp_c.to(torch.int32)[:, None, :] * tri[None]
    return kp_c, off, (m.to(torch.int32) - want).abs().sum() == 0


def _candidates(attn_mask, B: int, Lq: int, Lk: int, is_causal: bool, q_offset: int, window: int | None = None):
    """The device-side tests behind :func:`split_attn_mask`: ``(pre, forms)``, ``pre`` a list of 0-d
    bool tensors that must all hold for any form, ``forms`` a list of ``(key_padding [B, Lk], causal,
    offset, same, full)`` with ``same`` (the mask is exactly this form) and ``full`` (no key is
    padded) 0-d bool tensors. Nothing is read to the host here."""
    pre, m = _normalised(attn_mask, B, Lq, Lk)  # m: [B, Lq, Lk]
    kp = m.any(dim=1)  # [B, Lk]: keys some query may see
    forms = [(kp, is_causal, q_offset, (m == kp[:, None, :]).all(), kp.all())]
    for off in dict.fromkeys((Lk - Lq, q_offset, 0)):
        kp_c, _, same = _causal_form(m, Lq, Lk, off, window)
        forms.append((kp_c, True, off, same, kp_c.all()))
    return pre, forms


def _analyse(attn_mask, B: int, Lq: int, Lk: int, is_causal: bool, q_offset: int, window: int | None = None):
    """:func:`split_attn_mask` without the memo: every candidate form is tested on the device and the
    answers come back to the host together (one synchronisation). Returns ``(split or None, index of
    the form that matched or -1)``."""
    pre, forms = _candidates(attn_mask, B, Lq, Lk, is_causal, q_offset, window)
    flags = torch.stack(pre + [t for f in forms for t in f[3:]]).tolist()
    n_pre = len(pre)
    if not all(flags[:n_pre]):
        return None, -1
    for f, (kp_f, causal, off, _, _) in enumerate(forms):
        same, full = flags[n_pre + 2 * f], flags[n_pre + 2 * f + 1]
        if not same:
            continue
        if f and is_causal and off != q_offset:
            return None, -1
        return ((None if full else kp_f), causal, off), f
    return None, -1


def _analyse_captured(attn_mask, form_key, B: int, Lq: int, Lk: int, is_causal: bool, q_offset: int,
                      kind: str | None = None, window: int | None = None):
    """:func:`split_attn_mask` while a CUDA graph is captured: no host read. The form is the one an
    eager call of the same shapes found (``_form_memo``); the mask is checked against it on the device
    (``torch._assert_async``: a replay whose mask has another form stops with a device-side assertion
    instead of computing something else), and its key padding is always passed to the kernel, so
    replays with other padding of the same form stay exact."""
    from ..errors import GraphCaptureError

    f = _form_memo.get(form_key)
    if f is None and kind is not None:  # transformers passes no mask eagerly but builds one under capture
        f = 1 if kind == "causal" else 0  # forms[1]: causal from offset Lk - Lq (see _candidates)
        if f and is_causal and Lk - Lq != q_offset:
            f = None
    if f is None:
        raise GraphCaptureError(
            f"an attention mask of shape {list(attn_mask.shape)} ({attn_mask.dtype}) reached a block-sparse "
            f"backend during CUDA graph capture before any eager call of these shapes: run the model once "
            f"eagerly with the same input shapes (a warm-up) before capturing")
    if f < 0:
        return None  # the eager call found no kernel form: the reference backend runs it, as eagerly
    pre, forms = _candidates(attn_mask, B, Lq, Lk, is_causal, q_offset, window)
    kp_f, causal, off, same, _ = forms[f]
    torch._assert_async(torch.stack(pre + [same]).all(),
                        "attnprune: a replayed CUDA graph got an attention mask of another form than at capture")
    return kp_f, causal, off


def _fallback(q, k, v, site_mask, why: str, backend: str, to: str = "reference", **kw):
    name = getattr(site_mask, "name", "?")
    if (name, why, backend) not in _warned:  # once per site and reason
        _warned.add((name, why, backend))
        warnings.warn(f"site {name!r}: {why}; the {backend} backend hands this call to the {to} backend",
                      stacklevel=3)
    return BACKENDS.get(to)(q, k, v, site_mask, **kw)


def autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``q, k, v`` as ``scaled_dot_product_attention`` takes them under autocast: all cast to the
    autocast dtype of their device type when autocast is on there (a kernel called directly is not
    cast by autocast; under bf16 autocast a Llama's rotary embedding leaves q, k in float32 and v in
    bfloat16), unchanged otherwise."""
    dev = q.device.type
    if not torch.is_autocast_enabled(dev):
        return q, k, v
    dt = torch.get_autocast_dtype(dev)
    return q.to(dt), k.to(dt), v.to(dt)


def block_sparse_backend(kernel, block_for, name: str, what: str, unsupported=None, by_handle=None,
                         takes: tuple = (), variants_to: str = "reference", handle_takes: tuple = ()):
    """Make a backend that runs ``kernel(q, k, v, layout, causal=, scale=, key_padding=, q_offset=)`` on
    the site's block layout, with ``block_for(site_mask, lq, lk) -> (bq, bk)`` choosing the block shape.
    ``unsupported(q, k, v) -> str | None``: why the kernel cannot run this call (then the reference
    backend does, with the warning), or None.

    Calls the kernel cannot express (dropout while training; an ``attn_mask`` that is not key padding,
    with or without causality) go to the reference backend, with one warning per site. ``what`` names
    the kernel in that warning; ``name`` is the backend's registry name.

    ``window``: the model's sliding window (passed by ``apply`` for sliding-window layers,
    ``takes_window``): masks of the causal sliding-window form are run on the site's layout cut to the
    window (:meth:`~attnprune.kernels.BlockLayout.windowed`); under ``torch.compile`` through a layout source
    of the windowed layout that the first (eager) forward registers (without ``by_handle``, or without
    that forward: the reference backend).

    ``takes``: the softmax variants (:mod:`attnprune.softmax`) the kernel takes eagerly as keywords,
    among ``"sinks"`` (attention-sink logits ``[Hq]``) and ``"softcap"`` (the logit cap); a call with a
    variant the kernel does not take goes to the ``variants_to`` backend (the reference one unless the
    backend names a better one), with the warning; under ``torch.compile`` ``handle_takes`` are those
    ``by_handle`` takes.

    ``by_handle``: the kernel's ``torch.compile`` form, ``by_handle(q, k, v, handle, causal=, scale=,
    key_padding=, q_offset=, layout_q_offset=, beyond=)`` (:func:`attnprune.kernels.attention_by_handle`):
    while dynamo traces, the backend passes the site's layout as a handle (:mod:`attnprune.kernels.ops`,
    layout source ``"site:<name>"``, resolved when the op runs) instead of looking the layout up, and
    reads the mask's form without host reads (:func:`_compiled_split`).
    """

    # site mask -> {(Lq, Lk, device, q_offset, beyond): layout}: the per-call lookup without
    # SiteMask.layout's checks and key building (a hit means those checks passed for these arguments)
    layouts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def backend(q, k, v, site_mask, *, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0,
                q_offset=0, beyond="error", positions=None, key_padding_free=False, sinks=None, softcap=None,
                window=None):
        q, k, v = autocast_inputs(q, k, v)
        kw = dict(attn_mask=attn_mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
                  q_offset=q_offset, beyond=beyond, positions=positions)
        extra = {n: x for n, x in (("sinks", sinks), ("softcap", softcap)) if x is not None}
        if extra:
            kw.update(extra)
            compiling = torch.compiler.is_compiling()
            missing = [n for n in extra if n not in (handle_takes if compiling else takes)]
            if missing:
                what_ = {"sinks": "attention sinks", "softcap": "logit soft-capping"}
                return _fallback(q, k, v, site_mask, f"{' and '.join(what_[n] for n in missing)}: not supported by "
                                 f"{what}{' under torch.compile' if compiling else ''}", name, to=variants_to, **kw)
        if positions is not None:
            return _fallback(q, k, v, site_mask, "its queries or keys do not sit at their tensor index (a "
                             "left-padded batch or a sliding-window cache)", name, **kw)
        why = unsupported(q, k, v) if unsupported is not None else None
        if why:
            return _fallback(q, k, v, site_mask, why, name, **kw)
        if dropout_p and torch.is_grad_enabled():
            return _fallback(q, k, v, site_mask, f"attention dropout is not supported by {what}", name, **kw)
        B, Hq, Lq, _ = q.shape
        Lk = k.shape[2]
        kind = getattr(getattr(site_mask, "info", None), "kind", None)
        if window is not None and by_handle is None and torch.compiler.is_compiling():
            return _fallback(q, k, v, site_mask, f"a sliding-window layer is not supported by {what} under "
                             "torch.compile", name, **kw)
        if by_handle is not None and torch.compiler.is_compiling():
            split = _compiled_split(attn_mask, B, Lq, Lk, is_causal, q_offset, kind, key_padding_free,
                                    None if attn_mask is None else window)
            if split is None:
                return _fallback(q, k, v, site_mask, "its attention mask is not key padding (+ causal"
                                 f"{', sliding window' if window is not None else ''})", name, **kw)
            key_padding, causal, offset = split
            src = source
            if window is not None and causal and attn_mask is not None:  # (no mask: the window cuts nothing)
                src = f"{source}:window={window}"
                if src not in windowed_sources:  # registered by the eager forward that must come first
                    return _fallback(q, k, v, site_mask, "a sliding-window layer compiled before any eager forward",
                                     name, **kw)
            handle = layout_handle(src, site_mask)
            return by_handle(q, k, v, handle, causal=causal, scale=scale, key_padding=key_padding, q_offset=offset,
                             layout_q_offset=q_offset, beyond=beyond, **extra)
        split = split_attn_mask(attn_mask, B, Lq, Lk, is_causal, q_offset, kind=kind, window=window)
        if split is None:
            return _fallback(q, k, v, site_mask, "its attention mask is not key padding (+ causal"
                             f"{', sliding window' if window is not None else ''})", name, **kw)
        key_padding, causal, offset = split
        per = layouts.get(site_mask)  # the memo hit inline: this runs once per attention call
        layout = per.get((Lq, Lk, q.device, q_offset, beyond)) if per is not None else None
        if layout is None:
            layout = site_layout(site_mask, Lq, Lk, q.device, q_offset, beyond)
        if window is not None and causal:  # the window's lower edge, cut into the layout (cached there)
            layout = layout.windowed(window, offset)
            if by_handle is not None and f"{source}:window={window}" not in windowed_sources:
                add_windowed_source(window)
        return kernel(q, k, v, layout, causal=causal, scale=scale, key_padding=key_padding, q_offset=offset, **extra)

    def site_layout(site_mask, Lq: int, Lk: int, device, q_offset: int, beyond: str):
        key = (Lq, Lk, device, q_offset, beyond)
        per = layouts.get(site_mask)
        layout = per.get(key) if per is not None else None
        if layout is None:
            layout = site_mask.layout(Lq, Lk, block_for(site_mask, Lq, Lk), device=device, q_offset=q_offset,
                                      beyond=beyond)
            try:
                per = layouts.setdefault(site_mask, {})
            except TypeError:  # not weakly referenceable: no memo
                per = {}
            if len(per) >= 8:
                per.pop(next(iter(per)))
            per[key] = layout
        return layout

    source = f"site:{name}"
    if by_handle is not None:  # the op's layout source for a site mask: the same memo as the eager calls
        from ..kernels.ops import add_layout_source, layout_handle

        add_layout_source(source, lambda site_mask: lambda lq, lk, device, q_offset, beyond: site_layout(
            site_mask, lq, lk, device, q_offset, beyond))
    windowed_sources: set = set()

    def add_windowed_source(window: int) -> None:
        """The op's layout source for a site's sliding-window layer: the site's layout cut to the window at
        the causal offset ``lk - lq`` (the compiled causal form's), registered by the first eager call."""
        kind = f"{source}:window={window}"
        add_layout_source(kind, lambda site_mask: lambda lq, lk, device, q_offset, beyond: site_layout(
            site_mask, lq, lk, device, q_offset, beyond).windowed(window, lk - lq))
        windowed_sources.add(kind)
    backend.takes_padding_hint = True  # apply passes key_padding_free= (Positions.padding_free)
    backend.takes_window = True  # and window= (AttentionCall.window) for sliding-window layers
    return backend
