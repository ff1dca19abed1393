"""The length-free form of a site's mask: per-head sink columns and a local band, for positions past
the calibrated length (``beyond="extend"``, ``PruneMask.extend``).

A static mask is calibrated for ``q_len x k_len`` positions. Past them it says nothing; the
strongest static-sparsity systems (StreamingLLM's sinks, MoA's per-head band growing with length)
use the same two structures, and so does this form, fitted per head from the mask itself on the
mask's own grid (tokens, or ``b x b`` blocks for block masks, so a block mask extends by blocks):

* **sinks** ``s``: the leading key columns ``0 .. s-1`` that at least half of the fitted rows keep
  (at most a quarter of the columns);
* **band** ``w(r) = a + g * r``: for each fitted row ``r``, the number of kept entries outside the
  sinks is the width a band ending at the diagonal would need to keep as many; ``a`` and the growth
  ``g`` are its least-squares line over the rows, with ``g`` clipped at 0 (a band never narrows past
  the calibration: a percentile policy keeps fewer entries in later rows, which continued would
  leave far rows only their diagonal) and ``g = 0`` with ``grow=False``. So an extended row keeps
  about as many entries as the calibrated rows near its length did, growing as they grew.

From the attention statistics instead (``LengthFree.fit_mass``; ``PruneMask.extend(length,
hold="mass", stats=stats)``): per head, the sinks and band line that keep at least a share of every
fitted row's attention mass at the fewest entries, the share by default the one the calibrated
mask keeps there (``kept_mass``). A percentile mask's scattered entries have no place in a sinks +
band form, so holding its *mass* costs more entries than holding its width or density, and keeps
quality where those do not (RESULTS.md, "Masks past their calibrated length").

The fitted rows are the last half of the calibrated rows (the ones closest to the extension).
Extended row ``r`` keeps column ``c`` when ``c < s`` or ``0 <= r - c < w(r)`` (causal sites; for
bidirectional ``self`` sites ``|r - c| < (w(r) + 1) / 2``); causality itself is applied by the
backend as always. Cross-attention sites have no length-free form (``LengthError``).
"""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError, LengthError

__all__ = ["LengthFree", "HOLDS", "kept_mass", "site_form", "stats_form"]

HOLDS = ("width", "density", "mass")  # the extension rules (see site_form)


