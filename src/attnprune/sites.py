"""Attention sites: the places in a model where attention is computed."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SITE_KINDS = ("self", "causal", "cross")


@dataclass(frozen=True)
class SiteInfo:
    """One attention site.

    name: the module path (``model.layers.3.self_attn``); a module that calls attention more
        than once gets ``#1``, ``#2`` ... appended for its later calls.
    kind: ``"self"``, ``"causal"`` (causal self-attention) or ``"cross"``.
    num_heads: query heads.
    num_kv_heads: key/value heads (``num_heads`` unless grouped-query attention).
    """

    name: str
    kind: str
    num_heads: int
    num_kv_heads: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SiteInfo":
        return cls(name=d["name"], kind=d["kind"], num_heads=int(d["num_heads"]),
                   num_kv_heads=int(d["num_kv_heads"]))
