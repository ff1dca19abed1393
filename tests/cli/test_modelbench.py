"""attnprune bench --model: the whole-model benchmark runs on CPU at tiny sizes; bad input is a clean error."""

import json

import pytest

from cli_helpers import assert_clean_error, run


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-bert"])  # the names --model takes everywhere
def test_model_bench_cpu(capsys, tmp_path, arch):
    js, md = tmp_path / "mb.json", tmp_path / "mb.md"
    rc, out, err = run(capsys, "bench", "--model", arch, "--lengths", "32", "--sparsities", "0.5",
                       "--backend", "reference", "--block", "8", "--warmup", "0", "--reps", "1",
                       "-o", js, "--markdown", md)
    assert rc == 0, err
    data = json.loads(js.read_text())
    rows = data["rows"]
    variants = {(r["mode"], r["variant"]) for r in rows}
    for mode in ("prefill", "train"):
        for v in ("dense", "no-attention", "masked"):
            assert (mode, v) in variants
    for r in rows:
        assert r["ms"] is not None and r["ms"] > 0
        assert r["peak_mib"] is None  # CPU: memory n/a
    masked = [r for r in rows if r["variant"] == "masked"]
    assert all(r["backend"] == "reference" and r["sparsity"] == 0.5 for r in masked)
    assert all(0 < r["achieved_sparsity"] < 1 for r in masked)
    dense = [r for r in rows if r["variant"] == "dense"]
    assert all(r["attention_share"] is not None for r in dense)
    table = md.read_text()
    assert "| dense |" in table and "| masked |" in table and "n/a" in table


@pytest.mark.parametrize("argv, words", [
    (["--model", "no-such-arch"], ["no-such-arch", "smollm2", "tiny-llama"]),
    (["--model", "tiny-llama", "--sparsities", "1.5"], ["sparsity"]),
    (["--model", "tiny-llama", "--sparsities", "-0.1"], ["sparsity"]),
    (["--model", "tiny-llama", "--lengths", "0"], ["lengths"]),
    (["--model", "tiny-llama", "--model-modes", "banana"], ["banana", "prefill", "train", "decode"]),
    (["--model", "tiny-llama", "--model-modes", "decode", "--new-tokens", "0"], ["--new-tokens", "0"]),
    (["--model", "tiny-llama", "--model-modes", "decode", "--new-tokens", "1"], ["--new-tokens", "1"]),
    (["--model", "tiny-bert", "--model-modes", "decode"], ["decode", "causal", "tiny-bert"]),
    (["--model", "tiny-bert", "--model-modes", "prefill,decode"], ["decode", "causal", "tiny-bert"]),
    (["--model", "tiny-llama", "--model-modes", "decode", "--batch", "0"], ["--batch"]),
    (["--model", "tiny-llama", "--model-modes", "decode", "--decode-variants", "dense,turbo"],
     ["--decode-variants", "turbo", "pruned-graph"]),
    (["--model", "tiny-llama", "--decode-variants", "dense"], ["--decode-variants", "--model-modes decode"]),
    (["--model", "tiny-llama", "--model-modes", "decode", "--plot", "p.png"], ["--plot", "prefill"]),
    (["--plot", "p.png"], ["--plot", "--model"]),
    (["--model", "tiny-llama", "--compile", "banana"], ["banana", "reduce-overhead", "aot_eager"]),
    (["--model", "tiny-llama", "--model-modes", "decode", "--compile", "default"], ["--compile", "decode"]),
    (["--compile", "default"], ["--compile", "--model"]),
])
def test_model_bench_bad_input(capsys, tmp_path, monkeypatch, argv, words):
    from attnprune.bench import decode, model as mb  # (decode imported before model's build_model is patched)

    def no_model(*a, **k):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(mb, "build_model", no_model)
    monkeypatch.setattr(decode, "build_model", no_model)
    rc, _, err = run(capsys, "bench", *argv, "--backend", "reference", "--block", "8",
                     "-o", tmp_path / "x.json")
    assert_clean_error(rc, err, *words)
    assert not (tmp_path / "x.json").exists()


def _decode_rows(capsys, tmp_path, *extra):
    js, md = tmp_path / "dec.json", tmp_path / "dec.md"
    rc, out, err = run(capsys, "bench", "--model", "tiny-llama", "--model-modes", "decode", "--lengths", "32",
                       "--batch", "2", "--new-tokens", "4", "--block", "8", "--backend", "reference",
                       "--warmup", "0", "--reps", "1", "-o", js, "--markdown", md, *extra)
    assert rc == 0, err
    return json.loads(js.read_text()), md.read_text()


