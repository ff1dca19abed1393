"""``decode_greedy``: greedy decoding with one decode step replayed as a CUDA graph.

Every decode step of a small model is host-bound (Python and ~30 layers of kernel launches; the GPU
work is well under a millisecond). A CUDA graph of one step replays all its launches at once. That
needs a step whose kernels read everything that changes from step to step from device tensors at
fixed addresses:

* the next token: a ``[B, 1]`` buffer the step overwrites with its argmax (and writes into the
  ``[B, max_new_tokens]`` output by a device column index);
* the position: a ``[1, 1]`` device counter (the model's ``position_ids``, and for
  ``PrunedKVCache`` the positions its slots are tagged with), advanced in place by the step;
* ``PrunedKVCache``: per layer the next free slot, a device index (``index_copy_`` writes the new
  key, value and position there), advanced in place; the buffers have one fixed capacity for the
  whole generation (``PrunedLayer.capacity``: the mask's bound on live entries at the last position
  plus ``COMPACT_EVERY + 1``), so attention always reads the same ``[B, Hkv, capacity]`` slots (empty
  ones have position -1 and are masked). Compaction (every ``COMPACT_EVERY`` steps, and after the
  prompt) runs eagerly between two replays and packs the live entries into the same buffers, so
  one capture stays valid; if a compaction ever had to grow a buffer, the step is captured again.
  The host's view of the cache (filled slots, tokens seen) is advanced after each replay as the
  eager step would have advanced it, so compaction, ``kv_bytes`` and length checks stay exact;
* transformers' ``StaticCache`` (dense): it advances its own device counter
  (``cumulative_length``); the attention mask is a ``[1, 1, 1, max_cache_len]`` boolean buffer
  whose next slot the step switches on (no sliding-window layers).

Without CUDA (or ``cuda_graph=False``) the same graph-safe step runs eagerly. Not captured: the
prompt, compactions, and steps past the mask's calibrated length (``beyond="extend"``; under
``"error"`` the eager step raises ``LengthError`` as ``generate`` does). ``outside_counts`` does not
count replayed steps (no Python runs in a replay).
"""

from __future__ import annotations

import inspect
import time

import torch

from .errors import GraphCaptureError, InvalidArgumentError, UnsupportedModelError

__all__ = ["decode_greedy", "GraphCaptureError"]

WARMUP_STEPS = 2  # eager steps (on a side stream) before the capture: kernels compiled, tables cached


