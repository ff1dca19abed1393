"""``torch.compile`` of a masked model: the whole forward traces as one graph (``fullgraph=True``: any graph
break raises) and computes what the eager masked model computes, across a second shape.

With the reference backend, and with the triton backend (issue 9), whose kernels dynamo sees as the custom
ops ``attnprune::sparse_fwd`` / ``sparse_bwd`` (:mod:`attnprune.kernels.ops`); on the CPU they run under the
Triton interpreter, so shapes are tiny. The FA4 (``flash``) backend under compile: test_flash_compile.py."""

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attnprune  # noqa: E402
from attnprune.models import load_model  # noqa: E402

EPS = torch.finfo(torch.float32).eps
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the triton backend runs CUDA tensors where CUDA exists
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="the triton backend needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ops_in(graphs, name):
    return sum(str(n.target).startswith(f"attnprune.{name}") for g in graphs for n in g.graph.nodes)


def _recording(graphs, inner="aot_eager"):
    """A dynamo backend that keeps each graph it gets and hands it to ``inner``."""
    compile_inner = torch._dynamo.lookup_backend(inner)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_inner(gm, example_inputs)

    return backend


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_masked_model_compiles_as_one_graph(name):
    lm = load_model(name)
    model = lm.model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.vocab_size, (2, 32), generator=g)
    mask = attnprune.make_mask(attnprune.observe(model, [{"input_ids": ids}], progress=False), 0.5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = model(ids).logits
        with attnprune.apply(model, mask, backend="reference"):
            eager = model(ids).logits
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            got = compiled(ids).logits
            other = torch.randint(0, lm.vocab_size, (1, 20), generator=g)
            got2, eager2 = compiled(other).logits, model(other).logits
    assert (eager - dense).abs().max() > 1e-3  # the mask changes the output, so agreeing below means it is used
    # same graph of float32 ops as eager (aot_eager runs the traced aten ops themselves): equal to rounding
    tol = 64 * EPS * eager.abs().max()
    assert (got - eager).abs().max() <= tol and (got2 - eager2).abs().max() <= tol * 2


# ---------------------------------------------------------------------------------------------- triton backend
def _block_masked(name):
    """A tiny model without dropout and a 50% mask of whole 16 x 16 blocks (stats observed on blocks)."""
    lm = load_model(name)
    model = lm.model.to(DEV)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.vocab_size, (2, 32), generator=g).to(DEV)
    stats = attnprune.observe(model.eval(), [{"input_ids": ids}], progress=False, granularity=16)
    return lm, model, attnprune.make_mask(stats, 0.5, block=16), ids, g


def _loss(model, ids):
    logits = model(ids).logits  # the loss outside the model: transformers' loss logs under compile
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_triton_model(name, inner, tol_factor):
    lm, model, mask, ids, g = _block_masked(name)
    n_sites = len(mask.sites)
    graphs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            dense = model.eval()(ids).logits
        with attnprune.apply(model, mask, backend="triton"):
            compiled = torch.compile(model, backend=_recording(graphs, inner), fullgraph=True)
            with torch.no_grad():  # inference: forward only
                eager = model(ids).logits
                got = compiled(ids).logits
                other = torch.randint(0, lm.vocab_size, (1, 20), generator=g).to(DEV)
                got2, eager2 = compiled(other).logits, model(other).logits
            counts = [_ops_in([gm], "sparse_fwd") for gm in graphs]  # (the second shape may add a small graph)
            assert counts[0] == n_sites and set(counts) <= {0, n_sites}  # every site through the op
            model.train()  # training: forward and backward, against eager's gradients
            model.zero_grad()
            loss_e = _loss(model, ids)
            loss_e.backward()
            grads_e = _grads(model)
            model.zero_grad()
            loss_c = _loss(compiled, ids)
            loss_c.backward()
            grads_c = _grads(model)
    assert (eager - dense).abs().max() > 1e-3  # the mask changes the output, so agreeing below means it is used
    tol = tol_factor * EPS * eager.abs().max()
    assert (got - eager).abs().max() <= tol
    assert (got2 - eager2).abs().max() <= tol_factor * EPS * eager2.abs().max()
    assert abs(loss_c.item() - loss_e.item()) <= tol_factor * EPS * abs(loss_e.item())
    assert grads_e.keys() == grads_c.keys() and len(grads_e) > 0
    gmax = max(v.abs().max() for v in grads_e.values())
    assert gmax > 0
    for n in grads_e:
        assert (grads_c[n] - grads_e[n]).abs().max() <= tol_factor * EPS * gmax, n


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_triton_masked_model_compiles_as_one_graph(name):
    # aot_eager: the same kernels on the same inputs as eager, the rest the same aten ops: equal to rounding
    _check_triton_model(name, "aot_eager", 64)


@needs_triton
@pytest.mark.slow
def test_triton_masked_model_under_inductor():
    # inductor fuses and reorders the float32 work around the ops (~40 s to compile on a 2-core CPU)
    _check_triton_model("tiny-llama", "inductor", 256)


