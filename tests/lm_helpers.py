"""Tiny causal LMs of every supported family and helpers for masked-generation tests (imported by
the position, cache and extend tests)."""

import torch

from attnprune import make_mask, observe

V = 97
CAL = 32  # calibrated length
PROMPT = 8


def _cfg(cls, **kw):
    torch.manual_seed(0)
    return cls(vocab_size=V, initializer_range=0.3, **kw)


def _family(name):
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=128)
    if name == "gpt2":
        cfg = _cfg(tf.GPT2Config, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                   embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(cfg).eval()
    if name == "gpt-neox":
        cfg = _cfg(tf.GPTNeoXConfig, **small, hidden_dropout=0.0, attention_dropout=0.0)
        return tf.GPTNeoXForCausalLM(cfg).eval()
    kv = dict(small, num_key_value_heads=2)
    table = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen2-sliding": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
                          dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=8)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=None)),
        "mistral-sliding": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=4)),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(pad_token_id=0)),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
                   dict(head_dim=8, sliding_window=4, attn_logit_softcapping=None, final_logit_softcapping=None)),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(head_dim=8, sliding_window=4)),
    }
    cfg_cls, model_cls, extra = table[name]
    return model_cls(_cfg(cfg_cls, **kv, **extra)).eval()


FAMILIES = ["gpt2", "llama", "qwen2", "qwen2-sliding", "qwen3", "mistral", "mistral-sliding", "phi3",
            "gemma2", "gemma3", "gpt-neox"]
SLIDING = {"qwen2-sliding", "mistral-sliding", "gemma2", "gemma3"}  # window 4 < the 32 tokens generated


def _mask(model, seed=1, length_free="stats"):
    g = torch.Generator().manual_seed(seed)
    calib = [{"input_ids": torch.randint(3, V, (2, CAL), generator=g)} for _ in range(2)]
    return make_mask(observe(model, calib, progress=False), 0.7, length_free=length_free)


def _generate(model, ids, n, **kw):
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def _close(a, b):
    """Two float32 runs of one computation in different summation orders: far below the 0.2-0.5
    logit differences a misplaced mask row gives."""
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=0, atol=1e3 * torch.finfo(torch.float32).eps * scale)


def _left_padded(seqs):
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    am = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):], am[i, L - len(s):] = s, 1
    return ids, am