class LengthFree:
    """Per-head sinks and band on a grid. sinks: long ``[H]``; band, growth: float ``[H]``."""

    def __init__(self, sinks: torch.Tensor, band: torch.Tensor, growth: torch.Tensor, causal: bool):
        self.sinks, self.band, self.growth, self.causal = sinks.long(), band.double(), growth.double(), causal

    @classmethod
    def fit(cls, keep: torch.Tensor, kind: str, *, name: str = "?", grow: bool = True,
            hold: str = "width") -> "LengthFree":
        """Fit from a keep grid ``keep [H, R, C]`` (bool) of a site of ``kind``.

        hold: ``"width"`` (the default above: the band's width line, growth clipped at 0) or
        ``"density"`` (a band through the origin keeping each fitted row's kept share of its
        attendable entries: ``w(r) = f * (r + 1)``, so the extension is as dense as the calibration,
        and a pruned KV cache keeps keys for longer).
        """
        if hold not in ("width", "density"):
            raise InvalidArgumentError(f"hold must be 'width' or 'density', got {hold!r}")
        if kind == "cross":
            raise LengthError(f"site {name!r} is cross-attention: its mask has no length-free form to extend "
                              "past the calibrated length; use beyond='dense' or calibrate longer")
        H, R, C = keep.shape
        causal = kind == "causal"
        rows = torch.arange(R // 2, R) if R > 1 else torch.arange(R)
        k = keep[:, rows].double()  # [H, F, C]
        rate = k.mean(1)  # [H, C]: share of fitted rows keeping each column
        cap = max(1, C // 4)
        lead = (rate[:, :cap] >= 0.5).long().cumprod(1)  # leading columns kept by at least half the rows
        sinks = lead.sum(1)
        cols = torch.arange(C)
        outside = cols[None, None, :] >= sinks[:, None, None]  # [H, 1, C]
        width = (k * outside).sum(-1)  # [H, F]: kept entries outside the sinks per fitted row
        r = rows.double()
        if hold == "density":
            attendable = (r + 1 - sinks[:, None].double()).clamp_min(1.0) if causal else float(C)
            f = (width / attendable).mean(1)  # [H]
            return cls(sinks, f, f, causal)
        if grow and len(rows) > 1:
            rc = r - r.mean()
            growth = ((width - width.mean(1, keepdim=True)) @ rc / (rc @ rc)).clamp_min(0.0)
        else:
            growth = torch.zeros(H, dtype=torch.float64)
        # the line through the fitted rows' mean width with that growth (never shrinking past them)
        band = width.mean(1) - growth * r.mean()
        return cls(sinks, band, growth, causal)

    @classmethod
    def fit_mass(cls, score: torch.Tensor, kind: str, mass, *, name: str = "?", grow: bool = True,
                 max_sinks: int | None = None) -> "LengthFree":
        """Fit from attention statistics (MoA-style): per head, the sinks and band line that keep at
        least ``mass`` of each fitted row's attention mass at the fewest entries.

        score: float ``[H, R, C]``, attention mass per unit of the mask's grid (``units.site_units``:
        the mean probability of a token entry, or the summed mean probabilities of a ``b x b``
        block; NaN or 0 where nothing is attendable). mass: float in (0, 1], or float ``[H]`` (one
        share per head, e.g. what the calibrated mask kept: :func:`kept_mass`).

        Per head and per candidate sink count ``s`` (``0 .. max_sinks``, default a quarter of the
        columns) each fitted row ``r`` (the last half, as :meth:`fit`) needs the narrowest band
        ``w_r`` with ``sinks + band >= mass * row``; the band line's growth ``g`` is the least-squares
        slope of ``w_r`` over the rows (clipped at 0; 0 with ``grow=False``) and its offset the
        smallest that covers every fitted row (``a = max_r (w_r - g r)``), so every fitted row keeps
        at least ``mass``. The ``s`` keeping the fewest entries over the fitted rows wins (ties: fewer).

        Precisely (float64, CPU): a row's mass by distance ``d`` from the diagonal (``r - c >= 0``;
        ``|r - c|`` for ``self``) outside the sinks is summed in order of ``d`` onto the sinks' mass,
        and the band takes in the distances ``0 .. k`` up to the first that reaches the row's need
        (``k = C + R`` where none does): ``w_r = k + 1`` (causal) or ``2 k + 1``. All ``s`` are
        fitted at once (:func:`_reach`, :func:`_kept`), with the very sums and comparisons a
        separate fit per ``s`` would make, so the result does not depend on that.
        """
        if kind == "cross":
            raise LengthError(f"site {name!r} is cross-attention: its mask has no length-free form to extend "
                              "past the calibrated length; use beyond='dense' or calibrate longer")
        if score.dim() != 3:
            raise InvalidArgumentError(f"score must be [H, R, C], got {list(score.shape)}")
        H, R, C = score.shape
        m = torch.as_tensor(mass, dtype=torch.float64).flatten()
        if m.numel() not in (1, H) or not bool(((m > 0) & (m <= 1)).all()):
            raise InvalidArgumentError(f"mass must be in (0, 1], one value or one per head ({H}), got {mass!r}")
        m = m.expand(H)
        causal = kind == "causal"
        cap = max(1, C // 4) if max_sinks is None else int(max_sinks)
        if cap < 0:
            raise InvalidArgumentError(f"max_sinks must be >= 0, got {max_sinks!r}")
        cap = min(cap, C)
        rows = torch.arange(R // 2, R) if R > 1 else torch.arange(R)
        x = torch.nan_to_num(score.detach().cpu()[:, rows].double(), nan=0.0).clamp_min(0.0)  # [H, F, C]
        F = len(rows)
        need = m[:, None] * x.sum(-1) * (1 - 1e-9)  # [H, F]: mass each fitted row must keep
        sink = torch.stack([x[:, :, :s].sum(-1) for s in range(cap + 1)], -1)  # [H, F, S]: mass of sinks 0 .. s-1
        k = _reach(x, rows, sink, need, R + C, causal).permute(2, 0, 1).contiguous()  # [S, H, F]
        r = rows.double()
        rc = r - r.mean()
        bands, growths = [], []
        for s in range(cap + 1):  # the band line per s: cheap [H, F] sums, each as a lone fit would do them
            ks = k[s].double()
            w = ks + 1 if causal else 2 * ks + 1  # causal: 0 <= r - c < w; else |r - c| < (w + 1) / 2
            if grow and F > 1:
                g = ((w - w.mean(1, keepdim=True)) @ rc / (rc @ rc)).clamp_min(0.0)
            else:
                g = torch.zeros(H, dtype=torch.float64)
            bands.append((w - g[:, None] * r).max(1).values)  # the least offset covering every fitted row
            growths.append(g)
        a, g = torch.stack(bands), torch.stack(growths)  # [S, H]
        kept = _kept(a, g, rows, C, causal).sum(-1)  # [S, H]: entries kept over the fitted rows
        best = kept.argmin(0)  # the first minimum: ties go to the fewer sinks
        heads = torch.arange(H)
        return cls(best, a[best, heads], g[best, heads], causal)

    def to_dict(self) -> dict:
        """Plain numbers (for a mask file's header); :meth:`from_dict` is the inverse."""
        return {"sinks": self.sinks.tolist(), "band": self.band.tolist(), "growth": self.growth.tolist(),
                "causal": self.causal}

    @classmethod
    def from_dict(cls, d: dict) -> "LengthFree":
        return cls(torch.tensor(d["sinks"], dtype=torch.long), torch.tensor(d["band"], dtype=torch.float64),
                   torch.tensor(d["growth"], dtype=torch.float64), bool(d["causal"]))

    def width(self, rows: torch.Tensor) -> torch.Tensor:
        """float ``[H, R']``: band width at grid rows ``rows`` (at least 1: the diagonal)."""
        w = self.band[:, None] + self.growth[:, None] * rows.double()[None, :]
        return w.clamp_min(1.0)

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """bool ``[B, H, R', C']``: the form at grid rows ``rows [B, 1, R', 1]`` x columns
        ``cols [B, H or 1, 1, C']`` (long, broadcasting)."""
        dev = rows.device
        a, g, s = (t.to(dev)[None, :, None, None] for t in (self.band, self.growth, self.sinks))
        w = (a + g * rows.double()).clamp_min(1.0)
        d = (rows - cols).double()
        band = (d >= 0) & (d < w) if self.causal else d.abs() < (w + 1) / 2
        return band | (cols < s)

    def grid(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """bool ``[H, R', C']``: the form at grid rows ``rows [R']`` x columns ``cols [C']``."""
        return self.at(rows[None, None, :, None], cols[None, None, None, :])[0]

    def last_row(self, cols: torch.Tensor) -> torch.Tensor:
        """long ``[H, C']``: the last grid row whose band reaches column ``c`` (causal form; sinks and
        a band growing as fast as the rows: a huge number, read forever)."""
        big = torch.iinfo(torch.long).max // 4
        c = cols.double()[None, :]
        a, g = self.band[:, None], self.growth[:, None]
        # r - c < max(1, a + g r): row c itself, or r (1 - g) < a + c, i.e. r < (a + c) / (1 - g);
        # ceil() of that bound is one row more than the last such row: conservative against rounding
        last = torch.where(g < 1, torch.ceil((a + c) / (1 - g).clamp_min(1e-12)), float(big))
        last = torch.maximum(last, c)
        last = torch.where(c < self.sinks[:, None], float(big), last)
        return last.clamp(max=float(big)).long()


def _reach(x: torch.Tensor, rows: torch.Tensor, sink: torch.Tensor, need: torch.Tensor, D: int,
           causal: bool) -> torch.Tensor:
    """long ``[H, F, S]``: for fitted rows ``rows [F]`` with mass ``x [H, F, C]`` (float64), the mass
    of ``s`` sinks ``sink [H, F, S]`` and the rows' need ``need [H, F]``: how many distances the band
    must take in, i.e. the number of ``d`` whose running sum ``cum_s[d]`` (the sinks plus the mass at
    distances ``0 .. d`` outside them) falls short of the need (``D`` where every one does).

    ``cum_s[d]`` is the float64 sum a fit for that ``s`` alone makes: the mass by distance ``prof_s``
    (at most two entries per distance, so its rounding does not depend on their order), summed in
    order of ``d`` (torch's CPU cumsum is a sequential scan), plus the sinks. The sinks only take
    columns ``c < s``, so for ``d <= j = r - s`` ``prof_s[d]`` is the sink-free ``prof_0[d]`` and
    ``cum_s[d] = P[d] + sink``, with ``P`` the cumsum of ``prof_0``, computed once. Past ``j`` a causal
    row has nothing left (``cum_s`` stays ``P[j] + sink``); a ``self`` row still has its columns
    ``c = r + d`` right of the diagonal, summed on from ``P[j]`` where the prefix falls short (few
    rows and distances when the fitted rows are the last half of a square grid). ``cum_s`` never
    decreases (rounding is monotone), so on the prefix the count is a binary search.
    """
    H, F, C = x.shape
    S = sink.shape[-1]
    dist = rows[:, None] - torch.arange(C)[None, :]  # [F, C]
    if not causal:
        dist = dist.abs()
    # P[:, :, d + 1]: the sink-free mass at distances 0 .. d, P[:, :, 0] = 0 (causal: keys up to the query)
    P = torch.zeros(H, F, max(int(rows.max()) + 1, C) + 2, dtype=torch.float64)  # room for d = -1 .. max + 1
    P = P.scatter_add_(2, (dist + 1).clamp_min(0).expand(H, F, C), x * (dist >= 0)).cumsum_(-1)
    j = (rows[:, None] - torch.arange(S)[None, :]).clamp_min(-1).expand(H, F, S)  # last sink-free distance
    need = need[..., None]
    short = P.gather(-1, j + 1) + sink < need  # the distances 0 .. j are not enough
    lo, hi = torch.zeros_like(j), j + 1  # binary search on 0 .. j for the first d reaching the need
    while bool((live := lo < hi).any()):
        mid = (lo + hi) >> 1
        under = P.gather(-1, mid + 1) + sink < need
        lo, hi = torch.where(live & under, mid + 1, lo), torch.where(live & ~under, mid, hi)
    k = torch.where(short, D, lo)
    if not causal:
        tail = (C - 1 - rows[:, None] - j).clamp_min(0)  # distances past j with a right-hand column
        todo = torch.nonzero(short & (tail > 0))
        for part in todo.split(4096) if len(todo) else ():
            h, f, s = part.unbind(1)
            jj, n = j[h, f, s], int(tail[h, f, s].max())
            d = jj[:, None] + 1 + torch.arange(n)  # [n', n]: the distances past j
            c = rows[f][:, None] + d  # their right-hand column
            right = x[h[:, None], f[:, None], c.clamp(max=C - 1)]
            term = torch.where((d >= 1) & (c < C) & (c >= s[:, None]), right, 0.0)
            cum = torch.cat([P[h, f, jj + 1][:, None], term], 1).cumsum(1)[:, 1:]  # on from P[j], in order
            under = cum + sink[h, f, s][:, None] < need[h, f]
            k[h, f, s] = torch.where(under[:, -1], D, jj + 1 + under.sum(1))
    return k


def _kept(a: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, C: int, causal: bool) -> torch.Tensor:
    """long ``[S, H, F]``: the entries the form with ``s`` sinks and band line ``a, g [S, H]`` keeps in
    each fitted row ``rows [F]`` of ``C`` columns (causal: of the attendable ``c <= r``), counted in
    closed form: what ``LengthFree(s, a, g).grid(rows, arange(C))`` keeps there."""
    S = a.shape[0]
    w = (a[..., None] + g[..., None] * rows.double()).clamp_min(1.0)  # [S, H, F], as LengthFree.at
    big = float(C + len(rows) + int(rows.max()) + 2)  # more than any distance
    s = torch.arange(S)[:, None, None]
    if causal:  # band: 0 <= r - c < w, i.e. c in r - ceil(w) + 1 .. r; sinks: c < min(s, r + 1)
        lo, hi = rows - torch.ceil(w).clamp(max=big).long() + 1, rows.clamp(max=C - 1)
        ns = torch.minimum(s, (rows + 1).clamp(max=C))
    else:  # band: |r - c| < (w + 1) / 2, i.e. |r - c| <= ceil(that) - 1; sinks: c < s
        half = torch.ceil((w + 1) / 2).clamp(max=big).long() - 1
        lo, hi = rows - half, (rows + half).clamp(max=C - 1)
        ns = s.clamp(max=C)
    return ns + (hi - torch.maximum(lo, ns) + 1).clamp_min(0)  # the sinks, then the band right of them


def kept_mass(keep: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """float64 ``[H]``: the share of the fitted rows' attention mass (the last half of the rows, as
    :meth:`LengthFree.fit`) that the keep grid ``keep [H, R, C]`` (bool) keeps, per head; ``score``
    ``[H, R, C]`` as in :meth:`LengthFree.fit_mass`. 1 for a head with no observed mass."""
    if keep.shape != score.shape:
        raise InvalidArgumentError(f"keep {list(keep.shape)} and score {list(score.shape)} differ in shape")
    R = keep.shape[1]
    rows = slice(R // 2, R) if R > 1 else slice(0, R)
    x = torch.nan_to_num(score[:, rows].double(), nan=0.0).clamp_min(0.0)
    tot = x.sum((1, 2))
    got = (x * keep[:, rows]).sum((1, 2))
    return torch.where(tot > 0, got / tot.clamp_min(1e-300), torch.ones_like(tot)).clamp(1e-6, 1.0)


def site_form(sm, hold: str | None = None, *, stats=None, mass=None) -> LengthFree:
    """The length-free form of site mask ``sm`` under ``hold``: ``None``, the site's own
    (``sm.length_free``: what ``beyond="extend"`` continues); ``"width"``, ``"density"``: fitted from
    the mask, :meth:`LengthFree.fit`; ``"mass"``: from ``stats``, :meth:`LengthFree.fit_mass`, keeping
    ``mass`` (float, or None: per head the share the calibrated mask keeps, :func:`kept_mass`)."""
    from .errors import MaskMismatchError
    from .units import site_units

    if hold is not None and hold not in HOLDS:
        raise InvalidArgumentError(f"hold must be None or one of {', '.join(map(repr, HOLDS))}, got {hold!r}")
    if hold != "mass":
        if stats is not None or mass is not None:
            raise InvalidArgumentError(f"stats and mass are for hold='mass', not hold={hold!r}")
        if hold is None:
            return sm.length_free
        return LengthFree.fit(sm.keep, sm.info.kind, name=sm.name, hold=hold)
    if stats is None:
        raise InvalidArgumentError("hold='mass' needs the attention statistics the mask was made from (stats=...)")
    if sm.info.kind == "cross":
        sm.length_free  # raises the LengthError naming the site
    if sm.name not in stats.sites:
        raise MaskMismatchError(f"the stats have no site {sm.name!r}; give the stats the mask was made from")
    score = site_units(stats, sm.name, sm.block).score
    if tuple(score.shape) != tuple(sm.keep.shape):
        raise MaskMismatchError(f"site {sm.name!r}: the stats' grid {list(score.shape)} is not the mask's "
                                f"{list(sm.keep.shape)}; give the stats the mask was made from")
    m = kept_mass(sm.keep, score) if mass is None else mass
    return LengthFree.fit_mass(score, sm.info.kind, m, name=sm.name)


def stats_form(sm, stats):
    """A callable making the site's form from ``stats`` (``hold="mass"`` at the share the mask keeps),
    for a mask just made from them (``make_mask``): called on first use of the form, it fails with
    one clear error if the site's statistics changed in between (more or other observations)."""
    from .errors import MaskMismatchError

    def seen() -> float:  # the site's observation count: changes with every add / merge / all_reduce
        return float(stats.count(sm.name).sum()) if sm.name in stats.sites else -1.0

    before = seen()

    def make() -> LengthFree:
        if seen() != before:
            raise MaskMismatchError(
                f"site {sm.name!r}: the statistics this mask was made from changed since, so its length-free "
                f"form can no longer be fitted from them; make the mask again, or call "
                f"mask.with_length_free(stats) with the statistics it was made from")
        return site_form(sm, "mass", stats=stats)

    return make


def extend_mask(mask, length: int, *, hold: str | None = None, stats=None, mass=None):
    """``mask`` with every site materialised at ``length`` x ``length`` positions: the calibrated
    region as it is, the rest from each head's length-free form (``hold``, ``stats``, ``mass``: see
    :func:`site_form`). Block masks stay block masks. ``meta["extended_to"]`` records the length,
    ``meta["extended_hold"]`` the rule (``"own"`` for ``hold=None``; ``meta["extended_mass"]`` the mass
    under ``"mass"``);
    ``LengthError`` for cross-attention sites."""
    import copy

    from .mask import PruneMask, SiteMask

    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise InvalidArgumentError(f"length must be a positive integer, got {length!r}")
    sms = []
    for name in mask.sites:
        sm = mask.site(name)
        if sm.info.kind == "cross" and (length > sm.q_len or length > sm.k_len):
            sm.length_free  # raises the LengthError naming the site
        b = sm.block or 1
        n = -(-length // b)
        lf = site_form(sm, hold, stats=stats, mass=mass)
        grid = lf.grid(torch.arange(n), torch.arange(n))  # [H, n, n] on the mask's grid
        R, C = sm.keep.shape[1:]
        grid[:, :min(R, n), :min(C, n)] = sm.keep[:, :n, :n]
        sms.append(SiteMask(sm.info, length, length, keep=grid, block=sm.block))
    meta = copy.deepcopy(mask.meta)
    meta["extended_to"], meta["extended_hold"] = length, hold or "own"
    if hold == "mass":
        meta["extended_mass"] = "kept" if mass is None else float(mass)
    return PruneMask(sms, meta)
