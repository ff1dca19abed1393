"""AttentionStats: streaming sums of attention probabilities per site, mergeable and saveable.

At granularity ``g`` the statistics of a site live on a grid of ``g x g`` token blocks:
``sum(site)[h, i, j]`` is the summed probability of head ``h`` over every observed token entry
of block ``(i, j)`` and ``count(site)[i, j]`` the number of observed token entries in that block
(the same for every head), so ``mean(site) = sum / count`` is the mean probability per entry.
An entry is *observed* when its query is a real (non-padding) position and the key was
attendable for it (not padding, not causal-future, not masked out).

File format (version 2): safetensors; tensors ``sum.<i>`` / ``count.<i>`` (float64) of site ``i``;
the metadata key ``"attnprune"`` holds a JSON header (format, version, granularity, model name,
description, sequences, site infos with lengths and per-tensor checksums, and a checksum of the
header itself). Loading checks the checksums and the values (finite, counts non-negative integers,
``0 <= sum <= count``): a damaged file is a ``CorruptFileError``, never silently wrong statistics.
Version 1 files (no checksums) still load, with the value checks only.

Scores: ``score`` says what was summed per entry (``observe(..., score=...)``): ``"prob"`` (attention
probabilities, the default), ``"value"`` (probability times value norm), ``"influence"`` (absolute
first-order loss change of removing the entry), ``"loss"`` (the signed first-order loss change) or
``"ablation"`` (each head's measured loss increase under sinks + band restrictions, spread over blocks:
:mod:`attnprune.ablation`). The
header holds ``"score"`` only when it is not ``"prob"``, so probability files are unchanged and files
without it load as ``"prob"``. For scores other than ``"prob"`` the ``sum <= count`` check does not
apply (a score is not bounded by 1), and ``"loss"`` sums may be negative (``SCORE_RANGES``).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from typing import Iterable

import torch
import torch.nn.functional as F

from ._checksum import check_frame, json_checksum, tensor_checksum
from ._io import atomic_path
from .errors import CorruptFileError, InvalidArgumentError, MaskMismatchError
from .sites import SiteInfo

FORMAT = "attnprune.stats"
VERSION = 2
# summed probabilities are float32 (or float64) softmax outputs, each at most 1 up to its rounding
_SUM_SLACK = 4 * torch.finfo(torch.float32).eps
# what each score's sums may hold: probabilities (0 <= sum <= count), non-negative, or either sign
SCORE_RANGES = {"prob": "probability", "value": "non-negative", "influence": "non-negative", "loss": "signed",
                "ablation": "non-negative"}
SCORES = tuple(SCORE_RANGES)


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
        score: what the sums add up per entry: ``"prob"``, ``"value"`` or ``"influence"``.
    """

    def __init__(self, infos: Iterable[SiteInfo] = (), granularity: int = 1, model_name: str = "",
                 description: str = "", score: str = "prob"):
        if score not in SCORES:
            raise InvalidArgumentError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        self.score = score
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
        extra = "" if self.score == "prob" else f", score={self.score!r}"
        return (f"AttentionStats({len(self._infos)} sites, granularity={self.granularity}, "
                f"sequences={self.num_sequences}, model={self.model_name!r}{extra})")

    # ---- merging ---------------------------------------------------------------------------
    def __add__(self, other: "AttentionStats") -> "AttentionStats":
        if not isinstance(other, AttentionStats):
            return NotImplemented
        if other.granularity != self.granularity:
            raise MaskMismatchError(f"cannot add stats of granularity {self.granularity} and {other.granularity}")
        if other.score != self.score:
            raise MaskMismatchError(f"cannot add stats of different scores: {self.score!r} and {other.score!r}")
        if other.model_name != self.model_name:
            raise MaskMismatchError(f"cannot add stats of different models: {self.model_name or '(unnamed)'!r} "
                                    f"and {other.model_name or '(unnamed)'!r}; add only stats observed on the "
                                    f"same model (set model_name equal if they really are one model)")
        if self._infos != other._infos or list(self._infos) != list(other._infos):
            diff = sorted({i.name for i in set(self._infos.values()) ^ set(other._infos.values())})
            raise MaskMismatchError(f"cannot add stats of different models: sites differ ({', '.join(diff) or 'order'})")
        out = AttentionStats(self._infos.values(), self.granularity, self.model_name, self.description,
                             score=self.score)
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
        code = zlib.crc32(json.dumps([i.to_dict() for i in self._infos.values()]
                                     + [self.granularity, self.model_name, self.score]).encode())
        ident = torch.tensor([code, -code], dtype=torch.int64, device=dev)
        dist.all_reduce(ident, op=dist.ReduceOp.MAX, group=group)
        if int(ident[0]) != code or int(ident[1]) != -code:
            raise MaskMismatchError("all_reduce: the processes hold different sites, granularities or "
                                    f"models (this rank: {self.model_name or '(unnamed)'!r}); observe the "
                                    "same model on every rank")
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
        """Write to ``path`` (safetensors with a JSON header and checksums), atomically.

        Raises ``InvalidArgumentError`` if the statistics hold values no observation gives (see
        the module docstring), so that every file ``save`` writes loads.
        """
        from safetensors.torch import save_file

        tensors, sites = {}, []
        for i, (site, info) in enumerate(self._infos.items()):
            entry = info.to_dict()
            if site in self._sum:
                s, c = self._sum[site].detach().cpu().contiguous(), self._count[site].detach().cpu().contiguous()
                problem = _bad_values(info, s, c, *self._len[site], self.granularity,
                                      SCORE_RANGES[self.score])
                if problem:
                    raise InvalidArgumentError(f"cannot save the stats: site {site!r} {problem}, which no "
                                               f"observation gives; these are not attention statistics")
                tensors[f"sum.{i}"], tensors[f"count.{i}"] = s, c
                entry["q_len"], entry["k_len"] = self._len[site]
                entry["checksum"] = {"sum": tensor_checksum(s), "count": tensor_checksum(c)}
            sites.append(entry)
        header = {"format": FORMAT, "version": VERSION, "granularity": self.granularity,
                  "model_name": self.model_name, "description": self.description,
                  "num_sequences": self.num_sequences, "sites": sites}
        if self.score != "prob":
            header["score"] = self.score
        header["checksum"] = json_checksum(header)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"attnprune": json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AttentionStats":
        """Read a file written by :meth:`save`. Raises ``CorruptFileError`` on anything malformed,
        damaged (checksums) or impossible (values), naming the file and the site."""
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise CorruptFileError(f"stats file {str(path)!r} does not exist")
        def corrupt(reason: str) -> str:
            return (f"{str(path)!r}: the stats file is corrupted or was not written by attnprune ({reason}); "
                    f"make it again with `attnprune observe`")

        check_frame(path, corrupt)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if "attnprune" not in meta:
                    raise CorruptFileError(f"{str(path)!r} is not an attnprune stats file (its safetensors "
                                           f"metadata has no attnprune header); make one with `attnprune observe`")
                header = json.loads(meta["attnprune"])
                if not isinstance(header, dict):
                    raise _Damage("the attnprune header is not a JSON object")
                if header.get("format") == "attnprune.mask":
                    raise CorruptFileError(f"{str(path)!r} is an attnprune mask file, not stats; "
                                           f"give the stats file that `attnprune observe` wrote")
                if header.get("format") != FORMAT:
                    raise _Damage(f"format is {header.get('format')!r}, not {FORMAT!r}")
                version = header.get("version")
                if not isinstance(version, int) or version < 1:
                    raise _Damage(f"version {version!r}")
                if version > VERSION:
                    raise CorruptFileError(f"{str(path)!r} is a version {version} stats file, newer than "
                                           f"this attnprune reads ({VERSION}); upgrade attnprune")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return cls._from_file(header, tensors, version)
        except CorruptFileError:
            raise
        except _Damage as e:
            raise CorruptFileError(corrupt(str(e))) from None
        except Exception as e:  # safetensors, json, key, type and shape errors all mean a bad file
            raise CorruptFileError(corrupt(f"{type(e).__name__}: {e}")) from None

    @classmethod
    def _from_file(cls, header: dict, tensors: dict, version: int) -> "AttentionStats":
        """Build from a parsed file; ``_Damage`` (the caller's corruption message) on any damage."""
        if version >= 2:
            body = {k: v for k, v in header.items() if k != "checksum"}
            if header.get("checksum") != json_checksum(body):
                raise _Damage("the attnprune header does not match its checksum")
        score = header.get("score", "prob")
        if score not in SCORES:
            raise _Damage(f"score is {score!r}, not one of {', '.join(SCORES)}")
        out = cls([SiteInfo.from_dict(d) for d in header["sites"]], _nonneg_int(header["granularity"], "granularity"),
                  str(header.get("model_name", "")), str(header.get("description", "")), score=score)
        out.num_sequences = _nonneg_int(header.get("num_sequences", 0), "num_sequences")
        names = set()
        for i, d in enumerate(header["sites"]):
            site, observed = d["name"], f"sum.{i}" in tensors
            names |= {f"sum.{i}", f"count.{i}"} if observed else set()
            if not observed:
                if f"count.{i}" in tensors or "q_len" in d:
                    raise _Damage(f"site {site!r}: its sum or count tensor is missing")
                continue
            s, c = tensors[f"sum.{i}"], tensors[f"count.{i}"]
            if version >= 2:
                want = d["checksum"]
                for what, t in (("sum", s), ("count", c)):
                    if tensor_checksum(t) != want[what]:
                        raise _Damage(f"site {site!r}: the {what} tensor does not match its checksum")
            ql, kl = _nonneg_int(d["q_len"], "q_len"), _nonneg_int(d["k_len"], "k_len")
            problem = _bad_values(out._infos[site], s, c, ql, kl, out.granularity, SCORE_RANGES[score])
            if problem:
                raise _Damage(f"site {site!r} {problem}")
            out.add(site, s, c, q_len=ql, k_len=kl)
        if set(tensors) != names:
            raise _Damage(f"tensors not named in the header: {sorted(set(tensors) - names)}")
        return out


