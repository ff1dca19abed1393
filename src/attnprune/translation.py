"""The translation experiment: which attention types of an encoder-decoder tolerate pruning.

English -> Spanish on the ``bible-en-es`` verse pairs, after the paper's fairseq experiment:

1. train a shared English+Spanish BPE tokenizer (``tokenizers``) on the training split;
2. train a small ``BartForConditionalGeneration`` (random init, from a config) densely from scratch;
3. ``observe`` its attention on training pairs (teacher forcing) and make masks with
   ``make_mask`` (``layer``, the paper's rule, and the ``random`` control) at each sparsity;
4. restrict each mask to one attention type (:data:`ATTENTION_TYPES`: encoder self-attention,
   decoder self-attention, cross-attention, or all of them; the other sites keep every entry);
5. retrain with the mask attached, starting from the dense weights, for ``retrain_steps`` steps;
   the fair control is the dense model trained for the same extra steps without a mask;
6. translate the held-out ``test`` split greedily and score it with ``sacrebleu`` (BLEU on
   detokenized text), before retraining ("zero-shot") and after.

Why retrain from the dense weights rather than from scratch: the mask is read off *these*
weights' attention, the paper's recovery procedure is retraining the trained model under the
mask, and one retraining costs a fraction of the dense run, so all 24 masks (4 types x 3
sparsities x 2 policies) fit into one GPU session. Training 24 models from scratch would cost
24 dense runs.

Outputs (``run_experiment(cfg, out_dir)``): ``results.json`` (rewritten after every run, so an
interrupted experiment keeps what it finished), ``results.md``, ``attention_patterns.png``
(mean attention per type and layer), ``attention_offsets.png`` (mean attention by key-query
offset), ``bleu.png`` (BLEU versus sparsity per type), ``stats.safetensors`` (the dense model's
observed attention), ``translations_dense.tsv`` (ref, source, reference, dense model's greedy
translation per test verse), ``tokenizer.json`` and per-run logs. Weights are not written. Without
matplotlib the plots are skipped; :func:`write_plots` makes them later.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ._io import atomic_path, write_text_atomic
from .errors import InvalidArgumentError, MissingDependencyError

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = 0, 1, 2, 3

# attention type -> site kinds it covers (site kinds as ``SiteInfo.kind`` names them)
ATTENTION_TYPES = {
    "encoder": ("self",),      # encoder self-attention
    "decoder": ("causal",),    # decoder (causal) self-attention
    "cross": ("cross",),       # decoder-encoder cross-attention
    "all": ("self", "causal", "cross"),
}
TYPE_LABELS = {"encoder": "encoder self-attention", "decoder": "decoder self-attention",
               "cross": "cross-attention", "all": "all attention"}


@dataclass
class TranslationConfig:
    """Knobs of the experiment (see :data:`PRESETS`).

    Model: ``vocab_size`` (shared BPE vocabulary), ``d_model``, ``layers`` (encoder and decoder
    each), ``heads``, ``ffn_dim``, ``dropout``; ``max_len`` truncates source and target to this
    many tokens (including the end / start token) and is the model's position range.
    Dense training: ``train_steps`` optimizer steps of ``batch_size`` pairs, peak ``lr`` after
    ``warmup_steps``, cosine decay to 10%; ``label_smoothing``.
    Masks: ``sparsities``, ``types`` (keys of :data:`ATTENTION_TYPES`), ``policies`` (``layer``
    = AP, ``random`` = control), ``observe_examples`` training pairs observed.
    Retraining: ``retrain_steps`` from the dense weights at peak ``retrain_lr`` (warm-up
    ``retrain_warmup``); ``zero_shot`` also scores every mask before retraining.
    ``time_budget_s``: if set, after dense training the experiment times a short masked probe
    (and one masked evaluation) and lowers ``retrain_steps`` (for every run alike, the control
    included) so that the whole experiment should end within this many seconds; the steps used
    are recorded as ``retrain_steps_used``.
    Data: ``max_train_examples`` / ``max_test_examples`` cut the splits (``None``: all).
    Evaluation: ``eval_batch_size`` sentences decoded at once.
    ``precision``: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"fp32"`` or ``"bf16"``.
    """

    vocab_size: int = 8000
    d_model: int = 256
    layers: int = 3
    heads: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1
    max_len: int = 128
    train_steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 200
    label_smoothing: float = 0.1
    weight_decay: float = 0.01
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
    types: tuple[str, ...] = ("encoder", "decoder", "cross", "all")
    policies: tuple[str, ...] = ("layer", "random")
    observe_examples: int | None = 4096
    observe_batch_size: int = 256
    retrain_steps: int = 200
    retrain_lr: float = 3e-4
    retrain_warmup: int = 20
    zero_shot: bool = True
    time_budget_s: float | None = None
    max_train_examples: int | None = None
    max_test_examples: int | None = None
    eval_batch_size: int = 512
    seed: int = 0
    precision: str = "auto"
    device: str | None = None

    def validate(self) -> None:
        """Raise ``InvalidArgumentError`` on an unusable setting."""
        for t in self.types:
            if t not in ATTENTION_TYPES:
                raise InvalidArgumentError(f"unknown attention type {t!r}; choose from {', '.join(ATTENTION_TYPES)}")
        for s in self.sparsities:
            if not 0.0 <= float(s) < 1.0:
                raise InvalidArgumentError(f"sparsity must be in [0, 1), got {s!r}")
        if self.d_model % self.heads:
            raise InvalidArgumentError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        if self.max_len < 4:
            raise InvalidArgumentError(f"max_len must be at least 4, got {self.max_len}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise InvalidArgumentError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        for name in ("train_steps", "batch_size", "eval_batch_size", "observe_batch_size"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be at least 1")
        if self.retrain_steps < 0:
            raise InvalidArgumentError("retrain_steps must be >= 0")


PRESETS: dict[str, TranslationConfig] = {
    # CPU smoke run of the whole pipeline (a couple of minutes on 2 cores); BLEU is near zero.
    "tiny": TranslationConfig(vocab_size=1000, d_model=64, layers=2, heads=4, ffn_dim=128, max_len=48,
                              train_steps=150, batch_size=32, lr=2e-3, warmup_steps=20,
                              observe_examples=256, observe_batch_size=64, retrain_steps=10,
                              retrain_lr=1e-3, retrain_warmup=2, max_train_examples=3000,
                              max_test_examples=64, eval_batch_size=64),
    # The real experiment, sized for about 8 minutes on one H100 (see docs/translation.md).
    "gpu": TranslationConfig(vocab_size=8000, d_model=256, layers=3, heads=4, ffn_dim=1024, max_len=128,
                             train_steps=2200, batch_size=256, lr=1e-3, warmup_steps=300,
                             observe_examples=None, observe_batch_size=256, retrain_steps=400,
                             retrain_lr=5e-4, retrain_warmup=25, eval_batch_size=768, time_budget_s=420),
}


# ---------------------------------------------------------------------------------------------
# data


def load_pairs(data_file: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """The ``bible-en-es`` splits: ``{"train": [...], "valid": [...], "test": [...]}`` of
    ``{"ref", "source", "target"}`` records.

    data_file: a JSONL file written by ``scripts/export_bible.py`` (one record per line with a
        ``"split"`` key), for machines without the Debian-built corpus; ``None``: ``load_dataset``.
    """
    if data_file is None:
        from .data import load_dataset

        ds = load_dataset("bible-en-es")
        return {name: list(ds[name]) for name in ("train", "valid", "test")}
    p = Path(data_file)
    if not p.is_file():
        raise InvalidArgumentError(f"{p}: no such data file; write it with `python scripts/export_bible.py`")
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                splits.setdefault(rec.pop("split"), []).append(rec)
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise InvalidArgumentError(f"{p}:{n}: not a JSON record with a 'split' key") from None
    if not splits["train"] or not splits["test"]:
        raise InvalidArgumentError(f"{p}: needs records of the 'train' and 'test' splits")
    return splits


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A BPE ``tokenizers.Tokenizer`` trained on ``texts`` (NFKC, Metaspace pre-tokenizer).

    Ids 0-3 are ``<pad> <s> </s> <unk>``. ``decode`` restores the spacing of the text.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    except ImportError:
        raise MissingDependencyError("the translation experiment needs 'tokenizers': pip install tokenizers") from None
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_pairs(tok, pairs: Sequence[dict], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Token ids per pair: ``(source + [</s>], target)``, source and target cut to ``max_len - 1``
    tokens (the decoder sees ``[<s>] + target``, predicts ``target + [</s>]``)."""
    src = tok.encode_batch([p["source"] for p in pairs])
    tgt = tok.encode_batch([p["target"] for p in pairs])
    return [(s.ids[: max_len - 1] + [EOS], t.ids[: max_len - 1]) for s, t in zip(src, tgt)]