class _DeviceStep:
    """``PrunedKVCache._graph`` while a graph-safe loop runs: the decode step's device slot index per
    layer and its position counter (``PrunedLayer.update`` hands single-token updates to it)."""

    def __init__(self, cache, position: int, device):
        from . import cache as cache_mod

        self.cache_mod = cache_mod
        self.layers = list(cache.layers)
        self.index = {id(layer): i for i, layer in enumerate(self.layers)}
        self.slots = torch.zeros(len(self.layers), dtype=torch.long, device=device)
        self.slot = [self.slots[i:i + 1] for i in range(len(self.layers))]  # [1] views
        self.positions = torch.full((1, 1), position, dtype=torch.long, device=device)
        self.fresh = [False] * len(self.layers)  # compacted before this step (its counter restarts at 0)

    def update(self, layer, key_states, value_states, st):
        """Write one entry per (sequence, kv head) at the layer's device slot; no host sync, no
        host-int-dependent shape. Host counters advance as the eager step's do."""
        i = self.index[id(layer)]
        slot = self.slot[i]
        B, Hkv = key_states.shape[:2]
        layer.keys.index_copy_(2, slot, key_states)
        layer.values.index_copy_(2, slot, value_states)
        layer.pos.index_copy_(2, slot, st.new3.expand(B, Hkv, 1))
        layer.held_before = layer.C
        self.advance(i, layer)
        layer.new_pos, layer.q_pos, layer._st = st.new, st.q_pos, st
        return layer.keys, layer.values

    def advance(self, i: int, layer) -> None:
        """The host side of one step of layer ``i`` (run by ``update``, or after a replay)."""
        layer.C += 1
        layer.seen += 1
        layer._since_compact += 0 if self.fresh[i] else 1
        layer._last_n = 1
        self.fresh[i] = False

    def mirror(self) -> None:
        """After a replay: the host state every layer's ``update`` would have left."""
        for i, layer in enumerate(self.layers):
            layer.held_before = layer.C
            self.advance(i, layer)

    def prepare(self) -> None:
        """Before a step (eagerly): compact the layers the eager step would compact now (after the
        prompt, every ``COMPACT_EVERY`` steps, when the room is used up), into their fixed buffers,
        and point the device slots at each layer's next free slot."""
        from .cache import _Step

        every = self.cache_mod.COMPACT_EVERY
        st = None
        for i, layer in enumerate(self.layers):
            if layer._last_n != 1 or layer._since_compact >= every - 1 or layer.C + 1 > layer.pos.shape[-1]:
                if st is None:  # the step's query position: the device counter (no host read)
                    st = _Step((layer.seen, 1), self.positions)
                layer._compact(st, 1)
                self.fresh[i] = True
        if st is not None:
            self.slots.copy_(torch.tensor([layer.C for layer in self.layers], dtype=torch.long))

    def signature(self) -> tuple:
        """What a captured step depends on: the buffers' addresses and shapes."""
        return tuple((t.data_ptr(), tuple(t.shape)) for layer in self.layers
                     for t in (layer.keys, layer.values, layer.pos))

    def state(self) -> list:
        return [(layer.C, layer.seen, layer._since_compact, layer._last_n, layer.held_before, f)
                for layer, f in zip(self.layers, self.fresh)]

    def restore(self, saved: list) -> None:
        for i, (layer, s) in enumerate(zip(self.layers, saved)):
            layer.C, layer.seen, layer._since_compact, layer._last_n, layer.held_before, self.fresh[i] = s


class _Loop:
    """The buffers and the graph-safe step of one ``decode_greedy`` call (see the module docstring)."""

    def __init__(self, model, cache, kind: str, B: int, L: int, new: int, first, device, eos, pad):
        from .seq2seq import _cache_arg

        self.model, self.cache, self.kind, self.device = model, cache, kind, device
        self.arg = _cache_arg(model)
        self.tok = first.clone()  # [B, 1] the token the next step reads
        self.out = torch.zeros(B, new, dtype=torch.long, device=device)
        self.out[:, :1] = first
        self.col = torch.ones(1, dtype=torch.long, device=device)  # the output column of the next step
        self.eos = None if eos is None else torch.tensor(eos, dtype=torch.long, device=device)
        self.pad = pad
        self.unfinished = torch.ones(B, 1, dtype=torch.bool, device=device)
        if self.eos is not None:
            self.unfinished &= ~(first[..., None] == self.eos).any(-1)
        self.dev_step = None
        if kind == "pruned":
            self.dev_step = _DeviceStep(cache, L, device)
            self.positions = self.dev_step.positions
        else:
            self.positions = torch.full((1, 1), L, dtype=torch.long, device=device)
            M = cache.get_max_length()
            self.attn = torch.zeros(1, 1, 1, M, dtype=torch.bool, device=device)  # slots attended to
            self.attn[..., :L + 1] = True
            self.attn_max = M - 1
            impl = getattr(model.config, "_attn_implementation", "sdpa")
            self.additive = impl == "eager"
            self.mask_dtype = next(model.parameters()).dtype

    def step(self) -> None:
        """One greedy decode step; only device tensors change (what a CUDA graph replays)."""
        kw = {self.arg: self.cache, "use_cache": True, "position_ids": self.positions}
        if self.kind == "static":
            m = self.attn
            if self.additive:
                m = torch.where(m, 0.0, torch.finfo(self.mask_dtype).min).to(self.mask_dtype)
            kw["attention_mask"] = m
        logits = self.model(input_ids=self.tok, **kw).logits
        nxt = logits[:, -1, :].argmax(-1, keepdim=True)
        if self.eos is not None:
            nxt = torch.where(self.unfinished, nxt, self.pad)
            self.unfinished &= ~(nxt[..., None] == self.eos).any(-1)
        self.out.index_copy_(1, self.col, nxt)
        self.tok.copy_(nxt)
        self.advance()

    def advance(self) -> None:
        """The device counters, in place: output column, position, free slots / attended slots."""
        self.col.add_(1)
        self.positions.add_(1)
        if self.kind == "pruned":
            self.dev_step.slots.add_(1)
        else:
            self.attn.index_fill_(-1, self.positions.view(-1).clamp(max=self.attn_max), True)


