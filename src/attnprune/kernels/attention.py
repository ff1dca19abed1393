"""``sparse_attention``: block-sparse attention with Triton forward and backward kernels.

Only the blocks a :class:`~attnprune.kernels.BlockLayout` keeps are computed (forward, ``dq`` and
``dk``/``dv``); there is no dense fallback. Semantics, for query ``i`` and key ``j`` of head ``h``::

    allowed(i, j) = layout keeps (h, i, j)            # block flag, and the bitmask for partial blocks
                    and (not causal or j <= i + q_offset)
                    and key_padding[b, j]             # when given
    out[i] = softmax over allowed j of (q_i . k_j * scale) applied to v

A query row with no allowed key returns zeros, and its gradients (to q, and from it to k and v)
are exactly zero.

Backward: ``dq`` one program per query tile; ``dk``/``dv`` one program per kv tile, except that kv
tiles with far more work than the mean (the sink column of real masks) are cut into chunks, each
its own program, summed in a fixed order afterwards (:mod:`attnprune.kernels._split`;
``ATTNPRUNE_DKDV_SPLIT=0`` turns that off).
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError, MissingDependencyError
from . import _split
from ._inputs import _check_inputs, _padded_call, key_padding_bool  # noqa: F401 - key_padding_bool re-exported
from .config import _LOG2E, cap_args, get_config
from .layout import BlockLayout, LayoutPlan

__all__ = ["sparse_attention", "attention_by_handle", "key_padding_bool"]



def _kernels():
    try:
        from . import _triton
    except ImportError as e:  # pragma: no cover - depends on the install
        raise MissingDependencyError(
            "the triton backend needs the 'triton' package: pip install 'attnprune[kernels]'"
        ) from e
    return _triton


def _kernels_bwd():
    from . import _triton_bwd

    return _triton_bwd


def _layout_on(layout: BlockLayout, device: torch.device) -> BlockLayout:
    if layout.device == device:
        return layout
    key = ("device", str(device))
    moved = layout._cache.get(key)
    if moved is None:
        moved = layout.to(device)
        layout._cache[key] = moved
    return moved


def _placeholder(device: torch.device, dtype: torch.dtype, fill: int, shape: tuple = (1,)) -> torch.Tensor:
    """A small tensor (1 element unless ``shape``) standing in for an absent kernel argument (no key
    padding, no bitmask), made once per (device, dtype, fill, shape): no allocation or fill kernel per
    call. Never written."""
    key = (device, dtype, fill, tuple(shape))
    t = _PLACEHOLDERS.get(key)
    if t is None:
        t = torch.full(tuple(shape), fill, dtype=dtype, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):  # not in a graph's pool
            _PLACEHOLDERS[key] = t
    return t


_PLACEHOLDERS: dict = {}


def _fwd_launch(layout: BlockLayout, B: int, Hq: int, Lq: int, D: int, configs, device: torch.device):
    """``(cfg, grid, nw)`` of a forward launch, memoised per layout and call shape (not with an override
    table ``configs``: benchmarks pass those, and may change them between calls)."""
    key = ("fwd-launch", B, Hq, Lq, D, device)
    hit = None if configs else layout._cache.get(key)
    if hit is None:
        cfg = (configs or {}).get("fwd") or get_config("fwd", D, layout.block)
        hit = (cfg, (triton_cdiv(Lq, cfg.block_m), B * Hq), (layout.block[1] + 31) // 32)
        if not configs:
            layout._cache[key] = hit
    return hit


def _forward(q, k, v, kpm, layout: BlockLayout, plan: LayoutPlan, scale: float, causal: bool, q_offset: int,
             configs, softcap: float | None = None, sinks2: torch.Tensor | None = None):
    """The forward kernel's launch: ``(o [B, Hq, Lq, DV], lse [B, Hq, Lq] float32, kpm_t, bits)``,
    the last two being the key-padding and bitmask arguments it got (placeholders when absent).
    ``sinks2``: the heads' sink logits in the log2 domain (:func:`_sink_log2`), folded into ``o`` and
    ``lse`` by the kernel's epilogue (what :func:`_with_sinks` does with torch ops), or None."""
    tk = _kernels()
    B, Hq, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    bq, bk = layout.block
    cfg, grid, nw = _fwd_launch(layout, B, Hq, Lq, D, configs, q.device)
    o = torch.empty(B, Hq, Lq, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    has_kpm = kpm is not None
    kpm_t = kpm if has_kpm else _placeholder(q.device, torch.int8, 0)
    has_bits = layout.num_partial > 0
    bits = layout.bits if has_bits else _placeholder(q.device, torch.int32, -1)
    has_sinks = sinks2 is not None
    sink_t = sinks2.reshape(-1).contiguous() if has_sinks else _placeholder(q.device, torch.float32, 0)
    use_tma = bool(cfg.tma) and k.is_contiguous() and v.is_contiguous()
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd = TensorDescriptor.from_tensor(k.view(B * Hkv * Lk, D), [cfg.block_n, D])
        vd = TensorDescriptor.from_tensor(v.view(B * Hkv * Lk, DV), [cfg.block_n, DV])
    else:
        kd, vd = k, v
    tk._fwd_kernel[grid](
        q, k, v, o, lse, kpm_t, bits, kd, vd, sink_t,
        plan.fwd_ptr, plan.fwd_nclean, plan.fwd_col, plan.fwd_code,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        kpm_t.stride(0) if has_kpm else 0,
        Hq, Hq // Hkv, layout.num_heads, Lq, Lk, layout.q_blocks, scale * _LOG2E, q_offset,
        BQ=bq, BK=bk, NW=nw, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D=D, DV=DV,
        CAUSAL=causal, HAS_KPM=has_kpm, HAS_BITS=has_bits, USE_TMA=use_tma, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, HAS_SINKS=has_sinks, **cap_args(scale, softcap, q),
    )
    return o, lse, kpm_t, bits


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kpm, layout: BlockLayout, plan: LayoutPlan, scale: float, causal: bool,
                q_offset: int, configs, split, sinks=None, softcap=None):
        s2 = None if sinks is None else _sink_log2(sinks.detach())
        o, lse, kpm_t, bits = _forward(q, k, v, kpm, layout, plan, scale, causal, q_offset, configs, softcap, s2)
        ctx.save_for_backward(q, k, v, o, lse, kpm_t, bits)
        ctx.layout, ctx.plan, ctx.scale, ctx.causal, ctx.q_offset = layout, plan, scale, causal, q_offset
        ctx.has_kpm, ctx.configs, ctx.split = kpm is not None, configs, split
        ctx.sinks = None if sinks is None else (s2, sinks.dtype, sinks.requires_grad)
        ctx.softcap = softcap
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm_t, bits = ctx.saved_tensors
        dq, dk, dv, delta = _backward(do, q, k, v, o, lse, kpm_t, bits, ctx.layout, ctx.plan, ctx.scale,
                                      ctx.causal, ctx.q_offset, ctx.has_kpm, ctx.configs, ctx.split, ctx.softcap)
        ds = None
        if ctx.sinks is not None and ctx.sinks[2]:
            # the sink is a key of value 0: dL/ds_h = -sum over rows of p_sink * (dO . O), the
            # backward's own delta = rowsum(dO * O)
            s2, dtype, _ = ctx.sinks
            ds = -(torch.exp2(s2 - lse) * delta).sum((0, 2)).to(dtype)
        return dq, dk, dv, None, None, None, None, None, None, None, None, ds, None