def test_model_bench_decode_cpu(capsys, tmp_path):
    data, table = _decode_rows(capsys, tmp_path, "--sparsities", "0.5")
    rows = data["rows"]
    assert data["new_tokens"] == 4 and data["modes"] == ["decode"]
    assert [r["variant"] for r in rows] == ["dense", "masked", "pruned"]
    for r in rows:
        assert r["mode"] == "decode" and r["arch"] == "tiny-llama"
        assert (r["context"], r["batch"], r["new_tokens"]) == (32, 2, 4)
        # decode tok/s: positive, or no figure when the host's noise swallowed the decode time (not a timing claim)
        assert (r["decode_tok_s"] is not None and r["decode_tok_s"] > 0) or "timer noise" in r["note"]
        assert r["bare_step_ms"] > 0 and r["prefill_ms"] > 0
        assert r["peak_mib_over_weights"] is None and r["steady_mib_over_weights"] is None  # CPU: n/a
    dense, masked, pruned = rows
    assert dense["mask"] is None and dense["backend"] == "sdpa" and dense["kv_share"] is None
    assert masked["backend"] == pruned["backend"] == "reference"
    assert masked["mask"] == pruned["mask"] == "sink+band" and masked["sparsity"] == 0.5
    assert 0 < pruned["achieved_sparsity"] < 1
    kv = pruned["kv_bytes"]
    assert 0 < kv["held"] < kv["dense"] and pruned["kv_share"] == kv["share"] < 1
    assert pruned["same_tokens_as_masked"] is True  # greedy: PrunedKVCache gives the stock cache's tokens
    assert masked["same_tokens_as_masked"] is None and masked["kv_bytes"] is None
    assert "| dense |" in table and "| pruned |" in table and "decode tok/s" in table and "| yes |" in table


def test_model_bench_decode_variants_pick_rows(capsys, tmp_path):
    """--decode-variants: only those rows, in the benchmark's order (pruned-graph runs eagerly on the CPU)."""
    data, _ = _decode_rows(capsys, tmp_path, "--sparsities", "0.5", "--decode-variants", "pruned-graph,dense")
    assert [r["variant"] for r in data["rows"]] == ["dense", "pruned-graph"]
    assert all(r["error"] is None for r in data["rows"])


def test_model_bench_decode_next_to_prefill_and_batches(capsys, tmp_path):
    data, table = _decode_rows(capsys, tmp_path, "--sparsities", "0.5,0.9", "--model-modes", "prefill,decode",
                               "--batch", "1,2")
    rows = data["rows"]
    dec = [r for r in rows if r["mode"] == "decode"]
    pre = [r for r in rows if r["mode"] == "prefill"]
    assert {r["batch"] for r in dec} == {r["batch"] for r in pre} == {1, 2}
    for b in (1, 2):  # one dense row per (context, batch), masked + pruned per sparsity
        mine = [(r["variant"], r["sparsity"]) for r in dec if r["batch"] == b]
        assert mine == [("dense", None), ("masked", 0.5), ("pruned", 0.5), ("masked", 0.9), ("pruned", 0.9)]
    pruned = {r["sparsity"]: r for r in dec if r["variant"] == "pruned" and r["batch"] == 2}
    assert pruned[0.9]["kv_share"] < pruned[0.5]["kv_share"] < 1
    assert all(r["same_tokens_as_masked"] for r in dec if r["variant"] == "pruned")
    assert "| prefill |" in table and "| pruned |" in table


def test_model_bench_decode_real_mask(capsys, tmp_path):
    """--masks: decoded at the mask's calibrated length less the new tokens and the bare steps, next to a
    sink + band mask of its sparsity."""
    import torch

    from attnprune.bench import decode
    from attnprune.bench.model import build_model, discover_sites

    model, cfg, _ = build_model("tiny-llama", 64, torch.device("cpu"), torch.float32)
    length = 32 + 4 + decode.BARE_STEPS
    mask, _ = decode.band_mask(discover_sites(model, cfg.vocab_size, torch.device("cpu")), length, 8, 0.7)
    f = tmp_path / "real.mask"
    mask.save(f)
    data, table = _decode_rows(capsys, tmp_path, "--sparsities", "0.5", "--lengths", "16", "--masks", f)
    rows = data["rows"]
    real = [r for r in rows if r["mask"] == "real"]
    assert [r["variant"] for r in real] == ["masked", "pruned"] and {r["context"] for r in real} == {32}
    assert real[1]["same_tokens_as_masked"] is True and real[1]["kv_share"] < 1
    near = [r for r in rows if r["note"].startswith("density of real")]
    assert [r["variant"] for r in near] == ["masked", "pruned"] and near[0]["mask"] == "sink+band"
    assert {r["context"] for r in rows} == {16, 32}
    assert [r["variant"] for r in rows if r["context"] == 32 and r["mask"] is None] == ["dense"]


