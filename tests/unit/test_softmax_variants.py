"""Attention sinks (gpt-oss's ``s_aux``) and logit soft-capping (Gemma 2's ``softcap``): the dense form,
the Triton kernels (sinks) and tiny gpt-oss / Gemma 2 models end to end.

The float64 reference here does not use ``attnprune.softmax``: a sink is written as one more key whose score
is the sink logit and whose value is 0, built by widening the head dim (q gets a 1, every real key a 0,
the virtual key the logit), so plain masked softmax attention over ``Lk + 1`` keys gives the expected result.
Kernels run under the Triton interpreter without a GPU.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attnprune  # noqa: E402
from attnprune.errors import InvalidArgumentError  # noqa: E402
from attnprune.softmax import dense_attention  # noqa: E402
from tiny_models import auto_causal_lm, masked_runs, model_tol  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
EPS32 = torch.finfo(torch.float32).eps


def virtual_key_reference(q, k, v, allowed, scale, sinks):
    """float64 ``[B, Hq, Lq, Dv]``: softmax over the allowed keys plus a virtual key (score = the sink
    logit, value 0), written as ordinary attention with the head dim widened by one; empty rows -> 0."""
    B, Hq, Lq, D = q.shape
    G = Hq // k.shape[1]
    k = k.double().repeat_interleave(G, 1)
    v = v.double().repeat_interleave(G, 1)
    Lk = k.shape[2]
    q1 = torch.cat([q.double() * scale, torch.ones(B, Hq, Lq, 1, dtype=torch.float64)], -1)
    k1 = torch.cat([k, torch.zeros(B, Hq, Lk, 1, dtype=torch.float64)], -1)
    sink_key = torch.zeros(B, Hq, 1, D + 1, dtype=torch.float64)
    sink_key[..., D] = sinks.double()[None, :, None]
    k1 = torch.cat([k1, sink_key], 2)
    v1 = torch.cat([v, torch.zeros(B, Hq, 1, v.shape[-1], dtype=torch.float64)], 2)
    ok = torch.cat([allowed.expand(B, Hq, Lq, Lk), torch.ones(B, Hq, Lq, 1, dtype=torch.bool)], -1)
    s = (q1 @ k1.transpose(-1, -2)).masked_fill(~ok, float("-inf"))
    return torch.softmax(s, -1) @ v1


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_dense_attention_sinks_bool_additive_causal_and_empty_rows():
    torch.manual_seed(0)
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 7, 9, 8
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    sinks = torch.randn(Hq) * 2
    allowed = torch.rand(B, 1, Lq, Lk) < 0.6
    allowed[1, :, 3] = False  # a row with no key: all mass on the sink, output 0
    ref = virtual_key_reference(q, k, v, allowed, 0.3, sinks)
    tol = 4 * (Lk + D) * EPS32  # float32 sums of Lk + D terms of size <= 1 (relative)
    got = dense_attention(q, k, v, allowed, False, 0.3, sinks=sinks)
    assert rel(got, ref) < tol
    assert got[1, :, 3].abs().max() == 0
    additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)  # transformers' form
    assert rel(dense_attention(q, k, v, additive, False, 0.3, sinks=sinks), ref) < tol
    causal = torch.ones(Lq, Lk, dtype=torch.bool).tril()
    ref_c = virtual_key_reference(q, k, v, causal[None, None], D ** -0.5, sinks)
    assert rel(dense_attention(q, k, v, None, True, None, sinks=sinks), ref_c) < tol


def test_dense_attention_sinks_chunks_rows(monkeypatch):
    """Chunking the query rows (memory bound at long context) changes nothing."""
    import attnprune.softmax as S

    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 11, 4), torch.randn(1, 2, 11, 4), torch.randn(1, 2, 11, 4)
    sinks = torch.randn(2)
    whole = dense_attention(q, k, v, None, True, None, sinks=sinks)
    monkeypatch.setattr(S, "_ROWS_ELEMS", 2 * 11 * 3)  # 3 rows per chunk
    assert rel(dense_attention(q, k, v, None, True, None, sinks=sinks), whole) < 4 * (11 + 4) * EPS32


def _kernels_or_skip():
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    pytest.importorskip("triton")
    from attnprune.kernels import BlockLayout, sparse_attention

    return BlockLayout, sparse_attention


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_sinks_forward_and_gradients_against_float64(causal):
    """Token-exact layout (partial blocks), GQA, odd lengths, key padding with one sequence fully padded
    (its rows are empty: output 0), forward and the gradients of q, k, v and the sink logits."""
    BlockLayout, sparse_attention = _kernels_or_skip()
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, Hq, Hkv, Lq, Lk, D, blk = 3, 4, 2, 37, 45 if not causal else 37, 16, 16
    tok = torch.rand(Hq, Lq, Lk, generator=gen) < 0.6
    tok[:, :, :blk] &= torch.rand(Hq, Lq, blk, generator=gen) < 0.5
    layout = BlockLayout.from_tokens(tok, (blk, blk))
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(DEV).requires_grad_()
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(DEV).requires_grad_()
    v = torch.randn(B, Hkv, Lk, D, generator=gen).to(DEV).requires_grad_()
    sinks = (torch.randn(Hq, generator=gen) * 2).to(DEV).requires_grad_()
    lens = torch.tensor([Lk, Lk - 9, 0])
    out = sparse_attention(q, k, v, layout, causal=causal, key_padding=lens, sinks=sinks)
    allowed = tok[None].clone()
    if causal:
        allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool).tril()
    allowed = allowed & (torch.arange(Lk)[None, :] < lens[:, None])[:, None, None, :]
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v, sinks)]
    ref = virtual_key_reference(*leaves[:3], allowed, D ** -0.5, leaves[3])
    # float32 (TF32 on a GPU): sums of Lk + D terms forward, Lq + Lk + D in the gradients
    unit = EPS32 if not HAS_CUDA else 2.0 ** -10
    assert rel(out.cpu(), ref) < 4 * (Lk + D) * unit
    assert out[2].abs().max() == 0
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (out * w.to(DEV, out.dtype)).sum().backward()
    (ref * w).sum().backward()
    for got, want in zip((q, k, v, sinks), leaves):
        assert rel(got.grad.cpu(), want.grad) < 8 * (Lq + Lk + D) * unit
    with torch.no_grad():  # the no-grad launch folds the sinks in the same way
        assert rel(sparse_attention(q, k, v, layout, causal=causal, key_padding=lens, sinks=sinks).cpu(),
                   ref) < 4 * (Lk + D) * unit


def test_kernel_sinks_bad_shape():
    BlockLayout, sparse_attention = _kernels_or_skip()
    x = torch.randn(1, 2, 16, 16, device=DEV)
    layout = BlockLayout.from_tokens(torch.ones(2, 16, 16, dtype=torch.bool), (16, 16))
    with pytest.raises(InvalidArgumentError, match=r"sinks must be float \[q_heads\] = \[2\]"):
        sparse_attention(x, x, x, layout, sinks=torch.zeros(3, device=DEV))


def gpt_oss(seed=0):
    # experts "batched_mm" where this transformers has it: the default grouped-matmul fallback (float32, CUDA) has a
    # data-dependent backward that torch.compile (torch 2.11, transformers 5.17) cannot trace; the experts are not
    # what is tested here
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        experts = {"experts_implementation": "batched_mm"} if "batched_mm" in ALL_EXPERTS_FUNCTIONS else {}
    except ImportError:
        experts = {}
    model = auto_causal_lm("gpt_oss", seed, impl="eager", head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                           eos_token_id=1, bos_token_id=2, **experts)
    with torch.no_grad():  # initialised at 0 otherwise: large sinks make the test bite
        for m in model.modules():
            if hasattr(m, "sinks"):
                m.sinks.normal_(0.0, 2.0)
    return model


def _sink_params(model):
    return [p for n, p in model.named_parameters() if n.endswith("sinks")]


def _batch(L=20):
    ids = torch.randint(3, 97, (2, L))
    am = torch.ones(2, L, dtype=torch.long)
    am[1, -6:] = 0
    return dict(input_ids=ids, attention_mask=am)


def test_gpt_oss_observe_matches_its_attention_weights():
    """observe's probabilities are the model's own (sinks in the denominators, so rows sum to < 1),
    on full and sliding-window layers."""
    model = gpt_oss()
    ids = torch.randint(3, 97, (1, 16))
    out = model(input_ids=ids, output_attentions=True)
    stats = attnprune.observe(model, [dict(input_ids=ids)], progress=False)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    for site, weights in zip(stats.sites, out.attentions):
        want = weights[0].double()  # [H, L, L], the sink's column already dropped by the model
        got = stats.mean(site).double()
        seen = ~got[0].isnan() & causal  # not counted: outside the sliding window (masked by the model)
        assert torch.allclose(got[:, seen], want[:, seen], atol=16 * EPS32)  # float32 softmax over 16 keys
        assert torch.all(want[:, causal & ~seen] == 0)
        assert want.sum(-1).max() < 0.999  # the sinks hold mass: a softmax without them would fail above
    assert stats.count(stats.sites[0]).count_nonzero() < causal.sum()  # one sliding-window layer among them


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gpt_oss_all_kept_mask_equals_the_model_with_sink_gradients(backend):
    if backend == "triton":
        _kernels_or_skip()
    model = gpt_oss().to(DEV)
    batch = {k: v.to(DEV) for k, v in _batch().items()}
    stats = attnprune.observe(model, [batch], progress=False)
    real = batch["attention_mask"].bool()

    def run():
        model.zero_grad()
        logits = model(**batch).logits
        (logits[real] ** 2).sum().backward()
        return logits.detach(), [p.grad.clone() for p in _sink_params(model)]

    dense, dense_g = run()
    with attnprune.apply(model, attnprune.make_mask(stats, 0.0), backend=backend):
        got, got_g = run()
    tol = model_tol(model, batch["input_ids"].shape[1], HAS_CUDA)
    assert rel(got[real], dense[real]) < tol
    for a, b in zip(got_g, dense_g):
        assert b.abs().max() > 0 and rel(a, b) < tol


def test_gpt_oss_pruned_triton_equals_reference_and_flex_falls_back():
    _kernels_or_skip()
    model = gpt_oss(1).to(DEV)
    batch = {k: v.to(DEV) for k, v in _batch(24).items()}
    mask = attnprune.make_mask(attnprune.observe(model, [batch], progress=False), 0.5)
    real = batch["attention_mask"].bool()
    outs = {}
    for backend in ("reference", "triton"):
        with torch.no_grad(), attnprune.apply(model, mask, backend=backend):
            outs[backend] = model(**batch).logits[real]
    with torch.no_grad():
        dense = model(**batch).logits[real]
    assert rel(outs["triton"], outs["reference"]) < model_tol(model, 24, HAS_CUDA)
    assert rel(outs["reference"], dense) > 1e-3  # the mask does prune
    try:
        from attnprune.backends.flex import flex_backend  # noqa: F401
    except Exception:  # pragma: no cover - flex unavailable on this torch
        return
    with warnings.catch_warnings(record=True) as w, torch.no_grad(), attnprune.apply(model, mask, backend="flex"):
        warnings.simplefilter("always")
        got = model(**batch).logits[real]
    assert any("attention sinks: not supported" in str(x.message) for x in w)
    assert torch.equal(got, outs["reference"])


def pruned_cache_generation_matches_the_masked_model(model, kernel_patch=None, variant=None):
    """Greedy generation over a ``PrunedKVCache`` equals generation without a cache, both under a 50%
    mask (the decode path computes the model's softmax variant as the prefill path does). With
    ``kernel_patch`` (pytest's monkeypatch) the decode steps run the Triton decode kernel (on the CPU under
    the interpreter), which must get the ``variant`` keyword (``"sinks"`` / ``"softcap"``)."""
    calls = []
    if kernel_patch is not None:
        _kernels_or_skip()
        from attnprune.kernels import decode

        kernel_patch.setattr(decode, "FORCE", DEV == "cpu")
        real = decode.masked_decode
        kernel_patch.setattr(decode, "masked_decode", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
        model = model.to(DEV)  # the kernel runs CUDA tensors where CUDA exists
    dev = next(model.parameters()).device
    stats = attnprune.observe(model, [dict(input_ids=torch.randint(3, 97, (2, 40), device=dev))], progress=False)
    mask = attnprune.make_mask(stats, 0.5)
    prompt = torch.randint(3, 97, (1, 12), device=dev)
    with attnprune.apply(model, mask):
        # (min_new_tokens: random weights may pick the end-of-sequence token early, as Gemma 2's did on a GPU)
        with_cache = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                    past_key_values=attnprune.PrunedKVCache(model, mask))
        without = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 22) and torch.equal(with_cache, without)
    if kernel_patch is not None:
        assert calls and all(kw[variant] is not None for kw in calls)


@pytest.mark.parametrize("kernel", [False, True])
def test_gpt_oss_pruned_cache_generation_matches_the_masked_model(kernel, monkeypatch):
    """Through the dense form, and through the Triton decode kernel (sinks in its denominators)."""
    pruned_cache_generation_matches_the_masked_model(gpt_oss(2), monkeypatch if kernel else None, "sinks")


def capped_reference(q, k, v, allowed, scale, cap, sinks=None):
    """float64: scores ``cap * tanh(q.k * scale / cap)``, masked softmax (with a sink column of logits
    ``sinks [H]`` and value 0 when given), empty rows -> 0."""
    G = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(G, 1)
    v = v.double().repeat_interleave(G, 1)
    s = cap * torch.tanh((q.double() @ k.transpose(-1, -2)) * scale / cap)
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        col = sinks.double().reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        return torch.softmax(torch.cat([s, col], -1), -1)[..., :-1] @ v
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def test_dense_attention_softcap_and_reference_backend():
    from attnprune.backends import BACKENDS
    from attnprune.mask import SiteMask
    from attnprune.sites import SiteInfo

    torch.manual_seed(3)
    B, Hq, Hkv, L, D, cap = 2, 4, 2, 10, 8, 0.7
    q, k, v = torch.randn(B, Hq, L, D) * 3, torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    keep = torch.rand(Hq, L, L) < 0.7
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    ref = capped_reference(q, k, v, keep[None] & causal, D ** -0.5, cap)
    tol = 4 * (L + D) * EPS32
    assert rel(dense_attention(q, k, v, keep[None], True, None, softcap=cap), ref) < tol
    assert rel(dense_attention(q, k, v, keep[None], True, None), ref) > 1e-2  # the cap matters at this scale
    site = SiteMask(SiteInfo("layers.0.attn", "causal", Hq, Hkv), L, L, keep=keep)
    got = BACKENDS.get("reference")(q, k, v, site, is_causal=True, softcap=cap)
    assert rel(got, ref) < tol


def gemma2(seed=0, cap=1.0):
    model = auto_causal_lm("gemma2", seed, impl="eager", head_dim=8, attn_logit_softcapping=cap)
    with torch.no_grad():  # larger query weights: scores well past the cap, so capping changes them
        for name, p in model.named_parameters():
            if name.endswith("q_proj.weight"):
                p.mul_(8.0)
    return model


def test_gemma2_observe_apply_gradients_and_pruned_cache():
    model = gemma2()
    ids = torch.randint(3, 97, (1, 16))
    out = model(input_ids=ids, output_attentions=True)
    stats = attnprune.observe(model, [dict(input_ids=ids)], progress=False)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    for site, weights in zip(stats.sites, out.attentions):  # the model's own (capped) probabilities
        got, want = stats.mean(site).double(), weights[0].double()
        seen = ~got[0].isnan() & causal
        assert torch.allclose(got[:, seen], want[:, seen], atol=16 * EPS32)  # float32 softmax over 16 keys
    batch = _batch()
    real = batch["attention_mask"].bool()

    def run():
        model.zero_grad()
        logits = model(**batch).logits
        (logits[real] ** 2).sum().backward()
        return logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    dense, dense_g = run()
    with attnprune.apply(model, attnprune.make_mask(attnprune.observe(model, [batch], progress=False), 0.0)):
        got, got_g = run()
    tol = model_tol(model, batch["input_ids"].shape[1])
    assert rel(got[real], dense[real]) < tol and rel(got_g, dense_g) < tol
    pruned_cache_generation_matches_the_masked_model(model)


def test_gemma2_pruned_cache_generation_through_the_decode_kernel(monkeypatch):
    pruned_cache_generation_matches_the_masked_model(gemma2(), monkeypatch, "softcap")


def test_gemma2_capped_layers_run_on_the_kernels():
    _kernels_or_skip()
    model = gemma2(1).to(DEV)
    batch = {k: v.to(DEV) for k, v in _batch(24).items()}
    mask = attnprune.make_mask(attnprune.observe(model, [batch], progress=False), 0.5, block=16)
    got = masked_runs(model, mask, batch, model.model.layers[1].self_attn.k_proj.weight)
    tol = model_tol(model, 24, HAS_CUDA)
    assert rel(got["triton"][0], got["reference"][0]) < tol
    assert rel(got["triton"][1], got["reference"][1]) < tol


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_softcap_forward_and_gradients_against_float64(causal):
    """Capped scores in the kernels' clean blocks (one head keeps everything) and masked blocks, with
    key padding and GQA; with and without sinks on top."""
    BlockLayout, sparse_attention = _kernels_or_skip()
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, Hq, Hkv, L, D, cap = 2, 4, 2, 45, 16, 0.6
    tok = torch.rand(Hq, L, L, generator=gen) < 0.6
    tok[0] = True
    layout = BlockLayout.from_tokens(tok, (16, 16))
    q = (torch.randn(B, Hq, L, D, generator=gen) * 3).to(DEV).requires_grad_()
    k = torch.randn(B, Hkv, L, D, generator=gen).to(DEV).requires_grad_()
    v = torch.randn(B, Hkv, L, D, generator=gen).to(DEV).requires_grad_()
    sinks = torch.randn(Hq, generator=gen).to(DEV).requires_grad_()
    lens = torch.tensor([L, L - 10])
    allowed = tok[None] & (torch.arange(L)[None, :] < lens[:, None])[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
    unit = EPS32 if not HAS_CUDA else 2.0 ** -10
    for with_sinks in (False, True):
        out = sparse_attention(q, k, v, layout, causal=causal, key_padding=lens, softcap=cap,
                               sinks=sinks if with_sinks else None)
        leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v, sinks)]
        ref = capped_reference(*leaves[:3], allowed, D ** -0.5, cap, leaves[3] if with_sinks else None)
        assert rel(out.cpu(), ref) < 4 * (L + D) * unit
        w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        mine = [q, k, v] + ([sinks] if with_sinks else [])
        got = torch.autograd.grad((out * w.to(DEV, out.dtype)).sum(), mine)
        want = torch.autograd.grad((ref * w).sum(), leaves[:len(mine)])
        for a, b in zip(got, want):
            assert rel(a.cpu(), b) < 8 * (2 * L + D) * unit


def test_cap_args_use_the_hardware_tanh_only_for_16_bit_cuda_inputs(monkeypatch):
    """``FAST_TANH`` (``tanh.approx.f32``, PTX): fp16 / bf16 on a CUDA device, not float32 (its rounding is
    finer than the approximation's), not the CPU, the interpreter or ``ATTNPRUNE_FAST_TANH=0``."""
    from types import SimpleNamespace

    from attnprune.kernels.config import cap_args

    def fast(device, dtype):
        return cap_args(0.125, 50.0, SimpleNamespace(device=torch.device(device), dtype=dtype))["FAST_TANH"]

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ATTNPRUNE_FAST_TANH", raising=False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert fast("cuda", torch.bfloat16) and fast("cuda", torch.float16)
    assert not fast("cuda", torch.float32) and not fast("cpu", torch.bfloat16)
    monkeypatch.setenv("ATTNPRUNE_FAST_TANH", "0")
    assert not fast("cuda", torch.bfloat16)
    monkeypatch.delenv("ATTNPRUNE_FAST_TANH")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not fast("cuda", torch.bfloat16)
    args = cap_args(0.125, 50.0, SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32))
    assert args["CAP_IN"] == 0.125 / 50.0 and abs(args["CAP_OUT"] - 50.0 / math.log(2)) < 1e-12
    assert cap_args(0.125, None, None) == {}


@pytest.mark.skipif(not HAS_CUDA, reason="the hardware tanh runs on NVIDIA GPUs only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fast", ["1", "0"])
def test_kernel_softcap_16_bit_against_float64(dtype, fast, monkeypatch):
    """The capped kernels in fp16 / bf16 (where ``FAST_TANH`` is on unless ``ATTNPRUNE_FAST_TANH=0``), forward
    and gradients, against float64 on the same rounded inputs. Bound: the kernels round probabilities, dS and
    the outputs to the 16-bit type (unit ``u``); the approximate tanh moves a logit by at most
    ``cap * 2^-11``, a relative change of that size in its probability."""
    from attnprune.kernels import BlockLayout, sparse_attention

    monkeypatch.setenv("ATTNPRUNE_FAST_TANH", fast)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, Hq, Hkv, L, D, cap = 2, 4, 2, 300, 64, 5.0
    tok = torch.rand(Hq, L, L, generator=gen) < 0.6
    tok[0] = True
    layout = BlockLayout.from_tokens(tok, (64, 64))
    x = [torch.randn(B, h, L, D, generator=gen).to(dtype) for h in (Hq, Hkv, Hkv)]
    x[0] = (x[0].float() * 3).to(dtype)
    q, k, v = (t.to(DEV).requires_grad_() for t in x)
    allowed = tok[None] & torch.ones(L, L, dtype=torch.bool).tril()
    out = sparse_attention(q, k, v, layout, causal=True, softcap=cap)
    leaves = [t.double().requires_grad_() for t in x]
    ref = capped_reference(*leaves, allowed, D ** -0.5, cap, None)
    u = torch.finfo(dtype).eps
    tanh_err = cap * 2.0 ** -11
    assert rel(out.cpu(), ref) < 4 * u + tanh_err
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * w.to(DEV, dtype)).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), leaves)
    for a, b in zip(got, want):
        assert rel(a.cpu(), b) < 8 * u + 4 * tanh_err