def _sink_log2(sinks: torch.Tensor) -> torch.Tensor:
    """Sink logits ``[Hq]`` as ``[1, Hq, 1]`` float32 in the kernels' log2 domain (differentiable: the
    compiled path folds sinks in with torch ops; the eager autograd Function runs without grad)."""
    return sinks.float().reshape(1, -1, 1) * _LOG2E


def _with_sinks(o: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """Fold the heads' sink logits ``sinks [Hq]`` into a forward's ``o [B, Hq, Lq, DV]`` and log2-domain
    ``lse [B, Hq, Lq]`` (``+inf``: a row with no kept key): ``(o * Z / (Z + e^s), log2(Z + e^s))`` per row,
    which is what a softmax over the kept keys and the sink gives (the sink holds no value). The
    backward kernels then need nothing else: with this ``o`` and ``lse`` their gradients for q, k, v are
    those of the sink softmax; a row with no kept key gets ``lse = s`` and stays 0."""
    s2 = _sink_log2(sinks)
    keys = lse.masked_fill(lse == float("inf"), float("-inf"))
    total = torch.logaddexp2(keys, s2)
    o = (o.float() * torch.exp2(keys - total)[..., None]).to(o.dtype)
    return o, total


def _backward(do, q, k, v, o, lse, kpm_t, bits, layout: BlockLayout, plan: LayoutPlan, scale: float, causal: bool,
              q_offset: int, has_kpm: bool, configs: dict, split, softcap: float | None = None, dlse=None):
    """The backward launches (delta, dq, dk/dv): ``(dq, dk, dv, delta)`` (``delta [B, Hq, Lq]`` float32:
    ``rowsum(dO * O)``, lowered by ``dlse`` when given). ``kpm_t``, ``bits``: what the forward
    got (placeholders when absent); ``split``: the dK/dV chunk table or None; ``softcap``: the logit cap;
    ``dlse``: a gradient of the log2-domain ``lse`` too (its path adds ``P * dlse * log2(e)`` to the
    scores' gradient: ``delta`` lowered by ``dlse * log2(e)``), or None."""
    tk = _kernels()
    B, Hq, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    bq, bk = layout.block
    nw = (bk + 31) // 32
    do = do.contiguous() if do.stride(-1) != 1 else do
    delta = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    tk._delta_kernel[(triton_cdiv(Lq, 64), B * Hq)](
        o, do, delta, *o.stride(), *do.stride(), Hq, Lq, BLOCK_M=64, DV=DV, num_warps=4)
    if dlse is not None:
        delta = delta - dlse.float() * _LOG2E
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    kpm_s = kpm_t.stride(0) if has_kpm else 0
    common = dict(BQ=bq, BK=bk, NW=nw, D=D, DV=DV, CAUSAL=causal, HAS_KPM=has_kpm,
                  HAS_BITS=layout.num_partial > 0, **cap_args(scale, softcap, q))
    qk_scale = scale * _LOG2E

    cfg = configs.get("dq") or get_config("dq", D, layout.block)
    tk._dq_kernel[(triton_cdiv(Lq, cfg.block_m), B * Hq)](
        q, k, v, do, dq, lse, delta, kpm_t, bits,
        plan.fwd_ptr, plan.fwd_nclean, plan.fwd_col, plan.fwd_code,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), kpm_s,
        Hq, Hq // Hkv, layout.num_heads, Lq, Lk, layout.q_blocks, qk_scale, scale, q_offset,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        PRESCALE=cfg.prescale, **common,
    )
    cfg = configs.get("dkdv") or get_config("dkdv", D, layout.block)
    if split is not None:
        _dkdv_split_launch(split, cfg, q, k, v, do, dk, dv, lse, delta, kpm_t, bits, plan, layout, common,
                           kpm_s, qk_scale, scale, q_offset)
        return dq, dk, dv, delta
    tk._dkdv_kernel[(triton_cdiv(Lk, cfg.block_n), B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, kpm_t, bits,
        plan.bwd_ptr, plan.bwd_nclean, plan.bwd_row, plan.bwd_code,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), kpm_s,
        Hq, Hkv, Hq // Hkv, layout.num_heads, Lq, Lk, layout.k_blocks, qk_scale, scale, q_offset,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        PRESCALE=cfg.prescale, **common,
    )
    return dq, dk, dv, delta


