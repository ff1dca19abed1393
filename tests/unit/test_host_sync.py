"""Host work on the masked model's attention path: mask analysis once per forward, not per layer.

On the CPU the analyses are counted (``_block_sparse.ANALYSES``, ``positions.HOST_READS``); on a GPU
the GPU->CPU synchronisations of a masked forward are counted with ``torch.cuda.set_sync_debug_mode``
and compared with the dense model's own.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
pytest.importorskip("transformers")

import attnprune  # noqa: E402
from attnprune.backends import _block_sparse  # noqa: E402
from attnprune.backends._block_sparse import split_attn_mask  # noqa: E402
from attnprune.bench.model import discover_sites, synthetic_mask  # noqa: E402
from attnprune.bench.syncs import count_syncs  # noqa: E402
from attnprune.capture import positions  # noqa: E402

import tiny_models  # noqa: E402

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

L = 32


def _setup(device="cpu"):
    model = tiny_models.llama().to(device)
    infos = discover_sites(model, tiny_models.VOCAB, device)
    mask = synthetic_mask(infos, L, 0.5, 16, seed=0)
    return model, mask


def _batch(pad: str, device="cpu"):
    ids = torch.randint(0, tiny_models.VOCAB, (2, L), generator=torch.Generator().manual_seed(0)).to(device)
    am = torch.ones(2, L, dtype=torch.long)
    if pad == "right":
        am[1, L - 9:] = 0
    elif pad == "left":
        am[1, :9] = 0
    return ids, (None if pad == "none" else am.to(device))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="counts on the CPU path (Triton interpreter); on a GPU the sync test below counts")
@pytest.mark.parametrize("pad", ["none", "ones", "right"])
def test_mask_analysed_once_per_forward_not_per_layer(pad):
    model, mask = _setup()
    n_layers = model.config.num_hidden_layers
    assert n_layers >= 2
    ids, am = _batch(pad)
    with torch.no_grad():
        with attnprune.apply(model, mask, backend="reference"):
            want = model(input_ids=ids, attention_mask=am).logits
        with attnprune.apply(model, mask, backend="triton"), warnings.catch_warnings():
            warnings.simplefilter("error")  # no call handed to the reference backend
            a0, r0 = _block_sparse.ANALYSES[0], positions.HOST_READS[0]
            got = model(input_ids=ids, attention_mask=am).logits
            a1, r1 = _block_sparse.ANALYSES[0], positions.HOST_READS[0]
            model(input_ids=ids, attention_mask=am)  # a new forward: its own (new) 4-D mask
            a2 = _block_sparse.ANALYSES[0]
    # transformers hands no 4-D mask for no / all-ones padding; right padding: one tensor for all layers
    assert a1 - a0 == (1 if pad == "right" else 0)
    assert a2 - a1 == a1 - a0
    assert r1 - r0 == (0 if am is None else 1)  # the 2-D mask read once per forward, not per layer
    valid = torch.ones(2, L, dtype=torch.bool) if am is None else am.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="counts on the CPU path (Triton interpreter); on a GPU the sync test below counts")
def test_left_padding_reads_the_2d_mask_once_and_matches_reference():
    model, mask = _setup()
    ids, am = _batch("left")
    with torch.no_grad():
        with attnprune.apply(model, mask, backend="reference"):
            r0 = positions.HOST_READS[0]
            want = model(input_ids=ids, attention_mask=am).logits
            assert positions.HOST_READS[0] - r0 == 1
        seen = set(_block_sparse._warned)
        try:
            with attnprune.apply(model, mask, backend="triton"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # left padding: the reference backend runs it, with a warning
                got = model(input_ids=ids, attention_mask=am).logits
        finally:  # the warning is once per site and reason: leave it to the tests that expect it
            _block_sparse._warned.difference_update(_block_sparse._warned - seen)
    torch.testing.assert_close(got[am.bool()], want[am.bool()], atol=1e-4, rtol=1e-4)


def test_split_memo_follows_identity_and_version():
    B, Lq, Lk = 2, 8, 8
    kp = torch.ones(B, Lk, dtype=torch.bool)
    kp[1, 5:] = False
    m = (kp[:, None, None, :] & torch.ones(Lq, Lk, dtype=torch.bool).tril()).clone()
    n0 = _block_sparse.ANALYSES[0]
    first = split_attn_mask(m, B, Lq, Lk, False, 0)
    again = split_attn_mask(m, B, Lq, Lk, False, 0)
    assert again is first and _block_sparse.ANALYSES[0] - n0 == 1
    assert first[1] is True and first[2] == 0 and torch.equal(first[0], kp)
    other = m.clone()  # same values, another tensor: analysed again
    assert torch.equal(split_attn_mask(other, B, Lq, Lk, False, 0)[0], kp)
    assert _block_sparse.ANALYSES[0] - n0 == 2
    m[0, 0, 0, 3] = True  # in place: no longer key padding + causal
    assert split_attn_mask(m, B, Lq, Lk, False, 0) is None
    assert _block_sparse.ANALYSES[0] - n0 == 3
    # the memo holds no mask alive
    import weakref

    ref = weakref.ref(other)
    del other
    assert ref() is None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("pad", ["none", "ones", "right"])
def test_masked_forward_adds_no_sync_per_layer(pad):
    model, mask = _setup("cuda")
    ids, am = _batch(pad, "cuda")

    def fwd():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am)

    fwd()
    dense = count_syncs(fwd)[0]
    with attnprune.apply(model, mask, backend="triton"):
        fwd()  # layouts and plans built, sites found
        masked = count_syncs(fwd)[0]
    # no padding: nothing more than the dense model; a 2-D mask: one read of it per forward, and
    # for right padding one analysis of transformers' 4-D mask per forward (not per layer)
    allowed = {"none": 0, "ones": 1, "right": 2}[pad]
    assert masked - dense <= allowed, (masked, dense)
