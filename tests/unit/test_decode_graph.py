"""decode_greedy (decode_loop.py): the graph-safe decode step (slot index and positions as device
tensors advanced in place, compaction into fixed-capacity buffers) gives the tokens of
``model.generate`` with PrunedKVCache and of masked full recomputation; the dense StaticCache loop gives
generate's greedy tokens; unsupported input is refused clearly. On CUDA, the replayed CUDA graph gives
the eager loop's tokens."""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnprune import GraphCaptureError, PrunedKVCache, apply, decode_greedy  # noqa: F401
from attnprune import cache as cache_mod
from attnprune import decode_loop
from attnprune.errors import InvalidArgumentError, LengthError, UnsupportedModelError
from lm_helpers import CAL, V, _family, _mask

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}


def _model(family):
    model = _family(family)
    model.generation_config.eos_token_id = None  # generate runs max_new_tokens, no eos suppression either
    return model


def _ids(batch=2, n=8, seed=2):
    return torch.randint(3, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, n, cache=None, **kw):
    """Greedy generate; ``cache`` under the name this transformers takes (5.2x: ``cache``, 5.17: ``past_key_values``)."""
    from attnprune.seq2seq import _cache_arg

    if cache is not None:
        kw[_cache_arg(model)] = cache
    return model.generate(ids, max_new_tokens=n, do_sample=False, **{"pad_token_id": 0, **kw})


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral-sliding"])
@pytest.mark.parametrize("every", [3, 32])
def test_pruned_loop_equals_generate_and_full_recomputation(family, every, monkeypatch):
    """Across compactions (every 3 steps: seven of them; 32: the prompt's), one buffer size for the
    whole generation: the buffers never move, so one CUDA graph capture stays valid."""
    monkeypatch.setattr(cache_mod, "COMPACT_EVERY", every)
    sigs = []
    prepare = decode_loop._DeviceStep.prepare

    def spy(self):
        prepare(self)
        sigs.append(self.signature())

    monkeypatch.setattr(decode_loop._DeviceStep, "prepare", spy)
    model = _model(family)
    mask = _mask(model)
    ids, n = _ids(), CAL - 8
    with torch.no_grad(), apply(model, mask):
        cache = PrunedKVCache(model, mask)
        stats = {}
        out = decode_greedy(model, ids, cache, n, stats=stats)
        ref_cache = PrunedKVCache(model, mask)
        ref = _generate(model, ids, n, cache=ref_cache)
        full = _generate(model, ids, n, use_cache=False)
    assert out.shape == (2, 8 + n)
    assert torch.equal(out, ref) and torch.equal(out, full)
    assert stats["steps"] == n - 1 and stats["eager_steps"] == n - 1 and stats["replays"] == 0
    assert len(sigs) == n - 1 and all(s == sigs[0] for s in sigs)
    got, want = cache.kv_bytes(), ref_cache.kv_bytes()
    assert got["held"] == want["held"] and got["dense"] == want["dense"]
    assert cache._graph is None and all(layer.capacity is None for layer in cache.layers)


