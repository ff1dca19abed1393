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

The fitted rows are the last half of the calibrated rows (the ones closest to the extension).
Extended row ``r`` keeps column ``c`` when ``c < s`` or ``0 <= r - c < w(r)`` (causal sites; for
bidirectional ``self`` sites ``|r - c| < (w(r) + 1) / 2``); causality itself is applied by the
backend as always. Cross-attention sites have no length-free form (``LengthError``).
"""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError, LengthError

__all__ = ["LengthFree"]


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


def extend_mask(mask, length: int, *, hold: str = "width"):
    """``mask`` with every site materialised at ``length`` x ``length`` positions: the calibrated
    region as it is, the rest from each head's length-free form (``hold``: see
    :meth:`LengthFree.fit`). Block masks stay block masks. ``meta["extended_to"]`` records the
    length and ``meta["extended_hold"]`` the rule; ``LengthError`` for cross-attention sites."""
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
        lf = sm.length_free if hold == "width" else LengthFree.fit(sm.keep, sm.info.kind, name=name, hold=hold)
        grid = lf.grid(torch.arange(n), torch.arange(n))  # [H, n, n] on the mask's grid
        R, C = sm.keep.shape[1:]
        grid[:, :min(R, n), :min(C, n)] = sm.keep[:, :n, :n]
        sms.append(SiteMask(sm.info, length, length, keep=grid, block=sm.block))
    meta = copy.deepcopy(mask.meta)
    meta["extended_to"], meta["extended_hold"] = length, hold
    return PruneMask(sms, meta)
