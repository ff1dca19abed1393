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
    (["--model", "tiny-llama", "--model-modes", "decode"], ["decode"]),
])
def test_model_bench_bad_input(capsys, tmp_path, argv, words):
    rc, _, err = run(capsys, "bench", *argv, "--backend", "reference", "--block", "8",
                     "-o", tmp_path / "x.json")
    assert_clean_error(rc, err, *words)
    assert not (tmp_path / "x.json").exists()


def test_old_arch_names_still_work():
    from attnprune.bench.model import ARCHS, resolve_arch
    from attnprune.models import model_names

    assert set(ARCHS) <= set(model_names())  # every benchmark name is a --model name of the other commands
    for name in ARCHS:
        assert resolve_arch(f"{name}-arch") == name == resolve_arch(name)