def test_flash_backend_hands_calls_with_sinks_to_triton(monkeypatch):
    """FA4 is not given sinks (not verified on a GPU yet): the flash backend passes such calls to the
    triton backend, which computes them with the kernels; FA4 itself is never called."""
    _kernels_or_skip()
    import sys
    import types

    calls = []
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = lambda *a, **kw: calls.append(kw)
    for name, mod in (("flash_attn", types.ModuleType("flash_attn")), ("flash_attn.cute", cute)):
        monkeypatch.setitem(sys.modules, name, mod)
    from attnprune.backends import BACKENDS
    from attnprune.mask import SiteMask
    from attnprune.sites import SiteInfo

    import attnprune.backends.flash as flash

    monkeypatch.setattr(flash, "_flash_unsupported", lambda q, k, v: None)
    torch.manual_seed(5)
    H, L = 4, 40
    site = SiteMask(SiteInfo("layers.0.attn", "causal", H, 2), L, L, keep=torch.rand(H, 1, 1) < 2, block=128)
    q = torch.randn(1, H, L, 16, device=DEV)
    k, v = torch.randn(1, 2, L, 16, device=DEV), torch.randn(1, 2, L, 16, device=DEV)
    sinks = torch.randn(H, device=DEV)
    want = BACKENDS.get("triton")(q, k, v, site, is_causal=True, sinks=sinks)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = BACKENDS.get("flash")(q, k, v, site, is_causal=True, sinks=sinks)
    assert any("hands this call to the triton backend" in str(x.message) for x in w)
    assert torch.equal(got, want) and not calls
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    ref = virtual_key_reference(q.cpu(), k.cpu(), v.cpu(), causal[None, None], 16 ** -0.5, sinks.cpu())
    assert rel(got.cpu(), ref) < 4 * (L + 16) * (EPS32 if not HAS_CUDA else 2.0 ** -10)


