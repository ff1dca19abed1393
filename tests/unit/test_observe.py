"""observe() against brute-force averages of explicitly computed attention probabilities."""

import math

import pytest
import torch

import tiny_models as tm
from attnprune.errors import (EmptyDatasetError, InvalidArgumentError, NoAttentionSitesError,
                              NonFiniteAttentionError)
from attnprune.observe import observe


class Brute:
    """Expected stats by explicit loops: sum / count per (block of) entries, observed extents."""

    def __init__(self, g):
        self.g, self.sum, self.cnt, self.ext = g, {}, {}, {}

    def add(self, site, probs, valid, pos=None):
        """probs: [B, H, Lq, Lk] explicit probabilities; valid(b, i, j) -> bool; pos(b, i): the
        position of token i of sequence b in its own sequence (default: i)."""
        pos = pos or (lambda b, i: i)
        B, H, Lq, Lk = probs.shape
        g = self.g
        s = self.sum.setdefault(site, {})
        c = self.cnt.setdefault(site, {})
        ql, kl = self.ext.get(site, (0, 0))
        for b in range(B):
            for i in range(Lq):
                for j in range(Lk):
                    if valid(b, i, j):
                        pi, pj = pos(b, i), pos(b, j)
                        key = (pi // g, pj // g)
                        s[key] = s.get(key, 0) + probs[b, :, i, j].double()
                        c[key] = c.get(key, 0) + 1
                        ql, kl = max(ql, pi + 1), max(kl, pj + 1)
        self.ext[site] = (ql, kl)

    def check(self, stats, sites):
        assert stats.sites == sites
        assert stats.granularity == self.g
        for site in sites:
            ql, kl = self.ext[site]
            assert (stats.q_len(site), stats.k_len(site)) == (ql, kl), site
            mean = stats.mean(site)
            g = self.g
            assert mean.shape[1:] == (math.ceil(ql / g), math.ceil(kl / g)), site
            for i in range(mean.shape[1]):
                for j in range(mean.shape[2]):
                    if (i, j) in self.cnt[site]:
                        want = self.sum[site][(i, j)] / self.cnt[site][(i, j)]
                        assert stats.count(site)[i, j] == self.cnt[site][(i, j)]
                        torch.testing.assert_close(mean[:, i, j].double(), want, atol=2e-6, rtol=1e-5)
                    else:
                        assert torch.isnan(mean[:, i, j]).all(), (site, i, j)


def _eager(model):
    model.set_attn_implementation("eager")
    return model


BATCHES = [([5, 3], 6), ([7, 2, 4], 7), ([4], 4)]


def _batches(left=False):
    out = []
    for k, (lens, total) in enumerate(BATCHES):
        b = tm.batch(lens, total, seed=k)
        if left:
            b = {key: v.flip(1) for key, v in b.items()}
        out.append(b)
    return out


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("name,left", [("bert", False), ("gpt2", False), ("llama", True)])
def test_decoder_and_encoder_models_match_eager_probabilities(name, left, g):
    model = _eager(getattr(tm, name)())
    batches = _batches(left)
    stats = observe(model, batches, granularity=g, progress=False)
    assert model.config._attn_implementation == "eager"  # restored
    causal = name != "bert"
    brute = Brute(g)
    sites = stats.sites
    with torch.no_grad():
        for b in batches:
            atts = model(**b, output_attentions=True).attentions
            am = b["attention_mask"]
            own = am.cumsum(1) - 1  # a left-padded token counts at its position in its own sequence
            for site, p in zip(sites, atts):
                brute.add(site, p, lambda bb, i, j: bool(am[bb, i] and am[bb, j] and (j <= i or not causal)),
                          lambda bb, i: int(own[bb, i]))
    brute.check(stats, sites)
    kinds = {stats.infos[s].kind for s in sites}
    assert kinds == ({"causal"} if causal else {"self"})
    if name == "llama":
        assert all(stats.infos[s].num_heads == 4 and stats.infos[s].num_kv_heads == 2 for s in sites)
    assert stats.num_sequences == 6


@pytest.mark.parametrize("name,g", [("bart", 1), ("bart", 2), ("t5", 1)])
def test_encoder_decoder_cross_attention(name, g):
    model = _eager(getattr(tm, name)())
    batches = []
    for k, (lens, total) in enumerate(BATCHES):
        b = tm.batch(lens, total, seed=k)
        d = tm.batch([max(1, n - 1) for n in lens], max(1, total - 2), seed=10 + k)
        b["decoder_input_ids"], b["decoder_attention_mask"] = d["input_ids"], d["attention_mask"]
        batches.append(b)
    stats = observe(model, batches, granularity=g, progress=False)
    assert [stats.infos[s].kind for s in stats.sites] == ["self", "causal", "cross"]
    brute = Brute(g)
    with torch.no_grad():
        for b in batches:
            o = model(**b, output_attentions=True)
            am, dm = b["attention_mask"], b["decoder_attention_mask"]
            brute.add(stats.sites[0], o.encoder_attentions[0], lambda bb, i, j: bool(am[bb, i] and am[bb, j]))
            brute.add(stats.sites[1], o.decoder_attentions[0],
                      lambda bb, i, j: bool(dm[bb, i] and dm[bb, j] and j <= i))
            brute.add(stats.sites[2], o.cross_attentions[0], lambda bb, i, j: bool(dm[bb, i] and am[bb, j]))
    brute.check(stats, stats.sites)


@pytest.mark.parametrize("g", [1, 4])
def test_nanogpt_sdpa_matches_manual_softmax(g):
    model = tm.nanogpt()
    ids = [torch.randint(3, tm.VOCAB, (2, n), generator=torch.Generator().manual_seed(n)) for n in (6, 9, 3)]
    stats = observe(model, ids, granularity=g, progress=False)
    assert stats.sites == ["blocks.0", "blocks.1"]
    brute = Brute(g)
    with torch.no_grad():
        for x in ids:
            h = model.wte(x) + model.wpe(torch.arange(x.shape[1]))
            for site, blk in zip(stats.sites, model.blocks):
                q, k, _ = blk.qkv_heads(h)
                s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
                s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
                brute.add(site, s.softmax(-1), lambda bb, i, j: j <= i)
                h = blk(h)
    brute.check(stats, stats.sites)


def test_multihead_attention_matches_its_own_weights():
    model = tm.mha()
    batches = _batches()
    stats = observe(model, batches, progress=False)
    assert stats.sites == ["attn.0", "attn.1"] and {i.kind for i in stats.infos.values()} == {"self"}
    brute = Brute(1)
    with torch.no_grad():
        for b in batches:
            x, am = model.emb(b["input_ids"]), b["attention_mask"]
            for site, a in zip(stats.sites, model.attn):
                y, w = a(x, x, x, key_padding_mask=~am.bool(), need_weights=True, average_attn_weights=False)
                brute.add(site, w, lambda bb, i, j: bool(am[bb, i] and am[bb, j]))
                x = x + y
    brute.check(stats, stats.sites)


def test_training_mode_restored_and_no_grad():
    model = tm.nanogpt().train()
    seen = []
    model.blocks[0].register_forward_hook(lambda m, a, o: seen.append((m.training, o.requires_grad)))
    observe(model, [torch.randint(0, tm.VOCAB, (1, 5))], progress=False)
    assert model.training and seen == [(False, False)]


def test_variable_lengths_grow_and_model_name():
    model = tm.gpt2()
    stats = observe(model, [tm.batch([3]), tm.batch([8, 2])], progress=False)
    assert stats.q_len("transformer.h.0.attn") == 8
    assert stats.count("transformer.h.0.attn")[0, 0] == 3
    assert stats.model_name.startswith("GPT2LMHeadModel(") and "heads=4" in stats.model_name


def test_only_padding_positions_are_excluded_from_counts():
    model = tm.bert()
    stats = observe(model, [tm.batch([4, 2], 6)], progress=False)
    c = stats.count("encoder.layer.0.attention.self")
    assert c.shape == (4, 4)  # trimmed to the longest real sequence
    assert c[:2, :2].eq(2).all() and c[2:, :].eq(1).all() and c[:, 2:].eq(1).all()


def test_empty_dataset():
    with pytest.raises(EmptyDatasetError):
        observe(tm.nanogpt(), [], progress=False)
    with pytest.raises(EmptyDatasetError):
        observe(tm.bert(), [tm.batch([0, 0], 3)], progress=False)


def test_non_finite_probabilities_name_the_site():
    model = tm.nanogpt()
    with torch.no_grad():
        model.blocks[1].qkv.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteAttentionError, match="blocks.1"):
        observe(model, [torch.randint(0, tm.VOCAB, (1, 4))], progress=False)


