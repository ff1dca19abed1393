"""``backend="triton"``: a site's mask run through the project's block-sparse Triton kernels.

The site's ``SiteMask.layout`` (cached there) gives the kernel layout; causality, key padding and
the calibrated-region rule (``beyond``) are applied exactly as the reference backend does. Calls
the kernels cannot express (dropout, an additive bias that is not just 0/-inf, a boolean mask that
is not key padding with or without causality) are handed to the reference backend, with a warning
naming the site, once per site.
"""

from __future__ import annotations

import warnings

import torch

from ..kernels import sparse_attention

__all__ = ["triton_backend", "block_sparse_backend", "split_attn_mask", "kernel_block"]

_warned: set[tuple[str, str, str]] = set()


def kernel_block(site_mask, lq: int, lk: int) -> tuple[int, int]:
    """Layout block for a site: the mask's own block when it is a power of two in 16..128
    (block masks are handed over without tiling), else 64 x 64."""
    b = getattr(site_mask, "block", None)
    if b and 16 <= b <= 128 and not b & (b - 1):
        return (b, b)
    return (64, 64)


def split_attn_mask(attn_mask, B: int, Lq: int, Lk: int, is_causal: bool, q_offset: int):
    """Express ``attn_mask`` as (key padding, causal, causal offset), or ``None`` if impossible.

    attn_mask: None, bool (True = may attend) or additive float, broadcastable to [B, H, Lq, Lk].
    Returns ``(key_padding bool [B, Lk] | None, causal: bool, offset: int)``: the allowed set is
    ``key_padding[b, j] and (not causal or j <= i + offset)``, intersected with ``is_causal``'s
    own rule (``j <= i + q_offset``).
    """
    if attn_mask is None:
        return None, is_causal, q_offset
    m = attn_mask
    if m.dtype != torch.bool:
        finite = torch.isfinite(m) & (m > torch.finfo(m.dtype).min / 2)
        if not bool(((m == 0) | ~finite).all()):
            return None  # a real additive bias: not expressible
        m = finite
    while m.dim() < 4:
        m = m[None]
    if m.shape[1] != 1:
        if not bool((m == m[:, :1]).all()):
            return None  # differs between heads
        m = m[:, :1]
    m = m.expand(B, 1, Lq, Lk)[:, 0]  # [B, Lq, Lk]
    kp = m.any(dim=1)  # [B, Lk]: keys some query may see
    if bool((m == kp[:, None, :]).all()):
        return (None if bool(kp.all()) else kp), is_causal, q_offset
    i = torch.arange(Lq, device=m.device)[:, None]
    j = torch.arange(Lk, device=m.device)[None, :]
    for off in dict.fromkeys((Lk - Lq, q_offset, 0)):
        tri = j <= i + off
        # keys past the causal limit of every query are not "padding": recover them from the last row
        kp_c = m[:, -1, :] | ~tri[-1][None, :] if Lq else kp
        if bool((m == (kp_c[:, None, :] & tri[None])).all()):
            if is_causal and off != q_offset:
                return None
            return (None if bool(kp_c.all()) else kp_c), True, off
    return None


def _fallback(q, k, v, site_mask, why: str, backend: str, **kw):
    from . import BACKENDS  # the registry lives in backends/__init__.py

    name = getattr(site_mask, "name", "?")
    if (name, why, backend) not in _warned:  # once per site and reason
        _warned.add((name, why, backend))
        warnings.warn(f"site {name!r}: {why}; the {backend} backend hands this call to the reference backend",
                      stacklevel=3)
    return BACKENDS.get("reference")(q, k, v, site_mask, **kw)


def block_sparse_backend(kernel, block_for, name: str, what: str, unsupported=None):
    """Make a backend that runs ``kernel(q, k, v, layout, causal=, scale=, key_padding=, q_offset=)`` on
    the site's block layout, with ``block_for(site_mask, lq, lk) -> (bq, bk)`` choosing the block shape.
    ``unsupported(q, k, v) -> str | None``: why the kernel cannot run this call (then the reference
    backend does, with the warning), or None.

    Calls the kernel cannot express (dropout while training; an ``attn_mask`` that is not key padding,
    with or without causality) go to the reference backend, with one warning per site. ``what`` names
    the kernel in that warning; ``name`` is the backend's registry name.
    """

    def backend(q, k, v, site_mask, *, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0,
                q_offset=0, beyond="error", positions=None):
        kw = dict(attn_mask=attn_mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
                  q_offset=q_offset, beyond=beyond, positions=positions)
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
        split = split_attn_mask(attn_mask, B, Lq, Lk, is_causal, q_offset)
        if split is None:
            return _fallback(q, k, v, site_mask, "its attention mask is not key padding (+ causal)", name, **kw)
        key_padding, causal, offset = split
        layout = site_mask.layout(Lq, Lk, block_for(site_mask, Lq, Lk), device=q.device, q_offset=q_offset,
                                  beyond=beyond)
        return kernel(q, k, v, layout, causal=causal, scale=scale, key_padding=key_padding, q_offset=offset)

    return backend


triton_backend = block_sparse_backend(sparse_attention, kernel_block, "triton", "the kernels")
triton_backend.__doc__ = """Masked attention for one site with the block-sparse kernels.

q: ``[B, Hq, Lq, D]``, k: ``[B, Hkv, Lk, D]``, v: ``[B, Hkv, Lk, Dv]`` on a CUDA device;
``site_mask``: the site's ``SiteMask``. Returns ``[B, Hq, Lq, Dv]``. A row with no kept key is 0.
"""


try:  # register when the registry exists (backends/__init__.py, owned by core-capture)
    from . import BACKENDS as _REG

    if "triton" not in _REG:
        _REG.add("triton", triton_backend)
except ImportError:  # pragma: no cover
    pass
