"""Decode benchmark: dense vs masked (stock cache) vs masked with ``PrunedKVCache``.

Used by ``attnprune bench --model NAME --model-modes decode`` and ``bench/decode_bench.py``. The model
(a causal architecture of :mod:`attnprune.bench.model`, random weights) generates greedily
``new_tokens`` tokens after a ``context``-token prompt of random ids, per batch size:

* ``dense``: the model as built (SDPA, transformers' ``DynamicCache``);
* ``masked``: a mask attached with ``attnprune.apply`` through ``backend``, the stock cache;
* ``pruned``: the same mask, generation into ``attnprune.PrunedKVCache(model, mask)``;
* ``dense-graph``: the dense model through ``attnprune.decode_greedy`` into transformers' ``StaticCache``,
  each decode step replayed as a CUDA graph (the strongest dense baseline: no host work per step);
* ``pruned-graph``: the mask attached, ``decode_greedy`` into ``PrunedKVCache``, each step replayed as
  a CUDA graph (compactions eager between replays).

The graph variants run by default on CUDA only (``variants``: any subset, in this order). A graph
variant that fails (e.g. the capture) records ``error`` and the run goes on.

The mask is synthetic (:func:`band_mask`: a sink block column and a band of diagonal blocks, about
``sparsity`` of the causal blocks dropped) or a real one (``masks``: decoded at its calibrated
length minus ``new_tokens`` and the bare steps, next to a band mask of the same sparsity).

Per row: the time of a 1-token generation (``prefill_ms``); decode tokens/s, ``batch x (new_tokens
- 1)`` over the time of the ``new_tokens`` generation minus that of the 1-token one (medians over
``reps``); the median of ``steps`` bare single-token forwards (no ``generate``); on CUDA the peak
memory during the generation and the memory after the bare steps, over the weights (``None`` on
the CPU); for ``pruned`` the bytes the cache holds against a dense cache's and whether its tokens
equal the ``masked`` ones.

Graph variants: ``decode_tok_s`` is ``batch x replayed steps`` over their wall time, from the first
replay after the capture to the end of the generation (compactions included; the warm-up steps and the
capture excluded, reported in ``graph``: ``capture_s``, ``replays``, ``eager_steps``, ...);
``bare_step_ms`` the mean of those steps; ``prefill_ms`` the prompt forward alone;
``same_tokens_as_dense`` / ``same_tokens_as_masked`` compare with ``dense`` / ``masked``. Every variant
generates exactly ``new_tokens`` (the model's eos id is cleared: no eos suppression by ``generate``).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError
from ..mask import PruneMask, SiteMask
from ..policies import check_sparsity
from ..runtime import default_device
from .model import (ARCHS, _fmt, _transformers, build_model, check_masks, discover_sites, mask_length,
                    resolve_arch)

VARIANTS = ("dense", "masked", "pruned")  # the default off CUDA
GRAPH_VARIANTS = ("dense-graph", "pruned-graph")
ALL_VARIANTS = ("dense", "dense-graph", "masked", "pruned", "pruned-graph")  # the default on CUDA
BARE_STEPS = 16  # single-token forwards timed one by one (bare_step_ms)
SYNTHETIC = "sink+band"


@dataclass
class DecodeBenchRow:
    arch: str
    context: int  # prompt tokens
    batch: int
    variant: str  # dense, masked (stock cache), pruned (PrunedKVCache)
    backend: str  # sdpa (dense) or the attnprune backend
    mask: str | None  # "sink+band" (synthetic) or the label of a real mask; None for dense
    sparsity: float | None  # target
    achieved_sparsity: float | None
    new_tokens: int
    prefill_ms: float | None  # a 1-token generation
    decode_tok_s: float | None
    bare_step_ms: float | None
    peak_mib_over_weights: float | None  # None on the CPU
    steady_mib_over_weights: float | None  # after the bare steps: the cache in its steady state; None on the CPU
    kv_bytes: dict | None = None  # pruned: PrunedKVCache.kv_bytes() after the generation
    kv_share: float | None = None  # pruned: bytes held / a dense cache's
    same_tokens_as_masked: bool | None = None  # pruned, pruned-graph
    same_tokens_as_dense: bool | None = None  # dense-graph
    graph: dict | None = None  # graph variants: decode_greedy's stats of the timed generation
    error: str | None = None  # a variant that failed: why (the run goes on)
    note: str = ""
    mode: str = "decode"


def band_mask(infos: dict, length: int, block: int, sparsity: float) -> tuple[PruneMask, float]:
    """Sink block column + a band of diagonal blocks, wide enough for ~``sparsity`` of the causal
    blocks dropped, for every site of ``infos``; returns the mask and the achieved sparsity."""
    nb = -(-length // block)
    i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    width = max(1, round((1 - sparsity) * nb / 2))
    keep = ((j == 0) | ((i - j >= 0) & (i - j < width))) & (j <= i)
    sms = [SiteMask(info, length, length, keep=keep.expand(info.num_heads, nb, nb).clone(), block=block)
           for info in infos.values()]
    achieved = 1 - keep.sum().item() / (nb * (nb + 1) / 2)
    meta = {"model": {"name": "decode-bench", "num_sites": len(sms), "sites": list(infos)},
            "policy": SYNTHETIC, "block": block, "target_sparsity": sparsity, "sparsity": achieved}
    return PruneMask(sms, meta), achieved


def mask_context(mask: PruneMask, new_tokens: int, steps: int = BARE_STEPS) -> int:
    """The prompt length a real mask is decoded at: its calibrated length less the generated tokens
    and the bare steps (all of them must lie inside the calibrated region)."""
    return mask_length(mask) - new_tokens - steps


def check(arch: str, new_tokens, contexts=(), batches=(), masks=None, steps: int = BARE_STEPS) -> str:
    """``InvalidArgumentError`` unless a decode run of these arguments can start; returns the arch."""
    arch = resolve_arch(arch)
    if ARCHS[arch](_transformers(), 1)[2] != "causal":
        raise InvalidArgumentError(f"decode needs a causal (decoder-only) model; {arch} is an encoder "
                                   f"(use --model-modes prefill,train for it)")
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise InvalidArgumentError(f"--new-tokens must be an integer >= 2 (decode tok/s is the time of N tokens "
                                   f"minus that of 1), got {new_tokens}")
    if any(int(c) < 1 for c in contexts) or any(int(b) < 1 for b in batches):
        raise InvalidArgumentError(f"decode contexts (--lengths) and batches must be >= 1, got "
                                   f"{list(contexts)} and {list(batches)}")
    for label, m in (masks or {}).items():
        if mask_context(m, new_tokens, steps) < 1:
            raise InvalidArgumentError(f"mask {label}: its calibrated length {mask_length(m)} leaves no prompt for "
                                       f"{new_tokens} new tokens and {steps} bare steps (lower --new-tokens)")
    return arch


def run(arch: str, contexts, sparsities, *, batches=(1,), new_tokens: int = 64, backend: str = "reference",
        block: int = 64, warmup: int = 1, reps: int = 1, device=None, dtype=None, log=print,
        masks: dict[str, PruneMask] | None = None, steps: int = BARE_STEPS, variants=None) -> list[DecodeBenchRow]:
    """One row per (context, batch, mask, variant) (dense, dense-graph: one per context and batch); see the
    module docstring. ``masks``: ``{label: PruneMask}``, checked against the model's sites before timing.
    ``variants``: names of ``ALL_VARIANTS`` (None: all on CUDA, ``VARIANTS`` elsewhere)."""
    from ..backends import BACKENDS

    contexts, batches, real = [int(c) for c in contexts], [int(b) for b in batches], dict(masks or {})
    arch = check(arch, new_tokens, contexts, batches, real, steps)
    sparsities = [check_sparsity(s) for s in sparsities]
    if not (contexts and sparsities) and not real:
        raise InvalidArgumentError("decode needs contexts (--lengths) and sparsities, or --masks")
    if not batches or block < 1 or reps < 1 or warmup < 0 or steps < 1:
        raise InvalidArgumentError("batches, block, reps and steps must be >= 1, warmup >= 0")
    BACKENDS.get(backend)  # MissingDependencyError early, before building anything
    device = default_device(device)
    want = list(variants) if variants is not None else list(ALL_VARIANTS if device.type == "cuda" else VARIANTS)
    if not want or any(v not in ALL_VARIANTS for v in want):
        raise InvalidArgumentError(f"decode variants must be among {', '.join(ALL_VARIANTS)}, got {want}")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases: dict[int, list] = {c: [] for c in contexts if sparsities}  # context -> [(label, target, note, mask)]
    for label, m in real.items():
        cases.setdefault(mask_context(m, new_tokens, steps), [])
    model, cfg, _ = build_model(arch, max(cases) + new_tokens + steps + 8, device, dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # exactly new_tokens everywhere; the greedy loops compare tokens
    infos = discover_sites(model, cfg.vocab_size, device)
    check_masks(real, infos, arch)
    for ctx in cases:
        for s in sparsities if ctx in contexts else ():
            mk, got = band_mask(infos, ctx + new_tokens + steps, block, s)
            cases[ctx].append((SYNTHETIC, s, got, "", mk))
    for label, m in real.items():
        ctx = mask_context(m, new_tokens, steps)
        cases[ctx].append((label, m.meta.get("target_sparsity"), float(m.sparsity), label, m))
        mk, got = band_mask(infos, ctx + new_tokens + steps, m.block or block, float(m.sparsity))
        cases[ctx].append((SYNTHETIC, round(float(m.sparsity), 4), got, f"density of {label}", mk))
    cuda = device.type == "cuda"
    weights = torch.cuda.memory_allocated(device) if cuda else 0
    rows: list[DecodeBenchRow] = []
    for ctx, entries in cases.items():
        for B in batches:
            g = torch.Generator().manual_seed(ctx)
            ids = torch.randint(3, cfg.vocab_size, (B, ctx), generator=g).to(device)
            variants = [(v, "sdpa", None, None, None, "", None) for v in ("dense", "dense-graph") if v in want]
            variants += [(v, backend, label, s, got, note, mk) for label, s, got, note, mk in entries
                         for v in ("masked", "pruned", "pruned-graph") if v in want]
            ref = dense_ref = None
            for variant, bk, label, s, got, note, mk in variants:
                row = DecodeBenchRow(arch, ctx, B, variant, bk, label, s, None if got is None else round(got, 4),
                                     new_tokens, None, None, None, None, None, note=note)
                measure = _measure_graph if variant in GRAPH_VARIANTS else _measure
                try:
                    seqs = measure(row, model, ids, mk, backend, warmup, reps, steps, device, weights)
                except torch.OutOfMemoryError:
                    seqs, row.note = None, "out of memory" + (f"; {note}" if note else "")
                    if cuda:
                        torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001 - a graph variant's failure is recorded, the run goes on
                    if variant not in GRAPH_VARIANTS:
                        raise
                    import traceback

                    seqs, row.error = None, f"{type(e).__name__}: {e}"
                    log(f"{arch} ctx={ctx} B={B} decode {variant} failed:\n{traceback.format_exc(limit=6)}")
                    if cuda:
                        with contextlib.suppress(Exception):
                            torch.cuda.synchronize(device)
                            torch.cuda.empty_cache()
                if variant == "masked":
                    ref = seqs
                elif variant == "dense":
                    dense_ref = seqs
                elif variant in ("pruned", "pruned-graph") and seqs is not None and ref is not None:
                    row.same_tokens_as_masked = bool(torch.equal(seqs, ref))
                elif variant == "dense-graph" and seqs is not None and dense_ref is not None:
                    row.same_tokens_as_dense = bool(torch.equal(seqs, dense_ref))
                rows.append(row)
                log(f"{arch} ctx={ctx} B={B} decode {variant:12s} {bk:9s} mask={label} s={s} "
                    f"tok/s={_fmt(row.decode_tok_s)} step_ms={_fmt(row.bare_step_ms, 2)} "
                    f"peak_MiB={_fmt(row.peak_mib_over_weights, 0)} kv_share={_fmt(row.kv_share, 3)} {row.note}"
                    f"{' error: ' + row.error if row.error else ''}")
                del seqs
                gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _measure(row: DecodeBenchRow, model, ids, mask, backend: str, warmup: int, reps: int, steps: int,
             device, weights: int):
    """Fill ``row``'s measurements; returns the generated sequences (``new_tokens`` of them)."""
    from ..apply import apply
    from ..cache import PrunedKVCache
    from ..seq2seq import _cache_arg, _cache_of

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    pruned, new, B = row.variant == "pruned", row.new_tokens, ids.shape[0]

    def gen(n):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  attention_mask=torch.ones_like(ids))
        if pruned:  # transformers 5.24 names it `cache`, earlier versions `past_key_values`
            kw[_cache_arg(model)] = PrunedKVCache(model, mask)
        return model.generate(ids, **kw)

    def timed(n):
        sync()
        t0 = time.perf_counter()
        out = gen(n)
        sync()
        return time.perf_counter() - t0, out

    attached = contextlib.nullcontext() if mask is None else apply(model, mask, backend=backend)
    with torch.no_grad(), attached:
        for _ in range(warmup):
            gen(2)  # kernels compiled, layouts built
        t_one = statistics.median(timed(1)[0] for _ in range(reps))
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t_all, out = [], None
        for _ in range(reps):
            out = None  # the last generation's cache is not counted in this one's peak
            t, out = timed(new)
            t_all.append(t)
        if cuda:
            row.peak_mib_over_weights = (torch.cuda.max_memory_allocated(device) - weights) / 2**20
        if pruned:
            row.kv_bytes = _cache_of(out).kv_bytes()
            row.kv_share = row.kv_bytes["share"]
        seqs = out.sequences
        del out
        gc.collect()
        row.bare_step_ms, steady = step_ms(model, ids, pruned, mask, sync, steps)
        if cuda:
            row.steady_mib_over_weights = (steady - weights) / 2**20
    row.prefill_ms = 1e3 * t_one
    t_decode = statistics.median(t_all) - t_one
    if t_decode > 0:
        row.decode_tok_s = B * (new - 1) / t_decode
    else:  # a busy host: no figure rather than an absurd one
        row.note = "; ".join(filter(None, [row.note, f"decode time within timer noise ({new} tokens took no "
                                                        "longer than 1)"]))
    return seqs


