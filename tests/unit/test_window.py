"""Sliding-window layers on the block-sparse backends: the layout cut to the window, the mask analysis
that recognises transformers' sliding-window masks, and tiny Mistral / Gemma 3 / gpt-oss models whose
sliding layers run on the kernels (not handed to the reference backend) and agree with it."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attnprune  # noqa: E402
from attnprune.backends._block_sparse import split_attn_mask  # noqa: E402
from attnprune.kernels import BlockLayout  # noqa: E402
from tiny_models import auto_causal_lm, masked_runs, model_tol  # noqa: E402



def band(Lq, Lk, window, offset):
    i = torch.arange(Lq)[:, None]
    j = torch.arange(Lk)[None, :]
    return i + offset - j < window


@pytest.mark.parametrize("window", [5, 16, 37])
@pytest.mark.parametrize("offset", [0, 11])
def test_windowed_layout_is_the_band_of_the_layout(window, offset):
    torch.manual_seed(window + offset)
    H, Lq, Lk = 3, 45, 56
    tok = torch.rand(H, Lq, Lk) < 0.7
    tok[0] = True  # one head with every block full: only the window makes bitmasks there
    for layout in (BlockLayout.from_tokens(tok, (16, 32)),
                   BlockLayout.from_blocks(torch.rand(H, 3, 4) < 0.7, (16, 16), q_len=Lq, k_len=64)):
        lq, lk = layout.q_len, layout.k_len
        cut = layout.windowed(window, offset)
        want = layout.to_dense(lq, lk) & band(lq, lk, window, offset)
        assert torch.equal(cut.to_dense(lq, lk), want)
        # blocks wholly before the window are gone: every kept block holds some kept entry
        bq, bk = cut.block
        blocks = torch.nn.functional.pad(want, (0, cut.k_blocks * bk - lk, 0, cut.q_blocks * bq - lq))
        has = blocks.view(H, cut.q_blocks, bq, cut.k_blocks, bk).any(4).any(2)
        assert torch.equal(cut.block_mask(), has)
        assert layout.windowed(window, offset) is cut  # cached


def hf_sliding_mask(B, Lq, Lk, lens, window):
    """transformers' form: additive, 0 where allowed (causal from the last query, inside the window,
    real key), finfo.min elsewhere, ``[B, 1, Lq, Lk]``."""
    off = Lk - Lq
    ok = band(Lq, Lk, window, off) & (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + off)
    ok = ok[None] & (torch.arange(Lk)[None, :] < torch.as_tensor(lens)[:, None])[:, None, :]
    return torch.where(ok, 0.0, torch.finfo(torch.float32).min)[:, None]


def test_split_attn_mask_reads_a_sliding_window_mask():
    B, Lq, Lk, w = 2, 20, 20, 6
    m = hf_sliding_mask(B, Lq, Lk, [20, 14], w)
    assert split_attn_mask(m, B, Lq, Lk, False, 0) is None  # not key padding + causal without the window
    kp, causal, off = split_attn_mask(m, B, Lq, Lk, False, 0, window=w)
    assert causal and off == 0
    assert torch.equal(kp, torch.arange(Lk)[None, :] < torch.tensor([20, 14])[:, None])
    # a chunk of queries after cached keys: keys no query's window reaches are not padding
    m2 = hf_sliding_mask(1, 4, 30, [30], w)
    kp2, causal2, off2 = split_attn_mask(m2, 1, 4, 30, False, 0, window=w)
    assert causal2 and off2 == 26 and kp2 is None
    assert split_attn_mask(m2, 1, 4, 30, False, 0, window=w + 1) is None  # another window: another form


@pytest.mark.parametrize("model_type, kw", [
    ("mistral", {}),
    ("gemma3_text", dict(head_dim=8)),
    ("gpt_oss", dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2)),
])
@pytest.mark.parametrize("block", [None, 16])
def test_sliding_window_layers_run_on_the_kernels(model_type, kw, block):
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    pytest.importorskip("triton")
    model = auto_causal_lm(model_type, impl="eager" if model_type == "gpt_oss" else "sdpa", **kw).to(DEV)
    L = 40  # five windows
    am = torch.ones(2, L, dtype=torch.long)
    am[1, -7:] = 0
    batch = dict(input_ids=torch.randint(3, 97, (2, L)).to(DEV), attention_mask=am.to(DEV))
    mask = attnprune.make_mask(attnprune.observe(model, [batch], progress=False), 0.3, block=block)
    got = masked_runs(model, mask, batch, model.model.layers[0].self_attn.q_proj.weight)
    tol = model_tol(model, L, HAS_CUDA)
    for i in (0, 1):  # logits, a gradient
        assert ((got["triton"][i] - got["reference"][i]).norm() / got["reference"][i].norm()) < tol


@pytest.mark.parametrize("model_type, kw", [("mistral", {}), ("gemma3_text", dict(head_dim=8))])
def test_sliding_window_layers_compile_on_the_kernels(model_type, kw):
    """Under ``torch.compile`` (one graph) the sliding-window layers run the kernels' custom op on the windowed
    layout that the eager forward registered, and give what eager gives."""
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    pytest.importorskip("triton")
    import warnings

    torch._dynamo.reset()
    model = auto_causal_lm(model_type, **kw).to(DEV)
    L = 40
    am = torch.ones(2, L, dtype=torch.long)
    am[1, -7:] = 0
    batch = dict(input_ids=torch.randint(3, 97, (2, L)).to(DEV), attention_mask=am.to(DEV))
    mask = attnprune.make_mask(attnprune.observe(model, [batch], progress=False), 0.3, block=16)
    real = am.bool().to(DEV)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, \
            attnprune.apply(model, mask, backend="triton"):
        warnings.simplefilter("always")
        eager = model(**batch).logits[real]
        compiled = torch.compile(model, backend=recording, fullgraph=True)(**batch).logits[real]
    torch._dynamo.reset()
    assert not [str(w.message) for w in caught if "reference backend" in str(w.message)]
    ops = sum(str(n.target).startswith("attnprune.sparse_fwd") for g in graphs for n in g.graph.nodes)
    assert len(graphs) == 1 and ops == 2  # both layers through the op (one of them a sliding one)
    assert ((compiled - eager).norm() / eager.norm()) < model_tol(model, L, HAS_CUDA)
