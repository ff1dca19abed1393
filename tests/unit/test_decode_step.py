"""The PrunedKVCache decode step (issue 13): entries written into preallocated slots, compaction
every ``COMPACT_EVERY`` steps sized by a host-side bound, positions computed once per forward.
Compacting every N steps must give the tokens, logits and held bytes of compacting every step; the
step path makes no host synchronisation and dispatches three ops per layer between compactions."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnprune import PrunedKVCache, apply
from attnprune import cache as cache_mod
from attnprune.cache import PrunedLayer, last_reads, live_bound
from attnprune.mask import PruneMask, SiteMask
from lm_helpers import CAL, V, _close, _family, _generate, _left_padded, _mask

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}


def _batch():
    g = torch.Generator().manual_seed(5)
    return _left_padded([torch.randint(3, V, (n,), generator=g) for n in (8, 5, 2)])


def _run(model, mask, every, monkeypatch, n=CAL - 8, beyond="error", **kw):
    monkeypatch.setattr(cache_mod, "COMPACT_EVERY", every)
    ids, am = _batch()
    with torch.no_grad(), apply(model, mask, beyond=beyond):
        cache = PrunedKVCache(model, mask)
        seq, logits = _generate(model, ids, n, attention_mask=am, past_key_values=cache, **kw)
    return seq, logits, cache.kv_bytes()


@pytest.mark.parametrize("family", ["llama", "mistral-sliding", "gpt2"])
def test_compaction_every_n_steps_equals_compaction_every_step(family, monkeypatch):
    model = _family(family)
    mask = _mask(model)
    seq_1, log_1, bytes_1 = _run(model, mask, 1, monkeypatch)  # compacts at every step
    for every in (3, 32):  # several compactions during generation; none after the first
        seq_n, log_n, bytes_n = _run(model, mask, every, monkeypatch)
        assert torch.equal(seq_n, seq_1)
        _close(log_n, log_1)
        assert bytes_n["held"] == bytes_1["held"] and bytes_n["dense"] == bytes_1["dense"]
        assert bytes_n["allocated"] >= bytes_1["allocated"]  # dead entries wait for the next compaction
    ids, am = _batch()
    with torch.no_grad(), apply(model, mask):
        seq_r, log_r = _generate(model, ids, CAL - 8, attention_mask=am, use_cache=False)
    assert torch.equal(seq_1, seq_r)
    _close(log_1, log_r)


def test_extend_past_the_calibration_with_few_compactions(monkeypatch):
    model = _family("llama")
    mask = _mask(model)
    runs = [_run(model, mask, every, monkeypatch, n=60, beyond="extend") for every in (1, 7)]
    assert torch.equal(runs[0][0], runs[1][0])
    _close(runs[0][1], runs[1][1])
    assert runs[0][2]["held"] == runs[1][2]["held"]


def test_beam_search_reorders_the_slots(monkeypatch):
    """Beam search reorders the cache every step: the slot views follow the reordered buffers."""
    model = _family("llama")
    mask = _mask(model)
    prompt = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, pad_token_id=0, num_beams=3, num_return_sequences=2, do_sample=False)
    outs = []
    with torch.no_grad(), apply(model, mask):
        for every in (1, 4, 32):
            monkeypatch.setattr(cache_mod, "COMPACT_EVERY", every)
            outs.append(model.generate(prompt, past_key_values=PrunedKVCache(model, mask), **kw))
        outs.append(model.generate(prompt, use_cache=False, **kw))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def _random_last(g, Hkv, K, window=None):
    last = torch.randint(-1, 2 * K, (Hkv, K), generator=g)
    last[:, ::7] = torch.iinfo(torch.long).max // 4  # sinks: read forever
    if window is not None:
        last = torch.minimum(last, torch.arange(K) + window - 1)
    return last


@pytest.mark.parametrize("window", [None, 5])
def test_live_bound_is_the_prefix_max_of_live_counts(window):
    g = torch.Generator().manual_seed(0)
    for K in (1, 9, 40):
        last = _random_last(g, 3, K, window)
        bound = live_bound(last)
        assert len(bound) == K + 1
        p = torch.arange(K)
        live = torch.stack([((p < m) & (last >= m)).sum(-1).max() for m in range(K + 1)])  # [K + 1]
        assert bound == live.cummax(0).values.tolist()


def test_bound_of_a_sink_and_band_mask_is_what_it_keeps():
    """The compaction size of a sink + band mask is the entries a query keeps: nothing to spare."""
    from test_cache import _band_mask

    model = _family("llama")
    L, sinks, band = 48, 3, 6
    mask, _ = _band_mask(model, L, sinks, band)
    sm = mask.site(mask.sites[0])
    bound = live_bound(last_reads(sm, sm.info.num_kv_heads))
    assert bound[L - 1] == sinks + band - 1


def test_mask_reading_only_the_diagonal_keeps_one_slot():
    """A mask whose keys are never read by later queries: compaction keeps one (empty) slot, so the
    pruned path still runs (held_before > 0), and generation equals full recomputation."""
    from attnprune.capture import intercept

    model = _family("llama")
    infos = {}
    with torch.no_grad(), intercept(model, lambda c: infos.setdefault(c.site, c.info) and None):
        model(torch.zeros(1, 4, dtype=torch.long))
    eye = torch.eye(CAL, dtype=torch.bool)
    mask = PruneMask([SiteMask(i, CAL, CAL, keep=eye.expand(i.num_heads, CAL, CAL).clone()) for i in infos.values()],
                     {"model": {"name": "tiny"}})
    prompt = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), apply(model, mask):
        cache = PrunedKVCache(model, mask)
        seq_p, log_p = _generate(model, prompt, 10, past_key_values=cache)
        seq_n, log_n = _generate(model, prompt, 10, use_cache=False)
    assert torch.equal(seq_p, seq_n)
    _close(log_p, log_n)
    assert cache.kv_bytes()["held"] == 0


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func.overloadpacket.__name__ in SYNC_OPS
        return func(*args, **(kwargs or {}))


def test_decode_step_dispatches_three_ops_per_layer_and_never_syncs(monkeypatch):
    """Counted on the CPU: per decode step, each layer's cache update is three copies (the first
    layer of a forward also works out the step's positions) except at compactions; neither the
    update nor the attention call (``_Patch._pruned``) reads a tensor on the host, compactions included."""
    import sys

    apply_mod = sys.modules["attnprune.apply"]  # the module (``attnprune.apply`` is the function)

    monkeypatch.setattr(cache_mod, "COMPACT_EVERY", 4)
    model = _family("llama")
    mask = _mask(model)
    layers = model.config.num_hidden_layers
    calls: list = []  # (what, ops, syncs) per call, in order
    tolists = [0]
    real_update, real_pruned, real_tolist = PrunedLayer.update, apply_mod._Patch._pruned, torch.Tensor.tolist

    inside = [False]

    def counted(what, fn):
        def wrapped(*a, **k):
            inside[0] = True
            try:
                with _Count() as c:
                    out = fn(*a, **k)
            finally:
                inside[0] = False
            calls.append((what, c.ops, c.syncs))
            return out
        return wrapped

    monkeypatch.setattr(PrunedLayer, "update", counted("update", real_update))
    monkeypatch.setattr(apply_mod._Patch, "_pruned", counted("attention", real_pruned))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolists.__setitem__(0, tolists[0] + inside[0]) or real_tolist(t))
    ids, am = _batch()
    with torch.no_grad(), apply(model, mask):
        cache = PrunedKVCache(model, mask)
        out = model(input_ids=ids, attention_mask=am, past_key_values=cache, use_cache=True)
        steps = 10
        for _ in range(steps):
            am = torch.cat([am, am.new_ones(am.shape[0], 1)], 1)
            calls.clear()
            tolists[0] = 0
            out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=am, past_key_values=cache,
                        use_cache=True)
            updates = [c for c in calls if c[0] == "update"]
            assert len(updates) == layers and sum(c[0] == "attention" for c in calls) == layers
            assert all(c[2] == 0 for c in calls) and tolists[0] == 0
            if cache.layers[0]._since_compact:  # not a compaction step: three copies a layer
                assert [c[1] for c in updates[1:]] == [3] * (layers - 1)
                # + the step's positions, once per forward (and the forward's first look at its 2-D mask)
                assert updates[0][1] <= 3 + 20


def test_positions_worked_out_once_per_forward(monkeypatch):
    from attnprune.capture.positions import ForwardContext

    model = _family("llama")
    mask = _mask(model)
    seen = []
    real = ForwardContext.own_positions
    monkeypatch.setattr(ForwardContext, "own_positions", lambda self, *a, **k: seen.append(a) or real(self, *a, **k))
    ids, am = _batch()
    with torch.no_grad(), apply(model, mask):
        _generate(model, ids, 6, attention_mask=am, past_key_values=PrunedKVCache(model, mask))
    assert [a[:2] for a in seen] == [(0, ids.shape[1])] + [(ids.shape[1] + i, 1) for i in range(5)]


def test_room_is_empty_and_finite():
    """The slots after the filled ones (the attention reads the whole buffer) hold position -1 and
    zero keys and values: masked out, and nothing non-finite to multiply by a zero weight."""
    model = _family("llama")
    mask = _mask(model)
    ids, am = _batch()
    with torch.no_grad(), apply(model, mask):
        cache = PrunedKVCache(model, mask)
        _generate(model, ids, 5, attention_mask=am, past_key_values=cache)
    for layer in cache.layers:
        C = layer.C
        assert layer.pos.shape[-1] > C and (layer.pos[..., C:] == -1).all()
        assert (layer.keys[:, :, C:] == 0).all() and (layer.values[:, :, C:] == 0).all()
        assert layer.get_mask_sizes(1)[0] == C + 1
