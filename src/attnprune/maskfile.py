"""The ``PruneMask`` file format: safetensors with bit-packed keep tensors and a JSON header.

Tensor ``keep.<i>`` is site ``i``'s keep tensor, bit-packed (uint8, 8 entries a byte, row-major,
big-endian bits; its shape is in the header); the safetensors metadata key ``"attnprune"`` holds
a JSON header (``format = "attnprune.mask"``, version, site infos, lengths, block, per-tensor
blake2b checksums, the mask's ``meta``). Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ._io import atomic_path
from .errors import CorruptFileError, InvalidArgumentError
from .sites import SiteInfo

FORMAT = "attnprune.mask"
VERSION = 1


def save_mask(mask, path: str | os.PathLike) -> None:
    """Write ``mask`` to ``path`` (safetensors + JSON header), atomically."""
    from safetensors.torch import save_file

    sms = [mask.site(n) for n in mask.sites]
    tensors = {f"keep.{i}": _pack(m.keep) for i, m in enumerate(sms)}
    header = {
        "format": FORMAT, "version": VERSION, "meta": mask.meta,
        "sites": [{"info": m.info.to_dict(), "q_len": m.q_len, "k_len": m.k_len, "block": m.block,
                   "shape": list(m.keep.shape), "checksum": _checksum(tensors[f"keep.{i}"]),
                   **({"length_free": m.length_free.to_dict()} if m.length_free_fitted else {})}
                  for i, m in enumerate(sms)],
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"attnprune": json.dumps(header)})


def load_mask(path: str | os.PathLike):
    """Read a mask written by :func:`save_mask`; ``CorruptFileError`` if it is not a valid mask file."""
    from safetensors import safe_open

    from .mask import PruneMask, SiteMask

    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"{p}: no such mask file")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("attnprune")
            if raw is None:
                raise CorruptFileError(f"{p}: not an attnprune mask file (no attnprune header)")
            header = json.loads(raw)
            if header.get("format") != FORMAT:
                raise CorruptFileError(f"{p}: not an attnprune mask file (format "
                                       f"{header.get('format')!r}, expected {FORMAT!r})")
            if header.get("version") != VERSION:
                raise CorruptFileError(f"{p}: unsupported mask file version {header.get('version')!r}")
            masks = []
            for i, s in enumerate(header["sites"]):
                packed = f.get_tensor(f"keep.{i}")
                if _checksum(packed) != s["checksum"]:
                    raise CorruptFileError(f"{p}: checksum mismatch for site {s['info']['name']!r}")
                keep = _unpack(packed, s["shape"])
                sm = SiteMask(SiteInfo.from_dict(s["info"]), s["q_len"], s["k_len"], keep=keep, block=s["block"])
                if "length_free" in s:  # a form given by PruneMask.with_length_free
                    from .lengthfree import LengthFree

                    sm = sm._with_form(LengthFree.from_dict(s["length_free"]))
                masks.append(sm)
            return PruneMask(masks, header["meta"])
    except CorruptFileError:
        raise
    except Exception as e:  # safetensors / json / missing keys / bad shapes
        raise CorruptFileError(f"{p}: truncated or corrupted mask file ({type(e).__name__}: {e}); "
                               f"make it again with `attnprune mask`") from None


def _pack(keep: torch.Tensor) -> torch.Tensor:
    """bool [...] -> uint8 [ceil(numel / 8)], 8 entries per byte (row-major, big-endian bits)."""
    return torch.from_numpy(np.packbits(keep.detach().cpu().contiguous().numpy().reshape(-1)))


def _unpack(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    n = int(np.prod(shape))
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-n // 8):
        raise ValueError(f"packed keep tensor has {packed.numel()} {packed.dtype} values for shape {shape}")
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool).reshape(shape))


def _checksum(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
