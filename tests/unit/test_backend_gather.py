"""``gather_attention`` / ``backend="gather"``: block-sparse attention in PyTorch ops (any device), checked
against a float64 dense reference written here (masked softmax over an explicit allowed set), and on tiny
Hugging Face models against the reference backend."""

from __future__ import annotations

import pytest
import torch

import attnprune
from attnprune.errors import InvalidArgumentError
from attnprune.kernels import BlockLayout
from attnprune.kernels import gather as G
from attnprune.kernels.gather import gather_attention
from tiny_models import auto_causal_lm, masked_runs, model_tol

EPS64 = torch.finfo(torch.float64).eps


def reference(q, k, v, allowed, scale, sinks=None, softcap=None):
    """float64 ``[B, Hq, Lq, Dv]``: softmax over ``allowed [B, Hq, Lq, Lk]`` (plus a value-less sink logit per
    head), capped scores when ``softcap``; rows with nothing allowed -> 0."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        col = sinks.double().reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        return torch.softmax(torch.cat([s, col], -1), -1)[..., :-1] @ v
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _case(gen, B=3, Hq=4, Hkv=2, Lq=37, Lk=45, D=16, blk=16, shared=False):
    heads = 1 if shared else Hq
    tok = torch.rand(heads, Lq, Lk, generator=gen) < 0.5
    tok[:, :, :blk] |= torch.rand(heads, Lq, blk, generator=gen) < 0.3  # some full blocks, some partial
    layout = BlockLayout.from_tokens(tok, (blk, blk))
    x = [torch.randn(B, h, L, D, generator=gen, dtype=torch.float64) for h, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk))]
    return tok.expand(Hq, Lq, Lk), layout, x


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["plain", "sinks", "softcap", "shared-layout", "decode-offset"])
def test_gather_forward_and_gradients_against_float64(causal, variant):
    """Token-exact layout (partial blocks), GQA, odd lengths, key padding with one sequence fully padded (its
    rows are 0), causal with and without an offset (a cache step: Lq < Lk, q_offset = Lk - Lq), sinks, capping,
    one layout shared by all heads; forward and the gradients of q, k, v (and the sinks)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    Lq, Lk = (7, 45) if variant == "decode-offset" else (37, 45)
    tok, layout, (q, k, v) = _case(gen, Lq=Lq, Lk=Lk, shared=variant == "shared-layout")
    B, Hq, _, D = q.shape
    off = Lk - Lq if variant == "decode-offset" else 0
    lens = torch.tensor([Lk, Lk - 9, 0])
    sinks = torch.randn(Hq, generator=gen, dtype=torch.float64) * 2 if variant == "sinks" else None
    cap = 0.7 if variant == "softcap" else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([sinks.clone().requires_grad_()] if sinks is not None else [])
    out = gather_attention(*leaves[:3], layout, causal=causal, key_padding=lens, q_offset=off,
                           sinks=leaves[3] if sinks is not None else None, softcap=cap)
    allowed = tok[None] & (torch.arange(Lk)[None, :] < lens[:, None])[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + off)
    mine = [t.clone().requires_grad_() for t in (q, k, v)] + ([sinks.clone().requires_grad_()] if sinks is not None else [])
    ref = reference(*mine[:3], allowed, D ** -0.5, mine[3] if sinks is not None else None, cap)
    # float64 throughout: sums of Lk + D terms forward, Lq + Lk + D in the gradients
    assert rel(out, ref) < 4 * (Lk + D) * EPS64
    assert out[2].abs().max() == 0
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), leaves)
    want = torch.autograd.grad((ref * w).sum(), mine)
    for a, b in zip(got, want):
        assert rel(a, b) < 8 * (Lq + Lk + D) * EPS64


def test_chunks_of_query_blocks_give_the_same_result(monkeypatch):
    """A small chunk budget (one query block per chunk) computes exactly what one chunk does."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    _, layout, (q, k, v) = _case(gen)
    whole = gather_attention(q, k, v, layout, causal=True)
    monkeypatch.setattr(G, "CHUNK_ELEMENTS", 1)
    assert torch.equal(gather_attention(q, k, v, layout, causal=True), whole)


def test_only_the_kept_blocks_enter_the_matmuls(monkeypatch):
    """With two of eight key blocks kept per row, the score matmul's key width is two blocks, not eight."""
    keep = torch.zeros(2, 8, 8, dtype=torch.bool)
    idx = torch.arange(8)
    keep[:, idx, 0] = True
    keep[:, idx, idx] = True
    keep[:, idx[1:], idx[1:] - 1] = False  # (the diagonal and the sink column: 2 per row, 1 in row 0)
    layout = BlockLayout.from_blocks(keep, (16, 16))
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    widths = []
    real = torch.bmm

    def spy(a, b):  # scores: [n, bq, D] @ [n, D, keys]; values: [n, bq, keys] @ [n, keys, Dv]
        widths.append(b.shape[2] if len(widths) % 2 == 0 else a.shape[2])
        return real(a, b)

    monkeypatch.setattr(torch, "bmm", spy)
    out = gather_attention(q, k, v, layout, causal=True)
    monkeypatch.undo()
    assert len(widths) >= 2 and max(widths) == 2 * 16
    allowed = (layout.to_dense(128, 128) & torch.ones(128, 128, dtype=torch.bool).tril())[None]
    assert rel(out, reference(q, k, v, allowed, 16 ** -0.5)) < 4 * (128 + 16) * torch.finfo(torch.float32).eps


def test_bad_inputs_are_clear_errors():
    layout = BlockLayout.from_blocks(torch.ones(1, 2, 2, dtype=torch.bool), (16, 16))
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(InvalidArgumentError, match="does not cover"):
        gather_attention(q, torch.randn(1, 2, 48, 8), torch.randn(1, 2, 48, 8), layout)
    with pytest.raises(InvalidArgumentError, match="shape mismatch"):
        gather_attention(q, torch.randn(2, 2, 32, 8), torch.randn(2, 2, 32, 8), layout)
    with pytest.raises(InvalidArgumentError, match="multiple of kv heads"):
        gather_attention(q, torch.randn(1, 3, 32, 8), torch.randn(1, 3, 32, 8), layout)
    with pytest.raises(InvalidArgumentError, match="key_padding"):
        gather_attention(q, q, q, layout, key_padding=torch.ones(2, 32, dtype=torch.bool))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gather_backend_equals_the_reference_backend_on_a_tiny_model(family):
    """``apply(..., backend="gather")`` on a tiny causal LM (GQA, a right-padded batch; Gemma 2: logit capping and
    sliding-window layers): logits and a projection's gradient equal the reference backend's, no call handed on."""
    model = auto_causal_lm(family, 0, impl="eager" if family == "gemma2" else "sdpa")
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 24, dtype=torch.long)
    am[1, -5:] = 0
    batch = dict(input_ids=ids, attention_mask=am)
    mask = attnprune.make_mask(attnprune.observe(model, [batch], progress=False), 0.5, block=16)
    got = masked_runs(model, mask, batch, model.model.layers[0].self_attn.q_proj.weight, ("reference", "gather"))
    tol = model_tol(model, 24)
    assert rel(got["gather"][0], got["reference"][0]) < tol
    assert rel(got["gather"][1], got["reference"][1]) < tol
