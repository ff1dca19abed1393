"""The architectures of the whole-model benchmark (built from configs, random weights: no download) and the
synthetic block masks it times (:mod:`attnprune.bench.model`)."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import InvalidArgumentError, MissingDependencyError
from ..mask import PruneMask, SiteMask


# ---- architectures (``--model`` names)
def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("the whole-model benchmark needs 'transformers': pip install 'attnprune[hf]'") from None
    return transformers


def _smollm2(t, max_len: int):
    cfg = t.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max(8192, max_len),
                        rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    return t.LlamaForCausalLM, cfg, "causal"


def _gemma3_1b(t, max_len: int):
    cfg = t.Gemma3TextConfig(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                             query_pre_attn_scalar=256, max_position_embeddings=max(32768, max_len))
    return t.Gemma3ForCausalLM, cfg, "causal"


def _minilm(t, max_len: int):
    cfg = t.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                       intermediate_size=1536, max_position_embeddings=max(512, max_len),
                       attention_probs_dropout_prob=0.0)  # the kernels have no dropout: keep both sides equal
    return t.BertForMaskedLM, cfg, "encoder"


def _tiny_llama(t, max_len: int):
    cfg = t.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(128, max_len))
    return t.LlamaForCausalLM, cfg, "causal"


def _tiny_bert(t, max_len: int):
    cfg = t.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=max(128, max_len),
                       attention_probs_dropout_prob=0.0)
    return t.BertForMaskedLM, cfg, "encoder"


# named as ``--model`` elsewhere (``attnprune.models``): the same architectures, with random weights
ARCHS: dict[str, Callable] = {
    "smollm2": _smollm2,  # SmolLM2-135M: Llama, 30 layers, width 576, 9 heads / 3 kv heads
    "minilm": _minilm,  # MiniLM-L6: BERT, 6 layers, width 384, 12 heads
    # Gemma 3 1B: 26 layers, 4 heads / 1 kv head of dim 256, five of every six layers a 512-token sliding window
    "gemma3-1b": _gemma3_1b,
    "tiny-llama": _tiny_llama,  # for tests
    "tiny-bert": _tiny_bert,  # for tests
}
ALIASES = {f"{name}-arch": name for name in ARCHS}  # the names of earlier versions
ARCH_ONLY = frozenset({"gemma3-1b"})  # architectures without a loadable model (no weights in a package registry)


def resolve_arch(name: str) -> str:
    """The ``ARCHS`` key of ``name`` (a key or an old ``<name>-arch`` alias); else ``InvalidArgumentError``."""
    arch = ALIASES.get(name, name)
    if arch not in ARCHS:
        raise InvalidArgumentError(f"unknown model {name!r} for the whole-model benchmark; known: "
                                   f"{', '.join(ARCHS)} (built from their configs, random weights)")
    return arch


def build_model(arch: str, max_len: int, device, dtype):
    arch = resolve_arch(arch)
    t = _transformers()
    cls, cfg, kind = ARCHS[arch](t, max_len)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(cfg)
    model.to(device=device, dtype=dtype)
    return model, cfg, kind


# ---- synthetic masks
def discover_sites(model, vocab: int, device) -> dict:
    """Site infos of ``model`` from one short forward (attention computed by the original path)."""
    from ..capture import intercept

    ids = torch.randint(0, vocab, (1, 8), device=device)
    with torch.no_grad(), intercept(model, lambda call: None) as it:
        model(input_ids=ids)
    return dict(it.infos)


def synthetic_mask(infos: dict, length: int, sparsity: float, block: int, seed: int = 0) -> PruneMask:
    """A block mask per site: diagonal + left neighbour + random blocks, ``1 - sparsity`` of the
    attendable (causal: lower-triangular) blocks kept per head (at least the diagonal)."""
    nb = -(-length // block)
    g = torch.Generator().manual_seed(seed)
    sites, kept_all, att_all, meta_sites = [], 0, 0, {}
    for name, info in infos.items():
        causal = info.kind == "causal"
        att = torch.ones(nb, nb, dtype=torch.bool)
        if causal:
            att = att.tril()
        n_att = int(att.sum())
        target = max(nb, round((1.0 - sparsity) * n_att))
        keep = torch.zeros(info.num_heads, nb, nb, dtype=torch.bool)
        idx = torch.arange(nb)
        keep[:, idx, idx] = True
        if nb > 1:
            keep[:, idx[1:], idx[:-1]] = True
        for h in range(info.num_heads):
            need = target - int(keep[h].sum())
            if need > 0:
                free = (att & ~keep[h]).flatten().nonzero().flatten()
                pick = free[torch.randperm(len(free), generator=g)[:need]]
                keep[h].view(-1)[pick] = True
        kept = int(keep.sum())
        sites.append(SiteMask(info, length, length, keep=keep, block=block))
        meta_sites[name] = {"q_len": length, "k_len": length, "kept_blocks": kept,
                            "attendable_blocks": n_att * info.num_heads,
                            "sparsity": 1 - kept / (n_att * info.num_heads)}
        kept_all += kept
        att_all += n_att * info.num_heads
    meta = {"model": {"name": "modelbench-synthetic", "num_sites": len(sites), "sites": list(infos)},
            "policy": "synthetic-block", "seed": seed, "block": block, "target_sparsity": sparsity,
            "sparsity": 1 - kept_all / max(1, att_all), "sites": meta_sites}
    return PruneMask(sites, meta)
