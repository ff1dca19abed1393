"""``backend="flash"`` on an emulated FlashAttention-4 (tests/fa4_emulator.py, float64 on the CPU): the eager
backend against float64 (metadata, native causality, the mask_mod's bitmask / causal / key-padding
semantics), and under ``torch.compile(fullgraph=True)``: one ``attnprune::flash_fwd`` op per call
(:mod:`attnprune.backends.flash_ops`), the eager result and gradients, and token-exact masks routed by
``flash.PARTIAL``. FA4's own numbers are checked on the GPU (tests/unit/test_backend_flash.py)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from attnprune.backends import flash  # noqa: E402
from attnprune.mask import SiteMask  # noqa: E402
from attnprune.sites import SiteInfo  # noqa: E402
from fa4_emulator import emulated_fa4  # noqa: E402

EPS = torch.finfo(torch.float32).eps
B = 128


@pytest.fixture
def fa4(monkeypatch):
    """The emulated FA4, and the flash backend allowed on this machine's float32 CPU tensors."""
    if torch.cuda.is_available():
        pytest.skip("the emulator stands in for FA4 on the CPU")
    emulated_fa4(monkeypatch, flash, full_part_only=False)
    monkeypatch.setattr(flash, "_flash_unsupported", lambda q, k, v: None)
    torch._dynamo.reset()
    yield flash.flash_backend
    torch._dynamo.reset()


def _site(kind, Hq, Hkv, L, granularity, seed=0):
    """A random 60% mask that keeps the diagonal (as the policies do): with an additive attention mask, a
    row left with no key is zero in the kernels and uniform over its masked keys in SDPA's arithmetic."""
    g = torch.Generator().manual_seed(seed)
    n = L if granularity == "tokens" else -(-L // B)
    keep = (torch.rand(Hq, n, n, generator=g) < 0.6) | torch.eye(n, dtype=torch.bool)
    return SiteMask(SiteInfo("layers.0.self_attn", kind, Hq, Hkv), L, L, keep=keep,
                    block=B if granularity == "blocks" else None)


def _qkv(Bt, Hq, Hkv, L, D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(Bt, h, L, D, generator=g).requires_grad_() for h in (Hq, Hkv, Hkv)]


def _padding(Bt, L, causal):
    """An HF-style additive mask: right padding across a block edge in the last sequence, and causality
    folded in when ``causal`` (HF passes is_causal=False with a mask)."""
    allowed = torch.ones(Bt, 1, L, L, dtype=torch.bool)
    allowed[-1, ..., L - 70:] = False
    if causal:
        allowed &= torch.ones(L, L, dtype=torch.bool).tril()
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def _run(fn, q, k, v, go):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), go)
    return out.detach(), grads


