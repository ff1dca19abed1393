"""Tests of attnprune.train: exact resume, data order, masking during training, DDP, bad input.

Everything runs on tiny random models on the CPU. Transformers is imported inside tests only, so
the DDP worker processes (which import this module) start fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from attnprune.errors import AttnPruneError, CorruptFileError, InvalidArgumentError
from attnprune.train import (BatchPlan, CheckpointError, TrainConfig, collate, finetune,
                             latest_checkpoint, list_checkpoints, lr_factor, resolve_backend)

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; one thread is faster and steadier on a busy CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gpt2(dropout: float = 0.1):
    """Tiny GPT-2 (dropout on, so resuming must restore the RNG), fixed seed."""
    from attnprune.models import load_model

    model = load_model("tiny-gpt2").model
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    return model


def _sdpa():
    from attnprune.models import load_model

    return load_model("tiny-sdpa").model


def _lm_data(n: int = 48, seed: int = 1, ragged: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 17, (1,), generator=g)) if ragged else 16
        out.append(torch.randint(3, VOCAB, (length,), generator=g))
    return out


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _without_key_bias(w: dict) -> dict:
    """Weights with the key bias zeroed (tiny-sdpa's ``qkv.bias[32:64]``, BART's ``k_proj.bias``).
    Its true gradient is 0 (softmax ignores a per-row constant), so AdamW turns float round-off
    there into full-size steps: across summation orders it is noise, not a difference in training."""
    w = dict(w)
    for k in w:
        if k.endswith("qkv.bias"):
            w[k] = w[k].clone()
            w[k][32:64] = 0
        elif k.endswith("k_proj.bias"):
            w[k] = torch.zeros_like(w[k])
    return w


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"


def _training_diff(a: dict, b: dict, start: dict) -> dict[str, float]:
    """Per tensor: max |a - b| over the largest update max |a - start| (key bias left out)."""
    assert a.keys() == b.keys() == start.keys()
    a, b, start = _without_key_bias(a), _without_key_bias(b), _without_key_bias(start)
    out = {}
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float64, f"{k}: compare float64 runs"
        update = float((a[k] - start[k]).abs().max())
        diff = float((a[k] - b[k]).abs().max())
        out[k] = diff / update if update else (0.0 if diff == 0 else float("inf"))
    return out


def _assert_same_training(a: dict, b: dict, start: dict):
    """``a`` and ``b``: float64 weights after two trainings from ``start`` that are equal in exact
    arithmetic but sum in different orders (other batch splits, ranks, attention code).

    AdamW divides each gradient entry by its own size, so an entry's update inherits that entry's
    *relative* round-off, ``eps * kappa`` (kappa: the entry's condition, its summed magnitudes over
    its value; about 1e4 here). In float32 that is ~1e-3 of the update, not far from a real bug's
    effect, so these runs are float64. Per tensor the allowed difference is ``sqrt(eps64)``
    (1.5e-8) of its largest update: room for kappa up to 7e7, while a wrong accumulation (loss
    averaged per micro-batch, a micro-batch left out) moves every tensor by 0.25 to 1.9 of its
    update (measured on the grad-accumulation test).
    """
    rel = torch.finfo(torch.float64).eps ** 0.5
    bad = {k: f"{r:.3g}" for k, r in _training_diff(a, b, start).items() if not r <= rel}
    assert not bad, f"weights differ (max |a - b| / largest update, allowed {rel:.2g}): {bad}"


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=8, lr=3e-3, batch_size=3, grad_accum=2, warmup_steps=2, checkpoint_every=3,
                progress=False, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def _metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ data plan

def test_plan_is_split_invariant_and_disjoint():
    """A step's examples do not depend on how the global batch is split over ranks/accumulation."""
    n = 50
    one = BatchPlan(n, batch_size=8, grad_accum=1, world_size=1, seed=3)
    acc = BatchPlan(n, batch_size=2, grad_accum=2, world_size=2, seed=3)
    for step in range(one.steps_per_epoch * 2 + 1):  # crosses two epoch boundaries
        whole = one.micro_batches(step, 0)[0]
        parts = [acc.micro_batches(step, r) for r in range(2)]
        flat = [i for r in range(2) for mb in parts[r] for i in mb]
        assert sorted(flat) == sorted(whole)
        assert len(set(flat)) == len(flat)  # ranks' shards are disjoint
    # epochs differ in order but each covers distinct examples
    e0 = [i for s in range(one.steps_per_epoch) for i in one.micro_batches(s, 0)[0]]
    e1 = [i for s in range(one.steps_per_epoch, 2 * one.steps_per_epoch) for i in one.micro_batches(s, 0)[0]]
    assert len(set(e0)) == len(e0) and e0 != e1


