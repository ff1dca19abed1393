"""Whole-model benchmark: prefill and one training step, dense SDPA versus synthetic AP-style masks.

Used by ``attnprune bench --model NAME`` (``smollm2``, ``gemma3-1b``, ``minilm``, ``tiny-llama``, ``tiny-bert``:
the architectures of the models of those names; Gemma 3's sliding-window layers run the windowed layouts). The model is built from a config with random weights (no
download). For every length it times, with batch ``batch``:

* ``dense``: the model as built (``attn_implementation="sdpa"``);
* ``no-attention``: every attention call replaced by a stand-in of (almost) no cost (the values,
  repeated over query-head groups), so ``dense - no-attention`` is attention's time;
* ``masked``, per sparsity: a synthetic block mask per site attached with ``attnprune.apply`` through
  ``backend``. Each head keeps the diagonal block, its left neighbour (local band) and random
  (causally reachable) blocks until ``1 - sparsity`` of the attendable blocks are kept.

Modes: ``prefill`` (forward under ``no_grad``, no KV cache) and ``train`` (forward with the LM loss,
backward, AdamW step). On CUDA the time is the median over ``reps`` runs after ``warmup``
(synchronised wall clock) and the peak memory is ``torch.cuda.max_memory_allocated``; on CPU the
time is wall clock and memory is reported as ``None`` ("n/a"). Mode ``decode`` (causal models):
greedy generation, dense vs masked vs masked with ``PrunedKVCache``, its own rows
(:mod:`attnprune.bench.decode`). :func:`run` sends each mode to its runner (``RUNNERS``).
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from dataclasses import asdict, dataclass, is_dataclass
from typing import Callable

import torch

from .._io import write_json
from ..errors import InvalidArgumentError, MissingDependencyError
from ..mask import PruneMask
from ..policies import check_sparsity
from ..environment import environment  # noqa: F401 - the record of this benchmark's files
from ..runtime import default_device
from .archs import (ALIASES, ARCH_ONLY, ARCHS, _transformers, build_model, discover_sites,  # noqa: F401 - re-exported
                    resolve_arch, synthetic_mask)
from .compiled import compiled_runner

GRID_MODES = ("prefill", "train")  # the prefill / train grid of this module
MODES = GRID_MODES + ("decode",)  # every mode (RUNNERS)
DEFAULT_MODES = GRID_MODES


def _no_attention(call):
    """Stand-in for attention of (almost) no cost: the values, repeated over query-head groups. When gradients
    are recorded, q and k get (zero) gradients through it too, as from a real attention, so the training step
    still runs their projections' backward (before 2026-12-05 it did not: that bound was ~2 matmuls per
    projection and layer too low)."""
    q, k, v = call.q, call.k, call.v
    hq, hkv, lq = q.shape[1], v.shape[1], q.shape[2]
    if hq != hkv:
        v = v.repeat_interleave(hq // hkv, dim=1)
    out = v[:, :, :lq] if v.shape[2] >= lq else v.new_zeros(v.shape[0], hq, lq, v.shape[3])
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        out = out + 0.0 * (q.sum() + k.sum())
    return out


# ---------------------------------------------------------------------------------- timing
@dataclass
class ModelBenchRow:
    arch: str
    length: int
    batch: int
    mode: str  # prefill or train
    variant: str  # dense, no-attention, masked
    backend: str  # sdpa, none, or the attnprune backend
    sparsity: float | None  # target (masked rows)
    achieved_sparsity: float | None
    ms: float | None
    peak_mib: float | None  # None on CPU (n/a)
    attention_share: float | None = None  # (ms - no-attention ms) / ms
    speedup_vs_dense: float | None = None
    note: str = ""
    compile: str | None = None  # the torch.compile mode of the row (attnprune.bench.compiled), None: eager


def _measure(fn, device, warmup: int, reps: int) -> tuple[float, float | None]:
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return statistics.median(times), peak


def _runners(model, ids, kind: str):
    def prefill():
        with torch.no_grad():
            if kind == "causal":
                model(input_ids=ids, use_cache=False)
            else:
                model(input_ids=ids)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def train():
        model.train()
        try:
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            model.eval()

    return {"prefill": prefill, "train": train}, opt


def check_masks(masks: dict[str, PruneMask], infos: dict, arch: str) -> None:
    """``InvalidArgumentError`` naming the first of ``masks`` (``{label: PruneMask}``) that does not fit
    the sites ``infos`` of the ``arch`` model (before any timing)."""
    for label, m in masks.items():
        try:
            m.check_model(infos)
        except Exception as e:
            raise InvalidArgumentError(f"mask {label}: it does not fit the {arch} architecture: {e}") from None


def mask_length(mask: PruneMask) -> int:
    """The calibrated query length of a (self-attention) mask: the longest site's ``q_len``."""
    return max(mask.site(s).q_len for s in mask.sites)


