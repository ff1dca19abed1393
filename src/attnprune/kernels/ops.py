"""The block-sparse kernels as ``torch.library`` custom ops, for ``torch.compile`` (issue 9).

Under ``torch.compile`` the Python around a launch (layout objects, memo dicts, plans with cached
tensors) cannot be traced, so :func:`~attnprune.kernels.sparse_attention` calls two opaque ops
instead, whose non-tensor arguments are plain ints / floats / bools / strings:

* ``attnprune::sparse_fwd(q, k, v, kpm, handle, q_offset, beyond, causal, offset, scale, softcap) -> (o, lse)``
* ``attnprune::sparse_bwd(do, q, k, v, o, lse, kpm, handle, ..., dlse) -> (dq, dk, dv)`` (its autograd formula;
  ``lse`` is differentiable, so attention sinks can be folded in with plain torch ops on ``(o, lse)``)

``handle`` names a *layout source* in a registry of this module: a function ``(lq, lk, device,
q_offset, beyond) -> BlockLayout`` that the op calls when it runs, with the lengths of its real
inputs (so shapes may be dynamic). :func:`layout_handle` makes one while dynamo traces: it runs for
real at trace time (``torch.compiler.assume_constant_result``) and its int lands in the graph as a
constant, guarded by the identity of the object it was made from. The registry keeps every such
object alive (one entry per traced layout or site mask; only tracing adds entries).

Eager calls do not go through the ops (their dispatch costs host time per call): they launch
directly, as before; ``sparse_attention`` takes a handle eagerly too (then it runs the op), which
the tests use.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Optional

import torch

from ..errors import InvalidArgumentError

__all__ = ["layout_handle", "add_layout_source", "sparse_fwd", "sparse_bwd", "register_attention_autograd"]

# kind -> factory(obj) -> source(lq, lk, device, q_offset, beyond) -> BlockLayout
_FACTORIES: dict[str, Callable] = {}
_SOURCES: list[tuple[object, Callable]] = []  # handle -> (the object, kept alive; its layout source)
_HANDLES: dict[tuple[str, int], int] = {}  # (kind, id(object)) -> handle


def add_layout_source(kind: str, factory: Callable) -> None:
    """Register ``factory(obj) -> source`` under ``kind``; ``source(lq, lk, device, q_offset, beyond)``
    returns the :class:`~attnprune.kernels.BlockLayout` of a call (cheap when repeated: memoise)."""
    _FACTORIES[kind] = factory


def _layout_itself(layout):
    from .attention import _layout_on

    return lambda lq, lk, device, q_offset, beyond: _layout_on(layout, device)


add_layout_source("layout", _layout_itself)


@torch.compiler.assume_constant_result
def _handle(kind: str, obj_id: int) -> int:
    """Run at trace time (the result is a constant of the graph). ``obj_id`` is ``id()`` of an object
    that the frame being traced holds, so it is alive here; from here on the registry holds it, so its
    id is never reused while the graph (whose guards match that id) may run."""
    key = (kind, obj_id)
    h = _HANDLES.get(key)
    if h is None:
        obj = ctypes.cast(obj_id, ctypes.py_object).value
        _SOURCES.append((obj, _FACTORIES[kind](obj)))
        h = _HANDLES[key] = len(_SOURCES) - 1
    return h


def layout_handle(kind: str, obj) -> int:
    """The handle of ``obj``'s layout source of ``kind`` (``"layout"``: a fixed ``BlockLayout``; the
    block-sparse backends register one per site mask). Meant for traced code: dynamo turns ``id(obj)``
    into a constant guarded by the object's identity and runs :func:`_handle` once, at trace time.
    Eagerly it works too (a dict lookup)."""
    return _handle(kind, id(obj))


def _resolve(handle: int, lq: int, lk: int, device, q_offset: int, beyond: str):
    try:
        _, source = _SOURCES[handle]
    except IndexError:
        raise InvalidArgumentError(f"no layout source with handle {handle}: make it with layout_handle()") from None
    return source(lq, lk, device, q_offset, beyond)


def _launch_state(handle, q, k, causal: bool, q_offset: int, offset: int, beyond: str):
    """``(layout, plan)`` of an op call (the layout's own caches make repeats dict lookups)."""
    from .attention import _layout_on

    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    layout = _layout_on(_resolve(handle, Lq, Lk, q.device, q_offset, beyond), q.device)
    if layout.num_heads not in (1, Hq):
        raise InvalidArgumentError(
            f"layout has {layout.num_heads} heads but q has {Hq}; build it with one entry per query head")
    return layout, layout.plan(Lq, Lk, causal, offset)


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("attnprune::sparse_fwd", mutates_args=())
def sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: Optional[torch.Tensor], handle: int,
               q_offset: int, beyond: str, causal: bool, offset: int, scale: float,
               softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of :func:`~attnprune.kernels.sparse_attention` on the layout of ``handle`` (its
    ``q_offset``, ``beyond``: the layout's query offset and calibrated-region rule; ``causal``,
    ``offset``: the causal rule ``j <= i + offset``; ``softcap``: the logit cap, 0 for none). q, k, v: head
    dims already powers of two; kpm: int8 ``[B, Lk]`` or None. Returns ``(o [B, Hq, Lq, Dv], lse [B, Hq, Lq]
    float32, log2 domain, +inf for a row with no kept key)``."""
    from .attention import _forward

    q, k, v = _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v)
    layout, plan = _launch_state(handle, q, k, causal, q_offset, offset, beyond)
    o, lse, _, _ = _forward(q, k, v, kpm, layout, plan, scale, causal, offset, None, softcap or None)
    return o, lse


@sparse_fwd.register_fake
def _(q, k, v, kpm, handle, q_offset, beyond, causal, offset, scale, softcap=0.0):
    B, Hq, Lq, _ = q.shape
    return q.new_empty(B, Hq, Lq, v.shape[3]), q.new_empty(B, Hq, Lq, dtype=torch.float32)


@torch.library.custom_op("attnprune::sparse_bwd", mutates_args=())
def sparse_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, kpm: Optional[torch.Tensor], handle: int, q_offset: int, beyond: str, causal: bool,
               offset: int, scale: float, softcap: float = 0.0,
               dlse: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`sparse_fwd`: ``(dq, dk, dv)``, the kernels the eager autograd path runs;
    ``dlse``: the gradient of the (log2-domain) ``lse`` output, or None."""
    from . import _split
    from .attention import _backward, _placeholder

    q, k, v, o = _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v), _last_dim_dense(o)
    layout, plan = _launch_state(handle, q, k, causal, q_offset, offset, beyond)
    kpm_t = kpm if kpm is not None else _placeholder(q.device, torch.int8, 0)
    bits = layout.bits if layout.num_partial > 0 else _placeholder(q.device, torch.int32, -1)
    split = None
    if _split.split_enabled():
        split = layout.dkdv_split(q.shape[2], k.shape[2], causal, offset, q.shape[1], k.shape[1])
    return _backward(do, q, k, v, o, lse, kpm_t, bits, layout, plan, scale, causal, offset, kpm is not None, {},
                     split, softcap or None, dlse)[:3]


