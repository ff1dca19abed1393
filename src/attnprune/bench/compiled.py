"""The whole-model benchmark under ``torch.compile`` (``attnprune bench --model ... --compile MODE``).

At small batches a masked model spends its time on the host (Python and launches per attention call,
BENCHMARKS.md); compiled, the same model runs as one graph, and with ``mode="reduce-overhead"`` as CUDA
graphs. Every row of a compiled run (dense, no-attention, masked) is compiled the same way, so the
speed-ups compare like with like.

``COMPILE_MODES`` (a registry): name -> ``torch.compile`` keyword arguments. ``aot_eager`` traces the model
without generating code (no speed-up: it shows that the model compiles, quickly, e.g. on a CPU).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..errors import InvalidArgumentError

COMPILE_MODES: dict[str, dict] = {
    "default": {},
    "reduce-overhead": {"mode": "reduce-overhead"},
    "max-autotune": {"mode": "max-autotune"},
    "aot_eager": {"backend": "aot_eager"},
}


def check_compile(name: str | None, modes) -> None:
    """``InvalidArgumentError`` for an unknown compile mode, or one asked for with decode rows."""
    if name is None:
        return
    if name not in COMPILE_MODES:
        raise InvalidArgumentError(f"unknown compile mode {name!r}: use {', '.join(COMPILE_MODES)}")
    if "decode" in modes:
        raise InvalidArgumentError("--compile times prefill and train rows; decode has its own CUDA-graph "
                                   "variants (--decode-variants dense-graph pruned-graph)")


def compiled_runner(model, make_runner: Callable[[torch.nn.Module], Callable[[], None]], name: str,
                    device) -> tuple[Callable[[], None], float]:
    """``(fn, compile_s)``: ``make_runner(m)`` (a prefill or train step calling ``m``) on ``model`` compiled
    as ``name`` says (``fullgraph=True``: a graph break is an error, not a silent slow path), after one eager
    call (attnprune's capture path narrows its hooks on a model's first forward); ``compile_s``: the wall time
    of the first compiled call. Dynamo's caches are reset first: each row compiles its own graph."""
    make_runner(model)()  # eager first
    torch._dynamo.reset()
    fn = make_runner(torch.compile(model, fullgraph=True, **COMPILE_MODES[name]))
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return fn, time.perf_counter() - t0