@pytest.mark.parametrize("make", ["gpt_oss", "gemma2"])
def test_compiled_softmax_variants_run_the_kernels_op_and_equal_eager(make):
    """Under ``torch.compile`` (one graph) the kernels' op runs capped scores and the sinks are folded into its
    differentiable ``(o, lse)``: logits and the gradients (sink logits included) equal the eager ones."""
    _kernels_or_skip()
    torch._dynamo.reset()
    model = {"gpt_oss": gpt_oss, "gemma2": gemma2}[make](1).to(DEV)
    batch = {k: v.to(DEV) for k, v in _batch(24).items()}
    mask = attnprune.make_mask(attnprune.observe(model, [batch], progress=False), 0.5, block=16)
    real = batch["attention_mask"].bool()
    params = _sink_params(model) or [model.model.layers[0].self_attn.q_proj.weight]
    got = {}
    for mode in ("eager", "compiled"):  # eager first: the sliding-window layers register their layouts
        model.zero_grad()
        with warnings.catch_warnings(record=True) as caught, attnprune.apply(model, mask, backend="triton"):
            warnings.simplefilter("always")
            run = model if mode == "eager" else torch.compile(model, backend="aot_eager", fullgraph=True)
            logits = run(**batch).logits
            (logits[real] ** 2).sum().backward()
        assert not [str(w.message) for w in caught if "reference backend" in str(w.message)]
        got[mode] = (logits.detach()[real], [p.grad.clone() for p in params])
    torch._dynamo.reset()
    tol = model_tol(model, 24, HAS_CUDA)
    assert rel(got["compiled"][0], got["eager"][0]) < tol
    for a, b in zip(got["compiled"][1], got["eager"][1]):
        assert b.abs().max() > 0 and rel(a, b) < tol