def _pad(seqs: list[list[int]], multiple: int, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(length, max(len(s) for s in seqs))
    n = -(-n // multiple) * multiple
    ids = torch.full((len(seqs), n), PAD, dtype=torch.long)
    am = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        am[i, : len(s)] = 1
    return ids, am


def collate(examples: Sequence[tuple[list[int], list[int]]], *, pad_multiple: int = 8,
            same_length: bool = False) -> dict:
    """A training batch: ``input_ids``, ``attention_mask`` [B, Ls]; ``decoder_input_ids``,
    ``decoder_attention_mask``, ``labels`` [B, Lt] (``labels`` -100 on padding). Lengths are padded
    up to a multiple of ``pad_multiple``; with ``same_length`` both sides to the same length
    (``Ls == Lt``). Both keep the number of distinct shapes small, so the masked attention's
    per-shape keep tensors stay cached on the device."""
    n = max(max(len(s), len(t) + 1) for s, t in examples) if same_length else 0
    src, am = _pad([s for s, _ in examples], pad_multiple, n)
    dec, dam = _pad([[BOS] + t for _, t in examples], pad_multiple, n)
    lab, _ = _pad([t + [EOS] for _, t in examples], pad_multiple, n)
    lab = lab.masked_fill(dam == 0, -100)
    return {"input_ids": src, "attention_mask": am, "decoder_input_ids": dec,
            "decoder_attention_mask": dam, "labels": lab}


def batch_order(examples: Sequence[tuple[list[int], list[int]]], batch_size: int, seed: int,
                epoch: int) -> list[list[int]]:
    """Index batches for one epoch: shuffled, then sorted by length within windows of 50 batches
    (less padding), batches in random order. Deterministic in ``seed`` and ``epoch``; the tail
    shorter than ``batch_size`` is dropped."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    window = batch_size * 50
    out = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w:w + window], key=lambda i: (len(examples[i][1]), len(examples[i][0])))
        out += [chunk[b:b + batch_size] for b in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(out)
    return out


def _batches(examples, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless training batches, epoch after epoch."""
    if len(examples) < batch_size:
        batch_size = len(examples)
    epoch = 0
    while True:
        for ids in batch_order(examples, batch_size, seed, epoch):
            yield collate([examples[i] for i in ids], same_length=True)
        epoch += 1


# ---------------------------------------------------------------------------------------------
# model, training, decoding


def build_model(cfg: TranslationConfig, vocab_size: int, seed: int = 0):
    """A randomly initialised ``BartForConditionalGeneration`` (shared, tied embeddings)."""
    import transformers as t

    config = t.BartConfig(
        vocab_size=vocab_size, d_model=cfg.d_model, encoder_layers=cfg.layers, decoder_layers=cfg.layers,
        encoder_attention_heads=cfg.heads, decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim, max_position_embeddings=cfg.max_len,
        dropout=cfg.dropout, attention_dropout=0.0, activation_dropout=0.0, activation_function="gelu",
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
        forced_eos_token_id=None, scale_embedding=True, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = t.BartForConditionalGeneration(config)
    return model


def _device(cfg: TranslationConfig) -> torch.device:
    from .train import default_device

    return default_device(cfg.device)


def _autocast(cfg: TranslationConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_model(model, examples, *, steps: int, lr: float, warmup: int, batch_size: int, cfg: TranslationConfig,
                mask=None, seed: int = 0, progress: bool = True, desc: str = "train",
                log_path: str | os.PathLike | None = None) -> dict:
    """Train ``model`` in place for ``steps`` AdamW steps on ``examples`` (encoded pairs).

    Label-smoothed cross-entropy per target token; linear warm-up to ``lr`` over ``warmup`` steps,
    cosine decay to ``lr / 10``; gradient clipping at 1. With ``mask`` the mask is attached for the
    whole run (``attnprune.apply``, reference backend; inputs longer than the calibrated lengths
    run dense there). Data order depends only on ``seed``. Returns ``{"steps", "final_loss",
    "seconds", "tokens"}``; ``log_path`` gets one JSON line every 50 steps.
    """
    from tqdm.auto import tqdm

    from .apply import apply

    device = next(model.parameters()).device
    if steps <= 0:
        return {"steps": 0, "final_loss": None, "seconds": 0.0, "tokens": 0}
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98),
                            eps=1e-8, fused=device.type in ("cuda", "cpu"))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    data = _batches(examples, batch_size, seed)
    ctx = apply(model, mask, backend="reference", beyond="dense") if mask is not None else contextlib.nullcontext()
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    model.train()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    tokens, running, loss_val = 0, None, float("nan")
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step", leave=False)
    try:
        with ctx:
            for step in bar:
                batch = next(data)
                tokens += int(batch["decoder_attention_mask"].sum())  # on the CPU: no device sync
                batch = _to(batch, device)
                labels = batch.pop("labels")
                with _autocast(cfg, device):
                    logits = model(**batch, use_cache=False).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                                       ignore_index=-100, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                if step % 10 == 0 or step == steps - 1:
                    loss_val = loss.detach().item()
                    running = loss_val if running is None else 0.7 * running + 0.3 * loss_val
                    bar.set_postfix(loss=f"{running:.3f}")
                if log and (step % 50 == 0 or step == steps - 1):
                    log.write(json.dumps({"step": step + 1, "loss": loss.detach().item(), "lr": sched.get_last_lr()[0],
                                          "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
                    log.flush()
    finally:
        if log:
            log.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.eval()
    return {"steps": steps, "final_loss": running, "seconds": round(time.perf_counter() - t0, 2),
            "tokens": tokens}


def _cache_arg(model) -> str:
    """The forward keyword for the key/value cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None) if "cache" in getattr(output, "__dataclass_fields__", {}) else None
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def greedy_decode(model, sources: Sequence[list[int]], *, max_len: int, batch_size: int = 256,
                  cfg: TranslationConfig | None = None, use_cache: bool = True) -> list[list[int]]:
    """Greedy translations (token ids, without ``<s>``/``</s>``) of encoded ``sources``.

    The decoder starts from ``<s>`` and stops at ``</s>`` or after ``max_len - 1`` tokens (its
    position range). Sentences are decoded ``batch_size`` at a time, longest first. With
    ``use_cache`` the decoder reuses its key/value cache (one new position per step); without it
    every step recomputes the whole prefix (slow; for checking). Runs under whatever mask is
    attached to ``model``.
    """
    cfg = cfg or TranslationConfig()
    device = next(model.parameters()).device
    cache_arg = _cache_arg(model)
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    out: list[list[int]] = [[] for _ in sources]
    for b in range(0, len(order), batch_size):
        ids = order[b:b + batch_size]
        src, am = _pad([sources[i] for i in ids], 8)
        src, am = src.to(device), am.to(device)
        n = len(ids)
        dec = torch.full((n, 1), BOS, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        enc, past = None, None
        with _autocast(cfg, device):
            for _ in range(max_len - 1):
                if enc is None:
                    o = model(input_ids=src, attention_mask=am, decoder_input_ids=dec, use_cache=use_cache)
                    enc = (o.encoder_last_hidden_state,)
                elif use_cache:
                    o = model(encoder_outputs=enc, attention_mask=am, decoder_input_ids=dec[:, -1:],
                              use_cache=True, **{cache_arg: past})
                else:
                    o = model(encoder_outputs=enc, attention_mask=am, decoder_input_ids=dec, use_cache=False)
                past = _cache_of(o) if use_cache else None
                nxt = o.logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
                dec = torch.cat([dec, nxt[:, None]], 1)
                done |= nxt == EOS
                if bool(done.all()):
                    break
        for row, i in zip(dec[:, 1:].tolist(), ids):
            toks = []
            for t in row:
                if t in (EOS, PAD):
                    break
                toks.append(t)
            out[i] = toks
    return out


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (``sacrebleu``, default 13a tokenization) of detokenized ``hypotheses`` against
    one reference each; 0-100."""
    try:
        import sacrebleu
    except ImportError:
        raise MissingDependencyError("BLEU needs 'sacrebleu': pip install sacrebleu") from None
    if len(hypotheses) != len(references):
        raise InvalidArgumentError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def evaluate_bleu(model, tok, test_pairs: Sequence[dict], test_src: Sequence[list[int]],
                  cfg: TranslationConfig, mask=None) -> tuple[float, list[str]]:
    """Translate ``test_src`` (greedy, with ``mask`` attached if given) and score against the
    pairs' targets. Returns (BLEU, hypotheses)."""
    from .apply import apply

    ctx = apply(model, mask, backend="reference", beyond="dense") if mask is not None else contextlib.nullcontext()
    with ctx:
        hyp_ids = greedy_decode(model, test_src, max_len=cfg.max_len, batch_size=cfg.eval_batch_size, cfg=cfg)
    hyps = tok.decode_batch(hyp_ids)
    return bleu(hyps, [p["target"] for p in test_pairs]), hyps


# ---------------------------------------------------------------------------------------------
# masks by attention type


def restrict_mask(mask, kinds: Sequence[str]):
    """A copy of ``mask`` that prunes only at sites whose kind is in ``kinds``.

    Every other site keeps all its entries (an all-``True`` token mask over its calibrated
    lengths; the backend still applies causality and padding), so attaching the result leaves
    those sites dense. ``meta["restricted_to"]`` records ``kinds``; ``meta["sparsity"]`` is
    recomputed over all sites' attendable entries and ``meta["selected_sparsity"]`` over the
    selected sites only.
    """
    from .mask import PruneMask, SiteMask

    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in ("self", "causal", "cross")]
    if unknown:
        raise InvalidArgumentError(f"unknown site kind(s) {unknown}; kinds are self, causal, cross")
    meta = copy.deepcopy(mask.meta)
    site_meta = meta.setdefault("sites", {})
    masks = []
    for name in mask.sites:
        sm = mask.site(name)
        if sm.info.kind in kinds:
            masks.append(sm)
            continue
        keep = torch.ones(sm.info.num_heads, sm.q_len, sm.k_len, dtype=torch.bool)
        masks.append(SiteMask(sm.info, sm.q_len, sm.k_len, keep=keep, block=None))
        m = site_meta.setdefault(name, {})
        att = m.get("attendable_entries", 0)
        m.update({"target_sparsity": 0.0, "sparsity": 0.0, "paper_sparsity": 0.0, "kept_entries": att,
                  "kept_units": int(keep.numel()), "units": int(keep.numel()), "threshold": None})
    total = sum(site_meta.get(n, {}).get("attendable_entries", 0) for n in mask.sites)
    kept = sum(site_meta.get(n, {}).get("kept_entries", 0) for n in mask.sites)
    sel = [n for n in mask.sites if mask.site(n).info.kind in kinds]
    sel_total = sum(site_meta.get(n, {}).get("attendable_entries", 0) for n in sel)
    sel_kept = sum(site_meta.get(n, {}).get("kept_entries", 0) for n in sel)
    meta["restricted_to"] = list(kinds)
    meta["sparsity"] = 1.0 - kept / total if total else 0.0
    meta["selected_sparsity"] = 1.0 - sel_kept / sel_total if sel_total else 0.0
    if any(m.block is not None for m in masks):  # mixed levels: the mask as a whole is token-level
        meta["block"] = None
        masks = [m if m.block is None else SiteMask(m.info, m.q_len, m.k_len,
                                                    keep=m._tokens(m.q_len, m.k_len, 0), block=None)
                 for m in masks]
    return PruneMask(masks, meta)


# ---------------------------------------------------------------------------------------------
# plots and report


def _type_of(kind: str) -> str:
    return {"self": "encoder", "causal": "decoder", "cross": "cross"}[kind]


def mean_patterns(stats, size: int = 48) -> dict[str, list[torch.Tensor]]:
    """Per attention type, per layer: the mean attention [q, k] over heads (top-left ``size`` x
    ``size`` corner, NaN where never observed)."""
    out: dict[str, list[torch.Tensor]] = {"encoder": [], "decoder": [], "cross": []}
    for site in stats.sites:
        m = stats.mean(site)[:, :size, :size]
        out[_type_of(stats.infos[site].kind)].append(torch.nanmean(m, dim=0))
    return out


def offset_profile(stats, max_offset: int = 24) -> dict[str, torch.Tensor]:
    """Per attention type: mean attention probability by key-minus-query offset
    (-max_offset..max_offset), averaged over sites, heads and query positions (observed entries)."""
    prof = {}
    offs = torch.arange(-max_offset, max_offset + 1)
    for t in ("encoder", "decoder", "cross"):
        sums = torch.zeros(len(offs), dtype=torch.float64)
        cnt = torch.zeros(len(offs), dtype=torch.float64)
        for site in stats.sites:
            if _type_of(stats.infos[site].kind) != t:
                continue
            m = stats.mean(site).to(torch.float64)  # [H, Q, K]
            q, k = m.shape[1], m.shape[2]
            d = torch.arange(k)[None, :] - torch.arange(q)[:, None]
            for n, o in enumerate(offs.tolist()):
                sel = m[:, d == o]
                sel = sel[~torch.isnan(sel)]
                sums[n] += sel.sum()
                cnt[n] += sel.numel()
        prof[t] = torch.where(cnt > 0, sums / cnt.clamp(min=1), torch.full_like(sums, math.nan))
    prof["offsets"] = offs
    return prof


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("plots need matplotlib: pip install matplotlib") from None
    return plt


def plot_patterns(stats, path: str | os.PathLike, size: int = 48) -> None:
    """PNG: mean attention (over heads) per layer (rows) and attention type (columns), with a
    last row averaging the layers; log colour scale."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    pats = mean_patterns(stats, size)
    types = ["encoder", "decoder", "cross"]
    layers = max(len(v) for v in pats.values())
    fig, axes = plt.subplots(layers + 1, 3, figsize=(10, 3.2 * (layers + 1)), squeeze=False)
    for c, t in enumerate(types):
        rows = pats[t] + ([torch.nanmean(torch.stack(pats[t]), 0)] if pats[t] else [])
        for r in range(layers + 1):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if r >= len(rows):
                ax.axis("off")
                continue
            img = rows[r].clamp(min=1e-4).numpy()
            im = ax.imshow(img, norm=LogNorm(vmin=1e-4, vmax=1.0), cmap="viridis", interpolation="nearest")
            short = {"encoder": "encoder self", "decoder": "decoder self", "cross": "cross"}[t]
            ax.set_title(f"{short}, " + (f"layer {r}" if r < len(rows) - 1 else "mean"), fontsize=9)
            if r == layers:
                ax.set_xlabel("key position"), ax.set_ylabel("query position")
    fig.colorbar(im, ax=axes, shrink=0.5, label="mean attention probability")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def plot_offsets(stats, path: str | os.PathLike) -> None:
    """PNG: mean attention by key - query offset per attention type (log scale)."""
    plt = _plt()
    prof = offset_profile(stats)
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in ("encoder", "decoder", "cross"):
        ax.plot(prof["offsets"].numpy(), prof[t].numpy(), marker=".", label=TYPE_LABELS[t])
    ax.set_yscale("log")
    ax.set_xlabel("key position - query position")
    ax.set_ylabel("mean attention probability")
    ax.legend()
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)


def plot_bleu(results: dict, path: str | os.PathLike) -> None:
    """PNG: retrained BLEU versus sparsity, one panel per attention type, AP versus random, with the
    dense and dense-continued lines."""
    plt = _plt()
    types = [t for t in ATTENTION_TYPES if any(r["type"] == t for r in results["runs"])]
    if not types:
        return
    fig, axes = plt.subplots(1, len(types), figsize=(3.6 * len(types), 3.4), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], types):
        for pol, style in (("layer", "o-"), ("random", "s--")):
            rs = sorted((r for r in results["runs"] if r["type"] == t and r["policy"] == pol),
                        key=lambda r: r["sparsity"])
            for key, alpha in (("bleu", 1.0), ("bleu_zero_shot", 0.4)):
                pts = [(r["sparsity"], r[key]) for r in rs if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), style, alpha=alpha,
                            label=("AP" if pol == "layer" else "random") + (" (no retraining)" if alpha < 1 else ""))
        for key, ls, lab in (("dense", ":", "dense"), ("dense_continued", "-.", "dense + retrain steps")):
            if results.get(key, {}).get("bleu") is not None:
                ax.axhline(results[key]["bleu"], color="k", ls=ls, lw=1, label=lab)
        ax.set_title(TYPE_LABELS[t], fontsize=10)
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test BLEU")
    axes[0][-1].legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def results_markdown(results: dict) -> str:
    """The result table as Markdown: BLEU per attention type and sparsity, AP versus random,
    retrained and (if measured) before retraining."""
    cfg = results["config"]
    k = results.get("retrain_steps_used", cfg["retrain_steps"])
    lines = [
        "# Translation: attention pruning by attention type", "",
        f"English -> Spanish, `bible-en-es` ({results['data']['train']} training / {results['data']['test']} "
        f"test pairs), BART {cfg['layers']}+{cfg['layers']} layers, d={cfg['d_model']}, {cfg['heads']} heads, "
        f"shared BPE vocabulary {results['data']['vocab_size']}; greedy decoding, sacreBLEU "
        f"{results['env'].get('sacrebleu', '?')} (13a) on the test split.", "",
        f"Dense: {cfg['train_steps']} steps x {cfg['batch_size']} pairs from scratch. Masks: observed on "
        f"{results['data'].get('observed', 0)} training pairs; `layer` (AP) vs `random`; retrained "
        f"{k} steps from the dense weights with the mask attached.", "",
        f"- dense: BLEU **{_fmt(results.get('dense', {}).get('bleu'))}**",
        f"- dense + {k} more dense steps (the control for retraining): BLEU "
        f"**{_fmt(results.get('dense_continued', {}).get('bleu'))}**", "",
        "| attention type | sparsity | AP | random | AP, no retraining | random, no retraining | achieved |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in ATTENTION_TYPES:
        for s in cfg["sparsities"]:
            rs = {r["policy"]: r for r in results["runs"] if r["type"] == t and abs(r["sparsity"] - s) < 1e-9}
            if not rs:
                continue
            ap, rnd = rs.get("layer", {}), rs.get("random", {})
            ach = ap.get("achieved_sparsity", rnd.get("achieved_sparsity"))
            lines.append(f"| {TYPE_LABELS[t]} | {s:.0%} | {_fmt(ap.get('bleu'))} | {_fmt(rnd.get('bleu'))} | "
                         f"{_fmt(ap.get('bleu_zero_shot'))} | {_fmt(rnd.get('bleu_zero_shot'))} | "
                         f"{'-' if ach is None else f'{ach:.3f}'} |")
    lines += ["", "`achieved`: sparsity over the attendable entries of the pruned type's sites.", "",
              f"Device: {results['env'].get('device')}; torch {results['env'].get('torch')}, transformers "
              f"{results['env'].get('transformers')}; {results['env'].get('date')}; total "
              f"{results.get('seconds_total', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def _env(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import sacrebleu

        env["sacrebleu"] = sacrebleu.__version__
    except ImportError:
        pass
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return env


def _try_plots(fn, log) -> None:
    try:
        fn()
    except MissingDependencyError as e:  # e.g. no matplotlib on the GPU machine: plot later with write_plots
        log(f"plots skipped ({e}); make them later with `attnprune translate --plots-only --out DIR`")


def write_plots(out_dir: str | os.PathLike) -> list[Path]:
    """(Re)make the PNG plots of a finished or interrupted experiment from its ``stats.safetensors``
    and ``results.json``. Returns the files written."""
    from .stats import AttentionStats

    out = Path(out_dir)
    written = []
    if (out / "stats.safetensors").is_file():
        stats = AttentionStats.load(out / "stats.safetensors")
        plot_patterns(stats, out / "attention_patterns.png")
        plot_offsets(stats, out / "attention_offsets.png")
        written += [out / "attention_patterns.png", out / "attention_offsets.png"]
    if (out / "results.json").is_file():
        plot_bleu(json.loads((out / "results.json").read_text()), out / "bleu.png")
        written.append(out / "bleu.png")
    if not written:
        raise InvalidArgumentError(f"{out}: no stats.safetensors or results.json to plot from")
    return written


# ---------------------------------------------------------------------------------------------
# the experiment


def run_experiment(cfg: TranslationConfig, out_dir: str | os.PathLike, *, data_file=None, pairs=None,
                   progress: bool = True, log=print) -> dict:
    """Run the whole experiment (module docstring) and write its files into ``out_dir``.

    pairs: the splits as :func:`load_pairs` returns them (default: ``load_pairs(data_file)``).
    log: called with one line of progress text per stage (``None``: silent).
    Returns the results dict that ``results.json`` holds.
    """
    import attnprune

    cfg.validate()
    log = log or (lambda *_: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = _device(cfg)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    splits = pairs if pairs is not None else load_pairs(data_file)
    train_pairs = splits["train"][: cfg.max_train_examples] if cfg.max_train_examples else splits["train"]
    test_pairs = splits["test"][: cfg.max_test_examples] if cfg.max_test_examples else splits["test"]

    t = time.perf_counter()
    tok = train_tokenizer([p["source"] for p in train_pairs] + [p["target"] for p in train_pairs], cfg.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    train_ex = encode_pairs(tok, train_pairs, cfg.max_len)
    test_src = [s for s, _ in encode_pairs(tok, test_pairs, cfg.max_len)]
    vocab = tok.get_vocab_size()
    log(f"tokenizer: {vocab} tokens, {len(train_ex)} training / {len(test_src)} test pairs "
        f"({time.perf_counter() - t:.1f} s)")

    results: dict = {
        "config": {**asdict(cfg), "sparsities": list(cfg.sparsities), "types": list(cfg.types),
                   "policies": list(cfg.policies)},
        "data": {"source": str(data_file) if data_file else "bible-en-es", "train": len(train_ex),
                 "test": len(test_src), "vocab_size": vocab,
                 "mean_source_tokens": sum(len(s) for s, _ in train_ex) / max(1, len(train_ex)),
                 "mean_target_tokens": sum(len(t_) + 1 for _, t_ in train_ex) / max(1, len(train_ex))},
        "env": _env(device), "retrain_from": "dense weights", "runs": [], "timings": {},
    }

    def save():
        results["seconds_total"] = round(time.perf_counter() - t_start, 1)
        write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
        write_text_atomic(out / "results.md", results_markdown(results))

    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    model = build_model(cfg, vocab, seed=cfg.seed).to(device)
    results["model"] = {"parameters": sum(p.numel() for p in model.parameters())}
    tr = train_model(model, train_ex, steps=cfg.train_steps, lr=cfg.lr, warmup=cfg.warmup_steps,
                     batch_size=cfg.batch_size, cfg=cfg, seed=cfg.seed, progress=progress, desc="dense",
                     log_path=logs / "dense.jsonl")
    t = time.perf_counter()
    b, hyps = evaluate_bleu(model, tok, test_pairs, test_src, cfg)
    results["dense"] = {**tr, "bleu": b, "eval_seconds": round(time.perf_counter() - t, 2)}
    write_text_atomic(out / "translations_dense.tsv", "".join(
        f"{p['ref']}\t{p['source']}\t{p['target']}\t{h}\n".replace("\r", " ") for p, h in zip(test_pairs, hyps)))
    log(f"dense: {tr['steps']} steps in {tr['seconds']:.0f} s, loss {tr['final_loss']:.3f}, BLEU {b:.2f} "
        f"(eval {results['dense']['eval_seconds']:.1f} s)")
    save()
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # observe on training pairs (teacher forcing)
    t = time.perf_counter()
    n_obs = min(cfg.observe_examples or len(train_ex), len(train_ex))
    rng = random.Random(cfg.seed + 1)
    # sorted by length: little padding (the stats are sums, the order does not change them)
    obs_idx = sorted(rng.sample(range(len(train_ex)), n_obs),
                     key=lambda j: (len(train_ex[j][1]), len(train_ex[j][0])))
    obs_batches = []
    for i in range(0, n_obs, cfg.observe_batch_size):
        bt = collate([train_ex[j] for j in obs_idx[i:i + cfg.observe_batch_size]])
        bt.pop("labels")
        obs_batches.append(bt)
    stats = attnprune.observe(model, obs_batches, progress=progress,
                              description=f"bible-en-es train, {n_obs} pairs")
    results["data"]["observed"] = n_obs
    results["timings"]["observe_seconds"] = round(time.perf_counter() - t, 2)
    stats.save(out / "stats.safetensors")
    _try_plots(lambda: (plot_patterns(stats, out / "attention_patterns.png"),
                        plot_offsets(stats, out / "attention_offsets.png")), log)
    prof = offset_profile(stats)
    results["attention_offsets"] = {"offsets": prof["offsets"].tolist(),
                                    **{k: [None if math.isnan(x) else x for x in prof[k].tolist()]
                                       for k in ("encoder", "decoder", "cross")}}
    log(f"observed {n_obs} training pairs ({results['timings']['observe_seconds']:.1f} s)")

    # fit the retraining steps into the time budget (same number for every run)
    k = cfg.retrain_steps
    zero_shot_done: dict = {}
    n_runs = len(cfg.sparsities) * len(cfg.types) * len(cfg.policies)
    if cfg.time_budget_s and k and n_runs:
        s_max, pol0 = max(cfg.sparsities), cfg.policies[0]
        probe_mask = restrict_mask(attnprune.make_mask(stats, s_max, policy=pol0, seed=cfg.seed),
                                   ATTENTION_TYPES["all"])
        model.load_state_dict(dense_state)
        n_probe = min(k, 20)
        pr = train_model(model, train_ex, steps=n_probe, lr=cfg.retrain_lr, warmup=cfg.retrain_warmup,
                         batch_size=cfg.batch_size, cfg=cfg, seed=cfg.seed + 7, mask=probe_mask, progress=False)
        masked_step = pr["seconds"] / n_probe
        model.load_state_dict(dense_state)
        t = time.perf_counter()
        b, _ = evaluate_bleu(model, tok, test_pairs, test_src, cfg, mask=probe_mask)
        eval_masked = time.perf_counter() - t
        if cfg.zero_shot and "all" in cfg.types:
            zero_shot_done[("all", pol0, s_max)] = b
        dense_step = results["dense"]["seconds"] / cfg.train_steps
        n_evals = n_runs * (2 if cfg.zero_shot else 1) + 1 - len(zero_shot_done)
        left = cfg.time_budget_s - (time.perf_counter() - t_start) - 10.0
        fit = int((left - n_evals * eval_masked) / (n_runs * masked_step + dense_step))
        k = max(min(k, fit), min(k, 10))
        results["timings"].update({"dense_step_seconds": round(dense_step, 4),
                                   "masked_step_seconds": round(masked_step, 4),
                                   "masked_eval_seconds": round(eval_masked, 2)})
        log(f"time budget {cfg.time_budget_s:.0f} s: dense step {dense_step * 1e3:.1f} ms, masked step "
            f"{masked_step * 1e3:.1f} ms, masked evaluation {eval_masked:.1f} s -> {k} retraining steps"
            + (" (over budget: fewer steps would be too few)" if k > fit else ""))
    results["retrain_steps_used"] = k

    # the control: the dense model trained for the same extra steps, without a mask
    if k:
        model.load_state_dict(dense_state)
        tr = train_model(model, train_ex, steps=k, lr=cfg.retrain_lr, warmup=cfg.retrain_warmup,
                         batch_size=cfg.batch_size, cfg=cfg, seed=cfg.seed + 7, progress=progress,
                         desc="dense+", log_path=logs / "dense_continued.jsonl")
        b, _ = evaluate_bleu(model, tok, test_pairs, test_src, cfg)
        results["dense_continued"] = {**tr, "bleu": b}
        log(f"dense + {k} steps: BLEU {b:.2f} ({tr['seconds']:.0f} s)")
        save()

    for s in cfg.sparsities:
        full = {pol: attnprune.make_mask(stats, s, policy=pol, seed=cfg.seed) for pol in cfg.policies}
        for typ in cfg.types:
            for pol in cfg.policies:
                mask = restrict_mask(full[pol], ATTENTION_TYPES[typ])
                run = {"type": typ, "sparsity": s, "policy": pol,
                       "achieved_sparsity": mask.meta["selected_sparsity"],
                       "model_sparsity": mask.meta["sparsity"]}
                t = time.perf_counter()
                model.load_state_dict(dense_state)
                if cfg.zero_shot:
                    run["bleu_zero_shot"] = zero_shot_done.get((typ, pol, s))
                    if run["bleu_zero_shot"] is None:
                        run["bleu_zero_shot"], _ = evaluate_bleu(model, tok, test_pairs, test_src, cfg, mask=mask)
                tag = f"{typ}-{pol}-{round(s * 100)}"
                tr = train_model(model, train_ex, steps=k, lr=cfg.retrain_lr,
                                 warmup=cfg.retrain_warmup, batch_size=cfg.batch_size, cfg=cfg,
                                 seed=cfg.seed + 7, mask=mask, progress=progress, desc=tag,
                                 log_path=logs / f"{tag}.jsonl")
                run["bleu"], hyps = evaluate_bleu(model, tok, test_pairs, test_src, cfg, mask=mask) \
                    if k else (run.get("bleu_zero_shot"), None)
                run.update({"retrain_seconds": tr["seconds"], "final_loss": tr["final_loss"],
                            "seconds": round(time.perf_counter() - t, 2)})
                results["runs"].append(run)
                log(f"{tag}: achieved {run['achieved_sparsity']:.3f}, BLEU {_fmt(run.get('bleu_zero_shot'))} "
                    f"-> {_fmt(run['bleu'])} ({run['seconds']:.0f} s)")
                save()
    model.load_state_dict(dense_state)
    _try_plots(lambda: plot_bleu(results, out / "bleu.png"), log)
    save()
    log(f"done in {results['seconds_total']:.0f} s: {out / 'results.md'}")
    return results
