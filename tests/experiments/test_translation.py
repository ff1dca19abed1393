"""The translation experiment on a tiny synthetic parallel corpus (CPU, seconds)."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
pytest.importorskip("sacrebleu")

import attnprune
from attnprune import cli
from attnprune.errors import InvalidArgumentError
from attnprune.experiments.translation import (BOS, EOS, PAD, TranslationConfig, build_model, bleu, collate,
                                               encode_pairs, greedy_decode, restrict_mask, run_experiment,
                                               train_model, train_tokenizer)

EN = "zero one two three four five six seven eight nine".split()
ES = "cero uno dos tres cuatro cinco seis siete ocho nueve".split()


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        idx = [rng.randrange(10) for _ in range(rng.randint(2, 7))]
        out.append({"ref": f"x {i}", "source": " ".join(EN[j] for j in idx) + ".",
                    "target": " ".join(ES[j] for j in idx) + "."})
    return out


def _splits() -> dict:
    return {"train": _pairs(120, 0), "valid": _pairs(8, 1), "test": _pairs(12, 2)}


TINY = TranslationConfig(vocab_size=80, d_model=32, layers=1, heads=2, ffn_dim=64, max_len=16, train_steps=6,
                         batch_size=16, lr=3e-3, warmup_steps=2, observe_examples=32, observe_batch_size=16,
                         retrain_steps=2, retrain_warmup=1, sparsities=(0.5, 0.9), types=("encoder", "cross"),
                         policies=("layer", "random"), eval_batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)  # tiny ops: threads only add overhead on a shared CPU
    splits = _splits()
    texts = [p["source"] for p in splits["train"]] + [p["target"] for p in splits["train"]]
    tok = train_tokenizer(texts, TINY.vocab_size)
    ex = encode_pairs(tok, splits["train"], TINY.max_len)
    model = build_model(TINY, tok.get_vocab_size())
    return splits, tok, ex, model


def test_tokenizer_specials_and_round_trip(setup):
    _, tok, ex, _ = setup
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    text = "uno dos tres."
    assert tok.decode(tok.encode(text).ids) == text
    src, tgt = ex[0]
    assert src[-1] == EOS and EOS not in tgt and BOS not in tgt


def test_collate_shapes_and_labels(setup):
    _, _, ex, _ = setup
    b = collate(ex[:5])
    assert b["input_ids"].shape[1] % 8 == 0 and b["decoder_input_ids"].shape == b["labels"].shape
    assert (b["decoder_input_ids"][:, 0] == BOS).all()
    n = len(ex[0][1])
    assert b["labels"][0, n] == EOS and b["labels"][0, :n].tolist() == ex[0][1]
    assert (b["labels"][b["decoder_attention_mask"] == 0] == -100).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == PAD).all()
    same = collate(ex[:5], same_length=True)
    assert same["input_ids"].shape == same["labels"].shape and same["input_ids"].shape[1] % 8 == 0
    w = b["labels"].shape[1]
    assert same["labels"].shape[1] >= w
    assert torch.equal(same["labels"][:, :w], b["labels"]) and (same["labels"][:, w:] == -100).all()


def test_bleu_hand_made_case():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # same length (no brevity penalty); n-gram precisions 5/6, 3/5, 2/4, 1/3
    want = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(want, abs=1e-6)
    assert bleu(["a b c d"], ["w x y z"]) == pytest.approx(0.0)
    with pytest.raises(InvalidArgumentError):
        bleu(["a"], ["a", "b"])


def _stats(model, ex):
    batches = []
    for i in range(0, 32, 16):
        b = collate(ex[i:i + 16])
        b.pop("labels")
        batches.append(b)
    return attnprune.observe(model, batches, progress=False)


def test_restrict_mask_touches_only_its_kind(setup):
    _, _, ex, model = setup
    stats = _stats(model, ex)
    full = attnprune.make_mask(stats, 0.7)
    kinds = {s: stats.infos[s].kind for s in stats.sites}
    assert set(kinds.values()) == {"self", "causal", "cross"}
    for sel in (("self",), ("causal",), ("cross",)):
        m = restrict_mask(full, sel)
        assert m.sites == full.sites
        for s in m.sites:
            if kinds[s] in sel:
                assert torch.equal(m[s], full[s]) and not bool(m[s].all())
            else:
                assert bool(m[s].all())
        assert m.meta["selected_sparsity"] == pytest.approx(0.7, abs=0.05)
        assert 0 < m.meta["sparsity"] < m.meta["selected_sparsity"]
    with pytest.raises(InvalidArgumentError):
        restrict_mask(full, ("decoder",))

    # a cross-only mask leaves the encoder's output exactly dense and changes the decoder's
    b = collate(ex[:8])
    b.pop("labels")
    model.eval()
    with torch.no_grad():
        dense = model(**b)
        with attnprune.apply(model, restrict_mask(full, ("cross",)), beyond="dense"):
            masked = model(**b)
    assert torch.allclose(dense.encoder_last_hidden_state, masked.encoder_last_hidden_state, atol=1e-5)
    assert not torch.allclose(dense.logits, masked.logits, atol=1e-4)


def test_training_lowers_loss_and_cached_decoding_matches(setup):
    _, _, ex, _ = setup
    model = build_model(TINY, 80)
    first = train_model(model, ex, steps=1, lr=3e-3, warmup=1, batch_size=16, cfg=TINY, progress=False)
    later = train_model(model, ex, steps=25, lr=3e-3, warmup=2, batch_size=16, cfg=TINY, progress=False)
    assert later["final_loss"] < first["final_loss"]
    mask = restrict_mask(attnprune.make_mask(_stats(model, ex), 0.5), ("self", "causal", "cross"))
    src = [s for s, _ in ex[:6]]
    with attnprune.apply(model, mask, beyond="dense"):
        cached = greedy_decode(model, src, max_len=TINY.max_len, batch_size=4, cfg=TINY)
        full = greedy_decode(model, src, max_len=TINY.max_len, batch_size=4, cfg=TINY, use_cache=False)
    assert cached == full
    assert all(len(h) <= TINY.max_len - 1 for h in cached)


def _former_loop(model, examples, *, steps, lr, warmup, batch_size, cfg, seed, mask=None):
    """The experiment's own loop before it trained through ``attnprune.train`` (kept here as the
    reference): length-bucketed batches, AdamW betas 0.9/0.98 with decay on matrices, warm-up then
    cosine to 10%, mean label-smoothed cross-entropy, clipping at 1, ``torch.manual_seed(seed)``."""
    import contextlib
    import math

    import torch.nn.functional as F

    rng = random.Random(seed * 1_000_003)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    order = []
    for w in range(0, len(idx), batch_size * 50):
        chunk = sorted(idx[w:w + batch_size * 50], key=lambda i: (len(examples[i][1]), len(examples[i][0])))
        order += [chunk[b:b + batch_size] for b in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(order)
    assert steps <= len(order)  # one epoch is enough here
    decay = [p for p in model.parameters() if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8, fused=True)
    factor = (lambda s: (s + 1) / warmup if s < warmup else
              0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup)))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    ctx = attnprune.apply(model, mask, backend="reference", beyond="dense") if mask else contextlib.nullcontext()
    model.train()
    torch.manual_seed(seed)
    with ctx:
        for step in range(steps):
            batch = collate([examples[i] for i in order[step]], same_length=True)
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100,
                                   label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()


@pytest.mark.parametrize("masked", [False, True])
def test_training_through_the_one_loop_is_bitwise_the_former_loop(setup, masked):
    """The experiment's numbers do not move: same batches, RNG draws (dropout on), loss scaling and
    schedule, so every weight is bitwise equal after warm-up and decay steps, with and without a mask."""
    _, _, ex, _ = setup
    a, b = build_model(TINY, 80, seed=3), build_model(TINY, 80, seed=3)
    mask = restrict_mask(attnprune.make_mask(_stats(a, ex), 0.5), ("self", "cross")) if masked else None
    kw = dict(steps=5, lr=3e-3, warmup=2, batch_size=16, cfg=TINY, seed=7, mask=mask)
    train_model(a, ex, progress=False, **kw)
    _former_loop(b, ex, **kw)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_run_experiment_writes_results(tmp_path):
    torch.set_num_threads(1)
    res = run_experiment(TINY, tmp_path, pairs=_splits(), progress=False, log=None)
    for name in ("results.json", "results.md", "attention_patterns.png", "attention_offsets.png", "bleu.png",
                 "tokenizer.json", "stats.safetensors", "translations_dense.tsv"):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["runs"]) == 2 * 2 * 2 and data["retrain_steps_used"] == 2
    for r in data["runs"]:
        assert 0 <= r["bleu"] <= 100 and r["bleu_zero_shot"] is not None
        assert r["achieved_sparsity"] == pytest.approx(r["sparsity"], abs=0.05)
    assert data["dense"]["bleu"] == res["dense"]["bleu"]
    md = (tmp_path / "results.md").read_text()
    assert "cross-attention" in md and "encoder self-attention" in md and "decoder self-attention" not in md


def test_cli_with_data_file(tmp_path):
    torch.set_num_threads(1)
    f = tmp_path / "pairs.jsonl"
    with f.open("w") as fh:
        for split, recs in _splits().items():
            for r in recs:
                fh.write(json.dumps({"split": split, **r}) + "\n")
    out = tmp_path / "out"
    rc = cli.main(["--quiet", "translate", "--preset", "tiny", "--data-file", str(f), "--out", str(out),
                   "--train-steps", "3", "--retrain-steps", "1", "--sparsities", "0.9", "--types", "all",
                   "--policies", "layer", "--device", "cpu"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert [(r["type"], r["policy"]) for r in data["runs"]] == [("all", "layer")]
    assert cli.main(["translate", "--data-file", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    for png in out.glob("*.png"):
        png.unlink()
    assert cli.main(["translate", "--plots-only", "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} == {"attention_patterns.png", "attention_offsets.png", "bleu.png"}
    assert cli.main(["translate", "--plots-only", "--out", str(tmp_path / "empty")]) == 2