def test_length_bucketed_order_groups_lengths_and_splits_like_random():
    """Each epoch: disjoint global batches of similar lengths (sorted within 50-batch windows), the
    batch order shuffled, the same examples per step however a global batch is split."""
    lengths = [int(x) for x in torch.randint(1, 200, (1000,), generator=torch.Generator().manual_seed(0))]
    key = lambda i: (lengths[i],)
    one = BatchPlan(1000, batch_size=4, grad_accum=1, world_size=1, seed=3, order="length-bucketed", sort_key=key)
    acc = BatchPlan(1000, batch_size=1, grad_accum=2, world_size=2, seed=3, order="length-bucketed", sort_key=key)
    batches = [one.micro_batches(s, 0)[0] for s in range(one.steps_per_epoch)]
    flat = [i for b in batches for i in b]
    assert one.steps_per_epoch == 250 and len(set(flat)) == len(flat) == 1000
    # within a batch the lengths come from a 200-example sorted window: a small spread
    spread = sum(lengths[max(b, key=key)] - lengths[min(b, key=key)] for b in batches) / len(batches)
    assert spread < 5 < 50  # a random batch of 4 from 1..199 spreads ~120
    assert batches != sorted(batches, key=lambda b: lengths[b[0]])  # batches are shuffled, not sorted
    for step in (0, 7, 249, 250):
        parts = [i for r in range(2) for mb in acc.micro_batches(step, r) for i in mb]
        assert sorted(parts) == sorted(one.micro_batches(step, 0)[0])
    assert one.order(1).tolist() != one.order(0).tolist()
    with pytest.raises(InvalidArgumentError, match="lengths"):
        BatchPlan(10, batch_size=2, grad_accum=1, world_size=1, seed=0, order="length-bucketed").order(0)