def test_sparse_attention_by_handle_with_sinks_and_softcap_against_float64():
    """The op path (a layout handle, as under compile): sinks through the op's differentiable lse."""
    BlockLayout, sparse_attention = _kernels_or_skip()
    from attnprune.kernels.ops import layout_handle

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, Hq, Hkv, L, D, cap = 2, 4, 2, 37, 16, 0.8
    tok = torch.rand(Hq, L, L, generator=gen) < 0.6
    layout = BlockLayout.from_tokens(tok, (16, 16))
    q = (torch.randn(B, Hq, L, D, generator=gen) * 3).to(DEV).requires_grad_()
    k = torch.randn(B, Hkv, L, D, generator=gen).to(DEV).requires_grad_()
    v = torch.randn(B, Hkv, L, D, generator=gen).to(DEV).requires_grad_()
    sinks = (torch.randn(Hq, generator=gen) * 2).to(DEV).requires_grad_()
    out = sparse_attention(q, k, v, layout_handle("layout", layout), causal=True, softcap=cap, sinks=sinks)
    allowed = tok[None] & torch.ones(L, L, dtype=torch.bool).tril()
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v, sinks)]
    ref = capped_reference(*leaves[:3], allowed, D ** -0.5, cap, leaves[3])
    unit = EPS32 if not HAS_CUDA else 2.0 ** -10
    assert rel(out.cpu(), ref) < 4 * (L + D) * unit
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * w.to(DEV, out.dtype)).sum(), [q, k, v, sinks])
    want = torch.autograd.grad((ref * w).sum(), leaves)
    for a, b in zip(got, want):
        assert rel(a.cpu(), b) < 8 * (2 * L + D) * unit