def decode_greedy(model, input_ids: torch.Tensor, cache=None, max_new_tokens: int = 32, *,
                  attention_mask: torch.Tensor | None = None, cuda_graph: bool = True,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                  stats: dict | None = None, **kwargs) -> torch.Tensor:
    """Greedy decoding of a causal transformers model, each decode step replayed as a CUDA graph.

    Args:
        model: a decoder-only transformers model (``*ForCausalLM``), with a mask attached
            (``with attnprune.apply(model, mask):``, ``beyond="error"`` or ``"extend"``) or dense.
        input_ids: long ``[B, L]``, the prompts (all ``L`` tokens real: no padding).
        cache: an empty ``attnprune.PrunedKVCache(model, mask)`` (the mask attached), or an empty
            transformers ``StaticCache`` with ``max_cache_len >= L + max_new_tokens - 1`` (dense model,
            SDPA or eager attention, no sliding-window layers), or None: ``PrunedKVCache`` if a mask
            is attached, else a ``StaticCache`` of ``L + max_new_tokens`` slots. It is updated in place.
        max_new_tokens: tokens generated per sequence (>= 1).
        attention_mask: optional ``[B, L]``; it must be all ones (left padding is not supported:
            use ``model.generate``).
        cuda_graph: on a CUDA device, capture one decode step (after ``WARMUP_STEPS`` eager steps on
            a side stream, as PyTorch documents) and replay it; eager on the CPU or when False.
        eos_token_id: stop at these tokens: a finished sequence continues with ``pad_token_id``
            (default: the first eos id) and the output ends where every sequence has finished, as
            ``generate`` does. None (default): always ``max_new_tokens`` tokens (``generate`` with
            ``min_new_tokens=max_new_tokens``).
        stats: a dict to fill with timings and counts: ``prefill_s``, ``decode_s`` (the steps after
            the prompt), ``steps``, ``eager_steps``, ``replays``, ``captures``, ``capture_s``,
            ``timed_s`` / ``timed_steps`` (from the first replay after the last capture to the end,
            compactions included; None / 0 without replays), ``cuda_graph`` (whether steps were replayed).

    Returns long ``[B, L + new]``: the prompts followed by the generated tokens (``new = max_new_tokens``
    unless every sequence met an eos earlier), the tokens ``model.generate(input_ids, do_sample=False,
    max_new_tokens=..., cache=cache)`` gives. Beam search, sampling, logits processors and stopping
    criteria: use ``model.generate``. Raises ``InvalidArgumentError`` / ``UnsupportedModelError`` for
    what it does not support, ``GraphCaptureError`` if the capture fails (run with ``cuda_graph=False``).
    """
    from .apply import _ATTACHED
    from .cache import PrunedKVCache

    if kwargs:
        raise InvalidArgumentError(
            f"decode_greedy does greedy decoding only; got {', '.join(sorted(kwargs))}: for beam search, sampling, "
            f"logits processors or stopping criteria use model.generate")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise InvalidArgumentError("input_ids must be a long tensor [batch, length]")
    B, L = input_ids.shape
    if B < 1 or L < 1:
        raise InvalidArgumentError(f"input_ids must hold at least one token per sequence, got shape {list(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError("decode_greedy handles decoder-only transformers models; for an "
                                    "encoder-decoder model use model.generate")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, L):
            raise InvalidArgumentError(f"attention_mask must have the shape of input_ids {[B, L]}, got "
                                       f"{list(attention_mask.shape)}")
        if not bool((attention_mask != 0).all()):
            raise InvalidArgumentError("decode_greedy does not support padding (attention_mask with zeros, e.g. left "
                                       "padding); use model.generate for padded batches")
    device = input_ids.device
    pdev = next(model.parameters()).device
    if pdev != device:
        raise InvalidArgumentError(f"input_ids are on {device}, the model on {pdev}")
    eos = None
    if eos_token_id is not None:
        eos = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
        if not eos:
            raise InvalidArgumentError("eos_token_id must be an int or a non-empty list of ints")
        pad_token_id = eos[0] if pad_token_id is None else int(pad_token_id)
    patch = _ATTACHED.get(model)
    if cache is None:
        if patch is not None:
            cache = PrunedKVCache(model, patch.mask)
        else:
            from transformers import StaticCache

            cache = StaticCache(config=cfg, max_cache_len=L + max_new_tokens)
    kind = _check_cache(model, cache, patch, L, max_new_tokens)

    st = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0, "eager_steps": 0, "replays": 0, "captures": 0,
          "capture_s": 0.0, "timed_s": None, "timed_steps": 0, "cuda_graph": False}
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    from .seq2seq import _cache_arg

    with torch.no_grad():
        t0 = time.perf_counter()
        kw = {_cache_arg(model): cache, "use_cache": True}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kw["logits_to_keep"] = 1
        logits = model(input_ids=input_ids, **kw).logits
        first = logits[:, -1, :].argmax(-1, keepdim=True)
        del logits
        loop = _Loop(model, cache, kind, B, L, max_new_tokens, first, device, eos, pad_token_id)
        sync()
        st["prefill_s"] = time.perf_counter() - t0
        try:
            _decode(loop, cache, kind, L, max_new_tokens, cuda_graph and cuda, sync, st)
        finally:
            if kind == "pruned":
                cache._graph = None
                for layer in cache.layers:
                    layer.capacity = None
        out = loop.out
        if eos is not None:  # generate's length: up to the step at which every sequence had finished
            done = torch.isin(out, loop.eos).cummax(1).values.all(0)
            hit = done.nonzero()
            if len(hit):
                out = out[:, :int(hit[0]) + 1]
        if stats is not None:
            stats.update(st)
        return torch.cat([input_ids, out], 1)


