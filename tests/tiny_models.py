"""Tiny random-initialised models for tests (no downloads: every model is built from a config)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 97


def _seed(seed):
    torch.manual_seed(seed)


def bert(seed=0, **kw):
    from transformers import BertConfig, BertModel

    _seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **kw)
    return BertModel(cfg, add_pooling_layer=False).eval()


def gpt2(seed=0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    _seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    return GPT2LMHeadModel(cfg).eval()


def llama(seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, **kw)
    return LlamaForCausalLM(cfg).eval()


def bart(seed=0, **kw):
    from transformers import BartConfig, BartForConditionalGeneration

    _seed(seed)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     decoder_start_token_id=2, **kw)
    return BartForConditionalGeneration(cfg).eval()


def t5(seed=0, **kw):
    from transformers import T5Config, T5ForConditionalGeneration

    _seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, **kw)
    return T5ForConditionalGeneration(cfg).eval()


class NanoBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def qkv_heads(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln(x)).split(d, dim=-1)
        return [z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v)]

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(y.transpose(1, 2).reshape(x.shape))


class NanoGPT(nn.Module):
    """nanoGPT-style causal LM: attention through ``F.scaled_dot_product_attention(is_causal=True)``."""

    def __init__(self, d=32, h=4, layers=2, seq=64):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, d)
        self.wpe = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(NanoBlock(d, h) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, input_ids):
        x = self.wte(input_ids) + self.wpe(torch.arange(input_ids.shape[1], device=input_ids.device))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def nanogpt(seed=0):
    _seed(seed)
    return NanoGPT().eval()


class MHAModel(nn.Module):
    """Encoder with ``nn.MultiheadAttention`` self-attention taking a key padding mask."""

    def __init__(self, d=32, h=4, layers=2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.attn = nn.ModuleList(nn.MultiheadAttention(d, h, batch_first=True) for _ in range(layers))

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        kpm = None if attention_mask is None else ~attention_mask.bool()
        for a in self.attn:
            y, _ = a(x, x, x, key_padding_mask=kpm)
            x = x + y
        return x


def mha(seed=0):
    _seed(seed)
    return MHAModel().eval()


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, input_ids):
        return self.lin(self.emb(input_ids))


class ManualAttention(nn.Module):
    """Attention written by hand (softmax of q @ k.T): invisible to both capture paths."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        return torch.softmax(x @ x.transpose(1, 2) / math.sqrt(8), -1) @ x


def batch(lengths, total=None, seed=0, vocab=VOCAB, low=3):
    """Right-padded ``{"input_ids", "attention_mask"}`` for sequences of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    ids = torch.randint(low, vocab, (len(lengths), total), generator=g)
    am = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        am[i, :n] = 1
    ids = ids.masked_fill(am == 0, 1)
    return {"input_ids": ids, "attention_mask": am}


def auto_causal_lm(model_type, seed=0, impl="sdpa", **kw):
    """A tiny random ``AutoModelForCausalLM`` of transformers' ``model_type`` (2 layers, width 32, 4 query /
    2 kv heads, vocabulary 97, sliding windows of 8 where the family has them; ``kw`` on top); skips the
    test when this transformers lacks the family."""
    import pytest

    transformers = pytest.importorskip("transformers")
    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {model_type}")
    from transformers import AutoConfig, AutoModelForCausalLM

    _seed(seed)
    args = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=32, sliding_window=8, max_position_embeddings=64, pad_token_id=0)
    cfg = AutoConfig.for_model(model_type, **dict(args, **kw))
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def masked_runs(model, mask, batch, param, backends=("reference", "triton")):
    """Forward + backward of ``sum(logits**2)`` over the real tokens of ``batch`` under ``mask`` with each
    backend: ``{backend: (logits of the real tokens, param.grad)}``. Fails if a backend handed a call to
    the reference backend (every call must run on the backend named)."""
    import warnings

    import attnprune

    real = batch["attention_mask"].bool()
    out = {}
    for backend in backends:
        model.zero_grad()
        with warnings.catch_warnings(record=True) as caught, attnprune.apply(model, mask, backend=backend):
            warnings.simplefilter("always")
            logits = model(**batch).logits
            (logits[real] ** 2).sum().backward()
        handed = [str(w.message) for w in caught if "reference backend" in str(w.message)]
        assert not handed, handed
        out[backend] = (logits.detach()[real], param.grad.clone())
    return out


def model_tol(model, length: int, cuda: bool = False) -> float:
    """Bound on the relative difference between two float32 computations of a tiny model's output (two
    backends, eager and compiled, a mask keeping everything and the model): along the depth every linear
    layer sums ``in_features`` products and every attention call ``length`` terms, each sum off by up to
    about its number of terms x eps (relative); a factor 4 for the softmax, norms and residual adds. On a
    GPU (TF32 matmuls, 10-bit mantissa) the kernel-level bound of the GPU tests instead."""
    if cuda:
        return 1e-2
    linear = sum(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
    attention = sum(type(m).__name__.endswith("Attention") for m in model.modules()) or 1
    return 4 * (linear + attention * length) * torch.finfo(torch.float32).eps
