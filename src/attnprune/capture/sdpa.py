"""Generic capture path: a ``TorchFunctionMode`` catching ``F.scaled_dot_product_attention``.

Active only while the intercepted model's forward runs. ``F.multi_head_attention_forward``
(``nn.MultiheadAttention``) is re-run with ``need_weights=False`` so that it goes through SDPA;
while intercepted, ``nn.MultiheadAttention`` therefore returns ``None`` attention weights. Its
fused fast path is never taken while a torch-function mode is active.
"""

from __future__ import annotations

import inspect

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_MHA_PARAMS = list(inspect.signature(F.multi_head_attention_forward).parameters)


def _bind(names, defaults, args, kwargs) -> dict:
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


class SDPAMode(TorchFunctionMode):
    """Routes SDPA calls made during the model's forward to ``Interceptor.dispatch``."""

    def __init__(self, interceptor):
        super().__init__()
        self.it = interceptor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            a = _bind(_MHA_PARAMS, {}, args, kwargs)
            if a.get("need_weights", True):
                a["need_weights"] = False
            # The mode is off inside its own handler, so the SDPA call inside is caught by swapping
            # the module-level function that multi_head_attention_forward calls.
            F.scaled_dot_product_attention = lambda *x, **y: self.__torch_function__(_SDPA, (), x, y)
            try:
                return func(**a)
            finally:
                F.scaled_dot_product_attention = _SDPA
        if func is not _SDPA or self.it.hf_depth:
            return func(*args, **kwargs)
        a = _bind(_SDPA_PARAMS, _SDPA_DEFAULTS, args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        if q.dim() not in (3, 4) or k.dim() != q.dim():
            return func(*args, **kwargs)
        squeeze = q.dim() == 3
        mask = a["attn_mask"]
        if squeeze:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            if mask is not None and mask.dim() == 3:
                mask = mask.unsqueeze(1)
        if k.shape[1] != q.shape[1] and not a["enable_gqa"]:
            k = k.expand(k.shape[0], q.shape[1], *k.shape[2:])
            v = v.expand(v.shape[0], q.shape[1], *v.shape[2:])
        self.it.mode_caught = True
        out = self.it.dispatch(None, q, k, v, mask, a["is_causal"], a["scale"], a["dropout_p"], False)
        if out is None:
            return func(*args, **kwargs)
        return out.squeeze(1) if squeeze else out