def check_modes(arch: str, modes, new_tokens: int = 64, lengths=(), batches=(), masks=None) -> str:
    """``InvalidArgumentError`` for an unknown mode, or for ``decode`` on an encoder, with fewer than 2
    new tokens or a mask too short for them (before any model is built); returns the ``ARCHS`` key."""
    arch = resolve_arch(arch)
    if not modes:
        raise InvalidArgumentError(f"no mode given: use {', '.join(MODES)}")
    for m in modes:
        if m not in RUNNERS:
            raise InvalidArgumentError(f"unknown mode {m!r}: use {', '.join(MODES)}")
    if "decode" in modes:
        from . import decode

        decode.check(arch, new_tokens, lengths, batches, masks)
    return arch


def run(arch: str, lengths, sparsities, *, backend: str = "reference", modes=DEFAULT_MODES, batch=1,
        block: int = 128, warmup: int = 1, reps: int = 3, device=None, dtype=None, log=print,
        masks: dict[str, PruneMask] | None = None, new_tokens: int = 64, decode_variants=None,
        compile_mode: str | None = None) -> list:
    """Run the grid; returns one row per (length, batch, mode, variant[, sparsity]): ``ModelBenchRow``
    (prefill, train) and ``decode.DecodeBenchRow`` (decode: ``lengths`` are the prompt lengths,
    ``new_tokens`` generated). ``batch``: an int or a sequence of them.

    masks: ``{label: PruneMask}`` of real masks (e.g. saved by ``attnprune eval --save-masks``), each
    timed at its calibrated length (which is added to ``lengths``) as variant ``ap-mask`` (``note``: the
    label), next to a synthetic mask of the same achieved sparsity (variant ``masked``, ``note``
    ``"density of <label>"``). The masks must match the model's sites (checked before timing).
    Decode: see :func:`attnprune.bench.decode.run` (``decode_variants``: its ``variants``).
    compile_mode: every prefill / train row under ``torch.compile`` as :data:`attnprune.bench.compiled.COMPILE_MODES`
    says (None: eager)."""
    batches = [batch] if isinstance(batch, int) else [int(b) for b in batch]
    lengths = [int(n) for n in lengths]
    if not lengths or any(n < 1 for n in lengths):
        raise InvalidArgumentError(f"lengths must be positive integers, got {lengths}")
    arch = check_modes(arch, modes, new_tokens, lengths, batches, masks)
    from .compiled import check_compile

    check_compile(compile_mode, modes)
    groups: dict[Callable, list[str]] = {}
    for m in dict.fromkeys(modes):
        groups.setdefault(RUNNERS[m], []).append(m)
    rows: list = []
    for runner, ms in groups.items():
        rows += runner(arch, lengths, sparsities, modes=ms, batches=batches, backend=backend, block=block,
                       warmup=warmup, reps=reps, device=device, dtype=dtype, log=log, masks=masks,
                       new_tokens=new_tokens, decode_variants=decode_variants,
                       **({"compile_mode": compile_mode} if compile_mode else {}))
    return rows


def _decode(arch, lengths, sparsities, *, modes, batches, masks, new_tokens, decode_variants, **kw) -> list:
    from . import decode

    return decode.run(arch, lengths, sparsities, batches=batches, new_tokens=new_tokens, masks=masks,
                      variants=decode_variants, **kw)