@needs_triton
def test_compiled_masked_model_does_not_recompile_on_a_repeated_call():
    """Repeated calls of a compiled masked model reuse its graph: no per-call host counter (capture's
    ``calls`` / ``forwards``, apply's entry counts) is traced, which would make dynamo recompile every call."""
    _, model, mask, ids, _ = _block_masked("tiny-llama")
    graphs = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with attnprune.apply(model.eval(), mask, backend="triton"):
            model(ids)  # an eager forward first: the capture path narrows its hooks on the first one
            compiled = torch.compile(model, backend=_recording(graphs), fullgraph=True)
            compiled(ids)
            n = len(graphs)
            compiled(ids)
            compiled(ids)
    assert len(graphs) == n


# -------------------------------------------------------------------------------------- the ops themselves
def _qkv(B, Hq, Hkv, Lq, Lk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(DEV)
                 for shape in ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)))


@needs_triton
def test_sparse_attention_by_handle_equals_the_direct_launch():
    """The custom ops (run eagerly through a handle) compute what the direct launches compute, forward
    and backward, with key padding, causality from an offset and a head dim that is padded (24)."""
    from attnprune.kernels import BlockLayout, sparse_attention
    from attnprune.kernels.ops import layout_handle

    torch.manual_seed(0)
    Hq, Hkv, L, D = 4, 2, 40, 24
    layout = BlockLayout.from_tokens(torch.rand(Hq, 48, 48) < 0.5, block=16)
    handle = layout_handle("layout", layout)
    assert layout_handle("layout", layout) == handle  # one handle per object
    kp = torch.tensor([[True] * 40, [True] * 29 + [False] * 11], device=DEV)
    outs, grads = [], []
    for lay in (layout, handle):
        q, k, v = (t.requires_grad_() for t in _qkv(2, Hq, Hkv, L, L, D))
        out = sparse_attention(q, k, v, lay, causal=True, q_offset=3, key_padding=kp)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV))
        outs.append(out.detach())
        grads.append([q.grad, k.grad, v.grad])
    assert outs[0].abs().max() > 0 and torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert a.abs().max() > 0 and torch.equal(a, b)


@needs_triton
def test_compiled_sparse_attention_and_backend_with_a_padding_mask():
    """``sparse_attention`` on a fixed layout and the triton backend on a site mask, each inside a function
    compiled with ``fullgraph=True``: the same output and gradients as eagerly; the backend gets an
    HF-style additive mask (right padding + causal), read on the device while compiling."""
    from attnprune.backends.triton import triton_backend
    from attnprune.kernels import BlockLayout, sparse_attention
    from attnprune.mask import SiteMask
    from attnprune.sites import SiteInfo

    torch.manual_seed(0)
    B, Hq, Hkv, L, D = 2, 4, 2, 32, 16
    layout = BlockLayout.from_tokens(torch.rand(Hq, L, L) < 0.5, block=16)
    site = SiteMask(SiteInfo("layers.0.self_attn", "causal", Hq, Hkv), L, L, keep=torch.rand(Hq, 2, 2) < 0.6,
                    block=16)
    j = torch.arange(L, device=DEV)
    allowed = (j[None, :] < torch.tensor([L, 21], device=DEV)[:, None])[:, None, None, :] & (j[None, :] <= j[:, None])
    add = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)  # [B, 1, L, L]

    def by_layout(q, k, v):
        return sparse_attention(q, k, v, layout, causal=True)

    def by_site(q, k, v):
        return triton_backend(q, k, v, site, attn_mask=add)

    for fn in (by_layout, by_site):
        graphs = []
        compiled = torch.compile(fn, backend=_recording(graphs), fullgraph=True)
        results = []
        for f in (fn, compiled):
            q, k, v = (t.requires_grad_() for t in _qkv(B, Hq, Hkv, L, L, D))
            out = f(q, k, v)
            out.backward(torch.ones_like(out))
            results.append([out.detach(), q.grad, k.grad, v.grad])
        assert _ops_in(graphs, "sparse_fwd") == 1, fn.__name__
        for a, b in zip(*results):
            assert a.abs().max() > 0
            assert (a - b).abs().max() <= 64 * EPS * a.abs().max(), fn.__name__
        torch._dynamo.reset()


