"""Input handling shared by the kernels' entry points: checks, the scale, key padding, head-dim padding."""

from __future__ import annotations

import math

import torch

from ..errors import InvalidArgumentError
from .config import _interpreting

__all__ = ["key_padding_bool"]


def _pow2_dim(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _padded_call(q, k, v, scale, key_padding, run) -> torch.Tensor:
    """What both entry points do around the kernels: empty inputs give zeros; otherwise
    ``run(q, k, v, kpm, scale)`` on head dims padded to powers of two, with the scale checked and the key
    padding as int8 ``[B, Lk]`` (or None), and the output ``[B, Hq, Lq, Dv]`` cut back to ``v``'s head dim."""
    B, Hq, Lq, D = q.shape
    Lk, dv = k.shape[2], v.shape[3]
    if Lq == 0 or Lk == 0 or B == 0:
        return q.new_zeros(B, Hq, Lq, dv)
    scale = _scale(scale, D)
    kpm = _key_padding_mask(key_padding, B, Lk, q.device)
    out = run(*_pad_inputs(q, k, v), kpm, scale)
    return out if out.shape[3] == dv else out[..., :dv]


def _check_inputs(q, k, v) -> None:
    """:func:`_check_shapes`, then what the Triton kernels need: fp16/bf16/fp32, head dims up to 256, CUDA
    (or the interpreter)."""
    _check_shapes(q, k, v)
    D = q.shape[3]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InvalidArgumentError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if max(D, v.shape[3]) > 256:
        raise InvalidArgumentError(f"head dim {max(D, v.shape[3])} > 256 is not supported by the kernels")
    if q.device.type != "cuda" and not _interpreting():
        raise InvalidArgumentError(
            f"sparse_attention runs on CUDA tensors (got {q.device}); on the CPU use backend='reference' "
            "or set TRITON_INTERPRET=1 before importing triton (slow, for tests)"
        )


def _check_shapes(q, k, v) -> None:
    """4-D ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]`` with ``Hq`` a multiple of ``Hkv``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InvalidArgumentError("q, k, v must be 4-D: [batch, heads, length, head_dim]")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or v.shape[0] != B or v.shape[1] != Hkv or v.shape[2] != Lk or Dk != D:
        raise InvalidArgumentError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if Hkv == 0 or Hq % Hkv:
        raise InvalidArgumentError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")


def _scale(scale, D: int) -> float:
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not scale > 0:
        raise InvalidArgumentError(f"scale must be positive, got {scale}")
    return scale


def key_padding_bool(key_padding, Lk: int, device) -> torch.Tensor | None:
    """``key_padding`` as bool ``[B, Lk]`` (True: a real key): int key lengths ``[B]`` are expanded on ``device``;
    a bool mask or None is returned as it is."""
    if key_padding is None or key_padding.dtype == torch.bool:
        return key_padding
    return torch.arange(Lk, device=device)[None, :] < key_padding.to(device)[:, None]


def _key_padding_mask(key_padding, B: int, Lk: int, device) -> torch.Tensor | None:
    """``key_padding`` (bool ``[B, Lk]`` or int lengths ``[B]``) as the kernels' int8 ``[B, Lk]``, or None."""
    if key_padding is None:
        return None
    kp = key_padding.to(device)
    if kp.dtype == torch.bool:
        if kp.shape != (B, Lk):
            raise InvalidArgumentError(f"key_padding must be [batch, Lk] = {(B, Lk)}, got {tuple(kp.shape)}")
        return kp.to(torch.int8).contiguous()
    if kp.shape != (B,):
        raise InvalidArgumentError(f"key lengths must be [batch] = {(B,)}, got {tuple(kp.shape)}")
    return key_padding_bool(kp, Lk, device).to(torch.int8).contiguous()


def _pad_inputs(q, k, v):
    """Head dims padded to powers of two (>= 16), last dims made dense."""
    D, dv_orig = q.shape[3], v.shape[3]
    dp, dvp = _pow2_dim(D), _pow2_dim(dv_orig)
    if dp != D:
        q = torch.nn.functional.pad(q, (0, dp - D))
        k = torch.nn.functional.pad(k, (0, dp - D))
    if dvp != dv_orig:
        v = torch.nn.functional.pad(v, (0, dvp - dv_orig))
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    return q, k, v