def _decode(loop: _Loop, cache, kind: str, L: int, new: int, use_graph: bool, sync, st: dict) -> None:
    """Steps 1 .. new - 1 (step 0's token came from the prompt), eager or replayed."""
    ds = loop.dev_step
    limit = None
    if kind == "pruned":
        last = L + new - 2  # the last position a step feeds
        for layer in cache.layers:
            layer.capacity = max(1, layer.bound(last)) + 1 + ds.cache_mod.COMPACT_EVERY
        cache._graph = ds
        # steps at positions p with p + 1 > limit lie past the calibration: eager (LengthError, or extend)
        limit = min(min(layer.site_mask.q_len, layer.site_mask.k_len) for layer in cache.layers)
    graph, sig, side, t0 = None, None, None, None
    t_start = time.perf_counter()
    for s in range(1, new):
        p = L + s - 1  # the position this step feeds
        if ds is not None:
            ds.prepare()
        if not use_graph or s <= WARMUP_STEPS or (limit is not None and p + 1 > limit):
            if use_graph and s <= WARMUP_STEPS:  # warm-up on a side stream (PyTorch's CUDA graph recipe)
                if side is None:
                    side = torch.cuda.Stream(loop.device)
                side.wait_stream(torch.cuda.current_stream(loop.device))
                with torch.cuda.stream(side):
                    loop.step()
                torch.cuda.current_stream(loop.device).wait_stream(side)
            else:
                loop.step()
            st["eager_steps"] += 1
        else:
            now = ds.signature() if ds is not None else None
            if graph is None or now != sig:  # first capture, or a compaction moved a buffer
                del graph
                tc = time.perf_counter()
                graph, sig = _capture(loop), now
                graph.replay()  # the captured step itself (its host side ran during the capture)
                sync()
                st["captures"] += 1
                st["capture_s"] += time.perf_counter() - tc
                t0, st["timed_steps"] = None, 0
            else:
                if t0 is None:
                    sync()
                    t0 = time.perf_counter()
                graph.replay()
                if ds is not None:
                    ds.mirror()
            st["replays"] += 1
        if t0 is not None:
            st["timed_steps"] += 1
        st["steps"] += 1
        if loop.eos is not None and s % 32 == 0 and not bool(loop.unfinished.any()):
            break  # every sequence has finished (checked every 32 steps: one host sync)
    sync()
    t_end = time.perf_counter()
    st["decode_s"] = t_end - t_start
    st["timed_s"] = None if t0 is None else t_end - t0
    st["cuda_graph"] = st["replays"] > 0