def _dkdv_split_launch(sp, cfg, q, k, v, do, dk, dv, lse, delta, kpm_t, bits, plan, layout, common, kpm_s,
                       qk_scale, scale, q_offset):
    """dK/dV through the work items of ``sp`` (a :class:`~attnprune.kernels._split.DkdvSplit`): one
    launch over all items (split tiles' chunks into fp32 scratch ``[n_slots, B*hg, bk, d]``), then
    the in-order reduction of the split tiles. No host synchronisation: sizes come from ``sp``."""
    tb = _kernels_bwd()
    B, Hq, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    bk = layout.block[1]
    nbg = B * sp.hg
    sk = torch.empty(sp.n_slots, nbg, bk, D, dtype=torch.float32, device=q.device)
    sv = torch.empty(sp.n_slots, nbg, bk, DV, dtype=torch.float32, device=q.device)
    tb._dkdv_items_kernel[(sp.n_items * (bk // cfg.block_n) * nbg,)](
        q, k, v, do, dk, dv, sk, sv, lse, delta, kpm_t, bits,
        plan.bwd_ptr, plan.bwd_nclean, plan.bwd_row, plan.bwd_code, sp.items,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), kpm_s,
        Hq, sp.hg, nbg, Hq // Hkv, layout.num_heads, Lq, Lk, layout.k_blocks, qk_scale, scale, q_offset,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        PRESCALE=cfg.prescale, **common,
    )
    if not sp.n_split:  # a table built with force=True (benchmarks) may split nothing
        return
    br = 16  # reduction rows per program: many small programs (a few KiB each)
    tb._dkdv_reduce_kernel[(sp.n_split * (bk // br), nbg)](
        sk, sv, dk, dv, sp.reduce, *dk.stride(), *dv.stride(), sp.hg, nbg, Lk, scale,
        BK=bk, BLOCK_R=br, D=D, DV=DV, num_warps=2 if max(D, DV) <= 64 else 4,
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | int,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    q_offset: int = 0,
    configs: dict | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention computed only on the blocks ``layout`` keeps (Triton kernels, differentiable).

    Args:
        q: ``[batch, q_heads, Lq, d]``.
        k: ``[batch, kv_heads, Lk, d]``; ``q_heads`` must be a multiple of ``kv_heads`` (GQA).
        v: ``[batch, kv_heads, Lk, dv]``.
        layout: :class:`BlockLayout` with ``num_heads`` equal to ``q_heads`` (or 1, shared by all
            heads), covering at least ``Lq`` x ``Lk`` tokens; or an int handle of a layout source
            (:func:`attnprune.kernels.ops.layout_handle`).
        causal: query ``i`` sees key ``j`` only if ``j <= i + q_offset`` (``q_offset=0`` is
            SDPA's top-left alignment; a KV-cache decode step uses ``Lk - Lq``).
        scale: score scale, default ``1 / sqrt(d)``.
        key_padding: bool ``[batch, Lk]`` (True = real key, may be attended), or int ``[batch]``
            of per-sequence key lengths (keys ``0..len-1`` are real).
        configs: optional ``{"fwd"|"dq"|"dkdv": KernelConfig}`` overriding the tuned table.
        sinks: optional ``[q_heads]`` attention-sink logits (gpt-oss): each row's softmax also counts
            ``exp(sinks[h])`` in its denominator (the sink holds no value); differentiable. Eager calls
            only (not through a handle or under ``torch.compile``).
        softcap: optional logit cap ``c`` (Gemma 2): scores ``c * tanh(q.k * scale / c)``; eager only.

    Returns:
        ``[batch, q_heads, Lq, dv]`` in ``q``'s dtype. A query row with no allowed key is zero and
        gets zero gradient.

    Supported: fp16, bf16 and fp32 (fp32 matmuls use TF32 on GPUs); any head dim up to 256
    (padded to a power of two internally). On the CPU the kernels run only under Triton's
    interpreter (``TRITON_INTERPRET=1``, for tests).

    Under ``torch.compile`` (or given a handle) the kernels run through the custom ops of
    :mod:`attnprune.kernels.ops`, which dynamo traces as single nodes (``configs`` is then ignored);
    eagerly they are launched directly.
    """
    _check_inputs(q, k, v)
    if softcap is not None and not float(softcap) > 0:
        raise InvalidArgumentError(f"softcap must be positive, got {softcap}")
    if sinks is not None:
        if tuple(sinks.shape) != (q.shape[1],) or not sinks.is_floating_point():
            raise InvalidArgumentError(f"sinks must be float [q_heads] = [{q.shape[1]}], got "
                                       f"{sinks.dtype} {tuple(sinks.shape)}")
        sinks = sinks.to(q.device)
    if isinstance(layout, int) or torch.compiler.is_compiling():
        handle = layout if isinstance(layout, int) else _ops().layout_handle("layout", layout)
        return attention_by_handle(q, k, v, handle, causal=causal, scale=scale, key_padding=key_padding,
                                   q_offset=q_offset, sinks=sinks, softcap=softcap)
    Hq = q.shape[1]
    if layout.num_heads not in (1, Hq):
        raise InvalidArgumentError(
            f"layout has {layout.num_heads} heads but q has {Hq}; build it with one entry per query head"
        )

    def run(q, k, v, kpm, scale):
        lay = _layout_on(layout, q.device)
        Lq, Lk = q.shape[2], k.shape[2]
        plan = lay.plan(Lq, Lk, causal, q_offset)
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                            or (sinks is not None and sinks.requires_grad))
        split = None  # dK/dV chunk table, built (once per plan and head grouping) only when a backward may follow
        if grad and _split.split_enabled():
            split = lay.dkdv_split(Lq, Lk, causal, q_offset, Hq, k.shape[1])
        if grad:
            return _SparseAttention.apply(q, k, v, kpm, lay, plan, scale, bool(causal), int(q_offset),
                                          configs or {}, split, sinks, softcap)
        # no backward can follow: the launch without autograd's bookkeeping
        s2 = None if sinks is None else _sink_log2(sinks)
        return _forward(q, k, v, kpm, lay, plan, scale, bool(causal), int(q_offset), configs, softcap, s2)[0]

    return _padded_call(q, k, v, scale, key_padding, run)


def attention_by_handle(q, k, v, handle: int, *, causal: bool = False, scale: float | None = None,
                        key_padding: torch.Tensor | None = None, q_offset: int = 0, layout_q_offset: int = 0,
                        beyond: str = "error", sinks: torch.Tensor | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """:func:`sparse_attention` through the ``attnprune::sparse_fwd`` custom op (traceable by dynamo as one
    node; differentiable through its registered backward) on the layout that the source ``handle``
    (:func:`attnprune.kernels.ops.layout_handle`) gives for ``(Lq, Lk, device, layout_q_offset, beyond)``.
    ``causal``, ``q_offset``: the causal rule ``j <= i + q_offset``, as in :func:`sparse_attention`;
    ``sinks``, ``softcap`` as there (sinks folded into the op's ``(o, lse)`` with differentiable torch ops)."""
    _check_inputs(q, k, v)

    def run(q, k, v, kpm, scale):
        o, lse = _ops().sparse_fwd(q, k, v, kpm, handle, layout_q_offset, beyond, bool(causal), q_offset, scale,
                                   float(softcap or 0.0))
        return o if sinks is None else _with_sinks(o, lse, sinks.to(q.device))[0]

    return _padded_call(q, k, v, scale, key_padding, run)


def _ops():
    from . import ops

    return ops
