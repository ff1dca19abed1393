"""Side-by-side attention timings: SDPA (cuDNN, flash), FlexAttention (its Triton and its FLASH/FA4 kernels),
FlashAttention-4 called directly, and the project's backends (``ours``: the Triton kernels; ``ours-flash``:
``backend="flash"``).

Used by ``attnprune bench`` and ``bench/gpu_check.py``. Every configuration builds one random
block layout (128 x 128 blocks, a given fraction of blocks kept per head, the same for every
implementation that can use it), times forward and forward+backward with CUDA events (median of
``triton.testing.do_bench``; each implementation in several interleaved rounds, the median of the
rounds reported), and reports the time and the effective throughput: FLOPs of the
kept (and causally allowed) entries over the time, for every implementation. Dense kernels do
all the work whatever the density, so their effective throughput falls with density.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .._io import write_json
from ..kernels.attention import sparse_attention
from ..kernels.layout import BlockLayout
from ..environment import environment

IMPLS = ("cudnn", "flash", "flex", "flex-flash", "fa4", "ours", "ours-flash")  # IMPL_FNS' names, in table order
BLOCK = 128


@dataclass
class BenchConfig:
    """One benchmark configuration: ``heads`` query heads on ``kv_heads`` key/value heads (None: as many;
    fewer: grouped-query attention, each key/value head shared by ``heads // kv_heads`` query heads)."""

    head_dim: int
    length: int
    density: float
    causal: bool
    batch: int
    heads: int = 16
    dtype: str = "bfloat16"
    kv_heads: int | None = None


@dataclass
class BenchRow:
    config: BenchConfig
    mode: str  # "fwd" or "fwd+bwd"
    impl: str
    ms: float | None
    tflops: float | None  # effective: kept FLOPs / time
    kept_fraction: float  # allowed (i, j) entries / all Lq*Lk (causal and block mask included)
    note: str = ""
    extra: dict = field(default_factory=dict)


def default_batch(length: int, heads: int = 16, tokens: int = 32768) -> int:
    """Batch so that batch * length ~ ``tokens`` (16 heads x 32k tokens fills an H100/H200)."""
    return max(1, tokens // length)


def random_block_layout(heads: int, length: int, density: float, *, causal: bool, block: int = BLOCK,
                        seed: int = 0, device="cuda") -> BlockLayout:
    """``density`` of the (causally reachable) 128 x 128 blocks kept per head; the diagonal is kept."""
    nb = -(-length // block)
    g = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(heads, nb, nb, generator=g) < density
    if density >= 1.0:
        keep[:] = True
    keep |= torch.eye(nb, dtype=torch.bool)[None]  # no empty rows
    if causal:
        keep &= torch.ones(nb, nb, dtype=torch.bool).tril()
    return BlockLayout.from_blocks(keep.to(device), (block, block))


def kept_entries(layout: BlockLayout, length: int, causal: bool) -> int:
    """Number of (head, i, j) entries computed by an exact sparse kernel (per batch element)."""
    bm = layout.block_mask().to(torch.int64)
    b = layout.block[0]
    nb = layout.q_blocks
    sizes = torch.full((nb,), b, dtype=torch.int64)
    sizes[-1] = length - b * (nb - 1)
    area = sizes[:, None] * sizes[None, :]
    if causal:
        diag = sizes * (sizes + 1) // 2
        area = area.tril(-1) + torch.diag(diag)
    return int((bm.cpu() * area[None]).sum())


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]

    def f(q, k, v, causal):
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                    enable_gqa=q.shape[1] != k.shape[1])

    return f


def _flex_fn(kernel_options=None):
    def make(layout, causal, configs):
        from ..backends.flex import flex_sparse_attention

        return lambda q, k, v: flex_sparse_attention(q, k, v, layout, causal=causal, kernel_options=kernel_options)
    return make


def _fa4_direct(layout, causal, configs):
    """FlashAttention-4's ``flash_attn_func`` with block-sparse metadata of the layout and its own causal flag
    (what a user calling FA4 writes; the layouts here are block-exact)."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    from ..backends.flash import FLASH_BLOCK, fa4_metadata

    def f(q, k, v):
        meta = fa4_metadata(layout, q.shape[2], k.shape[2], causal=causal)
        r = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, pack_gqa=False,
                            block_sparse_tensors=BlockSparseTensorsTorch(*meta["fwd"], block_size=FLASH_BLOCK),
                            block_sparse_tensors_bwd=BlockSparseTensorsTorch(*meta["bwd"], block_size=FLASH_BLOCK))
        return (r[0] if isinstance(r, tuple) else r).transpose(1, 2)
    return f


def _ours_flash(layout, causal, configs):
    from ..backends.flash import flash_sparse_attention

    return lambda q, k, v: flash_sparse_attention(q, k, v, layout, causal=causal)


def _dense(name):
    def make(layout, causal, configs):
        f = _sdpa(name)
        return lambda q, k, v: f(q, k, v, causal)
    return make


# name -> (layout, causal, configs) -> fn(q, k, v); an import that fails becomes the row's note
IMPL_FNS = {
    "cudnn": _dense("cudnn"),
    "flash": _dense("flash"),
    "flex": _flex_fn(),
    "flex-flash": _flex_fn({"BACKEND": "FLASH"}),
    "fa4": _fa4_direct,
    "ours": lambda layout, causal, configs: (
        lambda q, k, v: sparse_attention(q, k, v, layout, causal=causal, configs=configs)),
    "ours-flash": _ours_flash,
}
DENSE = ("cudnn", "flash")  # dense kernels: timed once per shape


def _impl_fn(impl: str, layout: BlockLayout, causal: bool, length: int, configs=None):
    return IMPL_FNS[impl](layout, causal, configs)


def time_fn(fn, q, k, v, mode: str, *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn(q, k, v)`` (``mode="fwd"``) or of it plus ``backward``."""
    import triton

    if mode == "fwd":
        with torch.no_grad():
            return float(triton.testing.do_bench(lambda: fn(q, k, v), warmup=warmup, rep=rep, return_mode="median"))
    do = torch.randn_like(q)

    def step():
        out = fn(q, k, v)
        out.backward(do)

    return float(triton.testing.do_bench(step, warmup=warmup, rep=rep, grad_to_none=[q, k, v], return_mode="median"))


def matmul_ceiling(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Measured dense bf16 matrix-multiply rate (TFLOP/s) on random data."""
    import triton

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def run_config(cfg: BenchConfig, *, impls=IMPLS, modes=("fwd", "fwd+bwd"), dense_cache: dict | None = None,
               configs=None, rounds: int = 3, timer=None, device="cuda", log=print) -> list[BenchRow]:
    """Time every implementation on one configuration; returns one row per (mode, impl).

    Each implementation is timed ``rounds`` times, interleaved: round ``r`` times every implementation
    once, in the order of ``impls`` rotated by ``r``, so that a drift of the GPU (clocks, temperature,
    other work) during the configuration falls on all of them alike instead of on whichever ran last;
    the row's time is the median of its rounds (``extra["rounds_ms"]`` holds them all). The first
    round also compiles (``time_fn``'s warm-up). ``timer(fn, q, k, v, mode) -> ms`` replaces
    :func:`time_fn` (tests); ``device`` where inputs and layouts live.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    timer = timer or time_fn
    dtype = getattr(torch, cfg.dtype)
    L, H, B, D = cfg.length, cfg.heads, cfg.batch, cfg.head_dim
    Hkv = cfg.kv_heads or H
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    layout = random_block_layout(H, L, cfg.density, causal=cfg.causal, seed=hash((L, D, cfg.density)) % 2**31,
                                 device=device)
    kept = kept_entries(layout, L, cfg.causal)
    kept_frac = kept / (H * L * L)
    flops_fwd = 4.0 * B * kept * D
    rows: list[BenchRow] = []
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, h, L, D, device=device, dtype=dtype, generator=gen).requires_grad_() for h in (H, Hkv, Hkv))
    for mode in modes:
        flops = flops_fwd * (3.5 if mode == "fwd+bwd" else 1.0)
        fns, samples, notes = {}, {}, {}
        for impl in impls:  # round 0: build (and compile) every implementation
            key = (impl, mode, L, D, B, H, Hkv, cfg.causal)
            if impl in DENSE and dense_cache is not None and key in dense_cache:
                samples[impl], notes[impl] = [dense_cache[key]], "dense: timed once per shape"
                continue
            try:
                t0 = time.time()
                fns[impl] = _impl_fn(impl, layout, cfg.causal, L, configs)
                samples[impl] = [timer(fns[impl], q, k, v, mode)]
                notes[impl] = f"first call + timing {time.time() - t0:.1f}s"
            except Exception as e:  # a backend missing on this stack is reported, not fatal
                fns.pop(impl, None)
                samples[impl], notes[impl] = [], f"{type(e).__name__}: {str(e)[:200]}"
        live = [i for i in impls if i in fns]
        for r in range(1, rounds):
            for impl in live[r % len(live):] + live[: r % len(live)]:
                samples[impl].append(timer(fns[impl], q, k, v, mode))
        for impl in impls:
            got = samples[impl]
            ms = float(torch.tensor(got, dtype=torch.float64).median()) if got else None
            if impl in live and len(got) > 1:
                notes[impl] += f"; median of {len(got)} interleaved rounds ({min(got):.3f}-{max(got):.3f} ms)"
            if impl in DENSE and dense_cache is not None and ms is not None:
                dense_cache[(impl, mode, L, D, B, H, Hkv, cfg.causal)] = ms
            tf = flops / (ms * 1e-3) / 1e12 if ms else None
            rows.append(BenchRow(cfg, mode, impl, ms, tf, kept_frac, notes[impl],
                                 {"rounds_ms": got} if impl in live else {}))
            log(f"  d={D} L={L} dens={cfg.density} causal={cfg.causal} {mode:8s} {impl:6s} "
                f"{'-' if ms is None else f'{ms:8.3f} ms'} {'' if tf is None else f'{tf:6.1f} TFLOP/s'} "
                f"{notes[impl][:100]}")
    return rows


def rows_to_json(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def markdown_table(rows: list[dict]) -> str:
    """One line per (d, L, causal, density, mode): ms of each implementation timed (``IMPLS`` order),
    the effective TFLOP/s of the faster of ours (``ours``, ``ours-flash``), and its time over cuDNN's
    (speed-up) and over FA4 direct's (issue 9's target: at most 1.03)."""
    groups: dict = {}
    for r in rows:
        c = r["config"]
        key = (c["head_dim"], c["length"], c["causal"], c["density"], r["mode"])
        groups.setdefault(key, {"batch": c["batch"], "kept": r["kept_fraction"], "impls": {}})["impls"][r["impl"]] = r
    names = [i for i in IMPLS if any(i in g["impls"] for g in groups.values())]
    head = ("| d | L | batch | causal | block density | kept entries | mode | " + " | ".join(f"{n} ms" for n in names)
            + " | best ours TFLOP/s (eff.) | best ours vs cuDNN | best ours / FA4 direct |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ms_of(g, i):
        r = g["impls"].get(i)
        return r["ms"] if r and r["ms"] else None

    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], -k[3], k[4])):
        d, L, causal, dens, mode = key
        g = groups[key]
        ours = [(ms_of(g, i), i) for i in ("ours", "ours-flash") if ms_of(g, i)]
        best, best_name = min(ours) if ours else (None, None)
        cud, fa4 = ms_of(g, "cudnn"), ms_of(g, "fa4")
        tf = g["impls"][best_name].get("tflops") if best_name else None
        cells = [f"{ms_of(g, n):.3f}" if ms_of(g, n) else "—" for n in names]
        lines.append(
            f"| {d} | {L // 1024}k | {g['batch']} | {'yes' if causal else 'no'} | {dens:g} | {g['kept']:.3f} | {mode} | "
            + " | ".join(cells) + f" | {f'{tf:.0f} ({best_name})' if tf else '—'} | "
            f"{f'{cud / best:.2f}x' if cud and best else '—'} | {f'{best / fa4:.2f}' if fa4 and best else '—'} |"
        )
    return "\n".join(lines)


