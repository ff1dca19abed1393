"""Metrics (``evaluate.py``) against hand-computed values on toy models; the sweep (``experiments/sweep_loop.py``,
``experiments/sweep.py``) on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnprune.errors import EmptyDatasetError, InvalidArgumentError
from attnprune.evaluate import accuracy, perplexity, token_nll, train_classifier
from attnprune.experiments.sweep_loop import SweepConfig, check_disjoint, kept_mass, sweep


class Bigram(nn.Module):
    """Logits depend only on the current token: ``table[input_ids]`` -> [B, L, V]."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids]


# Rows are the logits after tokens 0, 1, 2; their softmaxes, by hand:
#   after 0: exp([0, ln2, ln3]) = [1, 2, 3] -> [1/6, 2/6, 3/6]
#   after 1: [0, 0, 0]                      -> [1/3, 1/3, 1/3]
#   after 2: exp([ln4, 0, 0]) = [4, 1, 1]   -> [4/6, 1/6, 1/6]
TABLE = [[0.0, math.log(2), math.log(3)], [0.0, 0.0, 0.0], [math.log(4), 0.0, 0.0]]


def test_perplexity_matches_hand_computation_with_padding_and_uneven_batches():
    model = Bigram(TABLE)
    b1 = {"input_ids": torch.tensor([[0, 2, 1, 1]]), "attention_mask": torch.tensor([[1, 1, 1, 1]])}
    # second batch: row 0 right-padded after 3 tokens, row 1 full
    b2 = {"input_ids": torch.tensor([[0, 1, 2, 0], [2, 0, 0, 1]]),
          "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    # b1: 0->2 (3/6), 2->1 (1/6), 1->1 (1/3)
    # b2 row 0: 0->1 (2/6), 1->2 (1/3); the pair 2->0 ends on padding and is not counted
    # b2 row 1: 2->0 (4/6), 0->0 (1/6), 0->1 (2/6)
    probs = [3 / 6, 1 / 6, 1 / 3, 2 / 6, 1 / 3, 4 / 6, 1 / 6, 2 / 6]
    nll = -sum(math.log(p) for p in probs) / len(probs)
    r = perplexity(model, [b1, b2], progress=False)
    assert r.count == 8
    assert r.nll == pytest.approx(nll, rel=1e-6)
    assert r.value == pytest.approx(math.exp(nll), rel=1e-6)
    # token-weighted, not the mean of per-batch perplexities
    per_batch = [perplexity(model, [b], progress=False).value for b in (b1, b2)]
    assert r.value != pytest.approx(sum(per_batch) / 2, rel=1e-3)


def test_perplexity_left_padding_labels_and_tensor_batches():
    model = Bigram(TABLE)
    # left padding: the first real token is not predicted (its predecessor is padding)
    b = {"input_ids": torch.tensor([[1, 1, 0, 2]]), "attention_mask": torch.tensor([[0, 0, 1, 1]])}
    r = perplexity(model, [b], progress=False)
    assert r.count == 1 and r.nll == pytest.approx(-math.log(3 / 6), rel=1e-6)
    # labels with -100 drop positions
    b = {"input_ids": torch.tensor([[0, 2, 1, 1]]), "labels": torch.tensor([[-100, 2, -100, 1]])}
    r = perplexity(model, [b], progress=False)
    assert r.count == 2 and r.nll == pytest.approx(-(math.log(3 / 6) + math.log(1 / 3)) / 2, rel=1e-6)
    # plain tensors are input ids
    r = perplexity(model, [torch.tensor([[1, 0]])], progress=False)
    assert r.count == 1 and r.value == pytest.approx(3.0, rel=1e-6)


def test_token_nll_and_errors():
    logits = torch.tensor(TABLE)[torch.tensor([[0, 2]])]
    s, n = token_nll(logits, torch.tensor([[0, 2]]))
    assert n == 1 and s == pytest.approx(-math.log(0.5), rel=1e-6)
    with pytest.raises(InvalidArgumentError):
        token_nll(logits[:, :1], torch.tensor([[0, 2]]))
    with pytest.raises(EmptyDatasetError):
        perplexity(Bigram(TABLE), [], progress=False)
    with pytest.raises(EmptyDatasetError):
        perplexity(Bigram(TABLE), [{"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 0]])}],
                   progress=False)


class FirstToken(nn.Module):
    """A classifier whose logits are ``table[input_ids[:, 0]]``."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids[:, 0]]


def test_accuracy_matches_hand_count():
    model = FirstToken([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])  # predicts 0, 1, 0 for first tokens 0, 1, 2
    b1 = {"input_ids": torch.tensor([[0, 9], [1, 9], [2, 9]]), "labels": torch.tensor([0, 0, 0])}  # 2 of 3
    b2 = {"input_ids": torch.tensor([[1, 9], [2, 9]]), "labels": torch.tensor([1, -100])}  # 1 of 1
    r = accuracy(model, [b1, b2], progress=False)
    assert (r.correct, r.count) == (3, 4)
    assert r.value == pytest.approx(0.75)
    with pytest.raises(InvalidArgumentError):
        accuracy(model, [{"input_ids": torch.tensor([[0]])}], progress=False)
    with pytest.raises(EmptyDatasetError):
        accuracy(model, [{"input_ids": torch.tensor([[0]]), "labels": torch.tensor([-100])}], progress=False)


class ToyEncoder(nn.Module):
    """Returns embeddings as hidden states; the label is carried by the tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(20, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.emb(input_ids)


def _toy_cls_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 2, (16,), generator=g)
        ids = torch.randint(0, 10, (16, 6), generator=g) + 10 * labels[:, None]  # class 1 uses tokens 10..19
        mask = torch.ones(16, 6, dtype=torch.long)
        mask[::3, 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_train_classifier_learns_a_separable_task_and_is_deterministic():
    train, test = _toy_cls_batches(8, 0), _toy_cls_batches(4, 1)
    clf = train_classifier(ToyEncoder(), train, hidden_size=8, progress=False)
    assert accuracy(clf, test, progress=False).value >= 0.95
    clf2 = train_classifier(ToyEncoder(), train, hidden_size=8, progress=False)
    assert torch.equal(clf.head.weight, clf2.head.weight)
    ft = train_classifier(ToyEncoder(), train, hidden_size=8, finetune=True, epochs=1, lr=1e-2, progress=False)
    assert accuracy(ft, test, progress=False).value >= 0.95
    with pytest.raises(EmptyDatasetError):
        train_classifier(ToyEncoder(), [], hidden_size=8, progress=False)


def test_check_disjoint():
    a = [{"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]])}]
    b = [{"input_ids": torch.tensor([[7, 8, 9]])}]
    check_disjoint(a, b)
    with pytest.raises(InvalidArgumentError, match="calibration and the test"):
        check_disjoint(a, [{"input_ids": torch.tensor([[4, 5, 6]])}])
    # padding is ignored when comparing
    c = [{"input_ids": torch.tensor([[1, 2, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}]
    with pytest.raises(InvalidArgumentError):
        check_disjoint(a, c)


class _FakeStats:
    granularity = 1

    def __init__(self, means):
        self._m = means
        self.sites = list(means)

    def mean(self, s):
        return self._m[s]


class _FakeMask:
    def __init__(self, keeps):
        self._k = keeps
        self.sites = list(keeps)

    def __getitem__(self, s):
        return self._k[s]


def test_kept_mass_by_hand():
    nan = float("nan")
    mean = torch.tensor([[[1.0, nan], [0.25, 0.75]]])  # one head, causal 2x2
    keep = torch.tensor([[[True, False], [False, True]]])
    km = kept_mass(_FakeStats({"a": mean}), _FakeMask({"a": keep}))
    assert km["a"] == pytest.approx((1.0 + 0.75) / 2.0)


# ------------------------------------------------------------------------------ sweep, tiny model

def _tiny_lm():
    from attnprune.models import load_model

    return load_model("tiny-llama")


def _random_batches(vocab, n, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (4, seq_len), generator=g)} for _ in range(n)]


def test_sweep_on_tiny_llama():
    lm = _tiny_lm()
    calib = _random_batches(lm.vocab_size, 3, 24, 0)
    test = _random_batches(lm.vocab_size, 2, 24, 1)
    cfg = SweepConfig(sparsities=(0.0, 0.5, 0.9), policies=("layer", "random"), blocks=(None, 8))
    result, stats, masks = sweep(lm.model, calib, test, config=cfg, model_name=lm.name, progress=False,
                                 keep_masks=True)
    dense = perplexity(lm.model, test, progress=False)
    assert result.dense["value"] == dense.value
    assert len(result.runs) == 2 * 2 * 3
    for r in result.runs:
        if r["sparsity"] == 0.0:
            # nothing pruned: the masked model reproduces the dense perplexity (float32 rounding only)
            assert r["achieved"] == 0.0
            assert r["value"] == pytest.approx(dense.value, rel=1e-5)
            assert all(v == pytest.approx(1.0) for v in r["kept_mass"].values())
        else:
            assert r["value"] != pytest.approx(dense.value, rel=1e-6)
            assert 0 < r["mean_kept_mass"] < 1
        if r["block"] is None:
            assert r["achieved"] == pytest.approx(r["sparsity"], abs=0.02)
        assert r["achieved_paper"] >= r["achieved"]
        # the run's value is what the mask gives when applied by hand
    from attnprune.apply import apply

    m = masks[("prob", None, "layer", 0.5)]
    with apply(lm.model, m):
        again = perplexity(lm.model, test, progress=False)
    r = next(r for r in result.runs if r["block"] is None and r["policy"] == "layer" and r["sparsity"] == 0.5)
    assert again.value == pytest.approx(r["value"], rel=1e-9)
    # layer keeps more attention mass than random at the same sparsity
    rl = next(r for r in result.runs if r["block"] is None and r["policy"] == "layer" and r["sparsity"] == 0.9)
    rr = next(r for r in result.runs if r["block"] is None and r["policy"] == "random" and r["sparsity"] == 0.9)
    assert rl["mean_kept_mass"] > rr["mean_kept_mass"]


def test_sweep_rejects_overlap_and_bad_config():
    lm = _tiny_lm()
    calib = _random_batches(lm.vocab_size, 2, 16, 0)
    with pytest.raises(InvalidArgumentError, match="calibration and the test"):
        sweep(lm.model, calib, calib[:1], config=SweepConfig(sparsities=(0.5,), policies=("layer",), blocks=(None,)),
              progress=False)
    with pytest.raises(InvalidArgumentError):
        SweepConfig(sparsities=(1.0,))
    with pytest.raises(InvalidArgumentError):
        sweep(lm.model, calib, calib, task="translation", progress=False)


def test_sweep_classification_on_tiny_bert():
    from attnprune.models import load_model

    lm = load_model("tiny-bert")
    g = torch.Generator().manual_seed(0)

    def batches(n):
        out = []
        for _ in range(n):
            ids = torch.randint(3, lm.vocab_size, (8, 12), generator=g)
            am = torch.ones(8, 12, dtype=torch.long)
            am[1::2, 9:] = 0
            out.append({"input_ids": ids, "attention_mask": am, "labels": torch.randint(0, 2, (8,), generator=g)})
        return out

    train, calib, test = batches(4), batches(2), batches(2)
    enc = getattr(lm.model, "base_model", lm.model)
    clf = train_classifier(enc, train, progress=False)
    cfg = SweepConfig(sparsities=(0.0, 0.8), policies=("layer", "random"), blocks=(None,))
    result, _, _ = sweep(clf, calib, test, task="classification", config=cfg, progress=False)
    assert result.metric == "accuracy" and result.dense["count"] == 16
    for r in result.runs:
        assert 0.0 <= r["value"] <= 1.0
        if r["sparsity"] == 0.0:
            assert r["value"] == result.dense["value"]


def test_eval_cli_on_tiny_model(tmp_path, capsys):
    import json

    from attnprune.cli import main

    out = tmp_path / "ev"
    rc = main(["--quiet", "eval", "--model", "tiny-gpt2", "--data", "random", "--seq-len", "16", "--calib", "4",
               "--test", "2", "--batch-size", "2", "--sparsities", "0.5", "--policies", "layer", "random",
               "--blocks", "token", "--no-heatmaps", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and str(out / "results.json") in printed
    doc = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in doc["runs"]] == ["layer", "random"]
    assert doc["data"]["calibration_sequences"] == 4 and doc["data"]["test_sequences"] == 2
    assert (out / "stats.safetensors").is_file() and not list(out.glob("attention_heatmaps*.png"))
    # stats reused: same numbers without observing again
    rc = main(["--quiet", "eval", "--model", "tiny-gpt2", "--data", "random", "--seq-len", "16", "--calib", "4",
               "--test", "2", "--batch-size", "2", "--sparsities", "0.5", "--policies", "layer", "--blocks", "token",
               "--no-heatmaps", "--stats", str(out / "stats.safetensors"), "-o", str(tmp_path / "ev2")])
    assert rc == 0
    doc2 = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert "observe_s" not in doc2["timings"]
    assert doc2["runs"][0]["value"] == doc["runs"][0]["value"]
    # bad input: one error line, status 2
    assert main(["--quiet", "eval", "--model", "tiny-gpt2", "--data", "random", "--sparsities", "1.5",
                 "-o", str(tmp_path / "bad")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["--quiet", "eval", "--model", "tiny-gpt2", "--data", "random", "--device", "nonsense",
                 "-o", str(tmp_path / "bad2")]) == 2
    assert "device 'nonsense' is not usable" in capsys.readouterr().err and not (tmp_path / "bad2").exists()


def test_classification_subsets_are_seeded_random_not_prefixes():
    from attnprune.experiments.sweep import _majority, _subset

    recs = [{"label": int(i >= 50), "i": i} for i in range(100)]  # labels sorted, like an id-ordered split
    a = _subset(recs, 20, 0)
    assert a == _subset(recs, 20, 0) and a != _subset(recs, 20, 1)
    idx = [r["i"] for r in a]
    assert idx == sorted(idx) and len(set(idx)) == 20 and idx != list(range(20))
    assert 0.2 < sum(r["label"] for r in a) / 20 < 0.8
    assert _subset(recs, None, 0) == recs and _subset(recs, 500, 0) == recs
    assert _majority(recs[:10]) == 1.0 and _majority(recs) == 0.5


def test_sweep_scores_block_observation_and_extra_test_set():
    """Scores x blocks with block-granularity observation; an extra test set measured dense and masked;
    kept mass from block stats equals kept mass from token stats for the same block mask."""
    from attnprune import observe
    from attnprune.evaluate import perplexity
    from attnprune.policies import make_mask

    lm = _tiny_lm()
    calib = _random_batches(lm.vocab_size, 2, 32, 0)
    test = _random_batches(lm.vocab_size, 1, 32, 1)
    other = _random_batches(lm.vocab_size, 1, 32, 2)
    cfg = SweepConfig(sparsities=(0.0, 0.6), policies=("layer", "streaming"), blocks=(8, 16),
                      scores=("prob", "influence"))
    seen = []
    res, stats, masks = sweep(lm.model, calib, test, config=cfg, progress=False, keep_masks=True,
                              extra_tests={"other": other}, on_stats=seen.append)
    assert [s.score for s in seen] == ["prob", "influence"] and stats.score == "prob"
    assert all(s.granularity == 8 for s in seen)  # gcd of the blocks, no token-level stats
    assert {(r["score"], r["block"], r["policy"], r["sparsity"]) for r in res.runs} == {
        (sc, b, p, sp) for sc in cfg.scores for b in cfg.blocks for p in cfg.policies for sp in cfg.sparsities
        if sc == "prob" or p != "streaming"}  # the data-free policy runs once
    want = perplexity(lm.model, other, progress=False).value
    assert res.extra_dense["other"]["value"] == pytest.approx(want, rel=1e-6)
    for r in res.runs:
        assert r["extra"]["other"]["count"] == res.extra_dense["other"]["count"]
        if r["sparsity"] == 0.0:  # keeps everything: the dense numbers on both sets
            assert r["value"] == pytest.approx(res.dense["value"], rel=1e-5)
            assert r["extra"]["other"]["value"] == pytest.approx(want, rel=1e-5)
    pruned = [r for r in res.runs if r["achieved"] > 0]  # (streaming at 16-blocks keeps all 3 blocks)
    assert all(r["extra"]["other"]["value"] != pytest.approx(want, rel=1e-6) for r in pruned)
    # kept mass from the block stats == from token stats (same block mask)
    tok = observe(lm.model, calib, progress=False)
    m = make_mask(stats, 0.6, policy="layer", block=16)
    a, b = kept_mass(stats, m), kept_mass(tok, m)
    assert a.keys() == b.keys()
    for site in a:
        assert a[site] == pytest.approx(b[site], rel=1e-5)


def test_sweep_rejects_stats_of_another_score():
    from attnprune import observe

    lm = _tiny_lm()
    calib = _random_batches(lm.vocab_size, 1, 16, 0)
    test = _random_batches(lm.vocab_size, 1, 16, 1)
    st = observe(lm.model, calib, progress=False, score="value")
    with pytest.raises(InvalidArgumentError, match="score"):
        sweep(lm.model, calib, test, config=SweepConfig(sparsities=(0.5,), policies=("layer",), blocks=(None,)),
              stats=st, progress=False)