@pytest.mark.parametrize("cls", [tm.NoAttention, tm.ManualAttention])
def test_no_attention_site(cls):
    with pytest.raises(NoAttentionSitesError, match=cls.__name__):
        observe(cls(), [torch.randint(0, tm.VOCAB, (1, 4))], progress=False)


def test_bad_arguments():
    for g in (0, 2.0, -3):
        with pytest.raises(InvalidArgumentError):
            observe(tm.nanogpt(), [torch.zeros(1, 3, dtype=torch.long)], granularity=g, progress=False)
    with pytest.raises(InvalidArgumentError):
        observe(tm.nanogpt(), ["not a batch"], progress=False)


def test_half_precision_inputs_are_accumulated_in_float32():
    model = tm.nanogpt().to(torch.bfloat16)
    x = torch.randint(0, tm.VOCAB, (2, 5))
    stats = observe(model, [x], progress=False)
    m = stats.mean("blocks.0")
    assert m.dtype == torch.float32
    rows = torch.nansum(m * stats.count("blocks.0").float(), dim=-1) / 2  # per query: sum of probabilities
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)


def test_probabilities_in_float64_sum_to_one_per_query():
    model = tm.llama().double()
    stats = observe(model, [tm.batch([6, 4], 7, seed=3)], progress=False)
    for s in stats.sites:
        tot = stats.sum(s).sum(-1)  # [H, Lq]: summed over sequences
        nq = torch.tensor([2, 2, 2, 2, 1, 1], dtype=torch.float64)
        torch.testing.assert_close(tot, nq.expand_as(tot))