def test_model_bench_decode_mask_too_short(capsys, tmp_path):
    import torch

    from attnprune.bench import decode
    from attnprune.bench.model import build_model, discover_sites

    model, cfg, _ = build_model("tiny-llama", 64, torch.device("cpu"), torch.float32)
    mask, _ = decode.band_mask(discover_sites(model, cfg.vocab_size, torch.device("cpu")), 16, 8, 0.5)
    f = tmp_path / "short.mask"
    mask.save(f)
    rc, _, err = run(capsys, "bench", "--model", "tiny-llama", "--model-modes", "decode", "--masks", f,
                     "--new-tokens", "4", "--backend", "reference", "-o", tmp_path / "x.json")
    assert_clean_error(rc, err, "short", "16", "--new-tokens")
    assert not (tmp_path / "x.json").exists()


def test_old_arch_names_still_work():
    from attnprune.bench.model import ARCH_ONLY, ARCHS, resolve_arch
    from attnprune.models import model_names

    # every benchmark name is a --model name of the other commands, but the architecture-only ones
    assert set(ARCHS) - ARCH_ONLY <= set(model_names()) and not ARCH_ONLY & set(model_names())
    for name in ARCHS:
        assert resolve_arch(f"{name}-arch") == name == resolve_arch(name)


def test_model_bench_plot(capsys, tmp_path):
    """--plot draws the speed-up against sparsity; the same picture from the JSON file's rows."""
    from attnprune.bench.plot import plot_speed
    from attnprune.errors import InvalidArgumentError

    js, png = tmp_path / "mb.json", tmp_path / "speed.png"
    rc, out, err = run(capsys, "bench", "--model", "tiny-llama", "--lengths", "32", "--sparsities", "0.5", "0.75",
                       "--backend", "reference", "--block", "8", "--warmup", "0", "--reps", "1", "-o", js,
                       "--plot", png)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out
    rows = json.loads(js.read_text())["rows"]
    again = plot_speed(rows, tmp_path / "again.png")
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InvalidArgumentError, match="decode"):
        plot_speed([dict(r, mode="decode") for r in rows], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_no_attention_stand_in_still_backpropagates_into_q_and_k():
    """The no-attention bound's stand-in returns the values (repeated over query-head groups) and, when
    gradients are recorded, gives q and k (zero) gradients, so a training step still runs the backward of
    their projections as with any real attention; without gradients nothing is added."""
    import torch

    from attnprune.bench.model import _no_attention
    from attnprune.capture import AttentionCall

    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 6, 8, requires_grad=True) for _ in range(2))
    call = AttentionCall.__new__(AttentionCall)
    call.q, call.k, call.v = q, k, v
    out = _no_attention(call)
    assert torch.equal(out.detach(), v.detach().repeat_interleave(2, dim=1))
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and not q.grad.any() and not k.grad.any()
    assert torch.equal(v.grad, torch.full_like(v, 2.0))  # each kv head feeds two query heads
    with torch.no_grad():
        assert _no_attention(call).grad_fn is None


def test_model_bench_compiled_rows(capsys, tmp_path, monkeypatch):
    """``--compile MODE``: every prefill / train row (dense, no-attention, masked) runs its own compiled graph
    (counted here through a recording dynamo backend standing in for the mode), the rows and the file say
    so; a row that fails to compile would have no time (its error is its note)."""
    import torch

    from attnprune.bench import compiled

    graphs = []
    inner = torch._dynamo.lookup_backend("aot_eager")

    def recording(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    monkeypatch.setitem(compiled.COMPILE_MODES, "aot_eager", {"backend": recording})
    js, md = tmp_path / "c.json", tmp_path / "c.md"
    rc, out, err = run(capsys, "bench", "--model", "tiny-llama", "--lengths", "32", "--sparsities", "0.5",
                       "--backend", "reference", "--block", "8", "--warmup", "0", "--reps", "1",
                       "--compile", "aot_eager", "-o", js, "--markdown", md)
    assert rc == 0, err
    data = json.loads(js.read_text())
    assert data["compile"] == "aot_eager"
    rows = data["rows"]
    assert len(rows) == 6 and all(r["compile"] == "aot_eager" and r["ms"] > 0 for r in rows)
    assert all(r["note"].startswith("compiled in ") for r in rows)
    assert len(graphs) >= 6  # one graph (at least) per row: nothing ran eagerly in place of the compiled model
    assert "| prefill (compiled, aot_eager) | masked |" in md.read_text()
