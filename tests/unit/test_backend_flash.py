"""``backend="flash"`` (FlashAttention-4 block sparsity): the FA4 metadata against a brute-force
construction from the dense block table (CPU), ``resolve_backend``, the missing-dependency error, and
on an sm90+ GPU with FA4 the backend's output and gradients against a float64 reference, alone and inside
``apply`` on a small transformers model."""

from __future__ import annotations

import pytest
import torch

import attnprune.backends as backends
from attnprune.backends import AUTO, BACKENDS, resolve_backend
from attnprune.backends.flash import fa4_block_tables, fa4_metadata
from attnprune.errors import MissingDependencyError
from attnprune.kernels import BlockLayout

B = 128


def brute(layout, lq, lk, causal, off, kp=None):
    """Dense reference: (full, part) bool [Bt, H, Qn, Kn] from the token mask."""
    dense = layout.to_dense(layout.q_blocks * B, layout.k_blocks * B)
    qn, kn = -(-lq // B), -(-lk // B)
    i = torch.arange(qn * B)[:, None]
    j = torch.arange(kn * B)[None, :]
    allowed = (j < lk) & (i >= 0)  # rows past lq: FA4 skips them itself, they decide nothing
    rows = (i < lq)[None, :, :]
    if causal:
        allowed = allowed & (j <= i + off)
    tok = dense[:, :qn * B, :kn * B] & allowed
    kps = [None] if kp is None else list(kp)
    fulls, parts = [], []
    for kpb in kps:
        t = tok if kpb is None else tok & torch.nn.functional.pad(kpb, (0, kn * B - lk))[None, None, :]
        blocks = t.view(-1, qn, B, kn, B)
        r = rows.reshape(1, qn, B, 1, 1)
        anyb = (blocks & r).any(4).any(2)
        allb = (blocks | ~r).all(4).all(2)
        fulls.append(allb)
        parts.append(anyb & ~allb)
    return torch.stack(fulls), torch.stack(parts)


def check_lists(cnt, idx, table):
    assert torch.equal(cnt, table.sum(-1, dtype=torch.int32))
    for pos in torch.cartesian_prod(*[torch.arange(s) for s in table.shape[:-1]]):
        p = tuple(pos.tolist())
        got = idx[p][: cnt[p]].tolist()
        assert got == table[p].nonzero().flatten().tolist()


@pytest.mark.parametrize("lq,lk,causal,off", [(300, 260, False, 0), (300, 300, True, 0), (129, 400, True, 271),
                                             (256, 256, True, -100), (100, 77, False, 0)])
@pytest.mark.parametrize("kind", ["tokens", "blocks", "shared"])
def test_metadata_matches_brute_force(lq, lk, causal, off, kind):
    torch.manual_seed(lq + lk)
    qn, kn = -(-lq // B), -(-lk // B)
    if kind == "tokens":
        keep = torch.rand(3, lq, lk) < 0.5
        keep[0, : min(lq, 128)] = False  # an empty query block
        layout = BlockLayout.from_tokens(keep, (B, B))
    else:
        h = 1 if kind == "shared" else 3
        keep = torch.rand(h, qn, kn) < 0.5
        layout = BlockLayout.from_blocks(keep, (B, B), q_len=lq, k_len=lk)
    meta = fa4_metadata(layout, lq, lk, causal=causal, q_offset=off)
    full, part = brute(layout, lq, lk, causal, off)
    # the block holding the end of the keys always goes through the mask lists
    if lk % B:
        anyk = full[..., -1] | part[..., -1]
        part[..., -1], full[..., -1] = anyk, False
    mc, mi, fc, fi = meta["fwd"]
    assert mc.shape == (1, layout.num_heads, qn) and mi.shape == (1, layout.num_heads, qn, kn)
    assert mc.dtype == torch.int32 and mi.dtype == torch.int32
    check_lists(mc, mi, part)
    check_lists(fc, fi, full)
    bmc, bmi, bfc, bfi = meta["bwd"]
    assert bmc.shape == (1, layout.num_heads, kn)
    check_lists(bmc, bmi, part.transpose(-1, -2))
    check_lists(bfc, bfi, full.transpose(-1, -2))
    assert fa4_metadata(layout, lq, lk, causal=causal, q_offset=off) is meta  # cached


def test_metadata_key_padding_per_batch():
    torch.manual_seed(0)
    lq, lk = 200, 390
    layout = BlockLayout.from_tokens(torch.rand(2, lq, lk) < 0.7, (B, B))
    kp = torch.ones(3, lk, dtype=torch.bool)
    kp[1, 300:] = False  # right padding inside the last blocks
    kp[2, :256] = False  # left padding over two whole blocks
    meta = fa4_metadata(layout, lq, lk, causal=True, q_offset=lk - lq, key_padding=kp)
    full, part = brute(layout, lq, lk, True, lk - lq, kp)
    part[..., -1], full[..., -1] = part[..., -1] | full[..., -1], False
    # a kept block touched by padding is partial even where the padded keys are pruned anyway
    mc, mi, fc, fi = meta["fwd"]
    assert mc.shape[0] == 3
    check_lists(fc, fi, full & ~part)
    got_part = torch.zeros_like(part)
    for pos in torch.cartesian_prod(*[torch.arange(s) for s in mc.shape]):
        p = tuple(pos.tolist())
        got_part[p][mi[p][: mc[p]].long()] = True
    assert not (got_part & full).any()
    assert torch.equal(got_part | full, part | full | (got_part & ~part & ~full))
    assert not got_part[2, :, :, :2].any()  # blocks without any real key are dropped
    bmc, bmi, _, _ = meta["bwd"]
    assert torch.equal(bmc, got_part.transpose(-1, -2).sum(-1, dtype=torch.int32))


def test_tables_are_cached_and_empty_rows():
    layout = BlockLayout.from_blocks(torch.zeros(1, 3, 3, dtype=torch.bool), (B, B))
    full, part = fa4_block_tables(layout, 384, 384)
    assert not full.any() and not part.any()
    meta = fa4_metadata(layout, 384, 384)
    assert int(meta["fwd"][0].sum()) == 0 and int(meta["fwd"][2].sum()) == 0
    assert fa4_block_tables(layout, 384, 384)[0] is full


def test_resolve_backend(monkeypatch):
    assert resolve_backend("triton", "cpu") == "triton"
    assert resolve_backend(AUTO, "cpu") == "reference"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, fa, tr, want in [((9, 0), True, True, "flash"), ((8, 0), True, True, "triton"),
                              ((9, 0), False, True, "triton"), ((9, 0), False, False, "reference"),
                              ((10, 0), True, False, "flash")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        monkeypatch.setattr(backends, "_importable",
                            lambda m, fa=fa, tr=tr: fa if m.startswith("flash_attn") else tr)
        assert resolve_backend(AUTO, "cuda") == want, (cap, fa, tr)
    assert resolve_backend(AUTO, "cpu") == "reference"


def test_missing_flash_attn_message(monkeypatch):
    monkeypatch.setattr(backends, "_importable", lambda m: False)
    with pytest.raises(MissingDependencyError, match=r"attnprune\[hopper\].*|sm90"):
        BACKENDS.get("flash")
    with pytest.raises(MissingDependencyError) as e:
        BACKENDS.get("flash")
    assert "attnprune[hopper]" in str(e.value) and "sm90" in str(e.value)


def _fa4_ok():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return False
    return backends._importable("flash_attn.cute")


@pytest.mark.gpu
@pytest.mark.skipif(not _fa4_ok(), reason="needs an sm90+ GPU with FlashAttention-4")
@pytest.mark.parametrize("partial", ["mask_mod", "triton"])  # how token-exact blocks run ("split": test_flash_split)
@pytest.mark.parametrize("case", ["odd", "gqa", "causal", "padding", "empty", "blocks"])
def test_flash_backend_matches_float64(case, partial, monkeypatch):
    import attnprune.backends.flash as flash
    from attnprune.mask import SiteMask
    from attnprune.sites import SiteInfo

    monkeypatch.setattr(flash, "PARTIAL", partial)
    torch.manual_seed(1)
    Bt, H, Hkv, D, lq, lk = 2, 4, 4, 64, 333, 333
    causal = case in ("causal", "padding")
    if case == "gqa":
        Hkv, D, lq, lk = 2, 128, 260, 517
    block = 128 if case == "blocks" else None
    info = SiteInfo("layers.0.self_attn", "self", H, Hkv)
    if block:
        keep = torch.rand(H, -(-lq // block), -(-lk // block)) < 0.5
    else:
        keep = torch.rand(H, lq, lk) < 0.5
    if case == "empty":
        keep[1, :140] = False
    site = SiteMask(info, lq, lk, keep=keep, block=block)
    dev = "cuda"
    q = torch.randn(Bt, H, lq, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(Bt, Hkv, lk, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(Bt, Hkv, lk, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    attn_mask = None
    if case == "padding":
        attn_mask = torch.ones(Bt, 1, 1, lk, dtype=torch.bool, device=dev)
        attn_mask[1, ..., 200:] = False
    kw = dict(attn_mask=attn_mask, is_causal=causal)
    with torch.autograd.set_detect_anomaly(False):
        import warnings

        with warnings.catch_warnings():
            # no silent fallback to the reference backend (FA4's own DSL warnings are not ours)
            warnings.filterwarnings("error", message=".*hands this call to the reference backend")
            out = BACKENDS.get("flash")(q, k, v, site, **kw)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = BACKENDS.get("reference")(q64, k64, v64, site, **kw)
    rgrads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for a, b in zip((out, *grads), (ref, *rgrads)):
        assert torch.isfinite(a).all()
        err = ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()
        assert err < 2e-2, err


def _fake_fa4(monkeypatch):
    """A stand-in ``flash_attn.cute`` that records what flash_sparse_attention passes to FA4."""
    import sys
    import types

    calls = []

    def flash_attn_func(q, k, v, **kw):  # q: [B, L, H, D]
        calls.append(kw)
        return torch.zeros_like(q), None

    class BlockSparseTensorsTorch:
        def __init__(self, *tensors, block_size):
            self.tensors, self.block_size = tensors, block_size

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    bs = types.ModuleType("flash_attn.cute.block_sparsity")
    bs.BlockSparseTensorsTorch = BlockSparseTensorsTorch
    for name, mod in (("flash_attn", types.ModuleType("flash_attn")), ("flash_attn.cute", cute),
                      ("flash_attn.cute.block_sparsity", bs)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_native_causal_only_where_fa4_causality_is_ours(monkeypatch):
    """Block-exact causal calls whose offset is FA4's own (q_offset = Lk - Lq) go to FA4's native
    causal path without a mask_mod when NATIVE_CAUSAL is on; token-exact blocks, key padding, another
    offset or NATIVE_CAUSAL=False keep the mask_mod (FA4 ignores causal= when a mask_mod is given)."""
    import attnprune.backends.flash as flash

    calls = _fake_fa4(monkeypatch)
    monkeypatch.setattr(flash, "_mask_mod", lambda *a: ("mask_mod", a))
    monkeypatch.setattr(flash, "PARTIAL", "mask_mod")  # token-exact layouts through FA4 (default: Triton)
    monkeypatch.setattr(flash, "NATIVE_CAUSAL", True)  # the default, unless ATTNPRUNE_FA4_NATIVE_CAUSAL=0
    blocks = torch.rand(2, 3, 3) < 0.7
    block_exact = BlockLayout.from_blocks(blocks, block=B)
    tok = torch.rand(2, 3 * B, 3 * B) < 0.5
    tok[:, :B, :B] = True
    token_exact = BlockLayout.from_tokens(tok, block=B)
    assert block_exact.num_partial == 0 and token_exact.num_partial > 0

    def run(layout, lq, lk, **kw):
        q = torch.randn(1, 2, lq, 64)
        k = v = torch.randn(1, 2, lk, 64)
        out = flash.flash_sparse_attention(q, k, v, layout, **kw)
        assert out.shape == q.shape
        c = calls[-1]
        return c["causal"], c["mask_mod"] is not None

    assert run(block_exact, 300, 300, causal=True) == (True, False)  # prefill
    assert run(block_exact, 1, 300, causal=True, q_offset=299) == (True, False)  # decode over a full cache
    assert run(block_exact, 300, 300, causal=False) == (False, False)
    assert run(block_exact, 100, 300, causal=True, q_offset=7) == (False, True)  # not FA4's alignment
    assert run(token_exact, 300, 300, causal=True) == (False, True)
    kp = torch.ones(1, 300, dtype=torch.bool)
    kp[0, 250:] = False
    assert run(block_exact, 300, 300, causal=True, key_padding=kp) == (False, True)
    monkeypatch.setattr(flash, "NATIVE_CAUSAL", False)
    assert run(block_exact, 300, 300, causal=True) == (False, True)


def test_native_causal_is_the_default_and_the_environment_turns_it_off():
    """FA4's own causal masking is on unless ATTNPRUNE_FA4_NATIVE_CAUSAL=0 (read at import)."""
    import os
    import subprocess
    import sys

    code = "from attnprune.backends import flash; print(flash.NATIVE_CAUSAL)"
    for value, want in ((None, "True"), ("0", "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "ATTNPRUNE_FA4_NATIVE_CAUSAL"}
        if value is not None:
            env["ATTNPRUNE_FA4_NATIVE_CAUSAL"] = value
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        assert out.stdout.strip() == want, (value, out.stdout, out.stderr)


def _small_llama():
    """A 2-layer Llama (GQA 4/2 heads, head dim 64, rotary positions: any length) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def check_apply_against_float64(backend, granularity, dev, dtype, length=300):
    """``apply(model, mask, backend=...)`` on ``dtype`` weights against the same model in float64 through the
    reference backend: logits and every parameter's gradient. The bound comes from the same comparison
    without a mask: the masked model may be at most 3x as far from float64 as the dense one in ``dtype``
    (the same rounding of weights and activations; attention itself accumulates in float32)."""
    import copy
    import warnings

    import attnprune

    model = _small_llama()
    ids = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(1))
    block = 128 if granularity == "blocks" else None
    stats = attnprune.observe(model, [{"input_ids": ids}], progress=False, granularity=block or 1)
    mask = attnprune.make_mask(stats, 0.5, block=block)
    ids = ids.to(dev)
    m64 = copy.deepcopy(model).to(dev, torch.float64)
    low = model.to(dev, dtype)

    def run(m, backend=None):
        m.zero_grad()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*hands this call to the reference backend")
            if backend is None:
                logits = m(ids).logits
            else:
                with attnprune.apply(m, mask, backend=backend):
                    logits = m(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        grads = torch.cat([p.grad.double().flatten() for p in m.parameters()])
        return logits.detach(), grads

    ref, ref_g = run(m64, "reference")
    dense64, dense64_g = run(m64)
    got, got_g = run(low, backend)
    dense, dense_g = run(low)
    # the mask moves the logits far more than the bound below allows: an ignored mask fails it
    assert _rel(ref, dense64) > 10 * _rel(dense, dense64)
    assert _rel(got, ref) <= 3 * _rel(dense, dense64), (_rel(got, ref), _rel(dense, dense64))
    assert _rel(got_g, ref_g) <= 3 * _rel(dense_g, dense64_g), (_rel(got_g, ref_g), _rel(dense_g, dense64_g))


@pytest.mark.gpu
@pytest.mark.skipif(not _fa4_ok(), reason="needs an sm90+ GPU with FlashAttention-4")
@pytest.mark.parametrize("partial", ["mask_mod", "triton"])
@pytest.mark.parametrize("granularity", ["blocks", "tokens"])
def test_apply_flash_matches_float64_on_a_small_llama(granularity, partial, monkeypatch):
    """``apply(..., backend="flash")`` on a bf16 transformers model (GQA, 300 tokens: a partial last
    block) against the float64 reference backend, forward and gradients; token masks make token-exact
    blocks, run by each way of ``PARTIAL``."""
    import attnprune.backends.flash as flash

    monkeypatch.setattr(flash, "PARTIAL", partial)
    check_apply_against_float64("flash", granularity, "cuda", torch.bfloat16)


@pytest.mark.slow
def test_apply_triton_matches_float64_on_a_small_llama(monkeypatch):
    """The check above with the triton backend, in float32 under the Triton interpreter on the CPU (~15 s,
    so that the check itself runs in CI), in bf16 on a GPU; token masks (token-exact blocks, a partial
    last block)."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    if torch.cuda.is_available():  # bf16: Triton's float32 dots run as TF32 there, dense float32 SDPA does not
        check_apply_against_float64("triton", "tokens", "cuda", torch.bfloat16)
    else:
        check_apply_against_float64("triton", "tokens", "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not _fa4_ok(), reason="needs an sm90+ GPU with FlashAttention-4")
@pytest.mark.parametrize("granularity", ["blocks", "tokens"])
def test_compiled_flash_backend_equals_eager_on_the_gpu(granularity, monkeypatch):
    """``torch.compile(fullgraph=True)`` of the flash backend (the custom ops of attnprune.backends.flash_ops,
    or the Triton ops for token-exact masks) gives the eager call's output and gradients (bf16, causal)."""
    import attnprune.backends.flash as flash
    from attnprune.mask import SiteMask
    from attnprune.sites import SiteInfo

    monkeypatch.setattr(flash, "PARTIAL", "mask_mod" if granularity == "blocks" else "triton")
    torch.manual_seed(3)
    H, L, D = 4, 333, 64
    n = L if granularity == "tokens" else -(-L // B)
    keep = (torch.rand(H, n, n) < 0.5) | torch.eye(n, dtype=torch.bool)
    site = SiteMask(SiteInfo("layers.0.self_attn", "causal", H, H), L, L, keep=keep,
                    block=B if granularity == "blocks" else None)
    backend = BACKENDS.get("flash")

    def f(q, k, v):
        return backend(q, k, v, site, is_causal=True)

    torch._dynamo.reset()
    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2, H, L, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results.append((out, *grads))
    torch._dynamo.reset()
    for a, b in zip(*results):
        assert b.float().abs().max() > 0
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err <= 2 ** -8, err  # the same kernels on the same inputs: at most bf16 rounding apart
