"""The ``ablation`` score: each head's *measured* loss increase when it keeps only sinks and a local band.

The other scores are per entry and first order at best (``influence``, ``loss``), and at kernel
granularity they rank blocks poorly: removing a whole block of large mass is far from a small
perturbation. MoA and DuoAttention profile *heads* instead. ``ablation`` does that by measurement
(zeroth order): for every head ``h`` of every self-attention site and every band width ``k`` of a grid
(in ``g``-blocks, ``g`` the stats' granularity), the calibration loss is computed with that one head
restricted to the structure the ``elastic`` policy keeps (the first ``ceil(SINK_TOKENS / g)`` block
columns and the ``k`` block diagonals nearest the main one; causal sites also keep their causal rule),
every other head dense (or, with ``base=k0``, every other head restricted to ``k0`` diagonals: measured
around the pruned model instead of the dense one, so the heads' interactions there are in the numbers):

    delta[h, k] = (NLL with head h restricted to width k  -  reference NLL) / calibration tokens

(next-token NLL summed over the calibration batches; nats per token). Many configurations run in one
forward: the batch is repeated ``configs_per_forward`` times and each copy restricts its own head.

The table becomes per-block scores, so every policy can rank by it and ``elastic`` (which sizes each
head's band by the score mass it keeps per kept entry) minimises the summed measured loss increase
under the model's budget, the allocation MoA solves: per head, ``delta`` is made non-increasing in
``k`` (what a wider band measured worse counts as the narrower one's loss) and clipped at 0; the drop
between two measured widths is spread evenly over the block diagonals between them and, within a
diagonal, over its blocks by their attendable entries (sink columns excluded); the main diagonal and
the sink columns, kept by every structure, get the head's highest per-entry score, and so do the
diagonals inside the narrowest measured width (a grid without ``1`` says nothing about narrower
bands). So a band of ``k`` diagonals keeps score mass ``const - delta[h, k]`` (interpolated between
measured widths).

Cost: ``heads x widths`` forwards of the calibration data (batched), so profile on a few windows.
Measured (RESULTS.md): against the dense model, SmolLM2's profile allocated worse than the uniform band
of ``streaming`` at 8k and 1k tokens: one head at a time underestimates what narrow bands cost together.
Around the operating point (``base``) it led ``streaming`` at 1k on the CPU, not at 2k or 8k on the GPU.
Needs a causal LM (batches with ``input_ids``, logits out); cross-attention sites are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from .capture import AttentionCall, intercept
from .errors import EmptyDatasetError, InvalidArgumentError
from .sites import SiteInfo
from .softmax import attendable, dense_attention
from .stats import AttentionStats
from .units import geometric_weight

GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # band widths profiled (in blocks), below the grid's size


def default_widths(diagonals: int) -> list[int]:
    """The band widths profiled for a site of ``diagonals`` block diagonals: ``GRID`` below it."""
    return [w for w in GRID if w < diagonals]


def band_mask(lq: int, lk: int, g: int, width: int, sinks: int, causal: bool, device=None) -> torch.Tensor:
    """bool ``[lq, lk]``: token entries inside the first ``sinks`` block columns or the band of ``width``
    block diagonals (``0 <= R - C < width``; ``|R - C| < width`` when not ``causal``), ``R`` / ``C`` the
    ``g``-blocks of a query (aligned bottom-right: query ``i`` sits at ``i + lk - lq``) and a key; under
    ``causal`` also ``key <= query``."""
    off = lk - lq
    rb = (torch.arange(lq, device=device) + off) // g  # each query's block row
    cb = torch.arange(lk, device=device) // g
    blocks = torch.arange(-(-lk // g), device=device)
    dist = blocks[:, None] - blocks[None, :]  # [blocks, blocks]: block row - block column
    band = ((dist >= 0) & (dist < width)) if causal else (dist.abs() < width)
    keep = (band | (blocks[None, :] < sinks))[rb][:, cb]
    return keep & torch.ones(lq, lk, dtype=torch.bool, device=device).tril(off) if causal else keep


def lm_nll(out, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence ``(summed next-token NLL [N], counted tokens [N])`` of a causal LM's output (float32,
    float64 for float64 logits); targets ``input_ids`` shifted (or ``labels``), ``-100`` and padding
    (a 2-D ``attention_mask``) not counted."""
    from .evaluate import _logits

    logits = _logits(out)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise InvalidArgumentError(
            "this score needs a causal LM: batches with input_ids [batch, seq] and a model returning "
            f"logits [batch, seq, vocab] (got logits {tuple(logits.shape) if logits.dim() else 'none'})")
    labels = kwargs.get("labels")
    target = (labels if labels is not None else ids)[:, 1:]
    valid = target != -100
    am = kwargs.get("attention_mask")
    if am is not None and am.dim() == 2 and tuple(am.shape) == tuple(ids.shape):
        am = am.bool()
        valid = valid & am[:, 1:] & am[:, :-1]
    lg = logits[:, :-1]
    dt = torch.float64 if lg.dtype == torch.float64 else torch.float32
    sums = []
    for i in range(lg.shape[0]):  # one sequence's float32 logits at a time
        nll = torch.nn.functional.cross_entropy(lg[i].to(dt), target[i].clamp_min(0).long(), reduction="none")
        sums.append((nll * valid[i].to(dt)).sum())
    return torch.stack(sums), valid.sum(1)