def test_dense_attention_narrow_scores_the_same(monkeypatch):
    """``narrow=True`` (each chunk scores only its attendable keys) gives what scoring every key gives:
    a sliding-window mask with key padding and a row with nothing allowed, with sinks and capping, and
    the gradients; SDPA's top-left causality without a mask and on top of a window mask."""
    import attnprune.softmax as S

    torch.manual_seed(9)
    B, H, L, D, w = 2, 4, 23, 8, 5
    monkeypatch.setattr(S, "_ROWS_ELEMS", B * H * L * 4)  # four rows a chunk: each chunk its own key range
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(H, dtype=torch.float64, requires_grad=True)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = ((j <= i) & (i - j < w))[None, None] & (torch.arange(L) < torch.tensor([[L], [L - 6]]))[:, None, None]
    allowed[0, :, 3] = False
    outs = []
    for narrow in (False, True):
        out = dense_attention(q, k, v, allowed, False, None, sinks=sinks, softcap=1.5, narrow=narrow)
        outs.append((out, torch.autograd.grad(out.square().sum(), [q, k, v, sinks])))
    tol = 8 * (L + D) * torch.finfo(torch.float64).eps
    assert rel(outs[1][0], outs[0][0]) < tol and outs[1][0][0, :, 3].abs().max() == 0
    for a, b in zip(outs[1][1], outs[0][1]):
        assert rel(a, b) < tol
    for mask in (None, (i - j < w)[None, None]):  # causality alone, and with a window mask (keys from > 0)
        want = dense_attention(q, k, v, mask, True, None, sinks=sinks)
        assert rel(dense_attention(q, k, v, mask, True, None, sinks=sinks, narrow=True), want) < tol