def _measure_graph(row: DecodeBenchRow, model, ids, mask, backend: str, warmup: int, reps: int, steps: int,
                   device, weights: int):
    """Fill a graph variant's ``row`` (``attnprune.decode_greedy``, see the module docstring); returns the
    generated sequences. Raises what ``decode_greedy`` raises (the caller records it)."""
    from transformers import StaticCache

    from ..apply import apply
    from ..cache import PrunedKVCache
    from ..decode_loop import WARMUP_STEPS, decode_greedy

    cuda = device.type == "cuda"
    pruned, new, (B, L) = row.variant == "pruned-graph", row.new_tokens, ids.shape

    def gen(n, stats=None):
        cache = PrunedKVCache(model, mask) if pruned else StaticCache(config=model.config, max_cache_len=L + n)
        out = decode_greedy(model, ids, cache, n, cuda_graph=True, stats=stats)
        return out, cache

    attached = apply(model, mask, backend=backend) if pruned else contextlib.nullcontext()
    with torch.no_grad(), attached:
        for _ in range(warmup):  # kernels compiled (Triton), one capture done
            gen(min(new, WARMUP_STEPS + 3))
        gc.collect()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        runs = []
        for _ in range(reps):
            stats: dict = {}
            seqs, cache = None, None  # the last generation's cache is not counted in this one's peak
            seqs, cache = gen(new, stats)
            runs.append(stats)
        if cuda:
            row.peak_mib_over_weights = (torch.cuda.max_memory_allocated(device) - weights) / 2**20
            row.steady_mib_over_weights = (torch.cuda.memory_allocated(device) - weights) / 2**20
        if pruned:
            row.kv_bytes = cache.kv_bytes()
            row.kv_share = row.kv_bytes["share"]
        del cache
    timed = [r for r in runs if r["timed_s"]]
    row.graph = runs[-1]
    row.prefill_ms = 1e3 * statistics.median(r["prefill_s"] for r in runs)
    if timed:
        t = statistics.median(r["timed_s"] / r["timed_steps"] for r in timed)
        row.decode_tok_s, row.bare_step_ms = B / t, 1e3 * t
        row.note = "; ".join(filter(None, [row.note, f"CUDA graph: {runs[-1]['replays']} replays, "
                                                     f"capture {1e3 * runs[-1]['capture_s']:.0f} ms"]))
    else:  # no replay (CPU, or too few tokens): the eager graph-safe loop
        t = statistics.median(r["decode_s"] / max(1, r["steps"]) for r in runs)
        row.decode_tok_s = B / t if t > 0 else None
        row.bare_step_ms = 1e3 * t
        row.note = "; ".join(filter(None, [row.note, "no timed replay: the eager graph-safe loop"]))
    return seqs


