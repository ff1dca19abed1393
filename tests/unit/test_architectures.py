"""Observe / make_mask / apply on tiny random-initialised models of many transformers architectures (text,
images, audio).

For each: an all-kept mask reproduces the model's own logits (right-padded batch), a 50% mask changes
them, and the Triton kernels (interpreter on the CPU) give what the reference backend gives. Models
whose attention the capture path cannot see are refused with one named error. (gpt-oss and Gemma 2:
``test_softmax_variants.py``.)
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"  # the triton backend runs CUDA tensors where CUDA exists
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

transformers = pytest.importorskip("transformers")

import attnprune  # noqa: E402
from attnprune.errors import NoAttentionSitesError  # noqa: E402
from tiny_models import model_tol  # noqa: E402

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXTRA = {  # what each architecture needs beyond SMALL to build at this size
    "qwen3": dict(head_dim=8), "qwen3_moe": dict(head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=32),
    "mixtral": dict(num_local_experts=4), "gemma": dict(head_dim=8), "gemma3_text": dict(head_dim=8),
    "olmo2": dict(head_dim=8), "phi3": dict(pad_token_id=0),
}
GQA = {"qwen2", "qwen3", "qwen3_moe", "mistral", "mixtral", "gemma", "gemma3_text", "olmo2", "phi3", "granite",
       "stablelm"}
ARCHS = ["qwen2", "qwen3", "qwen3_moe", "mistral", "mixtral", "gemma", "gemma3_text", "phi", "phi3", "gpt_neox",
         "opt", "falcon", "stablelm", "starcoder2", "olmo2", "granite", "gpt_bigcode", "roberta", "distilbert"]


def build(model_type: str, **kw):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {model_type}")
    args = dict(SMALL, **EXTRA.get(model_type, {}), **kw)
    if model_type == "distilbert":
        args = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                    pad_token_id=0)
    cfg = AutoConfig.for_model(model_type, **args)
    if model_type in GQA:
        cfg.num_key_value_heads = 2
    torch.manual_seed(0)
    impl = kw.pop("attn_implementation", None) or "sdpa"
    try:
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
    except ValueError:  # encoders without a causal-LM head
        return AutoModel.from_config(cfg, attn_implementation=impl).eval()


def _out(model, batch):
    out = model(**batch)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state).float()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("model_type", ARCHS)
def test_architecture_all_kept_equals_model_and_kernels_equal_reference(model_type):
    model = build(model_type).to(DEV)
    torch.manual_seed(1)
    L = 24
    am = torch.ones(2, L, dtype=torch.long)
    am[1, -5:] = 0
    batch = dict(input_ids=torch.randint(3, V, (2, L)).to(DEV), attention_mask=am.to(DEV))
    stats = attnprune.observe(model, [batch, dict(input_ids=torch.randint(3, V, (2, L)).to(DEV))], progress=False)
    real = am.bool().to(DEV)
    tol = model_tol(model, L)
    with torch.no_grad():
        dense = _out(model, batch)[real]
        with attnprune.apply(model, attnprune.make_mask(stats, 0.0), backend="reference"):
            kept = _out(model, batch)[real]
        mask = attnprune.make_mask(stats, 0.5)
        with attnprune.apply(model, mask, backend="reference"):
            pruned = _out(model, batch)[real]
        assert rel(kept, dense) < tol
        assert rel(pruned, dense) > 1e-3
        if HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1":
            pytest.importorskip("triton")
            with attnprune.apply(model, mask, backend="triton"):
                assert rel(_out(model, batch)[real], pruned) < (tol if not HAS_CUDA else model_tol(model, L, True))


@pytest.mark.parametrize("model_type", ["bloom", "mpt"])
def test_architectures_refused_with_a_named_error(model_type):
    model = build(model_type, attn_implementation="eager")
    with pytest.raises(NoAttentionSitesError, match="no attention site found"):
        attnprune.observe(model, [dict(input_ids=torch.randint(3, V, (1, 8)))], progress=False)


def _pixels():
    return dict(pixel_values=torch.randn(2, 3, 32, 32))


VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
              patch_size=8)
OTHER = {  # model_type: (config, inputs, number of attention sites)
    "vit": (VISION, _pixels, 2),
    "siglip_vision_model": (VISION, _pixels, 3),  # + the pooling head's nn.MultiheadAttention
    "whisper": (dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                     max_source_positions=32, max_target_positions=32, vocab_size=V, pad_token_id=0,
                     decoder_start_token_id=1),
                lambda: dict(input_features=torch.randn(2, 16, 64), decoder_input_ids=torch.randint(2, V, (2, 10))),
                3),  # encoder self, decoder causal, cross
    "wav2vec2": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=4),
                 lambda: dict(input_values=torch.randn(2, 800)), 2),
}


@pytest.mark.parametrize("model_type", list(OTHER))
def test_vision_and_speech_models(model_type):
    """Images and audio: ViT, SigLIP's vision tower, Whisper (self, causal and cross sites), wav2vec 2."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {model_type}")
    cfg_kw, inputs, n_sites = OTHER[model_type]
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **cfg_kw), attn_implementation="sdpa").eval().to(DEV)
    batch = {k: x.to(DEV) for k, x in inputs().items()}
    stats = attnprune.observe(model, [batch], progress=False)
    assert len(stats.sites) == n_sites

    def out():
        return model(**batch).last_hidden_state.float()

    kept = attnprune.make_mask(stats, 0.0)
    length = max(kept.site(s).k_len for s in kept.sites)  # the longest call's keys
    tol = model_tol(model, length)
    with torch.no_grad():
        dense = out()
        with attnprune.apply(model, kept, backend="reference"):
            assert rel(out(), dense) < tol
        mask = attnprune.make_mask(stats, 0.5)
        with attnprune.apply(model, mask, backend="reference"):
            pruned = out()
        assert rel(pruned, dense) > 1e-3
        if HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1":
            pytest.importorskip("triton")
            with attnprune.apply(model, mask, backend="triton"):
                assert rel(out(), pruned) < (tol if not HAS_CUDA else model_tol(model, length, True))
