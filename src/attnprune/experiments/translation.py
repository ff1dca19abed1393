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

Training goes through the library's one loop (:func:`attnprune.train.finetune`, task
:class:`attnprune.train.Seq2Seq` with label smoothing, length-bucketed order, cosine to 10%), so
the masked runs can use the block-sparse backends (``TranslationConfig.backend``). Files:
:mod:`.translation_data` (config, presets, data, model), :mod:`.translation_report` (plots, table),
this module (training, evaluation, the experiment).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from .._io import write_json, write_text_atomic
from ..runtime import default_device
from ..seq2seq import bleu, greedy_decode as _greedy_decode
from ..train import Seq2Seq, TrainConfig, finetune, lr_factor
from .translation_data import (ATTENTION_TYPES, BOS, EOS, PAD, PRESETS, SPECIALS, TYPE_LABELS, UNK,
                               TranslationConfig, build_model, collate, encode_pairs, load_pairs,
                               seq2seq_examples, train_tokenizer)
from .translation_report import (_fmt, _try_plots, mean_patterns, offset_profile, plot_bleu, plot_offsets,
                                 plot_patterns, results_markdown, write_plots)

__all__ = ["ATTENTION_TYPES", "BOS", "EOS", "PAD", "PRESETS", "SPECIALS", "TYPE_LABELS", "UNK",
           "TranslationConfig", "bleu", "build_model", "collate", "encode_pairs", "evaluate_bleu",
           "greedy_decode", "load_pairs", "mean_patterns", "offset_profile", "plot_bleu", "plot_offsets",
           "plot_patterns", "restrict_mask", "results_markdown", "run_experiment", "seq2seq_examples",
           "train_model", "train_tokenizer", "write_plots"]


def _device(cfg: TranslationConfig) -> torch.device:
    return default_device(cfg.device)


def train_model(model, examples, *, steps: int, lr: float, warmup: int, batch_size: int, cfg: TranslationConfig,
                mask=None, seed: int = 0, progress: bool = True, desc: str = "train",
                log_path: str | os.PathLike | None = None) -> dict:
    """Train ``model`` in place for ``steps`` AdamW steps on ``examples`` (encoded pairs), through
    :func:`attnprune.train.finetune` (in memory: no checkpoints or weights are written).

    Label-smoothed cross-entropy per target token (:class:`attnprune.train.Seq2Seq`, the mean over
    the batch's targets); betas 0.9/0.98, weight decay on matrices; linear warm-up to ``lr`` over
    ``warmup`` steps, cosine decay to ``lr / 10``; gradient clipping at 1. Batches: the
    length-bucketed order (shuffled, sorted by length within windows of 50 batches, batches in random
    order), both sides padded to one length, a multiple of 8. With ``mask`` the mask is attached for
    the whole run (``cfg.backend``; inputs longer than the calibrated lengths run dense there). Data
    order and dropout depend only on ``seed``. Returns ``{"steps", "final_loss", "seconds",
    "tokens"}`` (``final_loss``: a running mean of every tenth step's loss); ``log_path`` gets one
    JSON line every 50 steps (step, loss, the next step's lr, seconds). Leaves the model in eval mode.
    """
    if steps <= 0:
        return {"steps": 0, "final_loss": None, "seconds": 0.0, "tokens": 0}
    data = seq2seq_examples(examples)
    tcfg = TrainConfig(steps=steps, lr=lr, batch_size=min(batch_size, len(data)), warmup_steps=warmup,
                       schedule="cosine", min_lr_ratio=0.1, weight_decay=cfg.weight_decay, betas=(0.9, 0.98),
                       eps=1e-8, max_grad_norm=1.0, precision=cfg.precision, seed=seed, order="length-bucketed",
                       backend=cfg.backend, beyond="dense", pad_id=PAD, device=str(next(model.parameters()).device),
                       progress=progress)
    task = Seq2Seq(label_smoothing=cfg.label_smoothing, pad_multiple=8, same_length=True)
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    t0 = time.perf_counter()
    state = {"running": None}

    def on_step(info) -> None:
        s = info.step - 1
        if s % 10 == 0 or info.step == steps:
            state["running"] = info.loss if state["running"] is None else 0.7 * state["running"] + 0.3 * info.loss
        if log and (s % 50 == 0 or info.step == steps):
            log.write(json.dumps({"step": info.step, "loss": info.loss, "lr": lr * lr_factor(info.step, tcfg),
                                  "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
            log.flush()

    try:
        res = finetune(model, data, mask=mask, task=task, out_dir=None, config=tcfg, callbacks=[on_step], desc=desc)
    finally:
        if log:
            log.close()
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    model.eval()
    return {"steps": steps, "final_loss": state["running"], "seconds": round(time.perf_counter() - t0, 2),
            "tokens": sum(i.tokens for i in res.history)}


def greedy_decode(model, sources: Sequence[list[int]], *, max_len: int, batch_size: int = 256,
                  cfg: TranslationConfig | None = None, use_cache: bool = True) -> list[list[int]]:
    """Greedy translations (token ids, without ``<s>``/``</s>``) of encoded ``sources``:
    :func:`attnprune.seq2seq.greedy_decode` with this tokenizer's special ids and ``cfg.precision``."""
    cfg = cfg or TranslationConfig()
    return _greedy_decode(model, sources, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=max_len,
                          batch_size=batch_size, precision=cfg.precision, use_cache=use_cache)


def evaluate_bleu(model, tok, test_pairs: Sequence[dict], test_src: Sequence[list[int]],
                  cfg: TranslationConfig, mask=None) -> tuple[float, list[str]]:
    """Translate ``test_src`` (greedy, with ``mask`` attached if given, ``cfg.backend``) and score
    against the pairs' targets. Returns (BLEU, hypotheses)."""
    import contextlib

    from ..apply import apply
    from ..runtime import resolve_backend

    backend = resolve_backend(cfg.backend, next(model.parameters()).device)
    ctx = apply(model, mask, backend=backend, beyond="dense") if mask is not None else contextlib.nullcontext()
    with ctx:
        hyp_ids = greedy_decode(model, test_src, max_len=cfg.max_len, batch_size=cfg.eval_batch_size, cfg=cfg)
    hyps = tok.decode_batch(hyp_ids)
    return bleu(hyps, [p["target"] for p in test_pairs]), hyps


def restrict_mask(mask, kinds: Sequence[str]):
    """``mask.restrict_to_kinds(kinds)`` (:meth:`attnprune.mask.PruneMask.restrict_to_kinds`)."""
    return mask.restrict_to_kinds(kinds)


def _env(device: torch.device) -> dict:
    """The environment record (:func:`attnprune.report.environment`) plus sacreBLEU's version."""
    from ..report import environment

    env = environment(device)
    try:
        import sacrebleu

        env["sacrebleu"] = sacrebleu.__version__
    except ImportError:
        pass
    return env


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
        write_json(out / "results.json", results, indent=2)
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
