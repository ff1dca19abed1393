"""The masked model under CUDA graph capture: no host read on the attention path.

``split_attn_mask`` reads its analysis to the host (one synchronisation per forward). During a
capture it cannot: it reuses the form an eager call of the same shapes found, checks the new mask
against it on the device and always passes the key padding on, so replays with other padding of
the same form stay exact. On the CPU the capture is simulated (``_block_sparse._capturing``
patched); on a GPU a real ``torch.cuda.graph`` capture of a tiny masked model is replayed.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from attnprune.backends import BACKENDS, _block_sparse  # noqa: E402
from attnprune.backends._block_sparse import split_attn_mask  # noqa: E402
from attnprune.errors import GraphCaptureError  # noqa: E402
from test_backend_triton import hf_mask, make_site, ref_attention, rel  # noqa: E402

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DEV = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def capturing(monkeypatch):
    """Simulate a capture: the host-reading analysis must not run."""
    _block_sparse._form_memo.clear()
    _block_sparse._split_memo.clear()

    def no_host(*a, **k):
        raise AssertionError("the host-reading analysis ran during capture")

    def start():
        monkeypatch.setattr(_block_sparse, "_capturing", lambda: True)
        monkeypatch.setattr(_block_sparse, "_analyse", no_host)

    return start


def _allowed(split, B, Lq, Lk):
    kp, causal, off = split
    a = torch.ones(B, Lq, Lk, dtype=torch.bool)
    if kp is not None:
        a &= kp.cpu()[:, None, :]
    if causal:
        a &= torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + off
    return a


def test_capture_without_an_eager_call_is_refused(capturing):
    m, _ = hf_mask(2, 8, 8, [8, 8])
    capturing()
    with pytest.raises(GraphCaptureError, match="eagerly"):
        split_attn_mask(m, 2, 8, 8, False, 0)


@pytest.mark.parametrize("Lq,Lk", [(8, 8), (3, 11)])
def test_capture_without_an_eager_call_takes_the_site_kinds_form(capturing, Lq, Lk):
    """transformers passes no mask to an unpadded eager forward but builds one under capture: a
    causal site then reads it as key padding + causality from the last query (offset Lk - Lq)."""
    capturing()
    m, a = hf_mask(2, Lq, Lk, [Lk, Lk - 2])
    got = split_attn_mask(m, 2, Lq, Lk, False, 0, kind="causal")
    assert got[1] and got[2] == Lk - Lq and torch.equal(_allowed(got, 2, Lq, Lk), a[:, 0])
    pad, a_pad = hf_mask(2, Lq, Lk, [Lk, 4], causal=False)
    got = split_attn_mask(pad, 2, Lq, Lk, False, 0, kind="self")
    assert not got[1] and torch.equal(_allowed(got, 2, Lq, Lk), a_pad[:, 0])
    with pytest.raises(RuntimeError):  # a causal mask at a bidirectional site: not its form
        split_attn_mask(m.clone(), 2, Lq, Lk, False, 0, kind="self")


@pytest.mark.parametrize("Lq,Lk", [(8, 8), (5, 12)])
def test_captured_split_follows_the_eager_form_with_new_padding(capturing, Lq, Lk):
    """Eager: no padding (the form needs no key padding). Captured: a new tensor of the same shapes
    with right padding gives exactly its allowed set (padding passed as a tensor, causal offset kept)."""
    B = 3
    m0, a0 = hf_mask(B, Lq, Lk, [Lk] * B)
    eager = split_attn_mask(m0, B, Lq, Lk, False, 0)
    assert eager[0] is None and eager[1] and torch.equal(_allowed(eager, B, Lq, Lk), a0[:, 0])
    capturing()
    m1, a1 = hf_mask(B, Lq, Lk, [Lk, Lk - 3, 2])
    got = split_attn_mask(m1, B, Lq, Lk, False, 0)
    assert got[0] is not None and got[0].shape == (B, Lk)
    assert (got[1], got[2]) == (eager[1], eager[2])
    assert torch.equal(_allowed(got, B, Lq, Lk), a1[:, 0])


def test_captured_split_of_another_form_stops_on_the_device(capturing):
    B, L = 2, 8
    m0, _ = hf_mask(B, L, L, [L, L])
    split_attn_mask(m0, B, L, L, False, 0)
    capturing()
    torch.manual_seed(0)
    other = torch.rand(B, 1, L, L) < 0.5  # not key padding + causal
    with pytest.raises(RuntimeError):  # CPU: torch._assert_async raises here; CUDA: a device assertion
        split_attn_mask(other, B, L, L, False, 0)


def test_captured_mask_the_eager_call_could_not_express_goes_to_reference(capturing):
    B, L = 2, 8
    torch.manual_seed(1)
    bias = torch.randn(B, 1, L, L)  # a real additive bias: never key padding
    assert split_attn_mask(bias, B, L, L, False, 0) is None
    capturing()
    assert split_attn_mask(torch.randn(B, 1, L, L), B, L, L, False, 0) is None


def test_triton_backend_under_simulated_capture_matches_float64(capturing):
    torch.manual_seed(2)
    B, H, Hkv, L, D = 2, 4, 2, 40, 16
    site = make_site("causal", H, Hkv, L, L, block=16)
    q, k, v = (torch.randn(B, h, L, D, device=DEV) for h in (H, Hkv, Hkv))
    triton = BACKENDS.get("triton")
    m0, _ = hf_mask(B, L, L, [L, L])
    triton(q, k, v, site, attn_mask=m0.to(DEV))  # the eager call of these shapes
    capturing()
    m1, a1 = hf_mask(B, L, L, [L, 29])
    out = triton(q, k, v, site, attn_mask=m1.to(DEV))
    keep = site.keep_tokens(L, L).cpu()[None]  # [1, H, L, L]
    want = ref_attention(q.cpu(), k.cpu(), v.cpu(), keep & a1)
    rows = a1[:, 0].any(-1)[:, None, :, None]  # padded keys only: every query row keeps a key
    eps = torch.finfo(q.dtype).eps
    assert rel(out.cpu() * rows, want * rows) < 50 * eps * D ** 0.5 + (5e-3 if HAS_CUDA else 0)


@pytest.mark.skipif(not HAS_CUDA, reason="a real CUDA graph capture needs a GPU")
def test_masked_tiny_model_captured_and_replayed_on_the_gpu():
    import attnprune
    import tiny_models
    from attnprune.bench.model import discover_sites, synthetic_mask

    model = tiny_models.llama().to("cuda").eval()
    L = 64
    infos = discover_sites(model, tiny_models.VOCAB, "cuda")
    mask = synthetic_mask(infos, L, 0.5, 16, seed=0)
    ids = torch.randint(0, tiny_models.VOCAB, (2, L), device="cuda")
    with torch.no_grad(), attnprune.apply(model, mask, backend="triton"):
        want = model(input_ids=ids, use_cache=False).logits
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                model(input_ids=ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(input_ids=ids, use_cache=False).logits
        ids.copy_(torch.randint(0, tiny_models.VOCAB, (2, L), device="cuda"))
        want2 = model(input_ids=ids, use_cache=False).logits
        g.replay()
        torch.cuda.synchronize()
        assert rel(out, want2) < 1e-3 and rel(want, want2) > 1e-2  # the replay read the new ids
        with pytest.raises(GraphCaptureError, match="attention_mask"):
            g2 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g2):
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