def _repeat(args: tuple, kwargs: dict, n: int, b: int) -> tuple[tuple, dict]:
    """The batch ``n`` times along dim 0 (copy ``j`` holds rows ``j * b .. j * b + b - 1``)."""
    rep = lambda x: x.repeat(n, *([1] * (x.dim() - 1))) if isinstance(x, torch.Tensor) and x.dim() > 0 \
        and x.shape[0] == b else x
    return tuple(rep(a) for a in args), {key: rep(v) for key, v in kwargs.items()}


class _Profiler:
    """Intercept handler: every site's attention through SDPA (so dense and restricted forwards share
    one computation), with copy ``j``'s head restricted to ``plan[j] = (site, head, width)``."""

    def __init__(self, g: int, sinks: int, base: int | None = None):
        self.g, self.sinks, self.base = g, sinks, base
        self.plan: list[tuple[str, int, int]] = []
        self.rows = 0  # sequences per copy
        self.infos: dict[str, SiteInfo] = {}
        self.lengths: dict[str, tuple[int, int]] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    def mask(self, lq: int, lk: int, width: int, causal: bool, device) -> torch.Tensor:
        key = (lq, lk, width, causal, str(device))
        if key not in self._masks:
            self._masks[key] = band_mask(lq, lk, self.g, width, self.sinks, causal, device)
        return self._masks[key]

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        from .observe import attention_output

        if call.kind == "cross":
            raise InvalidArgumentError(
                f"score 'ablation' profiles the bands of self-attention sites; {call.site!r} is cross-attention "
                "(use score 'prob', 'value' or 'loss' for this model)")
        self.infos.setdefault(call.site, call.info)
        lq, lk = call.q.shape[-2], call.k.shape[-2]
        old = self.lengths.get(call.site, (0, 0))
        self.lengths[call.site] = (max(old[0], lq), max(old[1], lk))
        causal = call.kind == "causal"
        m = call.attn_mask
        allowed = None if m is None else attendable(m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)))  # 4-D bool
        if self.base is None:
            out = attention_output(call)
        else:  # every head restricted to the baseline band
            keep = self.mask(lq, lk, self.base, causal, call.q.device)
            out = attention_output(replace(call, attn_mask=keep if allowed is None else keep & allowed, is_causal=False))
        hq, hkv = call.q.shape[1], call.k.shape[1]
        for j, (site, h, width) in enumerate(self.plan):
            if site != call.site:
                continue
            rows = slice(j * self.rows, (j + 1) * self.rows)
            keep = self.mask(lq, lk, width, causal, call.q.device)
            if allowed is not None:
                keep = keep & allowed[rows if allowed.shape[0] > 1 else slice(None),
                                      h if allowed.shape[1] > 1 else 0][:, None]
            kv = h // (hq // hkv)
            sinks = None if call.sinks is None else call.sinks[h:h + 1]
            out[rows, h:h + 1] = dense_attention(
                call.q[rows, h:h + 1], call.k[rows, kv:kv + 1], call.v[rows, kv:kv + 1], keep, False,
                call.scale, sinks=sinks, softcap=call.softcap).to(out.dtype)
        return out


