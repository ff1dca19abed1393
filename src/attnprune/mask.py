"""``PruneMask``: one static keep-mask per attention site, its metadata and its file format.

A mask is made by ``attnprune.make_mask`` (see ``policies.py``). Per site it holds either a token
keep tensor bool [H, q_len, k_len] or a block keep tensor bool [H, ceil(q_len/b), ceil(k_len/b)]
(``True`` = computed). ``q_len``/``k_len`` are the calibrated token lengths.

The file format (safetensors, bit-packed, checksummed, written atomically) is in ``maskfile.py``.
"""

from __future__ import annotations

import os

import torch

from .errors import InvalidArgumentError, LengthError, MaskMismatchError
from .maskfile import FORMAT, VERSION  # noqa: F401  (re-exported)
from .sites import SiteInfo

BEYOND = ("error", "dense", "extend")  # what lies past the calibrated region: an error, dense, the length-free form
_CACHE_SIZE = 32


class SiteMask:
    """The mask of one site, as backends see it.

    info: the site's ``SiteInfo``. block: ``None`` (token level) or the block size b.
    q_len, k_len: calibrated token lengths.
    keep: bool [H, q_len, k_len] (token level) or [H, ceil(q_len/b), ceil(k_len/b)] (block level).
    """

    def __init__(self, info: SiteInfo, q_len: int, k_len: int, *, keep: torch.Tensor,
                 block: int | None = None):
        self.info, self.q_len, self.k_len, self.block = info, int(q_len), int(k_len), block
        h = info.num_heads
        want = (h, q_len, k_len) if block is None else (h, -(-q_len // block), -(-k_len // block))
        if keep.dtype != torch.bool or tuple(keep.shape) != want:
            raise InvalidArgumentError(
                f"site {info.name!r}: keep tensor must be bool {list(want)}, got {keep.dtype} {list(keep.shape)}")
        self._keep = keep
        self._cache: dict = {}
        self._length_free = None  # the LengthFree form: made on first use, or given
        self._form_source = None  # makes the form from the statistics on first use (make_mask), or None
        self._form_given = False  # True: the form was given or made by _form_source (statistics), not the mask's

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def keep(self) -> torch.Tensor:
        """The stored keep tensor (token or block level)."""
        return self._keep

    @property
    def keep_blocks(self) -> torch.Tensor | None:
        """bool [H, Qb, Kb] when block-level, else ``None``."""
        return self._keep if self.block is not None else None

    def _check_region(self, lq: int, lk: int, q_offset: int, beyond: str) -> bool:
        """True if the region lies inside the calibrated lengths; raises on bad arguments."""
        if beyond not in BEYOND:
            raise InvalidArgumentError(f"beyond must be one of {', '.join(map(repr, BEYOND))}, got {beyond!r}")
        if lq < 0 or lk < 0 or q_offset < 0:
            raise InvalidArgumentError(f"bad region: lq={lq}, lk={lk}, q_offset={q_offset}")
        inside = q_offset + lq <= self.q_len and lk <= self.k_len
        if not inside and beyond == "error":
            raise LengthError(
                f"site {self.name!r}: input needs {q_offset + lq} query x {lk} key positions, but the "
                f"mask was calibrated for {self.q_len} x {self.k_len}; observe with longer sequences, "
                f"or pass beyond='extend' (the mask's sinks and band continued) or beyond='dense' (attention "
                f"computed densely) outside the calibrated region")
        return inside

    @property
    def length_free(self):
        """The site's :class:`~attnprune.lengthfree.LengthFree` form (sinks + band per head) that
        ``beyond="extend"`` and ``PrunedKVCache`` continue past the calibrated lengths: fitted from the
        attention statistics (``make_mask``'s default, or :meth:`PruneMask.with_length_free`; kept in
        the mask file), else fitted from the mask itself; made once, on first use.
        ``LengthError`` for cross-attention sites."""
        from .lengthfree import LengthFree

        if self._length_free is None:
            if self._form_source is not None:
                self._length_free, self._form_given, self._form_source = self._form_source(), True, None
            else:
                self._length_free = LengthFree.fit(self._keep, self.info.kind, name=self.name)
        return self._length_free

    @property
    def length_free_fitted(self) -> bool:
        """True when :attr:`length_free` comes from the attention statistics (given, or made on first
        use), False when it is fitted from the mask itself."""
        return self._form_given or self._form_source is not None

    def _with_form(self, form) -> "SiteMask":
        """A copy of this site (same keep tensor) whose length-free form is ``form``: a ``LengthFree``,
        or a callable returning one, called on first use."""
        sm = SiteMask(self.info, self.q_len, self.k_len, keep=self._keep, block=self.block)
        if callable(form):
            sm._form_source = form
        else:
            sm._length_free, sm._form_given = form, True
        return sm

    def _outside(self, rows: torch.Tensor, cols: torch.Tensor, beyond: str) -> torch.Tensor:
        """bool ``[H, R, C]`` on the stored grid: what rows x cols hold outside the calibrated region."""
        if beyond == "extend":
            return self.length_free.grid(rows, cols)
        return torch.ones(self.info.num_heads, len(rows), len(cols), dtype=torch.bool, device=rows.device)

    def _cached(self, key, fn):
        if key not in self._cache:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = fn()
        return self._cache[key]

    def keep_tokens(self, lq: int, lk: int, *, device=None, q_offset: int = 0,
                    beyond: str = "error") -> torch.Tensor:
        """bool [H, lq, lk]: queries ``q_offset .. q_offset+lq-1`` against keys ``0 .. lk-1``.

        Outside the calibrated ``q_len x k_len`` region: ``beyond="error"`` raises ``LengthError``,
        ``beyond="dense"`` keeps everything there, ``beyond="extend"`` the length-free form
        (``lengthfree.py``). Cached; do not modify the result in place.
        """
        self._check_region(lq, lk, q_offset, beyond)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return self._cached(("tok", lq, lk, str(dev), q_offset, beyond),
                            lambda: self._tokens(lq, lk, q_offset, beyond).to(dev))

    def check_length(self, q_end: int, k_end: int, beyond: str) -> bool:
        """True if real positions ``< q_end`` x ``< k_end`` lie inside the calibrated region;
        ``LengthError`` under ``beyond="error"`` when they do not."""
        return self._check_region(q_end, k_end, 0, beyond)

    def keep_at(self, q_pos: torch.Tensor, k_pos: torch.Tensor, *, beyond: str = "error",
                checked: bool = False) -> torch.Tensor:
        """bool ``[B, H, Lq, Lk]``: the mask at rows ``q_pos`` and columns ``k_pos`` of each sequence.

        q_pos: long ``[B or 1, Lq]``; k_pos: long ``[B or 1, Lk]``, or ``[B or 1, Hkv, Lk]`` with one
        row of key positions per key/value head (query head ``h`` uses row ``h // (H // Hkv)``), e.g.
        for a left-padded batch, a sliding-window cache or a pruned KV cache. Negative positions
        (empty slots) read row / column 0; callers mask them out. Positions outside the calibrated
        region: kept under ``beyond="dense"``, the length-free form under ``beyond="extend"``;
        ``LengthError`` under ``beyond="error"`` (unless ``checked``: the caller knows the real
        positions are inside, and no GPU->CPU synchronisation is spent on finding out).
        """
        H = self.info.num_heads
        kp = k_pos[:, None, :] if k_pos.dim() == 2 else k_pos.repeat_interleave(H // k_pos.shape[1], dim=1)
        if beyond not in BEYOND:
            self._check_region(0, 0, 0, beyond)  # raises the unknown-value error
        if not checked and q_pos.numel() and kp.numel():
            self._check_region(int(q_pos.max()) + 1, int(kp.max()) + 1, 0, beyond)
        dev = q_pos.device
        keep = self._cached(("dev", str(dev)), lambda: self._keep.to(dev))
        b = self.block or 1
        qi = q_pos.clamp(0, self.q_len - 1) // b  # [B, Lq]
        ki = kp.clamp(0, self.k_len - 1) // b  # [B, H or 1, Lk]
        heads = torch.arange(H, device=dev)[None, :, None, None]
        out = keep[heads, qi[:, None, :, None], ki[:, :, None, :]]  # [B, H, Lq, Lk]
        outside = (q_pos >= self.q_len)[:, None, :, None] | (kp >= self.k_len)[:, :, None, :]
        if beyond == "extend" and self.info.kind == "cross":
            if bool(outside.any()):
                self.length_free  # raises the LengthError naming the site
            return out
        if beyond == "extend":
            ext = self.length_free.at((q_pos // b)[:, None, :, None], (kp // b)[:, :, None, :])
            return torch.where(outside, ext, out)
        return out | outside

    def _tokens(self, lq: int, lk: int, q_offset: int, beyond: str = "dense") -> torch.Tensor:
        b = self.block or 1
        inside = q_offset + lq <= self.q_len and lk <= self.k_len
        if inside:
            out = torch.empty(self.info.num_heads, lq, lk, dtype=torch.bool)
        else:
            out = self._outside(torch.arange(q_offset, q_offset + lq) // b, torch.arange(lk) // b, beyond)
        nq = max(0, min(q_offset + lq, self.q_len) - q_offset)
        nk = min(lk, self.k_len)
        if nq and nk:
            if self.block is None:
                part = self._keep[:, q_offset:q_offset + nq, :nk]
            else:
                rows = torch.arange(q_offset, q_offset + nq) // self.block
                cols = torch.arange(nk) // self.block
                part = self._keep[:, rows][:, :, cols]
            out[:, :nq, :nk] = part
        return out

    def _blocks(self, lq: int, lk: int, q_offset: int, beyond: str = "dense") -> torch.Tensor:
        b = self.block
        qb0, nqb, nkb = q_offset // b, -(-lq // b), -(-lk // b)
        out = self._outside(torch.arange(qb0, qb0 + nqb), torch.arange(nkb), beyond)
        have_q = max(0, min(nqb, self._keep.shape[1] - qb0))
        have_k = min(nkb, self._keep.shape[2])
        out[:, :have_q, :have_k] = self._keep[:, qb0:qb0 + have_q, :have_k]
        return out

    def layout(self, lq: int, lk: int, block: int | tuple[int, int] = (64, 64), *, device=None,
               q_offset: int = 0, beyond: str = "error"):
        """``kernels.BlockLayout`` for queries ``q_offset..q_offset+lq-1`` x keys ``0..lk-1``.

        block: the kernel's tile ``(bq, bk)``. A block-level mask with ``b == bq == bk`` and
        ``q_offset % b == 0`` is handed over block by block (``from_blocks``); otherwise (or when a
        block straddles the calibrated edge under ``beyond="dense"``) the token mask is tiled.
        Same ``beyond`` rule as ``keep_tokens``. Cached.
        """
        from .kernels import BlockLayout

        bq, bk = (int(block), int(block)) if isinstance(block, int) else (int(block[0]), int(block[1]))
        inside = self._check_region(lq, lk, q_offset, beyond)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        b = self.block
        # whole stored blocks can be handed over unless a block straddles the calibrated edge
        by_block = (b is not None and bq == bk == b and q_offset % b == 0
                    and (inside or (self.q_len % b == 0 and self.k_len % b == 0)))

        def build():
            if by_block:
                return BlockLayout.from_blocks(self._blocks(lq, lk, q_offset, beyond).to(dev), block=(bq, bk),
                                              q_len=lq, k_len=lk)
            return BlockLayout.from_tokens(self.keep_tokens(lq, lk, device=dev, q_offset=q_offset,
                                                            beyond=beyond), block=(bq, bk))

        return self._cached(("layout", lq, lk, bq, bk, str(dev), q_offset, beyond), build)

    def __repr__(self) -> str:
        level = "token" if self.block is None else f"block={self.block}"
        return f"SiteMask({self.name!r}, {self.info.kind}, heads={self.info.num_heads}, " \
               f"{self.q_len}x{self.k_len}, {level})"


class PruneMask:
    """Static keep-masks for every attention site of a model, plus metadata.

    ``mask.sites``: site names in model order. ``mask[site]``: bool [H, q_len, k_len] (token level;
    block masks expanded). ``mask.site(name)``: the ``SiteMask``. ``mask.meta``: a JSON-able dict
    with ``model`` (name, num_sites, sites), ``policy``, ``seed``, ``block``, ``target_sparsity``,
    ``sparsity`` (achieved, attendable entries), ``data`` (calibration description) and per site
    ``sites[name]``: q_len, k_len, target_sparsity, sparsity, paper_sparsity (causal zeros counted
    as pruned), kept_entries, attendable_entries.
    """

    def __init__(self, site_masks: list[SiteMask], meta: dict):
        self._sites = {m.name: m for m in site_masks}
        if len(self._sites) != len(site_masks):
            raise InvalidArgumentError("duplicate site names in mask")
        self.meta = meta

    @property
    def sites(self) -> list[str]:
        return list(self._sites)

    @property
    def infos(self) -> dict[str, SiteInfo]:
        return {n: m.info for n, m in self._sites.items()}

    @property
    def block(self) -> int | None:
        return self.meta.get("block")

    @property
    def policy(self) -> str:
        return self.meta.get("policy", "")

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all attendable entries of all sites."""
        return float(self.meta.get("sparsity", 0.0))

    def site(self, name: str) -> SiteMask:
        try:
            return self._sites[name]
        except KeyError:
            raise MaskMismatchError(f"the mask has no site {name!r}; its sites: {_short(self.sites)}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        m = self.site(name)
        return m._tokens(m.q_len, m.k_len, 0)  # a fresh tensor, not cached

    def __contains__(self, name: object) -> bool:
        return name in self._sites

    def __iter__(self):
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def check_model(self, infos: dict[str, SiteInfo]) -> None:
        """Raise ``MaskMismatchError`` unless ``infos`` has the same site names and head counts."""
        mine, theirs = self.infos, dict(infos)
        missing = [n for n in mine if n not in theirs]
        extra = [n for n in theirs if n not in mine]
        problems = []
        if missing:
            problems.append(f"sites in the mask but not in the model: {_short(missing)}")
        if extra:
            problems.append(f"sites in the model but not in the mask: {_short(extra)}")
        heads = [f"{n} (mask {mine[n].num_heads}, model {theirs[n].num_heads})"
                 for n in mine if n in theirs and mine[n].num_heads != theirs[n].num_heads]
        if heads:
            problems.append(f"head counts differ: {_short(heads)}")
        if problems:
            name = self.meta.get("model", {}).get("name") or "another model"
            raise MaskMismatchError(f"this mask was made for {name} and does not fit the model: "
                                    + "; ".join(problems))

    # -------------------------------------------------------------------------------- file I/O
    def save(self, path: str | os.PathLike) -> None:
        """Write the mask to ``path`` (safetensors + JSON header), atomically (``maskfile.py``)."""
        from .maskfile import save_mask

        save_mask(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruneMask":
        """Read a mask written by ``save``; ``CorruptFileError`` if it is not a valid mask file."""
        from .maskfile import load_mask

        return load_mask(path)

    # -------------------------------------------------------------------------------- display
    def summary(self) -> str:
        """A readable table: one row per site with its kind, heads, lengths and sparsities."""
        m = self.meta
        level = "token" if self.block is None else f"{self.block}x{self.block} blocks"
        lines = [
            f"attnprune mask: model {m.get('model', {}).get('name') or '?'}, {len(self)} sites, "
            f"policy {m.get('policy')}, {level}",
            f"target sparsity {m.get('target_sparsity', 0):.4f}, achieved {self.sparsity:.4f} "
            f"(attendable entries); calibration: {m.get('data', {}).get('description') or '?'} "
            f"({m.get('data', {}).get('num_sequences', 0)} sequences)",
        ]
        rows = [("site", "kind", "heads", "q x k", "target", "sparsity", "paper", "kept")]
        for name, sm in self._sites.items():
            s = m.get("sites", {}).get(name, {})
            rows.append((name, sm.info.kind, str(sm.info.num_heads), f"{sm.q_len}x{sm.k_len}",
                         f"{s.get('target_sparsity', 0):.4f}", f"{s.get('sparsity', 0):.4f}",
                         f"{s.get('paper_sparsity', 0):.4f}",
                         f"{s.get('kept_entries', 0)}/{s.get('attendable_entries', 0)}"))
        return "\n".join(lines + [""] + _table(rows))

    def __repr__(self) -> str:
        return f"PruneMask({len(self)} sites, policy={self.policy!r}, block={self.block}, " \
               f"sparsity={self.sparsity:.4f})"

    def extend(self, length: int, *, hold: str | None = None, stats=None,
               mass: float | None = None) -> "PruneMask":
        """This mask at ``length`` x ``length`` positions: past the calibrated lengths, each head's
        sinks and band continued (``attnprune.lengthfree``). ``hold``: ``None`` (default) each site's
        own form, what ``beyond="extend"`` computes (for a mask from ``make_mask``: fitted from the
        statistics); ``"width"`` / ``"density"`` a form fitted from the mask itself, holding its kept
        width or its density; ``"mass"`` sinks and band fitted from ``stats``, the ``AttentionStats``
        the mask was made from, to keep ``mass`` of each row's attention, default per head the share
        this mask keeps)."""
        from .lengthfree import extend_mask

        return extend_mask(self, length, hold=hold, stats=stats, mass=mass)

    def with_length_free(self, stats, *, mass: float | None = None) -> "PruneMask":
        """A copy whose sites continue past their calibrated lengths with sinks and a band fitted from
        ``stats`` (the ``AttentionStats`` the mask was made from) to keep ``mass`` of each row's
        attention (default: per head the share this mask keeps on its last calibrated rows), instead
        of the form fitted from the mask itself. ``beyond="extend"``, ``PrunedKVCache`` and
        :meth:`extend` then use it, and :meth:`save` keeps it. Cross-attention sites stay as they
        are (they have no length-free form). ``meta["length_free"]`` records the rule.

        Measured (RESULTS.md, SmolLM2 on Austen, 2x the calibrated length): the mask's own form costs
        +13% perplexity at 50% sparsity, this one +1.7%, keeping fewer of the savings past the
        calibration (28% vs 70% sparse there)."""
        import copy

        from .lengthfree import site_form

        sms = [sm if sm.info.kind == "cross" else sm._with_form(site_form(sm, "mass", stats=stats, mass=mass))
               for sm in (self._sites[n] for n in self._sites)]
        meta = copy.deepcopy(self.meta)
        meta["length_free"] = {"rule": "mass", "mass": "kept" if mass is None else float(mass)}
        return PruneMask(sms, meta)

    # -------------------------------------------------------------------------------- restriction
    def restrict_to_kinds(self, kinds) -> "PruneMask":
        """A copy that prunes only at sites whose kind (``self`` / ``causal`` / ``cross``) is in ``kinds``.

        Every other site keeps all its entries (an all-``True`` token keep tensor [H, q_len, k_len]
        over its calibrated lengths; the backend still applies causality and padding), so attaching
        the result leaves those sites dense. ``meta["restricted_to"]`` records ``kinds``;
        ``meta["sparsity"]`` is recomputed over all sites' attendable entries and
        ``meta["selected_sparsity"]`` over the selected sites only. A block-level mask whose kept
        sites would mix with token-level all-kept ones becomes token-level as a whole.
        """
        import copy

        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in ("self", "causal", "cross")]
        if unknown:
            raise InvalidArgumentError(f"unknown site kind(s) {unknown}; kinds are self, causal, cross")
        meta = copy.deepcopy(self.meta)
        site_meta = meta.setdefault("sites", {})
        masks = []
        for name, sm in self._sites.items():
            if sm.info.kind in kinds:
                masks.append(sm)
                continue
            keep = torch.ones(sm.info.num_heads, sm.q_len, sm.k_len, dtype=torch.bool)
            masks.append(SiteMask(sm.info, sm.q_len, sm.k_len, keep=keep, block=None))
            m = site_meta.setdefault(name, {})
            att = m.get("attendable_entries", 0)
            m.update({"target_sparsity": 0.0, "sparsity": 0.0, "paper_sparsity": 0.0, "kept_entries": att,
                      "kept_units": int(keep.numel()), "units": int(keep.numel()), "threshold": None})

        def sparsity_of(names) -> float:
            total = sum(site_meta.get(n, {}).get("attendable_entries", 0) for n in names)
            kept = sum(site_meta.get(n, {}).get("kept_entries", 0) for n in names)
            return 1.0 - kept / total if total else 0.0

        meta["restricted_to"] = list(kinds)
        meta["sparsity"] = sparsity_of(self.sites)
        meta["selected_sparsity"] = sparsity_of([n for n in self.sites if self._sites[n].info.kind in kinds])
        if any(m.block is not None for m in masks):  # mixed levels: the mask as a whole is token-level
            meta["block"] = None
            masks = [m if m.block is None else SiteMask(m.info, m.q_len, m.k_len,
                                                        keep=m._tokens(m.q_len, m.k_len, 0), block=None)
                     for m in masks]
        return PruneMask(masks, meta)


def _short(items: list[str], n: int = 5) -> str:
    head = ", ".join(items[:n])
    return head + (f" ... ({len(items) - n} more)" if len(items) > n else "")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
