"""Integrity helpers for attnprune's safetensors files: checksums and the file's outer frame.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON header
(tensor names, dtypes, shapes, offsets and a ``__metadata__`` string map), then the tensor bytes.
``check_frame`` checks that frame before safetensors parses it, so a damaged length or header is
reported as corruption rather than as whatever parse error it happens to cause. ``tensor_checksum``
covers a tensor's dtype, shape and bytes; ``json_checksum`` a JSON-able header.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Callable

import torch

from .errors import CorruptFileError


def tensor_checksum(t: torch.Tensor) -> str:
    """blake2b-128 (hex) of ``t``'s dtype, shape and bytes (row-major, on the CPU)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}:{list(t.shape)};".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def json_checksum(obj) -> str:
    """blake2b-128 (hex) of ``obj``'s canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def check_frame(path: str | os.PathLike, corrupt: Callable[[str], str]) -> None:
    """Raise ``CorruptFileError(corrupt(reason))`` unless ``path`` has a well-formed safetensors frame.

    corrupt: builds the message from the reason; it should name the file, say it is corrupted
    and say what to do.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(corrupt(f"only {size} bytes, less than a safetensors header length"))
        n = struct.unpack("<Q", head)[0]
        if n == 0 or n > size - 8:
            raise CorruptFileError(corrupt(f"its safetensors header length says {n} bytes, but only "
                                           f"{size - 8} bytes follow it"))
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptFileError(corrupt(f"its safetensors header, {n} bytes by the header length, "
                                       f"is not valid JSON: {e}")) from None
    if not isinstance(header, dict):
        raise CorruptFileError(corrupt(f"its safetensors header is not a JSON object"))
    end = 0
    for name, entry in header.items():
        if name != "__metadata__":
            try:
                end = max(end, int(entry["data_offsets"][1]))
            except (TypeError, KeyError, IndexError, ValueError):
                raise CorruptFileError(corrupt(f"tensor {name!r} has no valid data offsets")) from None
    if 8 + n + end != size:
        raise CorruptFileError(corrupt(f"the header and tensors account for {8 + n + end} bytes, "
                                       f"the file has {size}"))
