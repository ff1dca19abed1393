"""Hugging Face capture path: an attention function registered in ``transformers.AttentionInterface``.

Every ``PretrainedConfig`` reachable from the model (``module.config`` and their sub-configs) has its
attention implementation switched to ``"attnprune"`` while intercepting and restored afterwards.
Masks for it are built by transformers' ``sdpa_mask`` (registered in ``AttentionMaskInterface``):
boolean (True = attend) or None together with the module's ``is_causal``. When the handler returns
None, transformers' ``sdpa_attention_forward`` runs, so the model computes exactly what its ``"sdpa"``
implementation computes, whatever implementation it was configured with; for models with attention
sinks (gpt-oss's ``s_aux``) or logit soft-capping (Gemma 2's ``softcap``), which SDPA cannot express,
:func:`attnprune.softmax.dense_attention` runs instead. Models whose classes do not
use ``AttentionInterface`` (transformers' ``_can_set_attn_implementation()`` is False) are left alone
and captured by the generic SDPA path when they call ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

from ..softmax import dense_attention

NAME = "attnprune"
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()
_registered = False
# transformers' SDPA path, imported by _register (before any forward): an import inside the attention
# function breaks torch.compile's graph on some torch versions (transformers is a lazy module)
_sdpa_forward = _position_bias_mask = None


def _register() -> None:
    global _registered, _sdpa_forward, _position_bias_mask
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    _sdpa_forward, _position_bias_mask = sdpa_attention_forward, create_position_bias_mask
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      position_bias=None, **kwargs):
    """The registered function: same signature and result as transformers' ``sdpa_attention_forward``.

    query: ``[B, Hq, Lq, D]``; key/value: ``[B, Hkv, Lk, D]``; returns (``[B, Lq, Hq, Dv]``, None).
    """
    create_position_bias_mask = _position_bias_mask
    sinks = kwargs.pop("s_aux", None)
    sinks = kwargs.pop("sinks", None) if sinks is None else sinks
    softcap = kwargs.pop("softcap", None)
    it = _ACTIVE.get(module)
    if it is None:  # a module of a model no longer intercepted, or not part of the intercepted model
        return _original(module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias,
                         kwargs, sinks, softcap)
    module_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    lq, lk = query.shape[2], key.shape[2]
    causal = bool(lq > 1 and attention_mask is None and module_causal)
    k, v = key, value
    if causal and lk > lq:  # empty static cache prefill, as sdpa_attention_forward does
        k, v = key[:, :, :lq], value[:, :, :lq]
        if position_bias is not None:
            position_bias = position_bias[..., :lq]
    mask = attention_mask
    if position_bias is not None:
        mask = create_position_bias_mask(position_bias, attention_mask, causal, query, k)
        causal = False
    it.hf_depth += 1
    try:
        out = it.dispatch(module, query, k, v, mask, causal, scaling, dropout,
                          bool(getattr(module, "is_causal", False)) or bool(is_causal),
                          window=kwargs.get("sliding_window"), sinks=sinks, softcap=softcap)
        if out is None:
            return _original(module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias,
                             kwargs, sinks, softcap)
    finally:
        it.hf_depth -= 1
    return out.transpose(1, 2).contiguous(), None


def _original(module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias, kwargs, sinks,
              softcap):
    """What the model computes without attnprune: transformers' ``sdpa_attention_forward``, or for the softmax
    variants SDPA cannot express (sinks, soft-capping) :func:`attnprune.softmax.dense_attention` with SDPA's
    causality rules (top-left causal without a mask, an empty static cache's keys cut to the queries)."""
    if sinks is None and softcap is None:
        return _sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             is_causal=is_causal, position_bias=position_bias, **kwargs)
    module_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    lq = query.shape[2]
    causal = bool(lq > 1 and attention_mask is None and module_causal)
    if causal and key.shape[2] > lq:
        key, value = key[:, :, :lq], value[:, :, :lq]
    out = dense_attention(query, key, value, attention_mask, causal, scaling, sinks=sinks, softcap=softcap,
                          dropout_p=dropout, narrow=_may_read_host())
    return out.transpose(1, 2).contiguous(), None


def _may_read_host() -> bool:
    """Not while torch.compile traces or a CUDA graph is captured: no host reads there."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return not (capturing or torch.compiler.is_compiling())


def _configs(model: nn.Module) -> list:
    from transformers import PretrainedConfig

    seen, out = set(), []
    todo = [getattr(m, "config", None) for m in model.modules()]
    while todo:
        c = todo.pop()
        if not isinstance(c, PretrainedConfig) or id(c) in seen:
            continue
        seen.add(id(c))
        out.append(c)
        todo.extend(getattr(c, k, None) for k in getattr(c, "sub_configs", {}) or {})
    return out


def switch(model: nn.Module, interceptor) -> list | None:
    """Point every config of a transformers model at ``"attnprune"``; returns what ``restore`` needs."""
    if "transformers" not in sys.modules:  # nothing can be a transformers model
        return None
    from transformers import PreTrainedModel

    pretrained = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    if not pretrained or not all(type(m)._can_set_attn_implementation() for m in pretrained):
        return None
    _register()
    saved = [(c, c._attn_implementation_internal) for c in _configs(model)]
    for c, _ in saved:
        c._attn_implementation_internal = NAME
    mods = [m for m in model.modules()]
    for m in mods:
        _ACTIVE[m] = interceptor
    return [saved, mods]


def restore(state) -> None:
    saved, mods = state
    for c, impl in saved:
        c._attn_implementation_internal = impl
    for m in mods:
        _ACTIVE.pop(m, None)