@dataclass
class BandProfile:
    """What ``profile_bands`` measured. ``delta[site]``: float64 ``[H, len(widths[site])]``, the mean
    next-token NLL increase (nats per counted token) with one head restricted to ``sinks`` block columns
    and a band of ``widths[site][i]`` block diagonals of side ``g``; ``infos`` / ``lengths`` (``(q_len,
    k_len)``, the longest seen) per site in model order; ``tokens`` / ``sequences`` counted; ``base``: the
    band every other head kept (None: dense)."""

    g: int
    sinks: int
    delta: dict[str, torch.Tensor]
    widths: dict[str, list[int]]
    infos: dict[str, SiteInfo]
    lengths: dict[str, tuple[int, int]]
    tokens: int
    sequences: int
    base: int | None = None

    def stats(self, model_name: str = "", description: str = "") -> AttentionStats:
        """The profile as ``AttentionStats`` (``score == "ablation"``, granularity ``g``): ``band_scores`` per site."""
        if self.base is not None:
            description = f"{description}; ablation around a band of {self.base} blocks".lstrip("; ")
        stats = AttentionStats(self.infos.values(), self.g, model_name=model_name, description=description,
                               score="ablation")
        stats.num_sequences = self.sequences
        for site, info in self.infos.items():
            lq, lk = self.lengths[site]
            s, c = band_scores(self.delta[site], self.widths[site], info.kind, lq, lk, self.g, self.sinks,
                               dense_end=self.base is None)
            stats.add(site, s, c, q_len=lq, k_len=lk)
        return stats


def measure_bands(model: nn.Module, batches: Iterable, *, granularity: int, widths: Iterable[int] | None = None,
                  base: int | None = None, configs_per_forward: int = 8, progress: bool = True,
                  description: str = "") -> AttentionStats:
    """``profile_bands(...).stats()``: the measured table as ``AttentionStats`` with ``score == "ablation"``
    at ``granularity`` (see the module docs and ``profile_bands`` for the arguments)."""
    from .observe import model_name

    prof = profile_bands(model, batches, granularity=granularity, widths=widths, base=base,
                         configs_per_forward=configs_per_forward, progress=progress)
    return prof.stats(model_name(model), description)


def check_profile_arguments(base, widths, prefix: str = "") -> list[int] | None:
    """``widths`` sorted without repeats (None stays None), after checking that ``base`` (None or a band
    width) and ``widths`` are positive block counts; ``InvalidArgumentError`` naming ``prefix + name``."""
    fixed = None if widths is None else sorted({int(w) for w in widths})
    if fixed is not None and (not fixed or fixed[0] < 1):
        raise InvalidArgumentError(f"{prefix}widths must be positive block counts, got {widths!r}")
    if base is not None and (not isinstance(base, int) or isinstance(base, bool) or base < 1):
        raise InvalidArgumentError(f"{prefix}base must be a positive band width in blocks (or None), got {base!r}")
    return fixed