@pytest.mark.parametrize("broken", ["positions", "slots"])
def test_tokens_depend_on_the_device_counters(broken, monkeypatch):
    """The equality above is the device path's: a step whose position counter (RoPE, the slots' position
    tags) or slot index does not advance gives other tokens."""
    def advance(self):
        self.col.add_(1)
        if broken != "positions":
            self.positions.add_(1)
        if broken != "slots":
            self.dev_step.slots.add_(1)

    model = _model("llama")
    mask = _mask(model)
    ids, n = _ids(), CAL - 8
    with torch.no_grad(), apply(model, mask):
        ref = _generate(model, ids, n, cache=PrunedKVCache(model, mask))
        monkeypatch.setattr(decode_loop._Loop, "advance", advance)
        out = decode_greedy(model, ids, PrunedKVCache(model, mask), n)
    assert not torch.equal(out, ref)


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func.overloadpacket.__name__ in SYNC_OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["pruned", "static"])
def test_the_step_makes_no_host_sync(kind, monkeypatch):
    counter = _Syncs()
    step = decode_loop._Loop.step

    def counted(self):
        with counter:
            step(self)

    monkeypatch.setattr(decode_loop._Loop, "step", counted)
    model = _model("llama")
    mask = _mask(model)
    with torch.no_grad():
        if kind == "pruned":
            with apply(model, mask):
                decode_greedy(model, _ids(), None, 12)
        else:
            decode_greedy(model, _ids(), None, 12)
    assert counter.syncs == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_static_cache_loop_equals_generate(family):
    from transformers import StaticCache

    model = _model(family)
    ids, n = _ids(batch=3), 40
    with torch.no_grad():
        ref = _generate(model, ids, n)
        out = decode_greedy(model, ids, StaticCache(config=model.config, max_cache_len=8 + n), n)
        auto = decode_greedy(model, ids, None, n)  # a StaticCache of its own
    assert torch.equal(out, ref) and torch.equal(auto, ref)


