"""``Positions.padding_free``: when a forward itself says that none of a call's keys is padding (what lets
the block-sparse backends drop a materialised mask's key padding under ``torch.compile``)."""

import torch

from attnprune.capture.positions import ForwardContext


def _free(kwargs, trusted=True, positional=0, kind="causal", lq=8, lk=8):
    ctx = ForwardContext(kwargs, trusted=trusted, positional=positional)
    return ctx.positions("model.layers.0.self_attn", kind, lq, lk, kind == "causal", "cpu").padding_free


def test_a_transformers_forward_without_mask_or_cache_is_padding_free():
    ids = torch.zeros(2, 8, dtype=torch.long)
    assert _free({"input_ids": ids})
    assert _free({}, positional=1)  # input_ids given positionally
    assert _free({"input_ids": ids, "attention_mask": None, "past_key_values": None})


def test_any_sign_of_padding_or_a_cache_is_not():
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    assert not _free({"input_ids": ids, "attention_mask": mask})  # a padding mask, even one without padding
    assert not _free({"input_ids": ids}, positional=2)  # the mask may be the second positional argument
    assert not _free({"input_ids": ids}, trusted=False)  # a model that may take padding by other names
    assert not _free({"input_ids": ids, "past_key_values": object()})  # cached keys (a static cache has holes)
    assert not _free({"input_ids": ids}, lq=8, lk=12)  # more keys than tokens: the extra ones are not real
    assert not _free({"input_ids": ids, "attention_mask": mask[:, :8, None]}, kind="self")  # a 3-D mask too


def test_input_ids_given_positionally_still_mean_nothing_is_cached():
    """``model(ids)``: a transformers forward with its inputs as the one positional argument has nothing
    cached (so the call's real lengths are known without reading its mask); with more positional
    arguments a cache may be among them, so the past stays unknown."""
    assert ForwardContext({}, trusted=True, positional=1).past == 0
    assert ForwardContext({}, trusted=True, positional=3).past is None
    assert ForwardContext({}, trusted=False, positional=1).past is None
