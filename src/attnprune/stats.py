"""AttentionStats: streaming sums of attention probabilities per site, mergeable and saveable.

At granularity ``g`` the statistics of a site live on a grid of ``g x g`` token blocks:
``sum(site)[h, i, j]`` is the summed probability of head ``h`` over every observed token entry
of block ``(i, j)`` and ``count(site)[i, j]`` the number of observed token entries in that block
(the same for every head), so ``mean(site) = sum / count`` is the mean probability per entry.
An entry is *observed* when its query is a real (non-padding) position and the key was
attendable for it (not padding, not causal-future, not masked out).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Iterable

import torch
import torch.nn.functional as F

from ._io import atomic_path
from .errors import CorruptFileError, InvalidArgumentError, MaskMismatchError
from .sites import SiteInfo

FORMAT = "attnprune.stats"
VERSION = 1


def _grow(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad the last two dims of ``t`` up to ``rows x cols``."""
    pr, pc = rows - t.shape[-2], cols - t.shape[-1]
    if pr == 0 and pc == 0:
        return t
    return F.pad(t, (0, pc, 0, pr))


class AttentionStats:
    """Accumulated attention probabilities of a model over a dataset.

    Args:
        infos: the attention sites, in model order.
        granularity: 1 for token-level statistics, ``g > 1`` for ``g x g`` block sums.
        model_name: identity of the observed model (architecture and sizes).
        description: free text describing the calibration data.
    """

    def __init__(self, infos: Iterable[SiteInfo] = (), granularity: int = 1, model_name: str = "",
                 description: str = ""):
        if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 1:
            raise InvalidArgumentError(f"granularity must be a positive integer, got {granularity!r}")
        self._infos: dict[str, SiteInfo] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, torch.Tensor] = {}
        self._len: dict[str, tuple[int, int]] = {}
        self.granularity = granularity
        self.model_name = model_name
        self.description = description
        self.num_sequences = 0
        for info in infos:
            self.add_site(info)

    # ---- structure -------------------------------------------------------------------------
    def add_site(self, info: SiteInfo) -> None:
        """Register a site (appended to the model order). Re-adding an identical site is a no-op."""
        old = self._infos.get(info.name)
        if old is not None and old != info:
            raise MaskMismatchError(f"site {info.name!r} registered twice with different info: {old} vs {info}")
        self._infos[info.name] = info

    @property
    def sites(self) -> list[str]:
        """Site names in model order."""
        return list(self._infos)

    @property
    def infos(self) -> dict[str, SiteInfo]:
        return dict(self._infos)

    def _check(self, site: str) -> SiteInfo:
        if site not in self._infos:
            raise InvalidArgumentError(f"unknown site {site!r}; known sites: {', '.join(self._infos) or '(none)'}")
        return self._infos[site]

    # ---- accumulation ----------------------------------------------------------------------
    def add(self, site: str, prob_sum: torch.Tensor, count: torch.Tensor, *, q_len: int | None = None,
            k_len: int | None = None) -> None:
        """Accumulate observations of one site.

        Args:
            prob_sum: ``[H, Qg, Kg]`` summed probabilities per (block of) entries.
            count: ``[Qg, Kg]`` number of observed token entries per (block of) entries.
            q_len, k_len: token lengths behind the grid (default ``Qg * g`` / ``Kg * g``).
        The accumulators grow (zero-padded) when the new grid is larger than the stored one.
        """
        info = self._check(site)
        if prob_sum.dim() != 3 or prob_sum.shape[0] != info.num_heads:
            raise MaskMismatchError(f"site {site!r}: prob_sum must be [{info.num_heads}, Qg, Kg], "
                                    f"got {tuple(prob_sum.shape)}")
        if tuple(count.shape) != tuple(prob_sum.shape[1:]):
            raise MaskMismatchError(f"site {site!r}: count shape {tuple(count.shape)} does not match "
                                    f"prob_sum grid {tuple(prob_sum.shape[1:])}")
        g = self.granularity
        qlen = prob_sum.shape[1] * g if q_len is None else int(q_len)
        klen = prob_sum.shape[2] * g if k_len is None else int(k_len)
        ps, ct = prob_sum.detach().to(torch.float64), count.detach().to(torch.float64)
        if site in self._sum:
            s, c = self._sum[site], self._count[site]
            rows, cols = max(s.shape[1], ps.shape[1]), max(s.shape[2], ps.shape[2])
            s, c = _grow(s, rows, cols), _grow(c, rows, cols)
            s += _grow(ps.to(s.device), rows, cols)
            c += _grow(ct.to(c.device), rows, cols)
            self._sum[site], self._count[site] = s, c
            oq, ok = self._len[site]
            self._len[site] = (max(oq, qlen), max(ok, klen))
        else:
            self._sum[site], self._count[site] = ps.clone(), ct.clone()
            self._len[site] = (qlen, klen)

    # ---- reading ---------------------------------------------------------------------------
    def observed(self, site: str) -> bool:
        """Whether ``site`` has any accumulated observation."""
        self._check(site)
        return site in self._sum

    def sum(self, site: str) -> torch.Tensor:
        """Raw probability sums, float64 ``[H, Qg, Kg]``."""
        self._need(site)
        return self._sum[site]

    def count(self, site: str) -> torch.Tensor:
        """Raw entry counts, float64 ``[Qg, Kg]``."""
        self._need(site)
        return self._count[site]

    def mean(self, site: str) -> torch.Tensor:
        """Mean probability per entry, float32 ``[H, Qg, Kg]``; NaN where never observed."""
        self._need(site)
        s, c = self._sum[site], self._count[site]
        m = s / c.clamp_min(1)
        m = torch.where(c > 0, m, torch.full_like(m, float("nan")))
        return m.to(torch.float32)

    def q_len(self, site: str) -> int:
        """Longest query length (tokens) observed at ``site``."""
        self._need(site)
        return self._len[site][0]

    def k_len(self, site: str) -> int:
        """Longest key length (tokens) observed at ``site``."""
        self._need(site)
        return self._len[site][1]

    def _need(self, site: str) -> None:
        self._check(site)
        if site not in self._sum:
            raise InvalidArgumentError(f"site {site!r} has no observations")

    def to(self, device) -> "AttentionStats":
        """Move the accumulators to ``device`` (in place); returns ``self``."""
        for d in (self._sum, self._count):
            for k in d:
                d[k] = d[k].to(device)
        return self

    def __repr__(self) -> str:
        return (f"AttentionStats({len(self._infos)} sites, granularity={self.granularity}, "
                f"sequences={self.num_sequences}, model={self.model_name!r})")

    # ---- merging ---------------------------------------------------------------------------
    def __add__(self, other: "AttentionStats") -> "AttentionStats":
        if not isinstance(other, AttentionStats):
            return NotImplemented
        if other.granularity != self.granularity:
            raise MaskMismatchError(f"cannot add stats of granularity {self.granularity} and {other.granularity}")
        if self._infos != other._infos or list(self._infos) != list(other._infos):
            diff = sorted({i.name for i in set(self._infos.values()) ^ set(other._infos.values())})
            raise MaskMismatchError(f"cannot add stats of different models: sites differ ({', '.join(diff) or 'order'})")
        out = AttentionStats(self._infos.values(), self.granularity, self.model_name, self.description)
        for src in (self, other):
            for site in src._sum:
                q, k = src._len[site]
                out.add(site, src._sum[site], src._count[site], q_len=q, k_len=k)
        out.num_sequences = self.num_sequences + other.num_sequences
        return out

    def all_reduce(self, group=None) -> "AttentionStats":
        """Sum the statistics of every process of ``group`` (``torch.distributed``), in place.

        Every rank must hold the same sites (the same model). Ranks that never saw a site
        contribute zeros. Returns ``self``.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidArgumentError("all_reduce needs an initialised torch.distributed process group")
        dev = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
        n = len(self._infos)
        code = zlib.crc32(json.dumps([i.to_dict() for i in self._infos.values()] + [self.granularity]).encode())
        ident = torch.tensor([code, -code], dtype=torch.int64, device=dev)
        dist.all_reduce(ident, op=dist.ReduceOp.MAX, group=group)
        if int(ident[0]) != code or int(ident[1]) != -code:
            raise MaskMismatchError("all_reduce: the processes hold different sites or granularities "
                                    "(observe the same model on every rank)")
        shapes = torch.zeros(max(n, 1), 4, dtype=torch.int64, device=dev)
        for i, site in enumerate(self._infos):
            if site in self._sum:
                shapes[i] = torch.tensor([*self._sum[site].shape[1:], *self._len[site]])
        dist.all_reduce(shapes, op=dist.ReduceOp.MAX, group=group)
        seqs = torch.tensor([self.num_sequences], dtype=torch.float64, device=dev)
        dist.all_reduce(seqs, group=group)
        self.num_sequences = int(seqs.item())
        for i, (site, info) in enumerate(self._infos.items()):
            rows, cols, ql, kl = (int(x) for x in shapes[i])
            if rows == 0:
                continue
            home = self._sum[site].device if site in self._sum else torch.device("cpu")
            s = self._sum.get(site, torch.zeros(info.num_heads, 0, 0, dtype=torch.float64))
            c = self._count.get(site, torch.zeros(0, 0, dtype=torch.float64))
            s, c = _grow(s.to(dev), rows, cols).contiguous(), _grow(c.to(dev), rows, cols).contiguous()
            dist.all_reduce(s, group=group)
            dist.all_reduce(c, group=group)
            self._sum[site], self._count[site] = s.to(home), c.to(home)
            self._len[site] = (ql, kl)
        return self

    # ---- files -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (safetensors with a JSON header), atomically."""
        from safetensors.torch import save_file

        tensors, sites = {}, []
        for i, (site, info) in enumerate(self._infos.items()):
            entry = info.to_dict()
            if site in self._sum:
                tensors[f"sum.{i}"] = self._sum[site].detach().cpu().contiguous()
                tensors[f"count.{i}"] = self._count[site].detach().cpu().contiguous()
                entry["q_len"], entry["k_len"] = self._len[site]
            sites.append(entry)
        header = {"format": FORMAT, "version": VERSION, "granularity": self.granularity,
                  "model_name": self.model_name, "description": self.description,
                  "num_sequences": self.num_sequences, "sites": sites}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"attnprune": json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AttentionStats":
        """Read a file written by :meth:`save`. Raises ``CorruptFileError`` on anything malformed."""
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise CorruptFileError(f"stats file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                header = json.loads(meta["attnprune"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if header.get("format") != FORMAT:
                raise ValueError(f"format is {header.get('format')!r}, not {FORMAT!r}")
            if int(header.get("version", 0)) > VERSION:
                raise ValueError(f"version {header['version']} is newer than this library ({VERSION})")
            out = cls([SiteInfo.from_dict(d) for d in header["sites"]], int(header["granularity"]),
                      header.get("model_name", ""), header.get("description", ""))
            out.num_sequences = int(header.get("num_sequences", 0))
            for i, d in enumerate(header["sites"]):
                if f"sum.{i}" in tensors:
                    out.add(d["name"], tensors[f"sum.{i}"], tensors[f"count.{i}"],
                            q_len=int(d["q_len"]), k_len=int(d["k_len"]))
        except CorruptFileError:
            raise
        except Exception as e:  # safetensors, json, key and shape errors all mean a bad file
            raise CorruptFileError(f"{str(path)!r} is not a readable attnprune stats file "
                                   f"({type(e).__name__}: {e})") from None
        return out