def test_no_transformers_import_inside_a_masked_forward(monkeypatch):
    """The capture path imports nothing from transformers while the model runs: torch 2.11's dynamo
    refuses an import of transformers' lazy module inside a compiled forward ("Bad import result"; the
    H200 run of 2026-12-05 failed 6 tests of this file on it), which CI's torch version traces."""
    import builtins

    lm = load_model("tiny-llama")
    model = lm.model.eval()
    ids = torch.randint(0, lm.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = attnprune.make_mask(attnprune.observe(model, [{"input_ids": ids}], progress=False), 0.5)
    seen = []
    real_import = builtins.__import__

    def spy(name, *args, **kwargs):
        if name.startswith("transformers"):
            seen.append(name)
        return real_import(name, *args, **kwargs)

    with torch.no_grad(), warnings.catch_warnings(), attnprune.apply(model, mask, backend="reference"):
        warnings.simplefilter("ignore")
        model(ids)  # the first forward (the capture path narrows its hooks there)
        monkeypatch.setattr(builtins, "__import__", spy)
        model(ids)
        model(ids[:1, :9])
        monkeypatch.setattr(builtins, "__import__", real_import)
    assert not seen, seen


def _kpm_args(graphs):
    """The key-padding argument (``kpm``, the fourth) of every ``attnprune::sparse_fwd`` node."""
    return [n.args[3] if len(n.args) > 3 else n.kwargs.get("kpm") for g in graphs for n in g.graph.nodes
            if str(n.target).startswith("attnprune.sparse_fwd")]


@needs_triton
def test_compiled_forward_without_padding_passes_no_key_padding():
    """Under compile transformers materialise the causal mask (of a forward without a cache); a forward called
    without an attention mask
    says no key is padding, so the kernels get none (their unpadded, natively causal path: FA4 would
    otherwise run its per-element mask_mod on every block), and the output equals eager. (A forward with a
    2-D padding mask does not compile yet: its positions need a host read.)"""
    _, model, mask, ids, _ = _block_masked("tiny-llama")
    graphs = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with attnprune.apply(model.eval(), mask, backend="triton"):
            eager = model(ids, use_cache=False).logits  # (with a cache transformers 5 pass no mask at all)
            got = torch.compile(model, backend=_recording(graphs), fullgraph=True)(ids, use_cache=False).logits
    kpm = _kpm_args(graphs)
    assert len(kpm) == len(mask.sites) and all(a is None for a in kpm)
    assert (got - eager).abs().max() <= 64 * EPS * eager.abs().max()


def test_compiled_split_checks_a_padding_free_forward_on_the_device():
    """``padding_free``: no key padding is returned, and a mask that does pad a key fails the on-device
    check (on the CPU ``torch._assert_async`` raises at once) instead of being computed unpadded."""
    from attnprune.backends._block_sparse import _compiled_split

    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    kp, is_causal, off = _compiled_split(causal, 2, 6, 6, False, 0, "causal", padding_free=True)
    assert kp is None and is_causal and off == 0
    kp, _, _ = _compiled_split(causal, 2, 6, 6, False, 0, "causal")
    assert kp is not None and bool(kp.all())
    padded = causal.clone()
    padded[1, :, :, 4:] = False  # keys 4, 5 of the second sequence are padding
    kp, _, _ = _compiled_split(padded, 2, 6, 6, False, 0, "causal")
    assert kp[1].tolist() == [True] * 4 + [False] * 2  # without the claim: passed on as key padding
    with pytest.raises(RuntimeError):
        _compiled_split(padded, 2, 6, 6, False, 0, "causal", padding_free=True)


@needs_triton
def test_right_padded_batch_compiles_and_a_left_padded_one_is_refused():
    """A 2-D padding mask under compile: no host read of where the padding sits. A right-padded batch traces
    as one graph, passes its key padding to the kernels and equals eager on its real tokens; a left-padded
    one fails the on-device check (on the CPU ``torch._assert_async`` raises at once; checked there only: on a
    GPU it is a device-side assert, which ends the process's CUDA context) instead of being computed with the
    wrong positions."""
    _, model, mask, ids, _ = _block_masked("tiny-llama")
    right = torch.ones_like(ids)
    right[1, -5:] = 0
    graphs = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with attnprune.apply(model.eval(), mask, backend="triton"):
            eager = model(ids, attention_mask=right, use_cache=False).logits
            compiled = torch.compile(model, backend=_recording(graphs), fullgraph=True)
            got = compiled(ids, attention_mask=right, use_cache=False).logits
            kpm = _kpm_args(graphs)
            if DEV == "cpu":  # on a GPU the failed check is a device-side assert, fatal to the process's CUDA context
                with pytest.raises(RuntimeError, match="left-padded"):
                    compiled(ids, attention_mask=right.flip(1), use_cache=False)
    assert len(kpm) == len(mask.sites) and all(a is not None for a in kpm)
    real = right.bool()
    assert (got[real] - eager[real]).abs().max() <= 64 * EPS * eager.abs().max()


@needs_triton
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_input_past_the_calibrated_length_is_a_length_error_under_compile(backend):
    """Under compile the call's mask is not read to find padding past the calibrated length, so every
    position counts as real: an input longer than the mask's 32 positions raises ``LengthError`` while
    tracing (not a data-dependent-guard failure); with ``fullgraph=True`` dynamo reports it with the
    error's message."""
    from attnprune.errors import LengthError

    _, model, mask, ids, _ = _block_masked("tiny-llama")
    longer = torch.randint(0, 100, (1, 48), generator=torch.Generator().manual_seed(1)).to(DEV)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with attnprune.apply(model.eval(), mask, backend=backend):
            model(ids)
            with pytest.raises(LengthError, match="calibrated for 32 x 32"):
                torch.compile(model, backend="aot_eager")(longer)
            torch._dynamo.reset()
            with pytest.raises(Exception, match="calibrated for 32 x 32"):
                torch.compile(model, backend="aot_eager", fullgraph=True)(longer)
