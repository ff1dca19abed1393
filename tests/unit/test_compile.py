"""``torch.compile`` of a masked model: with the reference backend the whole forward traces as one graph
(``fullgraph=True``: any graph break raises) and computes what the eager masked model computes,
across a second shape; the Triton / FA4 backends under compile are GPU-only and not covered here."""

import warnings

import pytest
import torch

import attnprune
from attnprune.models import load_model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_masked_model_compiles_as_one_graph(name):
    lm = load_model(name)
    model = lm.model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.vocab_size, (2, 32), generator=g)
    mask = attnprune.make_mask(attnprune.observe(model, [{"input_ids": ids}], progress=False), 0.5)
    torch._dynamo.reset()
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
    tol = 64 * torch.finfo(torch.float32).eps * eager.abs().max()
    assert (got - eager).abs().max() <= tol and (got2 - eager2).abs().max() <= tol * 2
    torch._dynamo.reset()
