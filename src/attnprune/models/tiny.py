"""Tiny random-initialised models built from configs (no weights downloaded), and ``hf:<dir>``.

``load_model("tiny-gpt2")``, ``"tiny-llama"`` (grouped-query attention), ``"tiny-bert"``,
``"tiny-bart"`` (encoder-decoder, cross-attention) and ``"tiny-sdpa"`` (a nanoGPT-style model
whose attention is plain ``F.scaled_dot_product_attention``) are deterministic: the weights come
from a fixed seed. ``load_model("hf:/path/to/dir")`` loads a local Hugging Face model directory.
Transformers is imported only when a Hugging Face model is asked for.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InvalidArgumentError, MissingDependencyError, UnsupportedModelError
from . import MODELS, LoadedModel

VOCAB = 128
MAX_LEN = 128
SEED = 0


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("this model needs the 'transformers' package: "
                                     "pip install 'attnprune[hf]'") from None
    return transformers


def _build(cls, config, task: str, name: str) -> LoadedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = cls(config)
    model.eval()
    vocab = config.vocab_size
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", MAX_LEN)
    return LoadedModel(model=model, tokenizer=None, task=task, name=name, vocab_size=vocab,
                       max_length=int(max_len))


@MODELS.register("tiny-gpt2")
def tiny_gpt2(arg: str | None = None) -> LoadedModel:
    """GPT-2: 2 layers, 4 heads, width 32, causal LM."""
    t = _transformers()
    cfg = t.GPT2Config(vocab_size=VOCAB, n_positions=MAX_LEN, n_embd=32, n_layer=2, n_head=4,
                         bos_token_id=0, eos_token_id=0)
    return _build(t.GPT2LMHeadModel, cfg, "causal-lm", "gpt2-tiny(L2,H4,D32)")


@MODELS.register("tiny-llama")
def tiny_llama(arg: str | None = None) -> LoadedModel:
    """Llama: 2 layers, 4 query heads sharing 2 key/value heads (GQA), width 32, causal LM."""
    t = _transformers()
    cfg = t.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN)
    return _build(t.LlamaForCausalLM, cfg, "causal-lm", "llama-tiny(L2,H4,KV2,D32)")


@MODELS.register("tiny-bert")
def tiny_bert(arg: str | None = None) -> LoadedModel:
    """BERT: 2 layers, 4 heads, width 32, sequence classification with 2 labels."""
    t = _transformers()
    cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=MAX_LEN, num_labels=2)
    return _build(t.BertForSequenceClassification, cfg, "classification", "bert-tiny(L2,H4,D32)")


@MODELS.register("tiny-bart")
def tiny_bart(arg: str | None = None) -> LoadedModel:
    """BART: 2 encoder + 2 decoder layers, 4 heads, width 32; self, causal and cross attention."""
    t = _transformers()
    cfg = t.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                       decoder_ffn_dim=64, max_position_embeddings=MAX_LEN, pad_token_id=1,
                       bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return _build(t.BartForConditionalGeneration, cfg, "seq2seq", "bart-tiny(L2+2,H4,D32)")


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, N, D/H]
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class TinySDPAModel(nn.Module):
    """nanoGPT-style causal LM: ``forward(input_ids [B, N]) -> logits [B, N, vocab]``."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, layers: int = 2,
                 max_len: int = MAX_LEN):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


@MODELS.register("tiny-sdpa")
def tiny_sdpa(arg: str | None = None) -> LoadedModel:
    """A non-Hugging-Face causal LM (2 layers, 4 heads, width 32) using ``F.scaled_dot_product_attention``.

    It takes ``input_ids`` only; ``attention_mask`` is accepted and ignored (no padding support).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = TinySDPAModel()
    model.eval()
    return LoadedModel(model=model, tokenizer=None, task="causal-lm", name="sdpa-tiny(L2,H4,D32)",
                       vocab_size=VOCAB, max_length=MAX_LEN, extra={"padding": False})


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_TASK_BY_SUFFIX = [("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
                   ("ForConditionalGeneration", "seq2seq"), ("ForSequenceClassification", "classification")]


@MODELS.register("hf")
def hf_dir(arg: str | None) -> LoadedModel:
    """A local Hugging Face model directory (``config.json`` + weights; tokenizer if present)."""
    if not arg:
        raise InvalidArgumentError("give the model directory: --model hf:/path/to/model")
    path = Path(arg).expanduser()
    if not (path / "config.json").is_file():
        raise InvalidArgumentError(f"{path}: not a Hugging Face model directory (no config.json)")
    t = _transformers()
    try:
        config = t.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise UnsupportedModelError(f"{path}: cannot read config.json ({type(e).__name__}: {e})") from None
    arch = (getattr(config, "architectures", None) or [""])[0]
    task = next((tk for suffix, tk in _TASK_BY_SUFFIX if arch.endswith(suffix)), "encoder")
    auto = {"causal-lm": t.AutoModelForCausalLM, "seq2seq": t.AutoModelForSeq2SeqLM,
            "classification": t.AutoModelForSequenceClassification, "encoder": t.AutoModel}[task]
    try:
        model = auto.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise UnsupportedModelError(f"{path}: cannot load {arch or config.model_type} "
                                    f"({type(e).__name__}: {e})") from None
    model.eval()
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tokenizer = t.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception:
            tokenizer = None
    max_len = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
               or getattr(tokenizer, "model_max_length", None) or 512)
    max_len = int(min(max_len, 1 << 20)) if math.isfinite(max_len) else 512
    vocab = int(getattr(config, "vocab_size", None) or (len(tokenizer) if tokenizer is not None else 0))
    return LoadedModel(model=model, tokenizer=tokenizer, task=task, name=f"{arch or config.model_type}:{path.name}",
                       vocab_size=vocab, max_length=max_len, extra={"path": str(path)})
