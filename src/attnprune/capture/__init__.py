"""Finding and hooking attention sites: one interception mechanism shared by ``observe`` and ``apply``.

Two paths, chosen per attention call, invisible to callers:

* Hugging Face ``transformers`` models: a function registered in ``transformers.AttentionInterface``
  (and a boolean mask builder in ``AttentionMaskInterface``) under the name ``"attnprune"``; every
  config of the model is switched to it while intercepting and restored afterwards (``hf.py``).
* Anything else: a ``TorchFunctionMode`` active during the model's forward that catches
  ``F.scaled_dot_product_attention`` (and ``F.multi_head_attention_forward``, which
  ``nn.MultiheadAttention`` uses, forced onto its SDPA path) (``sdpa.py``).

Site names are module paths (``model.layers.3.self_attn``); the innermost module whose forward is
running owns an SDPA call. A module calling attention several times in one forward gets ``name#1``,
``name#2`` ... for its later calls.

Site kind (first call decides): ``cross`` when the module has ``is_cross_attention=True``, or a
path component is a known cross-attention name (``encoder_attn``, ``crossattention``,
``cross_attn``, ``cross_attention``, ``EncDecAttention``, ``src_attn``, ``multihead_attn`` inside an
``nn.TransformerDecoderLayer``); else ``causal`` when the call is causal (SDPA ``is_causal=True``, a
Hugging Face module with ``is_causal=True``, or an explicit mask that hides every key to the right
of the diagonal); else ``cross`` when ``Lq != Lk`` (no KV cache can be told apart here); else ``self``.

Hook scope: every module of the model carries a forward pre-hook and a forward hook until the first
completed forward of the model decides whether the SDPA mode is needed. When it is not (a Hugging
Face model whose attention all goes through the HF path), only the modules where the hooks can still
change anything keep them (``Interceptor._narrow``), so the rest of the model runs without Python hooks.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import InvalidArgumentError, NoAttentionSitesError
from ..sites import SiteInfo
from .positions import ForwardContext, Positions

_BUSY: "weakref.WeakKeyDictionary[nn.Module, Interceptor]" = weakref.WeakKeyDictionary()
CROSS_NAMES = ("encoder_attn", "crossattention", "cross_attn", "cross_attention", "encdecattention",
               "enc_dec_attn", "src_attn")


@dataclass
class AttentionCall:
    """One attention computation, as seen by a handler.

    q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]`` (``Hq`` a multiple of ``Hkv``).
    attn_mask: None, a bool tensor (True = may attend) or an additive float tensor, broadcastable
        to ``[B, Hq, Lq, Lk]``.
    is_causal: SDPA's flag (top-left aligned causal mask on top of ``attn_mask``).
    scale: softmax scale (None: ``1/sqrt(D)``); dropout_p: attention dropout probability.
    q_valid: ``[B, Lq]`` bool, False for padded queries, when known (filled by ``observe``).
    kind: ``"self"``, ``"causal"`` or ``"cross"``; info: the site's ``SiteInfo``.
    positions: where the queries and keys sit in their own sequences (mask rows and columns),
        from the forward's padding masks and cache (``positions.py``).
    window: the model's sliding window for this call (query ``i`` sees keys ``j > i - window``),
        when the model says it (transformers' ``sliding_window``); already part of ``attn_mask``.
    sinks: ``[Hq]`` per-head sink logits in every row's softmax denominator (gpt-oss's ``s_aux``;
        :mod:`attnprune.softmax`), or None.
    softcap: the logit cap ``c`` of soft-capped attention (scores ``c * tanh(x / c)``; Gemma 2), or None.
    """

    site: str
    module: nn.Module | None
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None
    is_causal: bool
    scale: float | None
    dropout_p: float
    kind: str
    info: SiteInfo
    q_valid: torch.Tensor | None = None
    positions: Positions | None = None
    window: int | None = None
    sinks: torch.Tensor | None = None
    softcap: float | None = None


Handler = Callable[[AttentionCall], "torch.Tensor | None"]


def allowed_entries(mask: torch.Tensor | None, is_causal: bool, lq: int, lk: int,
                    device=None) -> torch.Tensor | None:
    """Bool ``[..., Lq, Lk]`` of entries a call may attend to (None: all). Float masks count an
    entry as masked when it is below half the dtype's most negative value (``-inf`` or ``finfo.min``)."""
    allowed = None
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            allowed = mask > torch.finfo(mask.dtype).min / 2
    if is_causal:
        tril = torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
        allowed = tril if allowed is None else allowed & tril
    return allowed