def _grid(arch: str, lengths, sparsities, *, modes, batches, backend: str, block: int, warmup: int, reps: int,
          device, dtype, log, masks: dict[str, PruneMask] | None, new_tokens: int,
          decode_variants=None, compile_mode: str | None = None) -> list[ModelBenchRow]:
    """The prefill / train grid of :func:`run` (``new_tokens``, ``decode_variants`` unused)."""
    from ..apply import apply
    from ..capture import intercept

    sparsities = [check_sparsity(s) for s in sparsities]
    lengths = [int(n) for n in lengths]
    if not lengths or any(n < 1 for n in lengths):
        raise InvalidArgumentError(f"lengths must be positive integers, got {lengths}")
    if not batches or min(batches) < 1 or block < 1 or reps < 1 or warmup < 0:
        raise InvalidArgumentError("batch, block and reps must be >= 1, warmup >= 0")
    device = default_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from ..backends import BACKENDS

    BACKENDS.get(backend)  # MissingDependencyError early, before building anything
    real = dict(masks or {})
    lengths = list(dict.fromkeys(lengths + sorted({mask_length(m) for m in real.values()})))
    model, cfg, kind = build_model(arch, max(lengths), device, dtype)
    model.eval()
    infos = discover_sites(model, cfg.vocab_size, device)
    check_masks(real, infos, arch)
    rows: list[ModelBenchRow] = []
    for n, batch in itertools.product(lengths, batches):
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(0, cfg.vocab_size, (batch, n), generator=g).to(device)
        here = {label: m for label, m in real.items() if mask_length(m) == n}
        masks = {s: synthetic_mask(infos, n, s, block, seed=n) for s in sparsities}
        matched = {label: synthetic_mask(infos, n, float(m.sparsity), m.block or block, seed=n)
                   for label, m in here.items()}
        fns, opt = _runners(model, ids, kind)
        for mode in modes:
            fn = fns[mode]
            base: dict[str, float | None] = {}

            def one(variant, bk, ctx, s=None, achieved=None, label=""):
                note = label
                try:
                    with ctx() if ctx is not None else contextlib.nullcontext():
                        run_fn = fn
                        if compile_mode:
                            run_fn, secs = compiled_runner(model, lambda m: _runners(m, ids, kind)[0][mode],
                                                           compile_mode, device)
                            note = "; ".join(filter(None, [f"compiled in {secs:.1f} s", label]))
                        ms, peak = _measure(run_fn, device, warmup, reps)
                except torch.OutOfMemoryError:
                    ms, peak, note = None, None, "out of memory" + (f"; {label}" if label else "")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    opt.zero_grad(set_to_none=True)
                except Exception as e:  # noqa: BLE001 - a model that does not compile is this row's result
                    if not compile_mode:
                        raise
                    first = (str(e).strip().splitlines() or [""])[0][:200]
                    ms, peak, note = None, None, f"compile failed: {type(e).__name__}: {first}"
                row = ModelBenchRow(arch, n, batch, mode, variant, bk, s, achieved, ms, peak, note=note,
                                    compile=compile_mode)
                rows.append(row)
                log(f"{arch} L={n} {mode:7s} {variant:12s} {bk:9s} s={s} ms={_fmt(ms)} peak_MiB={_fmt(peak)} {note}")
                return row

            dense = one("dense", "sdpa", None)
            noatt = one("no-attention", "none", lambda: intercept(model, _no_attention))
            base["dense"], base["none"] = dense.ms, noatt.ms
            for s in sparsities:
                mk = masks[s]
                one("masked", backend, lambda mk=mk: apply(model, mk, backend=backend), s, round(mk.sparsity, 4))
            for label, mk in here.items():
                one("ap-mask", backend, lambda mk=mk: apply(model, mk, backend=backend), mk.meta.get("target_sparsity"),
                    round(mk.sparsity, 4), label=label)
                syn = matched[label]
                one("masked", backend, lambda mk=syn: apply(model, mk, backend=backend), round(float(here[label].sparsity), 4),
                    round(syn.sparsity, 4), label=f"density of {label}")
            for r in rows:
                if r.length == n and r.batch == batch and r.mode == mode and r.ms:
                    if base["none"] is not None and r.variant != "no-attention":
                        r.attention_share = round(max(0.0, (r.ms - base["none"]) / r.ms), 4)
                    if base["dense"] is not None:
                        r.speedup_vs_dense = round(base["dense"] / r.ms, 3)
        del opt, fns
    if compile_mode:
        torch._dynamo.reset()
    return rows


RUNNERS: dict[str, Callable] = {"prefill": _grid, "train": _grid, "decode": _decode}  # mode -> its runner


# ---------------------------------------------------------------------------------- output
def _fmt(x, nd=1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def markdown_table(rows: list) -> str:
    """The Markdown tables of ``rows``: one per kind of row (``TABLES``, by mode), blank-line separated."""
    groups: dict[Callable, list] = {}
    for r in rows:
        groups.setdefault(TABLES[r.mode], []).append(r)
    return "\n\n".join(table(rs) for table, rs in groups.items()) if groups else _grid_table([])


def _decode_table(rows: list) -> str:
    from . import decode

    return decode.markdown_table(rows)


def _grid_table(rows: list[ModelBenchRow]) -> str:
    head = ("| model | length | batch | mode | variant | backend | sparsity (achieved) | ms | peak MiB "
            "| attention share | speedup vs dense |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        sp = "" if r.sparsity is None else f"{r.sparsity:g} ({r.achieved_sparsity:.3f})"
        share = "" if r.attention_share is None else f"{100 * r.attention_share:.0f}%"
        ms = _fmt(r.ms, 2) + (f" ({r.note})" if r.note else "")
        mode = r.mode if r.compile is None else f"{r.mode} (compiled, {r.compile})"
        lines.append(f"| {r.arch} | {r.length} | {r.batch} | {mode} | {r.variant} | {r.backend} | {sp} | {ms} "
                     f"| {_fmt(r.peak_mib, 0)} | {share} | {'' if r.speedup_vs_dense is None else r.speedup_vs_dense} |")
    return "\n".join(lines)


TABLES: dict[str, Callable] = {"prefill": _grid_table, "train": _grid_table, "decode": _decode_table}


def save(path, payload: dict) -> None:
    payload = dict(payload)
    payload["rows"] = [asdict(r) if is_dataclass(r) else r for r in payload.get("rows", [])]
    write_json(path, payload)