@sparse_bwd.register_fake
def _(do, q, k, v, o, lse, kpm, handle, q_offset, beyond, causal, offset, scale, softcap=0.0, dlse=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def register_attention_autograd(fwd_op, bwd_op, n_rest: int, lse_grad: bool = False) -> None:
    """Make ``bwd_op`` the autograd formula of ``fwd_op``, for ops of the form ``fwd_op(q, k, v, mask, *rest)
    -> (o, lse)`` and ``bwd_op(do, q, k, v, o, lse, mask, *rest) -> (dq, dk, dv)`` (``mask``: an optional
    tensor, ``rest``: ``n_rest`` non-tensor arguments). ``lse`` is not differentiable unless ``lse_grad``:
    then ``bwd_op`` takes its gradient as a last argument (None when nothing reached it)."""

    def setup_context(ctx, inputs, output):
        q, k, v, mask, *rest = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.rest = tuple(rest)
        if not lse_grad:
            ctx.mark_non_differentiable(lse)

    def backward(ctx, do, dlse):
        q, k, v, o, lse, mask = ctx.saved_tensors
        extra = (dlse,) if lse_grad else ()
        dq, dk, dv = bwd_op(do.contiguous(), q, k, v, o, lse, mask, *ctx.rest, *extra)
        return (dq, dk, dv) + (None,) * (1 + n_rest)

    fwd_op.register_autograd(backward, setup_context=setup_context)


register_attention_autograd(sparse_fwd, sparse_bwd, 7, lse_grad=True)  # handle, q_offset, beyond, causal, offset,
# scale, softcap