def _looks_causal(mask: torch.Tensor | None, lq: int, lk: int) -> bool:
    """True when an explicit mask hides every key right of the (bottom-right aligned) diagonal."""
    if mask is None or lq < 2:
        return False
    allowed = allowed_entries(mask, False, lq, lk)
    future = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).triu(lk - lq + 1)
    return not bool((allowed.expand(*allowed.shape[:-2], lq, lk) & future).any())


def site_kind(name: str, module: nn.Module | None, parent: nn.Module | None, causal: bool,
              lq: int, lk: int) -> str:
    """The site kind rule of this module's docstring."""
    if module is not None and getattr(module, "is_cross_attention", False) is True:
        return "cross"
    parts = [p.lower() for p in name.split("#")[0].split(".")]
    if any(p in CROSS_NAMES for p in parts):
        return "cross"
    if parts[-1] == "multihead_attn" and isinstance(parent, nn.TransformerDecoderLayer):
        return "cross"
    if causal:
        return "causal"
    return "cross" if lq != lk else "self"


class Interceptor:
    """Hooks on the modules of ``model`` that name attention calls and route them to ``handler``.

    The per-module hooks keep the stack of modules whose forward runs: its top owns an SDPA call; a
    module entered while it is empty (the model, a submodule called directly such as
    ``model.get_encoder()``, a layer recomputed by activation checkpointing) turns the SDPA mode on and
    may start a ``ForwardContext`` (``ForwardContext.starts_forward``); a module's pre-hook resets its
    call count (``name#1`` ...). Once the SDPA mode is known to be unneeded (HF path only), the owner
    of a call is the module calling the attention function and the hooks matter only where a forward
    can be entered around such a module: ``_narrow`` then removes the others.
    """

    def __init__(self, model: nn.Module, handler: Handler):
        from .sdpa import SDPAMode

        self.model, self.handler = model, handler
        self.names = {m: n for n, m in model.named_modules()}
        self.up: dict[nn.Module, list[nn.Module]] = {}  # every parent of a module (a shared module has several)
        for m in model.modules():
            for c in m.children():
                self.up.setdefault(c, []).append(m)
        self.parents = {c: ps[-1] for c, ps in self.up.items()}
        # transformers models among the modules, looked up here: an import inside a forward hook
        # breaks torch.compile's graph on some torch versions (2.11: "Bad import result", _LazyModule)
        self.hf_models = {m: _is_hf_model(m) for m in model.modules()}
        self.stack: list[nn.Module] = []
        self.counts: dict[nn.Module, int] = {}
        self.infos: dict[str, SiteInfo] = {}
        self.calls = 0
        self.forwards = 0
        self.hf_depth = 0  # >0 while the HF path runs an attention function (SDPA path stays out)
        self.mode = SDPAMode(self)
        # The SDPA mode adds Python work to every torch op of the forward. With the Hugging Face path
        # active it is only needed for attention outside that path (a custom module inside or around
        # an HF model): the first full forward runs with it and records whether it caught any call.
        self.mode_on = False
        self.mode_caught = False  # the mode caught an attention call outside the HF path
        self.mode_needed: bool | None = None  # None: not known yet
        self.after_forward: Callable[[dict], None] | None = None  # called after a successful model forward
        self._root_kwargs: dict = {}
        self.context = ForwardContext()  # positions of the forward running now (or last run)
        self.hooked: dict[nn.Module, tuple] = {}  # module -> the handles of its two per-module hooks
        self.narrowed = False  # the per-module hooks are on the modules of ``_narrow`` only
        self._seen: set | None = None  # modules entered before the SDPA mode is decided (HF path)
        self._keep: set = set()  # modules seen then that keep their hooks (``_narrow``)
        self._root_handles = []
        self._hf = None

    # ---- installation ----------------------------------------------------------------------
    def install(self) -> None:
        from . import hf

        mods = list(self.model.modules())
        if any(m in _BUSY for m in mods):
            raise InvalidArgumentError(
                f"{type(self.model).__name__} (or a module inside it) is already intercepted, e.g. a mask is "
                "attached to it: detach it before observing or applying again")
        for m in mods:
            _BUSY[m] = self
        for m in mods:
            self._hook(m)
        self._root_handles = [self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True),
                              self.model.register_forward_hook(self._root_done)]
        self._hf = hf.switch(self.model, self)
        if self._hf is not None:
            self._seen = set()

    def _hook(self, m: nn.Module) -> None:
        self.hooked[m] = (m.register_forward_pre_hook(self._pre, with_kwargs=True),
                          m.register_forward_hook(self._post, always_call=True))

    def _upward(self, mods) -> set:
        """``mods`` and all their ancestors in the model."""
        out, todo = set(mods), list(mods)
        while todo:
            for p in self.up.get(todo.pop(), ()):
                if p not in out:
                    out.add(p)
                    todo.append(p)
        return out

    def _narrow(self) -> None:
        """Remove the per-module hooks that can no longer change anything (the SDPA mode is off for
        good). They stay on the model; on the modules that owned an attention call or ran around one;
        on those entered with a forward's inputs (``ForwardContext.starts_forward``: entered from
        outside, they start a context); on those no forward has entered yet (unknown); and on the
        ancestors of all these, so a module without hooks has none below it. Hence a forward entered
        at a hooked module runs the hooks and starts the context it did before, and one entered at a
        module without hooks owns no attention call and starts no context, with or without hooks
        (for modules that call their submodules, with the keywords of the forwards seen so far).
        A module that calls attention later anyway gets its hooks back then (``_widen``); that first
        call is named as before (its count is 0: it has had none)."""
        keep = {m for m in self._keep if m in self.hooked} | (self.hooked.keys() - self._seen)
        keep = self._upward(keep | {self.model})
        for m in [m for m in self.hooked if m not in keep]:
            for h in self.hooked.pop(m):
                h.remove()
        self._seen, self._keep, self.narrowed = None, set(), True

    def _widen(self, owner: nn.Module) -> None:
        """Hooks back on ``owner`` (an attention call's owner without them) and its ancestors."""
        for m in self._upward({owner}):
            if m not in self.hooked:
                self._hook(m)

    def remove(self) -> None:
        from . import hf

        for h in [h for hs in self.hooked.values() for h in hs] + self._root_handles:
            h.remove()
        self.hooked.clear()
        self._root_handles.clear()
        for m in self.model.modules():
            if _BUSY.get(m) is self:
                del _BUSY[m]
        if self.stack:  # removed in the middle of a forward
            self.stack.clear()
            self._mode_exit()
        if self._hf is not None:
            hf.restore(self._hf)
            self._hf = None

    def _pre(self, module, args, kwargs):
        # The SDPA mode is on while any forward of the model runs: the model itself, a submodule
        # called directly (``model.get_encoder()(...)``) or recomputed by activation checkpointing.
        if not self.stack:
            if ForwardContext.starts_forward(kwargs, module is self.model):
                self.context = ForwardContext(kwargs, trusted=self.hf_models.get(module, False), positional=len(args))
            if self._hf is None or self.mode_needed is not False:
                self.mode.__enter__()
                self.mode_on = True
            if module is self.model and not torch.compiler.is_compiling():  # a traced counter recompiles per call
                self.forwards += 1
        if self._seen is not None:
            self._seen.add(module)
            if ForwardContext.starts_forward(kwargs, False):
                self._keep.add(module)
        self.stack.append(module)
        self.counts[module] = 0
        return None

    def _root_pre(self, module, args, kwargs):
        if len(self.stack) == 1:
            self._root_kwargs = kwargs
        return None

    def _root_done(self, module, args, output):
        if not self.stack and self._hf is not None and self.mode_needed is None:
            self.mode_needed = self.mode_caught  # decided by the first completed forward of the model
            if self.mode_needed:
                self._seen, self._keep = None, set()
            else:
                self._narrow()
        if not self.stack and self.after_forward is not None:
            self.after_forward(self._root_kwargs)
        return None

    def _post(self, module, args, output):
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
            if not self.stack:
                self._mode_exit()
        return None

    def _mode_exit(self) -> None:
        if self.mode_on:
            self.mode.__exit__(None, None, None)
            self.mode_on = False

    # ---- dispatch --------------------------------------------------------------------------
    def dispatch(self, module: nn.Module | None, q, k, v, attn_mask, is_causal, scale, dropout_p,
                 causal_hint: bool, window: int | None = None, sinks: torch.Tensor | None = None,
                 softcap: float | None = None):
        """Name the call, build an ``AttentionCall`` and run the handler (None: run the original)."""
        owner = module if module is not None else (self.stack[-1] if self.stack else None)
        if self._seen is not None:
            self._keep.add(owner)
            for m in self.stack:  # (not set.update: dynamo's polyfill of it fails here on torch 2.11)
                self._keep.add(m)
        elif self.narrowed and owner not in self.hooked and owner in self.names:
            self._widen(owner)
        base = self.names.get(owner, type(owner).__name__ if owner is not None else "<root>")
        idx = self.counts.get(owner, 0)
        self.counts[owner] = idx + 1
        name = base if idx == 0 else f"{base}#{idx}"
        info = self.infos.get(name)
        lq, lk = q.shape[-2], k.shape[-2]
        if info is None:
            causal = bool(is_causal) or causal_hint or _looks_causal(attn_mask, lq, lk)
            kind = site_kind(name, owner, self.parents.get(owner), causal, lq, lk)
            info = SiteInfo(name, kind, int(q.shape[1]), int(k.shape[1]))
            self.infos[name] = info
        if not torch.compiler.is_compiling():  # a traced counter would make torch.compile recompile per call
            self.calls += 1
        pos = self.context.positions(name, info.kind, lq, lk, bool(is_causal), q.device)
        call = AttentionCall(name, owner, q, k, v, attn_mask, bool(is_causal), scale, float(dropout_p),
                             info.kind, info, positions=pos, window=window, sinks=sinks,
                             softcap=softcap)
        return self.handler(call)

    def check_found(self) -> None:
        """Raise ``NoAttentionSitesError`` when the model ran but no attention call was seen."""
        if self.forwards and not self.calls:
            raise NoAttentionSitesError(
                f"no attention site found in {type(self.model).__name__}: attnprune sees attention computed "
                "through transformers' AttentionInterface or torch.nn.functional.scaled_dot_product_attention "
                "(and nn.MultiheadAttention); a hand-written softmax(q @ k.T) cannot be intercepted")


def _is_hf_model(module: nn.Module) -> bool:
    """A transformers model: it takes its KV cache as ``cache`` / ``past_key_values``."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


@contextlib.contextmanager
def intercept(model: nn.Module, handler: Handler) -> Iterator[Interceptor]:
    """Route every attention call of ``model`` to ``handler`` while the context is open.

    ``handler(call: AttentionCall)`` returns the attention output ``[B, Hq, Lq, Dv]`` to use instead
    of the model's computation, or None to run the original. Hooks and the Hugging Face attention
    implementation are restored on exit. If the model ran inside the context and no attention call
    was seen, ``NoAttentionSitesError`` is raised on exit.
    """
    it = Interceptor(model, handler)
    it.install()
    try:
        yield it
    finally:
        it.remove()
    it.check_found()


__all__ = ["AttentionCall", "Interceptor", "intercept", "allowed_entries", "site_kind", "Positions"]
