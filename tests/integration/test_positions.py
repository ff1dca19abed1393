"""Mask rows and columns follow each token's own position: KV caches (dynamic, static, sliding
window) and left padding give the same masked results as running each sequence alone, uncached.

Models are tiny and random, with weights large enough (``initializer_range``) that attention, and
so the mask, changes the logits: every test first checks that the mask matters, so agreement is
not a no-op.
"""

import pytest
import torch

from attnprune import apply, observe
from attnprune.errors import LengthError
from lm_helpers import CAL, FAMILIES, PROMPT, SLIDING, V, _close, _family, _generate, _left_padded, _mask


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_generate_with_cache_equals_without(family, cache):
    """Dynamic and static caches; for the sliding-window families these hold sliding layers (the
    dynamic and the static sliding-window layer), which hand attention only the last keys."""
    from transformers import DynamicCache

    model = _family(family)
    sliding = any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=model.config).layers)
    assert sliding == (family in SLIDING)
    mask = _mask(model)
    prompt = torch.randint(3, V, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    n = CAL - PROMPT
    with torch.no_grad():
        _, dense = _generate(model, prompt, n, use_cache=False)
        with apply(model, mask):
            kw = {"cache_implementation": "static"} if cache == "static" else {}
            seq_c, log_c = _generate(model, prompt, n, use_cache=True, **kw)
            seq_n, log_n = _generate(model, prompt, n, use_cache=False)
    assert (log_n - dense).abs().max() > 1e-2, "the mask must change the logits for this test to mean anything"
    assert torch.equal(seq_c, seq_n)
    _close(log_c, log_n)


@pytest.mark.parametrize("family", ["llama", "mistral-sliding", "gemma3"])
def test_generation_past_the_calibrated_length_raises(family):
    model = _family(family)
    mask = _mask(model)
    prompt = torch.randint(3, V, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), apply(model, mask):
        # the last new token comes from a forward over positions < CAL: still inside the calibration
        _generate(model, prompt, CAL - PROMPT + 1)
        with pytest.raises(LengthError):
            _generate(model, prompt, CAL - PROMPT + 2)
        with pytest.raises(LengthError):
            _generate(model, prompt, CAL - PROMPT + 2, cache_implementation="static")


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral-sliding", "gemma2"])
def test_left_padded_batch_equals_each_sequence_alone(family):
    model = _family(family)
    mask = _mask(model)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, V, (n,), generator=g) for n in (12, 20, 7)]
    ids, am = _left_padded(seqs)
    pos = (am.cumsum(1) - 1).clamp_min(0)  # each token's own position, as generate() gives them
    with torch.no_grad():
        with apply(model, mask):
            batched = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
            alone = [model(input_ids=s[None]).logits[0] for s in seqs]
        dense = model(input_ids=seqs[0][None]).logits[0]
    assert (alone[0] - dense).abs().max() > 1e-2
    for i, s in enumerate(seqs):
        _close(batched[i, ids.shape[1] - len(s):], alone[i])


@pytest.mark.parametrize("family", ["llama", "mistral-sliding"])
def test_left_padded_batched_generate_equals_each_alone(family):
    model = _family(family)
    mask = _mask(model)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, V, (n,), generator=g) for n in (8, 5, 3)]
    ids, am = _left_padded(seqs)
    n = 12
    with torch.no_grad(), apply(model, mask):
        seq_b, log_b = _generate(model, ids, n, attention_mask=am)
        for i, s in enumerate(seqs):
            seq_1, log_1 = _generate(model, s[None], n)
            assert torch.equal(seq_b[i, ids.shape[1]:], seq_1[0, len(s):])
            _close(log_b[i], log_1[0])


def test_observe_left_padded_equals_alone():
    model = _family("llama")
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(3, V, (6,), generator=g), torch.randint(3, V, (9,), generator=g)
    ids, am = _left_padded([a, b])
    for gran in (1, 2):
        alone = observe(model, [{"input_ids": a[None]}, {"input_ids": b[None]}], progress=False, granularity=gran)
        padded = observe(model, [{"input_ids": ids, "attention_mask": am}], progress=False, granularity=gran)
        for s in alone.sites:
            assert torch.equal(alone.count(s), padded.count(s))
            torch.testing.assert_close(padded.sum(s), alone.sum(s), rtol=0,
                                       atol=64 * torch.finfo(torch.float32).eps * float(alone.count(s).max()))
            assert (alone.q_len(s), alone.k_len(s)) == (padded.q_len(s), padded.k_len(s))


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_block_sparse_backends_hand_shifted_positions_to_the_reference(backend):
    """Left-padded calls (queries/keys not at their tensor index) are not what the kernels' layouts
    express: the backend hands them to the reference backend, with a warning, and agrees with it."""
    pytest.importorskip("triton")
    model = _family("llama")
    mask = _mask(model)
    ids, am = _left_padded([torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4)])
    with torch.no_grad():
        with apply(model, mask):
            want = model(input_ids=ids, attention_mask=am).logits
        with pytest.warns(UserWarning, match="left-padded"), apply(model, mask, backend=backend):
            got = model(input_ids=ids, attention_mask=am).logits
    real = am.bool()
    _close(got[real], want[real])


def test_flex_on_the_cpu_with_gradients_uses_the_reference_backend():
    """FlexAttention has no CPU backward: training on the CPU with backend='flex' falls back (warning)
    and gives the reference backend's gradients, instead of a raw NotImplementedError."""
    model = _family("llama")
    mask = _mask(model)
    ids = torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(6))

    def grads(backend):
        model.zero_grad()
        with apply(model, mask, backend=backend):
            model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want = grads("reference")
    with pytest.warns(UserWarning, match="no backward pass on the CPU"):
        got = grads("flex")
    for a, b in zip(got, want):
        _close(a, b)


def test_unknown_backend_lists_every_backend():
    from attnprune.errors import InvalidArgumentError

    model = _family("llama")
    with pytest.raises(InvalidArgumentError, match="known: flash, flex, gather, reference, triton"):
        with apply(model, _mask(model), backend="nope"):
            pass
