"""observe(score=...): value and influence scores against direct computations; score metadata in files."""

import torch

import tiny_models as T
from attnprune import observe
from attnprune.capture import intercept
from attnprune.observe import explicit_attention, lm_loss_sum
from attnprune.stats import AttentionStats


def _model64():
    return T.llama().double().eval()


def _loss(model, batch, site=None, h=0, i=0, j=0):
    """Summed NLL; with ``site``: entry (h, i, j) of that site removed and its row renormalised."""
    def handler(call):
        out, p = explicit_attention(call)
        if call.site != site:
            return out
        p = p.clone()
        p[0, h, i, j] = 0.0
        p[0, h, i] = p[0, h, i] / p[0, h, i].sum()
        v = call.v.repeat_interleave(p.shape[1] // call.v.shape[1], dim=1).to(p.dtype)
        return (p @ v).to(call.q.dtype)

    with torch.no_grad(), intercept(model, handler):
        out = model(**batch)
    return float(lm_loss_sum(out, (), batch))


def _entries_to_check(stats, probs):
    """``(site, head, query, key, predicted score)`` of the first two sites' entries worth a brute-force
    removal: probability in (0.01, 0.08) (first order holds) and a predicted change of at least 1e-4."""
    for site in stats.sites[:2]:
        pred, p = stats.mean(site), probs.mean(site)
        H, Q, K = pred.shape
        for h in range(H):
            for i in range(20, Q):
                for j in range(i + 1):
                    if 0.01 < float(p[h, i, j]) < 0.08 and abs(float(pred[h, i, j])) >= 1e-4:
                        yield site, h, i, j, float(pred[h, i, j])


def test_influence_matches_brute_force_removal():
    model = _model64()
    batch = T.batch([40])
    stats = observe(model, [batch], score="influence", progress=False)
    probs = observe(model, [batch], progress=False)
    assert stats.score == "influence"
    base = _loss(model, batch)
    checked = 0
    for site, h, i, j, want in _entries_to_check(stats, probs):
        actual = abs(_loss(model, batch, site, h, i, j) - base)
        # first order in p_j: the error is O(p_j) relative
        assert abs(actual - want) <= 0.25 * want + 1e-6, (site, h, i, j, actual, want)
        checked += 1
        if checked >= 12:
            break
    assert checked >= 4


def test_value_score_is_prob_times_value_norm():
    model = _model64()
    batch = T.batch([9])
    seen = {}

    def handler(call):
        seen[call.site] = (explicit_attention(call)[1], call.v)
        return None

    with torch.no_grad(), intercept(model, handler):
        model(**batch)
    stats = observe(model, [batch], score="value", progress=False)
    assert stats.score == "value"
    for site, (p, v) in seen.items():
        rep = p.shape[1] // v.shape[1]
        norm = v.norm(dim=-1).repeat_interleave(rep, dim=1)  # [1, H, Lk]
        want = (p * norm[:, :, None, :])[0]
        got = stats.mean(site).to(torch.float64)
        causal = torch.ones(want.shape[-2:], dtype=torch.bool).tril()
        torch.testing.assert_close(got[:, causal], want[:, causal], rtol=1e-5, atol=1e-6)


def test_score_metadata_round_trip(tmp_path):
    model = T.llama()
    batch = T.batch([8, 5])
    prob = observe(model, [batch], progress=False)
    prob.save(tmp_path / "p.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        assert '"score"' not in f.metadata()["attnprune"]  # probability files are unchanged
    assert AttentionStats.load(tmp_path / "p.safetensors").score == "prob"
    for score in ("value", "influence", "loss"):
        st = observe(model, [batch], score=score, progress=False)
        if score == "loss":  # signed: some entries help when removed; such files must load too
            assert any(bool((st.sum(site) < 0).any()) for site in st.sites)
        st.save(tmp_path / f"{score}.safetensors")
        back = AttentionStats.load(tmp_path / f"{score}.safetensors")
        assert back.score == score
        for site in st.sites:
            torch.testing.assert_close(back.sum(site), st.sum(site))
        try:
            prob + back
        except Exception as e:
            assert "score" in str(e)
        else:
            raise AssertionError("adding stats of different scores must fail")


def test_influence_leaves_model_untouched():
    model = T.llama()
    for p in model.parameters():
        p.requires_grad_(False)
    observe(model, [T.batch([6, 4])], score="influence", progress=False)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_influence_equals_probability_gradient_formula_on_padded_batch():
    """The output-gradient route (do . (o - v_j)) equals influence(p, dL/dp) with dL/dp taken through
    explicitly materialised probabilities, on a left/right-padded GQA batch."""
    from attnprune.observe import influence

    model = _model64()
    batch = T.batch([11, 7])  # padded batch of two sequences
    seen = []

    def handler(call):
        out, p = explicit_attention(call)
        seen.append((call.site, p))
        return out

    with torch.enable_grad(), intercept(model, handler):
        out = model(**batch)
        loss = lm_loss_sum(out, (), batch)
        # the graph must reach the first layer through the parameters' requires_grad (default True)
        grads = torch.autograd.grad(loss, [p for _, p in seen])
    stats = observe(model, [batch], score="influence", progress=False)
    am = batch["attention_mask"].bool()
    for (site, p), g in zip(seen, grads):
        want = influence(p.detach(), g)  # [B, H, L, L] in padded coordinates
        H, L = want.shape[1], want.shape[-1]
        # realign to each sequence's own positions and average over sequences, as observe counts
        acc = torch.zeros(H, L, L, dtype=torch.float64)
        cnt = torch.zeros(L, L, dtype=torch.float64)
        for b in range(want.shape[0]):
            idx = am[b].nonzero().flatten()
            n = len(idx)
            sub = want[b][:, idx][:, :, idx]
            tri = torch.ones(n, n, dtype=torch.bool).tril()
            acc[:, :n, :n] += torch.where(tri, sub, 0.0)
            cnt[:n, :n] += tri.double()
        got = stats.mean(site).to(torch.float64)
        n = got.shape[-1]
        ok = cnt[:n, :n] > 0
        torch.testing.assert_close(got[:, ok], (acc[:, :n, :n] / cnt[:n, :n].clamp_min(1))[:, ok],
                                   rtol=1e-7, atol=1e-9)


def test_loss_score_matches_signed_brute_force_removal():
    """score="loss" is the signed first-order change: removing the entry and renormalising its row
    changes the summed NLL by about the predicted amount, sign included."""
    model = _model64()
    batch = T.batch([40])
    stats = observe(model, [batch], score="loss", progress=False)
    absolute = observe(model, [batch], score="influence", progress=False)
    probs = observe(model, [batch], progress=False)
    assert stats.score == "loss"
    base = _loss(model, batch)
    signs, checked = set(), 0
    for site in stats.sites[:2]:
        torch.testing.assert_close(stats.mean(site).abs(), absolute.mean(site), rtol=1e-9, atol=1e-12, equal_nan=True)
    for site, h, i, j, want in _entries_to_check(stats, probs):
        actual = _loss(model, batch, site, h, i, j) - base
        # first order: the renormalisation factor p/(1-p) (< 9% here) plus the loss's curvature
        assert (actual > 0) == (want > 0), (site, h, i, j, actual, want)
        assert abs(actual - want) <= 0.4 * abs(want) + 1e-6, (site, h, i, j, actual, want)
        signs.add(actual > 0)
        checked += 1
        if checked >= 40 or (checked >= 12 and len(signs) == 2):
            break
    assert checked >= 8 and signs == {True, False}  # both signs seen and predicted