def run_grid(head_dims=(64, 128), lengths=(4096, 16384, 32768), densities=(1.0, 0.5, 0.1),
             causals=(False, True), modes=("fwd", "fwd+bwd"), impls=IMPLS, heads=16, tokens=32768,
             configs=None, rounds: int = 3, kv_heads: int | None = None, log=print) -> list[dict]:
    """The issue-3 grid; returns JSON-able rows. ``kv_heads``: see :class:`BenchConfig`."""
    rows: list[BenchRow] = []
    dense_cache: dict = {}
    for d in head_dims:
        for L in lengths:
            for causal in causals:
                for dens in densities:
                    cfg = BenchConfig(d, L, dens, causal, default_batch(L, heads, tokens), heads, kv_heads=kv_heads)
                    rows += run_config(cfg, impls=impls, modes=modes, dense_cache=dense_cache, configs=configs,
                                       rounds=rounds, log=log)
                    torch.cuda.empty_cache()
    return rows_to_json(rows)


def save(path, payload: dict) -> None:
    write_json(path, payload, default=str)


__all__ = ["BenchConfig", "BenchRow", "run_config", "run_grid", "matmul_ceiling", "environment", "markdown_table",
           "random_block_layout", "kept_entries", "default_batch", "time_fn", "save", "IMPLS"]