def test_eos_stops_as_generate_does():
    model = _model("llama")
    ids = _ids()
    with torch.no_grad():
        free = decode_greedy(model, ids, None, 20)
        eos = int(free[0, 8 + 4])  # a token the first sequence generates
        out = decode_greedy(model, ids, None, 20, eos_token_id=eos, pad_token_id=1)
        ref = _generate(model, ids, 20, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(out, ref)


def test_extend_past_the_calibration(monkeypatch):
    monkeypatch.setattr(cache_mod, "COMPACT_EVERY", 7)
    model = _model("llama")
    mask = _mask(model)
    ids, n = _ids(), 40  # 8 + 40 > CAL: the steps past it run eagerly (the graph covers those inside)
    with torch.no_grad(), apply(model, mask, beyond="extend"):
        out = decode_greedy(model, ids, None, n)
        ref = _generate(model, ids, n, cache=PrunedKVCache(model, mask))
    assert torch.equal(out, ref)


def test_unsupported_input_is_refused():
    from transformers import DynamicCache, StaticCache

    model = _model("llama")
    mask = _mask(model)
    ids = _ids()
    with torch.no_grad():
        am = torch.ones_like(ids)
        am[0, :2] = 0
        with pytest.raises(InvalidArgumentError, match="padding"):
            decode_greedy(model, ids, None, 4, attention_mask=am)
        assert decode_greedy(model, ids, None, 4, attention_mask=torch.ones_like(ids)).shape == (2, 12)
        for kw in ({"num_beams": 2}, {"do_sample": True}):
            with pytest.raises(InvalidArgumentError, match="model.generate"):
                decode_greedy(model, ids, None, 4, **kw)
        with pytest.raises(InvalidArgumentError, match="model.generate"):
            decode_greedy(model, ids, DynamicCache(config=model.config), 4)
        with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
            decode_greedy(model, ids, None, 0)
        with pytest.raises(InvalidArgumentError, match="long tensor"):
            decode_greedy(model, ids[0], None, 4)
        with pytest.raises(InvalidArgumentError, match="holds 9 tokens"):
            decode_greedy(model, ids, StaticCache(config=model.config, max_cache_len=9), 4)
        with pytest.raises(InvalidArgumentError, match="not attached|attached"):
            decode_greedy(model, ids, PrunedKVCache(model, mask), 4)
        with pytest.raises(UnsupportedModelError, match="sliding"):
            decode_greedy(_model("mistral-sliding"), ids, None, 4)
        with apply(model, mask):
            with pytest.raises(UnsupportedModelError, match="PrunedKVCache"):
                decode_greedy(model, ids, StaticCache(config=model.config, max_cache_len=20), 4)
            used = PrunedKVCache(model, mask)
            decode_greedy(model, ids, used, 2)
            with pytest.raises(InvalidArgumentError, match="empty cache"):
                decode_greedy(model, ids, used, 2)
            with pytest.raises(LengthError):  # as generate: the step past the calibrated length raises
                decode_greedy(model, ids, None, CAL - 8 + 2)
        with apply(model, mask, beyond="dense"), pytest.raises(InvalidArgumentError, match="beyond"):
            decode_greedy(model, ids, None, 4)


def test_encoder_decoder_is_refused():
    import tiny_models as tm

    with pytest.raises(UnsupportedModelError, match="model.generate"):
        decode_greedy(tm.bart(), _ids(), None, 4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton decode kernel on the CPU needs "
                    "TRITON_INTERPRET=1")
def test_pruned_loop_through_the_decode_kernel(monkeypatch):
    """The CUDA path's attention (masked_decode over the fixed-capacity buffers), on the interpreter."""
    pytest.importorskip("triton")
    from attnprune.kernels import decode

    monkeypatch.setattr(decode, "FORCE", True)
    monkeypatch.setattr(cache_mod, "COMPACT_EVERY", 5)
    model = _model("llama")
    mask = _mask(model)
    ids, n = _ids(), 16
    with torch.no_grad(), apply(model, mask):
        out = decode_greedy(model, ids, None, n)
        ref = _generate(model, ids, n, use_cache=False)
    assert torch.equal(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["pruned", "static"])
def test_cuda_graph_replay_equals_the_eager_loop(kind, monkeypatch):
    """float32 on the GPU: the replayed graph (one capture, compactions every 5 steps between replays)
    gives the eager loop's tokens, and (dense) generate's."""
    monkeypatch.setattr(cache_mod, "COMPACT_EVERY", 5)
    model = _model("llama").cuda().float()
    mask = _mask(model)
    ids, n = _ids().cuda(), CAL - 8
    runs = []
    with torch.no_grad():
        with apply(model, mask) if kind == "pruned" else torch.no_grad():
            for graph in (False, True):
                stats = {}
                runs.append(decode_greedy(model, ids, None, n, cuda_graph=graph, stats=stats))
                if graph:
                    assert stats["cuda_graph"] and stats["captures"] == 1
                    assert stats["replays"] == n - 1 - decode_loop.WARMUP_STEPS
            ref = _generate(model, ids, n, cache=PrunedKVCache(model, mask) if kind == "pruned" else None)
    assert torch.equal(runs[1], runs[0])
    assert torch.equal(runs[0], ref)


def test_bench_graph_variants_and_a_failing_one(monkeypatch):
    """bench.decode: the graph variants' rows (CPU: the eager graph-safe loop) give the tokens of the
    variants they stand next to; a graph variant that fails records its error and the run goes on."""
    from attnprune.bench import decode as bench

    kw = dict(batches=[2], new_tokens=5, backend="reference", block=8, warmup=0, reps=1, device="cpu",
              log=lambda line: None, steps=2)
    rows = bench.run("tiny-llama", [16], [0.5], variants=bench.ALL_VARIANTS, **kw)
    assert [r.variant for r in rows] == list(bench.ALL_VARIANTS)
    by = {r.variant: r for r in rows}
    assert by["dense-graph"].same_tokens_as_dense is True and by["pruned-graph"].same_tokens_as_masked is True
    assert by["pruned-graph"].kv_share == by["pruned"].kv_share < 1
    assert by["pruned-graph"].graph["steps"] == 4 and by["dense-graph"].error is None

    def fail(*a, **k):
        raise decode_loop.GraphCaptureError("capture failed: test")

    monkeypatch.setattr(decode_loop, "decode_greedy", fail)
    rows = bench.run("tiny-llama", [16], [0.5], variants=["dense", "dense-graph", "pruned-graph"], **kw)
    assert [r.variant for r in rows] == ["dense", "dense-graph", "pruned-graph"]
    assert rows[1].error == rows[2].error == "GraphCaptureError: capture failed: test"
    assert rows[0].error is None and rows[0].decode_tok_s is not None and rows[1].decode_tok_s is None
    assert "error: GraphCaptureError" in bench.markdown_table(rows)
