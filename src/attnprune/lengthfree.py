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

__all__ = ["LengthFree", "HOLDS", "kept_mass", "site_form"]

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
        x = torch.nan_to_num(score[:, rows].double(), nan=0.0).clamp_min(0.0)  # [H, F, C]
        F = len(rows)
        need = m[:, None] * x.sum(-1) * (1 - 1e-9)  # [H, F]: mass each fitted row must keep
        cols = torch.arange(C)
        r = rows.double()
        # units by distance from the diagonal: causal d = r - c >= 0; bidirectional |r - c| (both sides)
        dist = (rows[:, None] - cols[None, :])  # [F, C]
        if not causal:
            dist = dist.abs()
        ok = dist >= 0  # [F, C]: attendable by distance (causal: keys up to the query)
        idx = dist.clamp_min(0).expand(H, F, C)
        rc = r - r.mean()
        best = None  # (kept entries [H], sinks, band, growth), the cheapest so far per head
        for s in range(cap + 1):
            sink = x[:, :, :s].sum(-1)  # [H, F]
            prof = torch.zeros(H, F, C + R, dtype=torch.float64)  # mass by distance, outside the sinks
            prof.scatter_add_(2, idx, x * ((cols >= s) & ok))
            cum = prof.cumsum(-1) + sink[..., None]  # [H, F, D]: kept by sinks + distances 0 .. d
            # the band must reach the first distance k with cum[k] >= need: distances 0 .. k
            k = (cum < need[..., None]).sum(-1).double()  # [H, F]
            w = k + 1 if causal else 2 * k + 1  # causal: 0 <= r - c < w; else |r - c| < (w + 1) / 2
            if grow and F > 1:
                g = ((w - w.mean(1, keepdim=True)) @ rc / (rc @ rc)).clamp_min(0.0)
            else:
                g = torch.zeros(H, dtype=torch.float64)
            a = (w - g[:, None] * r).max(1).values  # the least offset covering every fitted row
            sinks = torch.full((H,), s)
            kept = (cls(sinks, a, g, causal).grid(rows, cols) & ok).sum((1, 2)).double()
            if best is None:
                best = [kept, sinks, a, g]
                continue
            better = kept < best[0]  # ties: the fewer sinks (tried first)
            best = [torch.where(better, new, old) for new, old in zip((kept, sinks, a, g), best)]
        return cls(best[1], best[2], best[3], causal)

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


def site_form(sm, hold: str = "width", *, stats=None, mass=None) -> LengthFree:
    """The length-free form of site mask ``sm`` under ``hold`` (``"width"``, ``"density"``: from the
    mask, :meth:`LengthFree.fit`; ``"mass"``: from ``stats``, :meth:`LengthFree.fit_mass`, keeping
    ``mass`` (float, or None: per head the share the calibrated mask keeps, :func:`kept_mass`))."""
    from .errors import MaskMismatchError
    from .units import site_units

    if hold not in HOLDS:
        raise InvalidArgumentError(f"hold must be one of {', '.join(map(repr, HOLDS))}, got {hold!r}")
    if hold != "mass":
        if stats is not None or mass is not None:
            raise InvalidArgumentError(f"stats and mass are for hold='mass', not hold={hold!r}")
        return sm.length_free if hold == "width" else LengthFree.fit(sm.keep, sm.info.kind, name=sm.name, hold=hold)
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


def extend_mask(mask, length: int, *, hold: str = "width", stats=None, mass=None):
    """``mask`` with every site materialised at ``length`` x ``length`` positions: the calibrated
    region as it is, the rest from each head's length-free form (``hold``, ``stats``, ``mass``: see
    :func:`site_form`). Block masks stay block masks. ``meta["extended_to"]`` records the length,
    ``meta["extended_hold"]`` the rule (and ``meta["extended_mass"]`` the mass under ``"mass"``);
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
    meta["extended_to"], meta["extended_hold"] = length, hold
    if hold == "mass":
        meta["extended_mass"] = "kept" if mass is None else float(mass)
    return PruneMask(sms, meta)