def _capture(loop: _Loop):
    """A ``torch.cuda.CUDAGraph`` of ``loop.step()`` (recorded, not run). On failure the host state
    of the cache is put back and ``GraphCaptureError`` says why."""
    ds = loop.dev_step
    saved = ds.state() if ds is not None else None
    if ds is not None:
        loop.cache._steps.clear()  # the step's positions are computed inside the capture
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            loop.step()
    except Exception as e:  # noqa: BLE001 - any failure of the capture is reported the same way
        if ds is not None:
            ds.restore(saved)
            loop.cache._steps.clear()
        raise GraphCaptureError(f"CUDA graph capture of the {loop.kind} decode step failed: {type(e).__name__}: "
                                f"{e}; decode_greedy(..., cuda_graph=False) runs the same step eagerly") from e
    return graph


def _check_cache(model, cache, patch, L: int, new: int) -> str:
    """``"pruned"`` or ``"static"``, or an error for a cache ``decode_greedy`` cannot drive."""
    from .cache import PrunedKVCache

    if isinstance(cache, PrunedKVCache):
        if patch is None or patch.mask is not cache.mask:
            raise InvalidArgumentError("decode_greedy with a PrunedKVCache(model, mask) needs that mask attached: run "
                                       "it inside `with attnprune.apply(model, mask):`")
        if patch.beyond == "dense":
            raise InvalidArgumentError("PrunedKVCache needs beyond='error' or 'extend' (got 'dense')")
        if cache.model is not model:
            raise InvalidArgumentError("the PrunedKVCache was made for another model")
        if any(layer.is_initialized for layer in cache.layers):
            raise InvalidArgumentError("decode_greedy needs an empty cache (this one holds tokens already)")
        return "pruned"
    from transformers import StaticCache

    if isinstance(cache, StaticCache):
        if patch is not None:
            raise UnsupportedModelError("decode_greedy with a mask attached needs attnprune.PrunedKVCache(model, mask), "
                                        "not a StaticCache (or use model.generate)")
        if any(getattr(cache, "is_sliding", [])):
            raise UnsupportedModelError("decode_greedy: a StaticCache with sliding-window layers is not supported; "
                                        "use model.generate")
        if any(getattr(layer, "is_initialized", False) for layer in cache.layers):
            raise InvalidArgumentError("decode_greedy needs an empty cache (this one holds tokens already)")
        if cache.get_max_length() < L + new - 1:
            raise InvalidArgumentError(f"the StaticCache holds {cache.get_max_length()} tokens; {L} prompt + "
                                       f"{new} new tokens need {L + new - 1}")
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager"):
            raise UnsupportedModelError(f"decode_greedy with a StaticCache needs attn_implementation 'sdpa' or "
                                        f"'eager' (a 4-D mask), got {impl!r}; use model.generate")
        return "static"
    raise InvalidArgumentError(f"decode_greedy drives attnprune.PrunedKVCache or transformers' StaticCache, got "
                               f"{type(cache).__name__}; use model.generate for other caches")