def test_seq2seq_collate_pads_to_a_multiple_and_masks_labels():
    from attnprune.train import Seq2Seq

    ex = [{"input_ids": [5, 6, 7], "decoder_input_ids": [1, 8], "labels": [8, 2]},
          {"input_ids": [9], "decoder_input_ids": [1, 4, 4, 4], "labels": [4, 4, 4, 2]}]
    b = collate(ex, [0, 1], Seq2Seq(pad_multiple=4), pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert b["decoder_input_ids"].tolist() == [[1, 8, 0, 0], [1, 4, 4, 4]]
    assert b["labels"].tolist() == [[8, 2, -100, -100], [4, 4, 4, 2]]
    same = collate(ex, [0], Seq2Seq(pad_multiple=3, same_length=True))
    assert same["input_ids"].shape == same["labels"].shape == (1, 3)
    with pytest.raises(InvalidArgumentError, match="differ in length"):
        collate([{"input_ids": [1], "decoder_input_ids": [1], "labels": [1, 2]}], [0], "seq2seq")


def _seq2seq_data(n: int = 24) -> list[dict]:
    """Copy tasks: the target is the source's first tokens, shifted into another id range."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        src = torch.randint(4, 20, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        tgt = src[:int(torch.randint(2, 10, (1,), generator=g))] + 20
        out.append({"input_ids": src, "decoder_input_ids": torch.cat([torch.tensor([1]), tgt]),
                    "labels": torch.cat([tgt, torch.tensor([2])])})
    return out


def test_seq2seq_grad_accum_equals_big_batch_and_learns(tmp_path):
    """The label-smoothed seq2seq task (a per-micro-batch mean, weighted by its targets) gives the
    update of one big batch, and training lowers its loss."""
    from attnprune.models import load_model
    from attnprune.train import Seq2Seq

    task = Seq2Seq(label_smoothing=0.1)
    data = _seq2seq_data()
    a, b = load_model("tiny-bart").model.double(), load_model("tiny-bart").model.double()
    for mod in [*a.modules(), *b.modules()]:  # BART's dropout is functional, its rate an attribute
        if isinstance(getattr(mod, "dropout", None), float):
            mod.dropout = 0.0
    start = _weights(a)
    finetune(a, data, task=task, out_dir=None, config=_cfg(steps=3, batch_size=6, grad_accum=1))
    finetune(b, data, task=task, out_dir=None, config=_cfg(steps=3, batch_size=2, grad_accum=3))
    _assert_same_training(_weights(a), _weights(b), start)
    res = finetune(load_model("tiny-bart").model, data, task=task, out_dir=tmp_path / "learn",
                   config=_cfg(steps=30, batch_size=8, grad_accum=1, lr=3e-3, order="length-bucketed"))
    assert res.history[-1].loss < 0.7 * res.history[0].loss
    assert json.loads((tmp_path / "learn" / "summary.json").read_text())["task"] == "seq2seq"


def test_in_memory_run_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = finetune(_sdpa(), _lm_data(), out_dir=None, config=_cfg(steps=2))
    assert res.finished and res.checkpoint is None and res.metrics is None and res.weights is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="out_dir"):
        finetune(_sdpa(), _lm_data(), out_dir=None, config=_cfg(), resume=True)


def test_collate_pads_and_masks_labels():
    ex = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    b = collate(ex, [0, 1], "causal-lm", pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, 9, -100]]
    c = collate([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}], [0, 1], "classification")
    assert c["labels"].tolist() == [1, 0]


def test_lr_schedule():
    cfg = TrainConfig(steps=10, warmup_steps=2, schedule="linear")
    assert [round(lr_factor(s, cfg), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    floor = TrainConfig(steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    # cosine from 1 after the warm-up to 0.1 at the last step: halfway 0.1 + 0.9 / 2
    assert [round(lr_factor(s, floor), 4) for s in (0, 2, 6, 10, 12)] == [0.5, 1.0, 0.55, 0.1, 0.1]
    assert lr_factor(5, TrainConfig(steps=10, schedule="constant", min_lr_ratio=0.3)) == 1.0


# ------------------------------------------------------------------------------------ resume

def test_interrupted_run_resumes_exactly(tmp_path):
    """Stop after 5 of 8 steps, resume: same final weights, same batches, metrics once per step."""
    model = _gpt2()
    seen_full: list[list[int]] = []
    res = finetune(model, _lm_data(), out_dir=tmp_path / "full", config=_cfg(),
                   callbacks=[lambda i: seen_full.append(i.example_ids)])
    assert res.finished and res.step == 8
    full = _weights(model)

    model2 = _gpt2()
    seen: list[list[int]] = []
    r1 = finetune(model2, _lm_data(), out_dir=tmp_path / "cut", config=_cfg(max_steps_this_run=5),
                  callbacks=[lambda i: seen.append(i.example_ids)])
    assert not r1.finished and r1.step == 5 and r1.weights is None
    assert r1.checkpoint.name == "step-00000005.pt"
    torch.manual_seed(1234)  # as in a fresh process: the RNG state must come from the checkpoint
    model3 = _gpt2()  # a fresh process would rebuild the model: its weights come from the checkpoint
    r2 = finetune(model3, _lm_data(), out_dir=tmp_path / "cut", config=_cfg(), resume=True,
                  callbacks=[lambda i: seen.append(i.example_ids)])
    assert r2.finished and r2.step == 8 and len(r2.history) == 3
    assert seen == seen_full
    _assert_same_weights(_weights(model3), full)
    assert _metric_steps(tmp_path / "cut") == list(range(1, 9))
    losses_full = [json.loads(x)["loss"] for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    losses_cut = [json.loads(x)["loss"] for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert losses_full == losses_cut
    assert not all(torch.equal(a, b) for a, b in zip(_weights(_gpt2()).values(), full.values()))


class _Crash(Exception):
    pass


def test_crash_resumes_from_last_checkpoint(tmp_path):
    """A crash at step 5 (checkpoints every 2) loses step 5; resuming redoes it from step 4."""
    model = _gpt2()
    seen_full: list[list[int]] = []
    finetune(model, _lm_data(ragged=True), out_dir=tmp_path / "full", config=_cfg(checkpoint_every=2),
             callbacks=[lambda i: seen_full.append(i.example_ids)])
    full = _weights(model)

    def crash(info):
        if info.step == 5:
            raise _Crash

    with pytest.raises(_Crash):
        finetune(_gpt2(), _lm_data(ragged=True), out_dir=tmp_path / "cut",
                 config=_cfg(checkpoint_every=2), callbacks=[crash])
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [2, 4]  # keep_checkpoints=2
    assert _metric_steps(tmp_path / "cut") == [1, 2, 3, 4, 5]
    seen: list[list[int]] = []
    torch.manual_seed(1234)  # as in a fresh process
    model2 = _gpt2()
    finetune(model2, _lm_data(ragged=True), out_dir=tmp_path / "cut", config=_cfg(checkpoint_every=2),
             resume=True, callbacks=[lambda i: seen.append(i.example_ids)])
    assert seen == seen_full[4:]  # steps 5..8: nothing lost, nothing repeated
    _assert_same_weights(_weights(model2), full)
    assert _metric_steps(tmp_path / "cut") == list(range(1, 9))  # the lost step-5 line was dropped
    assert (tmp_path / "cut/model.safetensors").is_file()
    assert json.loads((tmp_path / "cut/summary.json").read_text())["finished"] is True


def test_training_reduces_loss_and_saves_loadable_weights(tmp_path):
    from safetensors.torch import load_model

    model = _sdpa()
    data = [torch.arange(3, 19) % 11 + 3 for _ in range(16)]  # one repeated sequence: learnable
    res = finetune(model, data, out_dir=tmp_path, config=TrainConfig(steps=30, lr=1e-2, batch_size=4,
                                                                      progress=False))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    fresh = _sdpa()
    load_model(fresh, str(res.weights))
    _assert_same_weights(_weights(fresh), _weights(model))


def test_classification(tmp_path):
    from attnprune.models import load_model

    model = load_model("tiny-bert").model
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(32):
        label = i % 2
        ids = torch.randint(10, 60, (8,), generator=g) + 60 * label  # token range gives the label away
        data.append({"input_ids": ids, "labels": label})
    finetune(model, data, task="classification", out_dir=tmp_path,
             config=TrainConfig(steps=25, lr=5e-3, batch_size=8, progress=False))
    model.eval()
    batch = collate(data, list(range(32)), "classification")
    with torch.no_grad():
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    assert (pred == batch["labels"]).float().mean() >= 0.9


# ------------------------------------------------------------------------------------ bad input

def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        finetune(_sdpa(), _lm_data(), out_dir=tmp_path, config=_cfg(), resume=True)
    assert issubclass(CheckpointError, AttnPruneError)


def test_existing_run_needs_resume_and_same_settings(tmp_path):
    finetune(_sdpa(), _lm_data(), out_dir=tmp_path, config=_cfg(max_steps_this_run=2))
    with pytest.raises(CheckpointError, match="--resume"):
        finetune(_sdpa(), _lm_data(), out_dir=tmp_path, config=_cfg())
    with pytest.raises(CheckpointError, match="lr"):
        finetune(_sdpa(), _lm_data(), out_dir=tmp_path, config=_cfg(lr=1e-4), resume=True)
    with pytest.raises(CheckpointError, match="different model"):
        finetune(_gpt2(), _lm_data(), out_dir=tmp_path, config=_cfg(), resume=True)


def test_checkpoint_from_before_the_order_and_floor_settings_resumes(tmp_path):
    """A checkpoint whose config lacks ``order`` / ``min_lr_ratio`` (written before they existed)
    resumes a run with their defaults, and is refused for other values."""
    finetune(_sdpa(), _lm_data(), out_dir=tmp_path, config=_cfg(max_steps_this_run=3))
    ck = latest_checkpoint(tmp_path)
    state = torch.load(ck, weights_only=True)
    del state["config"]["order"], state["config"]["min_lr_ratio"]
    torch.save(state, ck)
    with pytest.raises(CheckpointError, match="order"):
        finetune(_sdpa(), _lm_data(), out_dir=tmp_path, config=_cfg(order="length-bucketed"), resume=True)
    with pytest.raises(CheckpointError, match="min_lr_ratio"):
        finetune(_sdpa(), _lm_data(), out_dir=tmp_path, config=_cfg(min_lr_ratio=0.1), resume=True)
    assert finetune(_sdpa(), _lm_data(), out_dir=tmp_path, config=_cfg(), resume=True).finished


def test_corrupt_checkpoint(tmp_path):
    finetune(_sdpa(), _lm_data(), out_dir=tmp_path, config=_cfg(max_steps_this_run=3))
    ck = latest_checkpoint(tmp_path)
    ck.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(CorruptFileError, match="cannot be read"):
        finetune(_sdpa(), _lm_data(), out_dir=tmp_path, config=_cfg(), resume=True)


def test_bad_config_and_data(tmp_path):
    with pytest.raises(InvalidArgumentError, match="lr"):
        finetune(_sdpa(), _lm_data(), out_dir=tmp_path, config=TrainConfig(lr=-1.0))
    with pytest.raises(InvalidArgumentError, match="fewer than one global batch"):
        finetune(_sdpa(), _lm_data(n=4), out_dir=tmp_path, config=TrainConfig(batch_size=8))
    with pytest.raises(InvalidArgumentError, match="task"):
        finetune(_sdpa(), _lm_data(), out_dir=tmp_path, task="summarize")
    with pytest.raises(InvalidArgumentError, match="seq2seq examples must be dicts"):
        finetune(_sdpa(), _lm_data(), out_dir=tmp_path, task="seq2seq")
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------ the mask

def _observed_mask(model, data, sparsity: float, policy: str = "layer"):
    from attnprune.observe import observe
    from attnprune.policies import make_mask

    stats = observe(model, [torch.stack(data[:8])], progress=False)
    return make_mask(stats, sparsity, policy=policy)


def _diagonal_mask(model, length: int = 16):
    """Every query keeps only its own key: any cross-position dependence must vanish."""
    from attnprune.mask import PruneMask, SiteMask
    from attnprune.observe import observe

    stats = observe(model, [torch.randint(3, VOCAB, (2, length))], progress=False)
    eye = torch.eye(length, dtype=torch.bool)
    sites = [SiteMask(info, length, length, keep=eye.expand(info.num_heads, -1, -1).clone())
             for info in stats.infos.values()]
    return PruneMask(sites, {"model": {"name": "diagonal-test"}})


def test_mask_attached_during_training_prunes_attention(tmp_path):
    """Inside the training loop, pruned keys get no gradient (exactly zero); after it, they do."""
    model = _gpt2()
    mask = _diagonal_mask(model)
    ids = torch.randint(3, VOCAB, (2, 16))
    checked = []

    def grad_to_other_positions() -> torch.Tensor:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        (g,) = torch.autograd.grad(logits[:, -1].sum(), embeds)  # no .grad on parameters
        return g[:, :-1].abs().max()

    def check(info):
        assert model.training  # a real training-mode forward, dropout on
        checked.append(float(grad_to_other_positions()))

    finetune(model, _lm_data(), mask=mask, out_dir=tmp_path, callbacks=[check],
             config=_cfg(steps=2, checkpoint_every=0))
    assert checked == [0.0, 0.0]
    assert float(grad_to_other_positions()) > 0  # the mask was detached at the end


class _HandMaskedBlock(torch.nn.Module):
    """Same parameters as tiny-sdpa's block, attention computed by an explicit masked softmax."""

    keep: torch.Tensor  # bool [H, L, L]

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        allowed = self.keep[:, :n, :n] & torch.ones(n, n, dtype=torch.bool).tril()
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + self.proj((probs @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


def test_masked_finetune_equals_hand_masked_training(tmp_path):
    """Fine-tuning with the mask attached gives the weights of training a hand-masked model."""
    data = _lm_data(ragged=True)
    model = _sdpa().double()
    start = _weights(model)
    mask = _observed_mask(model, [d[:6] for d in data], 0.6)
    assert mask.sparsity > 0.4
    # calibrated on 6 tokens: longer sequences use the 6x6 mask top-left and run dense beyond it
    cfg = _cfg(steps=4, checkpoint_every=0, beyond="dense")
    hand, dense = _sdpa().double(), _sdpa().double()
    for blk, site in zip(hand.blocks, mask.sites):
        blk.__class__ = _HandMaskedBlock
        keep = torch.ones(4, 16, 16, dtype=torch.bool)
        keep[:, :6, :6] = mask[site]
        blk.keep = keep
    finetune(model, data, mask=mask, out_dir=tmp_path / "ap", config=cfg)
    finetune(hand, data, out_dir=tmp_path / "hand", config=cfg)
    finetune(dense, data, out_dir=tmp_path / "dense", config=cfg)
    _assert_same_training(_weights(model), _weights(hand), start)
    assert max(_training_diff(_weights(model), _weights(dense), start).values()) > 0.1  # the mask mattered


def test_mask_for_another_model_and_resume_with_other_mask(tmp_path):
    from attnprune.errors import MaskMismatchError

    data = _lm_data()
    gpt2_mask = _diagonal_mask(_gpt2())
    with pytest.raises(MaskMismatchError):
        finetune(_sdpa(), data, mask=gpt2_mask, out_dir=tmp_path, config=_cfg())
    assert not tmp_path.joinpath("checkpoints").exists() and not tmp_path.joinpath("metrics.jsonl").exists()
    model = _sdpa()
    finetune(model, data, mask=_observed_mask(model, data, 0.5), out_dir=tmp_path, config=_cfg(max_steps_this_run=2))
    with pytest.raises(CheckpointError, match="different mask"):
        finetune(_sdpa(), data, mask=_observed_mask(model, data, 0.7), out_dir=tmp_path, config=_cfg(), resume=True)
    with pytest.raises(CheckpointError, match="mask"):
        finetune(_sdpa(), data, out_dir=tmp_path, config=_cfg(), resume=True)


# ------------------------------------------------------------------------------------ DDP

def _ddp_worker(rank: int, world: int, init_file: str, mask_path: str, out: str, stop_at: int):
    import torch.distributed as dist

    from attnprune.mask import PruneMask

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        mask = PruneMask.load(mask_path)
        seen = []
        cfg = _cfg(batch_size=2, grad_accum=2, beyond="dense", max_steps_this_run=stop_at)
        finetune(_sdpa().double(), _lm_data(ragged=True), mask=mask, out_dir=out, config=cfg,
                 callbacks=[lambda i: seen.append(i.example_ids)])
        torch.manual_seed(99 + rank)
        cfg.max_steps_this_run = None
        finetune(_sdpa().double(), _lm_data(ragged=True), mask=mask, out_dir=out, config=cfg,
                 resume=True, callbacks=[lambda i: seen.append(i.example_ids)])
        Path(out, f"seen{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path):
    """Two gloo ranks (batch 2 each, accumulation 2, interrupted and resumed) = one process, batch 4."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    data = _lm_data(ragged=True)
    model = _sdpa().double()
    start = _weights(model)
    mask = _observed_mask(model, [d[:6] for d in data], 0.6)
    mask.save(tmp_path / "mask.safetensors")
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "mask.safetensors"), str(out), 3),
             nprocs=2, join=True)

    seen_single = []
    finetune(model, data, mask=mask, out_dir=tmp_path / "single",
             config=_cfg(batch_size=4, grad_accum=2, beyond="dense"),
             callbacks=[lambda i: seen_single.append(i.example_ids)])
    ddp = load_file(str(out / "model.safetensors"))
    _assert_same_training({k: ddp[k] for k in start}, _weights(model), start)
    seen = [json.loads((out / f"seen{r}.json").read_text()) for r in range(2)]
    for step in range(8):
        a, b = seen[0][step], seen[1][step]
        assert not set(a) & set(b)  # disjoint shards
        assert sorted(a + b) == sorted(seen_single[step])  # together: the single process's batch
    assert _metric_steps(out) == list(range(1, 9))  # rank 0 alone logged, once per step
    assert [s for s, _ in list_checkpoints(out)] == [6, 8]


# ------------------------------------------------------------------------------------ CLI

def test_cli_stop_resume_and_errors(tmp_path, capsys):
    from safetensors.torch import load_file

    from attnprune.cli import main

    base = ["--quiet", "finetune", "--model", "tiny-sdpa", "--data", "random", "--seq-len", "16",
            "--max-examples", "24", "--steps", "4", "--lr", "1e-3", "--batch-size", "4"]
    assert main(["--quiet", "observe", "--model", "tiny-sdpa", "--num-seqs", "4", "--seq-len", "16",
                 "-o", str(tmp_path / "stats.safetensors")]) == 0
    assert main(["mask", str(tmp_path / "stats.safetensors"), "--sparsity", "0.7",
                 "-o", str(tmp_path / "mask.safetensors")]) == 0
    mask = ["--mask", str(tmp_path / "mask.safetensors")]
    assert main(base + mask + ["--out", str(tmp_path / "full")]) == 0
    assert main(base + mask + ["--out", str(tmp_path / "cut"), "--max-steps-this-run", "2"]) == 0
    assert not (tmp_path / "cut/model.safetensors").exists()
    assert main(base + mask + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    a, b = load_file(str(tmp_path / "full/model.safetensors")), load_file(str(tmp_path / "cut/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "cut/summary.json").read_text())
    assert summary["masked"] and summary["model"] == "tiny-sdpa" and summary["finished"]
    assert summary["backend"] == "reference"  # --backend auto on the CPU
    capsys.readouterr()

    def fails(argv, match):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and match in err and "Traceback" not in err

    fails(base + ["--mask", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")], "no such mask file")
    fails(base + mask + ["--out", str(tmp_path / "none"), "--resume"], "no checkpoint")
    fails(base + mask + ["--out", str(tmp_path / "full")], "already holds checkpoints")
    (tmp_path / "bad.safetensors").write_bytes(b"not a mask")
    fails(base + ["--mask", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "y")], "corrupt")
    other = ["--quiet", "finetune", "--model", "tiny-llama", "--data", "random", "--seq-len", "16",
             "--steps", "2", "--out", str(tmp_path / "z")]
    fails(other + mask, "mask does not know")
    assert not (tmp_path / "z").exists()


def test_grad_accum_equals_big_batch_and_bf16_runs(tmp_path):
    """Batch 2 x accumulation 3 = batch 6 (same examples per step, loss over all their tokens)."""
    data = _lm_data(ragged=True)
    a, b = _sdpa().double(), _sdpa().double()
    start = _weights(a)
    finetune(a, data, out_dir=tmp_path / "a", config=_cfg(steps=3, batch_size=6, grad_accum=1))
    finetune(b, data, out_dir=tmp_path / "b", config=_cfg(steps=3, batch_size=2, grad_accum=3))
    _assert_same_training(_weights(a), _weights(b), start)
    c = _sdpa()
    finetune(c, data, out_dir=tmp_path / "c", config=_cfg(steps=1, batch_size=2, grad_accum=1, precision="bf16"))
    rows = [json.loads(x) for x in (tmp_path / "c/metrics.jsonl").read_text().splitlines()]
    assert all(r["bf16"] for r in rows) and all(r["loss"] == r["loss"] for r in rows)


def test_too_long_example_anywhere_fails_before_training(tmp_path):
    from attnprune.errors import LengthError

    data = _lm_data()
    model = _sdpa()
    mask = _observed_mask(model, data, 0.5)  # calibrated on 16 tokens
    data[-1] = torch.randint(3, VOCAB, (20,))  # one long example, not in the first batch
    with pytest.raises(LengthError):
        finetune(model, data, mask=mask, out_dir=tmp_path, config=_cfg(shuffle=False))
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_extend_trains_past_the_calibrated_length(tmp_path):
    """beyond="extend": examples longer than the 16-token calibration train (the mask's sinks and
    band continued); an unknown value is refused up front."""
    data = _lm_data()
    model = _sdpa()
    mask = _observed_mask(model, data, 0.5)
    data[-1] = torch.randint(3, VOCAB, (20,))
    result = finetune(model, data, mask=mask, out_dir=tmp_path, config=_cfg(steps=2, beyond="extend", shuffle=False))
    assert result.step == 2 and result.finished
    with pytest.raises(InvalidArgumentError, match="beyond"):
        finetune(model, data, mask=mask, out_dir=tmp_path / "bad", config=_cfg(beyond="nope"))


def test_backend_auto_resolution(monkeypatch):
    """auto: flash on an sm90+ GPU where FA4 imports, else triton on a GPU where Triton imports, else reference."""
    from attnprune import backends

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert TrainConfig().backend == "auto"
    assert resolve_backend("auto", cpu) == "reference" and resolve_backend("flex", cpu) == "flex"
    # a GPU without FlashAttention-4 (or older than sm90): triton where it imports, else reference
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    have = {"triton": True, "flash_attn.cute": False}
    monkeypatch.setattr(backends, "_importable", lambda name: have[name])
    assert resolve_backend("auto", gpu) == "triton"
    have["flash_attn.cute"] = True
    assert resolve_backend("auto", gpu) == "flash"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_backend("auto", gpu) == "triton"
    have["triton"] = False
    assert resolve_backend("auto", gpu) == "reference"
    assert resolve_backend("auto", cpu) == "reference"