CASES = {  # name: granularity, causal, padding
    "blocks": ("blocks", False, False),
    "blocks_causal": ("blocks", True, False),  # FA4's native causal path
    "blocks_causal_padding": ("blocks", True, True),  # causal + key padding through the mask_mod
    "tokens_causal": ("tokens", True, False),  # the bitmask through the mask_mod
    "tokens_padding": ("tokens", False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eager_flash_backend_on_emulated_fa4_matches_float64(fa4, monkeypatch, case):
    """The eager flash backend's glue (metadata lists, native causality, the mask_mod's aux tensors) against
    the reference backend in float64."""
    from attnprune.backends import BACKENDS

    granularity, causal, padding = CASES[case]
    monkeypatch.setattr(flash, "PARTIAL", "mask_mod")
    Bt, Hq, Hkv, L, D = 2, 4, 2, 300, 32
    site = _site("causal" if causal else "self", Hq, Hkv, L, granularity)
    kw = dict(attn_mask=_padding(Bt, L, causal), is_causal=False) if padding else dict(is_causal=causal)
    q, k, v = _qkv(Bt, Hq, Hkv, L, D)
    go = torch.randn(Bt, Hq, L, D, generator=torch.Generator().manual_seed(2))
    out, grads = _run(lambda q, k, v: fa4(q, k, v, site, **kw), q, k, v, go)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, rgrads = _run(lambda q, k, v: BACKENDS.get("reference")(q, k, v, site, **kw), q64, k64, v64, go.double())
    for a, b in zip((out, *grads), (ref, *rgrads)):
        assert b.abs().max() > 0
        assert (a.double() - b).abs().max() <= 64 * EPS * b.abs().max()  # float64 math, float32 inputs / outputs


def _ops_in(graphs, name):
    return sum(str(n.target).startswith(f"attnprune.{name}") for g in graphs for n in g.graph.nodes)


def _compiled(fn, graphs):
    inner = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    return torch.compile(fn, backend=backend, fullgraph=True)


@pytest.mark.parametrize("case, partial, op", [
    ("blocks_causal", "triton", "flash_fwd"),  # block-exact: FA4 whatever PARTIAL says
    ("blocks_causal_padding", "mask_mod", "flash_fwd"),
    ("tokens_causal", "mask_mod", "flash_fwd"),  # token-exact through FA4's mask_mod
    ("tokens_padding", "triton", "sparse_fwd"),  # token-exact on the Triton kernels (the default)
])
def test_compiled_flash_backend_is_one_op_and_equals_eager(fa4, monkeypatch, case, partial, op):
    granularity, causal, padding = CASES[case]
    monkeypatch.setattr(flash, "PARTIAL", partial)
    Bt, Hq, Hkv, L, D = 2, 4, 2, 300, 32
    site = _site("causal" if causal else "self", Hq, Hkv, L, granularity)
    kw = dict(attn_mask=_padding(Bt, L, causal), is_causal=False) if padding else dict(is_causal=causal)

    def f(q, k, v):
        return fa4(q, k, v, site, **kw)

    graphs = []
    go = torch.randn(Bt, Hq, L, D, generator=torch.Generator().manual_seed(2))
    eager = _run(f, *_qkv(Bt, Hq, Hkv, L, D), go)
    got = _run(_compiled(f, graphs), *_qkv(Bt, Hq, Hkv, L, D), go)
    assert _ops_in(graphs, op) == 1
    assert _ops_in(graphs, "flash_fwd" if op == "sparse_fwd" else "sparse_fwd") == 0
    for a, b in zip((got[0], *got[1]), (eager[0], *eager[1])):
        assert b.abs().max() > 0
        # the same kernels on the same inputs; the Triton route's padding and scale arithmetic may round apart
        assert (a - b).abs().max() <= 64 * EPS * b.abs().max()


def test_compiled_flash_backend_follows_a_new_length_without_retracing_the_mask(fa4, monkeypatch):
    """A second length runs the op again on that length's layout (resolved when the op runs)."""
    monkeypatch.setattr(flash, "PARTIAL", "mask_mod")
    site = _site("causal", 2, 2, 300, "blocks")
    graphs = []
    compiled = _compiled(lambda q, k, v: fa4(q, k, v, site, is_causal=True), graphs)
    for L in (300, 200):
        q, k, v = _qkv(1, 2, 2, L, 16, seed=L)
        got = compiled(q, k, v)
        want = fa4(q, k, v, site, is_causal=True)
        assert (got - want).abs().max() <= 64 * EPS * want.abs().max()
    assert _ops_in(graphs, "flash_fwd") >= 1


def test_compiled_flash_backend_uses_fa4s_own_causality_when_the_forward_has_no_padding(fa4, monkeypatch):
    """Under compile a causal site gets the model's materialised causal mask. Without the forward's word that
    no key is padding (``key_padding_free``), its key padding goes to FA4 through the per-element
    ``mask_mod``; with it, FA4 runs its own causality and no ``mask_mod``. Both equal the eager causal call."""
    L = 256
    site = _site("causal", 2, 2, L, "blocks")
    causal_mask = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
    q, k, v = _qkv(1, 2, 2, L, 16)
    want = fa4(q, k, v, site, is_causal=True)
    seen, build = [], flash.fa4_call_args

    def recording(*a, **kw):
        native, mask_mod, aux, meta = build(*a, **kw)
        seen.append((native, mask_mod is not None))
        return native, mask_mod, aux, meta

    monkeypatch.setattr(flash, "fa4_call_args", recording)
    for free in (False, True):
        seen.clear()
        torch._dynamo.reset()
        compiled = _compiled(lambda q, k, v: fa4(q, k, v, site, attn_mask=causal_mask, key_padding_free=free), [])
        got = compiled(q, k, v)
        assert (got - want).abs().max() <= 64 * EPS * want.abs().max()
        assert seen == [(True, False)] if free else seen == [(False, True)]