class _Damage(ValueError):
    """What is wrong with a stats file (``load`` turns it into a ``CorruptFileError``)."""


def _nonneg_int(x, what: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise _Damage(f"{what} is {x!r}, not a non-negative integer")
    return x


def _bad_values(info: SiteInfo, s: torch.Tensor, c: torch.Tensor, q_len: int, k_len: int, g: int,
                rng: str = "probability") -> str | None:
    """What is impossible about one site's sums ``s`` and counts ``c``, or None.

    Exact for anything ``observe`` (or adding / all-reducing its results) produces: float64 tensors
    ``s [H, Qg, Kg]`` and ``c [Qg, Kg]`` with ``Qg = ceil(q_len / g)``, ``Kg = ceil(k_len / g)``;
    counts are non-negative integers; sums are finite, ``>= 0`` and ``<= count`` (probabilities are
    at most 1), so where nothing was observed the sum is 0. ``rng`` (``SCORE_RANGES``): for
    ``"non-negative"`` scores sums are finite, ``>= 0`` and 0 where the count is 0, but not bounded by
    the count; ``"signed"`` ones may also be negative.
    """
    grid = (math.ceil(q_len / g), math.ceil(k_len / g))
    if s.dtype != torch.float64 or c.dtype != torch.float64:
        return f"has {s.dtype} sums and {c.dtype} counts, not float64"
    if tuple(s.shape) != (info.num_heads, *grid) or tuple(c.shape) != grid:
        return (f"has sums {list(s.shape)} and counts {list(c.shape)}, not {[info.num_heads, *grid]} and "
                f"{list(grid)} ({info.num_heads} heads, {q_len} x {k_len} tokens, granularity {g})")
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()) or not bool((c == c.round()).all()):
        return "has counts that are not finite non-negative integers"
    if not bool(torch.isfinite(s).all()):
        return "has non-finite (NaN or infinite) probability sums"
    if rng != "signed" and bool((s < 0).any()):
        return f"has negative probability sums (down to {float(s.min()):.4g})"
    if rng != "probability":
        if bool(((s != 0) & (c == 0)).any()):
            return "has score mass where nothing was observed (count 0)"
        return None
    over = s > c * (1 + _SUM_SLACK)
    if bool((over & (c == 0)).any()):
        return "has probability mass where nothing was observed (count 0)"
    if bool(over.any()):
        return f"has mean probabilities above 1 (up to {float((s / c.clamp_min(1)).max()):.4g})"
    return None