def profile_bands(model: nn.Module, batches: Iterable, *, granularity: int, widths: Iterable[int] | None = None,
                  base: int | None = None, configs_per_forward: int = 8, progress: bool = True) -> BandProfile:
    """Measure every head's loss under sinks + band restrictions (see the module docs).

    Args:
        model: a causal LM (``input_ids [batch, seq]`` in, logits ``[batch, seq, vocab]`` out) whose
            attention ``observe`` can intercept; run in eval mode without gradients.
        batches: iterable of dicts of model keyword arguments (or tensors), as for ``observe``; every batch
            runs ``1 + ceil(heads x widths / configs_per_forward)`` times, so keep it to a few windows.
        granularity: the block side ``g >= 2`` of the bands.
        widths: band widths (in blocks) to profile; default ``default_widths`` of each site's grid.
        base: None to measure each head against the dense model; an int ``k0`` to measure around a pruned
            model instead: every head of every site keeps the sinks and a band of ``k0`` blocks, the profiled
            head its own width, and ``delta`` is the change from that baseline (negative for wider bands).
            Around the operating point the heads' interactions are in the measurement (one head at a time
            against a dense model misses them); choose ``k0`` near the width the target sparsity allows.
        configs_per_forward: restricted heads per forward (the batch is repeated that many times).
    """
    from tqdm.auto import tqdm

    from .observe import _batch_size, _split
    from .policies import SINK_TOKENS

    if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 2:
        raise InvalidArgumentError(f"score 'ablation' needs blocks (granularity >= 2), got {granularity!r}: "
                                   "give --blocks (e.g. 64 or 128)")
    if not isinstance(configs_per_forward, int) or isinstance(configs_per_forward, bool) or configs_per_forward < 1:
        raise InvalidArgumentError(f"configs_per_forward must be a positive integer, got {configs_per_forward!r}")
    fixed = check_profile_arguments(base, widths)
    g = granularity
    prof = _Profiler(g, max(1, math.ceil(SINK_TOKENS / g)), base)
    device = next((p.device for p in model.parameters()), None)
    delta: dict[str, torch.Tensor] = {}  # site -> float64 [H, W] summed NLL increase
    grids: dict[str, list[int]] = {}
    tokens = sequences = 0
    batches = list(batches)
    if not batches:
        raise EmptyDatasetError("score 'ablation' got no batches: the dataset is empty")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), intercept(model, prof):
            bar = tqdm(total=len(batches), desc="ablation", disable=not progress, unit="forward")
            for bi, batch in enumerate(batches):
                args, kwargs = _split(batch, device)
                prof.rows, prof.plan = _batch_size(args, kwargs), []
                sequences += prof.rows
                ref, counted = lm_nll(model(*args, **kwargs), args, kwargs)
                tokens += int(counted.sum())
                configs = []
                for site, info in prof.infos.items():
                    if site not in grids:
                        grids[site] = fixed if fixed is not None else default_widths(-(-prof.lengths[site][0] // g))
                        delta[site] = torch.zeros(info.num_heads, len(grids[site]), dtype=torch.float64)
                    configs += [(site, h, i) for h in range(info.num_heads) for i in range(len(grids[site]))]
                if bi == 0:
                    bar.total = len(batches) * (1 + math.ceil(len(configs) / configs_per_forward))
                bar.update(1)
                for c0 in range(0, len(configs), configs_per_forward):
                    part = configs[c0:c0 + configs_per_forward]
                    prof.plan = [(s, h, grids[s][i]) for s, h, i in part]
                    rargs, rkwargs = _repeat(args, kwargs, len(part), prof.rows)
                    nll, _ = lm_nll(model(*rargs, **rkwargs), rargs, rkwargs)
                    per_copy = nll.view(len(part), prof.rows).sum(1) - ref.sum()
                    for (s, h, i), d in zip(part, per_copy.tolist()):
                        delta[s][h, i] += d
                    bar.update(1)
            bar.close()
    finally:
        prof.plan = []
        model.train(was_training)
    if tokens == 0:
        raise EmptyDatasetError("score 'ablation': the batches hold no counted token")
    return BandProfile(g, prof.sinks, {s: d / tokens for s, d in delta.items()}, grids, prof.infos,
                       prof.lengths, tokens, sequences, base)


def band_scores(delta: torch.Tensor, widths: list[int], kind: str, lq: int, lk: int, g: int,
                sinks: int, dense_end: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``(sums [H, R, C], counts [R, C])`` whose per-block mass (``sum``) reproduces the measured
    ``delta [H, len(widths)]`` (nats per token) as described in the module docs. ``dense_end``: the full
    band costs 0 (``delta`` measured against the dense model); False: it costs what the widest measured
    width does (measured around a pruned baseline, beyond which nothing was measured)."""
    count = geometric_weight(kind, lq, lk, g)  # [R, C] attendable token entries
    R, C = count.shape
    H = delta.shape[0]
    causal = kind == "causal"
    r = torch.arange(R)[:, None] + (math.ceil(lk / g) - R if causal else 0)
    dist = r - torch.arange(C)[None, :]
    dist = dist if causal else dist.abs()
    body = (torch.arange(C)[None, :] >= sinks) & (count > 0) & (dist >= 0)  # blocks outside the sink columns
    D = int(dist[body].max()) + 1 if bool(body.any()) else 1  # a band of D diagonals (+ sinks) keeps everything
    ks = [w for w in widths if w < D]
    d = delta[:, [widths.index(w) for w in ks]].to(torch.float64)
    end = torch.zeros(H, 1, dtype=d.dtype) if dense_end or not ks else d[:, -1:]
    d = (torch.cat([d, end], 1) - end).clamp_min(0.0)  # the full band: 0
    d = d.flip(1).cummax(1).values.flip(1)  # non-increasing in the width
    edges = ks + [D]
    per_dist = torch.zeros(H, D, dtype=torch.float64)  # score mass of distance t
    for i in range(len(ks)):
        lo, hi = edges[i], edges[i + 1]
        per_dist[:, lo:hi] = ((d[:, i] - d[:, i + 1]) / (hi - lo))[:, None]
    where = torch.where(body, dist, torch.full_like(dist, D))  # D: not a body block
    total = torch.zeros(D + 1, dtype=torch.float64).index_add_(0, where.flatten(), (count * body).flatten())
    share = count * body / total[where].clamp_min(1.0)  # [R, C] each body block's share of its diagonal
    sums = per_dist[:, where.clamp(max=D - 1)] * share  # [H, R, C]
    dens = sums / count.clamp_min(1.0)
    top = dens.flatten(1).max(1).values.clamp_min(torch.finfo(torch.float64).tiny)  # [H]
    floor = ks[0] if ks else D  # the narrowest measured band: nothing narrower was measured, so kept as structure
    fixed = ((dist < floor) & (dist >= 0) | (torch.arange(C)[None, :] < sinks)) & (count > 0)
    sums = torch.where(fixed, top[:, None, None] * count, sums)
    return sums, count