def step_ms(model, ids, pruned: bool, mask, sync, steps: int) -> tuple[float, int]:
    """Median ms of one bare decode forward (no ``generate``): prefill ``ids`` into a cache
    (``PrunedKVCache`` if ``pruned``, else ``DynamicCache``), then ``steps`` single-token forwards
    feeding back the argmax, each synchronised by ``sync``. Also the bytes allocated on the model's
    CUDA device after them (weights + the cache in its steady decode state + the last logits; 0 on
    the CPU). Run it with the mask attached when there is one."""
    from transformers import DynamicCache

    from ..cache import PrunedKVCache
    from ..seq2seq import _cache_arg

    arg = _cache_arg(model)
    cache = PrunedKVCache(model, mask) if pruned else DynamicCache(config=model.config)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{arg: cache})
    times = []
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, **{arg: cache})  # the cache is updated in place
        sync()
        times.append(time.perf_counter() - t0)
    dev = ids.device
    mem = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    return 1e3 * statistics.median(times), mem


def markdown_table(rows: list[DecodeBenchRow]) -> str:
    head = ("| model | context | batch | variant | backend | mask | sparsity (achieved) | new tokens | prefill ms "
            "| decode tok/s | step ms | peak MiB over weights | KV share | same tokens as masked (dense) |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        sp = "" if r.sparsity is None else f"{r.sparsity:g} "
        sp += "" if r.achieved_sparsity is None else f"({r.achieved_sparsity:.3f})"
        note = "; ".join(filter(None, [r.note, r.error and f"error: {r.error}"]))
        tok_s = _fmt(r.decode_tok_s) + (f" ({note})" if note else "")
        same_as = r.same_tokens_as_masked if r.same_tokens_as_masked is not None else r.same_tokens_as_dense
        same = "" if same_as is None else ("yes" if same_as else "NO")
        lines.append(f"| {r.arch} | {r.context} | {r.batch} | {r.variant} | {r.backend} | {r.mask or ''} | {sp} "
                     f"| {r.new_tokens} | {_fmt(r.prefill_ms, 2)} | {tok_s} | {_fmt(r.bare_step_ms, 2)} "
                     f"| {_fmt(r.peak_mib_over_weights, 0)} | {_fmt(r.kv_share, 3)} | {same} |")
    return "\n".join(lines)
