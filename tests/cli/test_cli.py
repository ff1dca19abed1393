"""CLI observe / mask / info end to end on tiny models, bad input, random data, model loaders."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from cli_helpers import assert_clean_error, make_full, make_read_only, run, tiny_lm_folder
from attnprune.mask import PruneMask
from attnprune.sites import SiteInfo
from attnprune.stats import AttentionStats


@pytest.fixture()
def stats_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    st = AttentionStats([SiteInfo("l0", "causal", 2, 2), SiteInfo("l1", "self", 3, 1)],
                        model_name="toy", description="built in a test")
    tri = torch.ones(16, 16).tril()
    st.add("l0", torch.rand(2, 16, 16, generator=g) * tri, tri)
    st.add("l1", torch.rand(3, 16, 16, generator=g), torch.ones(16, 16))
    st.num_sequences = 1
    path = tmp_path / "stats.safetensors"
    st.save(path)
    return path


# ---- mask / info on stats built here -----------------------------------------------------------

def test_mask_and_info(capsys, tmp_path, stats_file):
    out_path = tmp_path / "out" / "mask.safetensors"
    rc, out, _ = run(capsys, "mask", stats_file, "--sparsity", "0.75", "--policy", "head", "-o", out_path)
    assert rc == 0 and "l0" in out and "l1" in out
    m = PruneMask.load(out_path)
    assert m.policy == "head" and m.sites == ["l0", "l1"]
    # l1: 3 heads x 256 entries, every head keeps 256 - floor(0.75 * 256) = 64
    assert m["l1"].sum((1, 2)).tolist() == [64, 64, 64]
    assert m.meta["sites"]["l0"]["attendable_entries"] == 2 * 136
    rc, out, _ = run(capsys, "info", out_path)
    assert rc == 0 and "policy head" in out and "0.7500" in out and "toy" in out
    rc, out, _ = run(capsys, "info", stats_file)
    assert rc == 0 and "granularity 1" in out and "built in a test" in out and "l1" in out


def test_mask_blocks(capsys, tmp_path, stats_file):
    out_path = tmp_path / "m.safetensors"
    rc, out, _ = run(capsys, "mask", stats_file, "--sparsity", "0.5", "--block", "4", "-o", out_path)
    assert rc == 0 and "4x4 blocks" in out
    m = PruneMask.load(out_path)
    assert m.block == 4 and m.site("l1").keep_blocks.shape == (3, 4, 4)


@pytest.mark.parametrize("args,words", [
    (["--sparsity", "1.5"], ["sparsity", "[0, 1)"]),
    (["--sparsity", "-0.1"], ["sparsity"]),
    (["--sparsity", "0.5", "--policy", "best"], ["policy", "'best'", "layer"]),
    (["--sparsity", "0.5", "--block", "0"], ["block"]),
])
def test_mask_bad_arguments(capsys, tmp_path, stats_file, args, words):
    out_path = tmp_path / "m.safetensors"
    rc, out, err = run(capsys, "mask", stats_file, *args, "-o", out_path)
    assert_clean_error(rc, err, *words)
    assert sorted(os.listdir(tmp_path)) == ["stats.safetensors"]


def test_bad_files(capsys, tmp_path, stats_file):
    out_path = tmp_path / "m.safetensors"
    rc, _, err = run(capsys, "mask", tmp_path / "missing.safetensors", "--sparsity", "0.5", "-o", out_path)
    assert_clean_error(rc, err, "missing.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(stats_file.read_bytes()[:200])
    rc, _, err = run(capsys, "mask", cut, "--sparsity", "0.5", "-o", out_path)
    assert_clean_error(rc, err, "cut.safetensors")
    rc, _, err = run(capsys, "info", cut)
    assert_clean_error(rc, err, "cut.safetensors")
    rc, _, err = run(capsys, "info", tmp_path / "nothing.safetensors")
    assert_clean_error(rc, err, "nothing.safetensors")
    assert not out_path.exists()


def test_existing_output_survives_failure(capsys, tmp_path, stats_file):
    out_path = tmp_path / "m.safetensors"
    assert run(capsys, "mask", stats_file, "--sparsity", "0.5", "-o", out_path)[0] == 0
    before = out_path.read_bytes()
    rc, _, err = run(capsys, "mask", stats_file, "--sparsity", "2", "-o", out_path)
    assert_clean_error(rc, err)
    assert out_path.read_bytes() == before


def test_real_process_exit_status(tmp_path):
    out_path = tmp_path / "m.safetensors"
    p = subprocess.run([sys.executable, "-m", "attnprune", "mask", str(tmp_path / "nope.safetensors"),
                        "--sparsity", "0.5", "-o", str(out_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert not out_path.exists()


# ---- observe end to end ----------------------------------------------------------------------

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

MODELS = {  # model -> (sites, kinds present, heads, kv heads)
    "tiny-gpt2": (2, {"causal"}, 4, 4),
    "tiny-llama": (2, {"causal"}, 4, 2),
    "tiny-bert": (2, {"self"}, 4, 4),
    "tiny-bart": (6, {"self", "causal", "cross"}, 4, 4),
    "tiny-sdpa": (2, {"causal"}, 4, 4),
}


@needs_hf
@pytest.mark.parametrize("model", list(MODELS))
def test_observe_mask_info_end_to_end(capsys, tmp_path, model):
    stats_path, mask_path = tmp_path / "s.safetensors", tmp_path / "m.safetensors"
    rc, out, err = run(capsys, "--quiet", "observe", "--model", model, "--num-seqs", 3, "--seq-len", 12,
                       "--batch-size", 2, "-o", stats_path)
    assert rc == 0, err
    assert "%|" not in err  # --quiet: no progress bar
    st = AttentionStats.load(stats_path)
    n, kinds, heads, kv = MODELS[model]
    assert len(st.sites) == n and {i.kind for i in st.infos.values()} == kinds
    assert {i.num_heads for i in st.infos.values()} == {heads}
    assert {i.num_kv_heads for i in st.infos.values()} == {kv}
    assert st.num_sequences == 3 and "random tokens" in st.description
    rc, out, err = run(capsys, "mask", stats_path, "--sparsity", "0.6", "-o", mask_path)
    assert rc == 0, err
    m = PruneMask.load(mask_path)
    m.check_model(st.infos)
    assert m.meta["data"]["description"] == st.description
    for site in m.sites:
        assert m[site].shape == (heads, 12, 12)
        assert m.meta["sites"][site]["sparsity"] <= 0.6 + 1e-9
        assert m[site].any(-1).all()  # every row keeps a key (all rows observed)
    rc, out, _ = run(capsys, "info", mask_path)
    assert rc == 0 and all(s in out for s in m.sites)


@needs_hf
def test_observe_padding_and_granularity(capsys, tmp_path):
    path = tmp_path / "s.safetensors"
    rc, _, err = run(capsys, "--quiet", "observe", "--model", "tiny-llama", "--num-seqs", 4, "--seq-len", 16,
                     "--min-len", 5, "--granularity", 4, "-o", path)
    assert rc == 0, err
    st = AttentionStats.load(path)
    assert st.granularity == 4
    rc, out, err = run(capsys, "mask", path, "--sparsity", "0.5", "--block", "8", "-o", tmp_path / "m.safetensors")
    assert rc == 0, err
    assert PruneMask.load(tmp_path / "m.safetensors").block == 8
    rc, _, err = run(capsys, "mask", path, "--sparsity", "0.5", "--block", "6", "-o", tmp_path / "x.safetensors")
    assert_clean_error(rc, err, "granularity 4")


@needs_hf
@pytest.mark.parametrize("args,words", [
    (["--model", "tiny-nothing"], ["model", "tiny-nothing", "tiny-gpt2"]),
    (["--model", "tiny-gpt2", "--seq-len", "4000"], ["4000"]),
    (["--model", "tiny-gpt2", "--num-seqs", "0"], ["num_seqs"]),
    (["--model", "tiny-gpt2", "--granularity", "0"], ["granularity"]),
    (["--model", "tiny-gpt2", "--data", "nosuchdata"], ["nosuchdata"]),
    (["--model", "tiny-sdpa", "--min-len", "3"], ["padding"]),
    (["--model", "hf:/nonexistent/dir"], ["/nonexistent/dir"]),
])
def test_observe_bad_input(capsys, tmp_path, args, words):
    path = tmp_path / "s.safetensors"
    # argparse keeps the last value of a repeated option, so ``args`` override these defaults
    rc, _, err = run(capsys, "--quiet", "observe", "--num-seqs", 2, "--seq-len", 8, *args, "-o", path)
    assert_clean_error(rc, err, *words)
    assert os.listdir(tmp_path) == []


@needs_hf
def test_observe_from_data_source(capsys, tmp_path):
    path = tmp_path / "s.safetensors"
    rc, _, err = run(capsys, "--quiet", "observe", "--model", "tiny-gpt2", "--data", "random:60", "--num-seqs", 3,
                     "--seq-len", 10, "-o", path)
    assert rc == 0, err
    st = AttentionStats.load(path)
    assert st.num_sequences == 3 and st.q_len(st.sites[0]) == 10 and "random" in st.description
    text = tmp_path / "t.txt"
    text.write_text("some words\n\nmore words\n\nand more\n")
    rc, _, err = run(capsys, "--quiet", "observe", "--model", "tiny-gpt2", "--data", f"text:{text}",
                     "-o", tmp_path / "x.safetensors")
    assert_clean_error(rc, err)
    assert not (tmp_path / "x.safetensors").exists()


@needs_hf
def test_hf_directory(capsys, tmp_path):
    from attnprune.models import load_model

    ref = load_model("tiny-llama")
    ref.model.save_pretrained(tmp_path / "llama")
    loaded = load_model(f"hf:{tmp_path / 'llama'}")
    assert loaded.task == "causal-lm" and loaded.vocab_size == ref.vocab_size and loaded.tokenizer is None
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, ref.model(input_ids=ids).logits)
    rc, _, err = run(capsys, "--quiet", "observe", "--model", f"hf:{tmp_path / 'llama'}", "--num-seqs", 2,
                     "--seq-len", 8, "-o", tmp_path / "s.safetensors")
    assert rc == 0, err
    assert len(AttentionStats.load(tmp_path / "s.safetensors").sites) == 2


@needs_hf
def test_tiny_models_are_deterministic():
    from attnprune.models import load_model

    a, b = load_model("tiny-gpt2").model, load_model("tiny-gpt2").model
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


# ---- random data -------------------------------------------------------------------------------

def test_random_tokens():
    from attnprune.data.random import RandomTokens

    data = RandomTokens(50, num_seqs=7, seq_len=10, batch_size=3, seed=1, min_len=4, pad_id=0)
    batches = list(data)
    assert len(batches) == len(data) == 3
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        lens = mask.sum(1)
        assert ((lens >= 4) & (lens <= 10)).all() and ids.shape[1] == int(lens.max())
        assert (mask[:, :-1] >= mask[:, 1:]).all()  # right padding
        assert (ids[mask == 0] == 0).all() and ((ids[mask == 1] >= 3) & (ids[mask == 1] < 50)).all()
    again = list(data)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))
    other = list(RandomTokens(50, num_seqs=7, seq_len=10, batch_size=3, seed=2, min_len=4))
    assert not torch.equal(other[0]["input_ids"], batches[0]["input_ids"])


# ---- outputs that cannot be written, unusable devices: one error before any long work -----------

@pytest.fixture()
def no_model_load(monkeypatch):
    """Loading a model (the first long step of observe / eval / finetune) fails the test."""
    import attnprune.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad argument was reported")

    monkeypatch.setattr(attnprune.models, "load_model", refuse)


def _command(name, out, stats_file):
    return {"mask": ["mask", stats_file, "--sparsity", "0.5", "-o", out / "m.safetensors"],
            "observe": ["observe", "--model", "tiny-gpt2", "-o", out / "s.safetensors"],
            "eval": ["eval", "--model", "tiny-gpt2", "--data", "random", "-o", out / "run"],
            "finetune": ["finetune", "--model", "tiny-gpt2", "--data", "random", "-o", out / "run"]}[name]


@pytest.mark.parametrize("fault", ["under-a-file", "read-only", "full"])
@pytest.mark.parametrize("command", ["mask", "observe", "eval", "finetune"])
def test_unwritable_output(capsys, tmp_path, monkeypatch, stats_file, no_model_load, command, fault):
    out = tmp_path / "out"
    if fault == "under-a-file":
        out.write_text("")
    else:
        out.mkdir()
        (make_read_only if fault == "read-only" else make_full)(monkeypatch, out)
    rc, _, err = run(capsys, "--quiet", *_command(command, out, stats_file))
    assert_clean_error(rc, err, str(out), {"under-a-file": "is a file", "read-only": "Read-only file system",
                                           "full": "No space left on device"}[fault])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["out", "stats.safetensors"]
    assert out.is_file() or os.listdir(out) == []


LATE_FAILURE = """
import resource, signal, sys
from attnprune.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@needs_hf
def test_write_failing_at_the_end_is_a_clean_error(tmp_path):
    # the real write (safetensors, in Rust) fails after the check passed: the disk filled meanwhile
    p = subprocess.run([sys.executable, "-c", LATE_FAILURE, "--quiet", "observe", "--model", "tiny-gpt2",
                        "--seq-len", "64", "-o", str(tmp_path / "s.safetensors")],
                       capture_output=True, text=True, timeout=300)
    assert_clean_error(p.returncode, p.stderr, "s.safetensors", "File too large")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("device", ["banana", "cuda"])
@pytest.mark.parametrize("command", ["observe", "finetune", "translate", "eval"])
def test_unusable_device(capsys, tmp_path, monkeypatch, no_model_load, command, device):
    import attnprune.translation

    if device == "cuda" and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU
    monkeypatch.setattr(attnprune.translation, "run_experiment", lambda *a, **k: pytest.fail("experiment ran"))
    argv = {"observe": ["observe", "--model", "tiny-gpt2", "-o", tmp_path / "s.safetensors"],
            "finetune": ["finetune", "--model", "tiny-gpt2", "--data", "random", "-o", tmp_path / "run"],
            "translate": ["translate", "-o", tmp_path / "run"],
            "eval": ["eval", "--model", "tiny-gpt2", "--data", "random", "-o", tmp_path / "run"]}[command]
    rc, _, err = run(capsys, *argv, "--device", device)
    assert_clean_error(rc, err, f"device {device!r}")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad,words", [(["--policies", "layer", "layr"], ["'layr'", "layer", "random"]),
                                       (["--sparsities", "0.5", "1.5"], ["sparsity", "1.5"]),
                                       (["--calib-split", "test"], ["'test'", "--calib-split"]),
                                       (["--calib-split", "nosuch"], ["nosuch", "calibration"])])
def test_eval_checks_the_sweep_first(capsys, tmp_path, no_model_load, bad, words):
    rc, _, err = run(capsys, "eval", "--model", "tiny-gpt2", "--data", "random", "-o", tmp_path / "run", *bad)
    assert_clean_error(rc, err, *words)
    assert os.listdir(tmp_path) == []  # no stats.safetensors, no folder


def test_quiet_after_every_subcommand():
    from attnprune.cli import build_parser

    argv = {"observe": ["--model", "m", "-o", "o"], "mask": ["s", "--sparsity", "0.5", "-o", "o"], "info": ["f"],
            "finetune": ["--model", "m", "--data", "d", "-o", "o"], "eval": [], "demo": [], "bench": [],
            "translate": ["-o", "o"], "generate": ["--model", "m", "--prompt-ids", "1"]}
    parser = build_parser()
    assert sorted(argv) == sorted(parser._subparsers._group_actions[0].choices)
    for command, rest in argv.items():
        assert parser.parse_args([command, *rest, "--quiet"]).quiet is True, command
        assert parser.parse_args(["--quiet", command, *rest]).quiet is True, command  # the old form
        assert parser.parse_args([command, *rest]).quiet is False, command


# ---- observe on a user's own text file -----------------------------------------------------------

@pytest.fixture(scope="module")
def word_lm(tmp_path_factory):
    return tiny_lm_folder(tmp_path_factory.mktemp("lm") / "lm")


@needs_hf
def test_observe_reads_the_whole_text_file(capsys, tmp_path, word_lm):
    text = tmp_path / "notes.txt"  # 20 paragraphs of 40 words: 800 tokens, 12 sequences of 64
    text.write_text("\n\n".join(" ".join(f"w{(7 * p + i) % 50}" for i in range(40)) for p in range(20)) + "\n")
    path = tmp_path / "s.safetensors"
    rc, out, err = run(capsys, "--quiet", "observe", "--model", f"hf:{word_lm}", "--data", f"text:{text}",
                       "--num-seqs", 16, "-o", path)
    assert rc == 0, err
    assert AttentionStats.load(path).num_sequences == 12  # not the 1 of the first 10% (2 paragraphs)
    note = [line for line in err.splitlines() if line.startswith("observe: using")]
    assert len(note) == 1 and "all of text:notes.txt" in note[0] and "20 records, 12 sequences" in note[0]
    assert "--num-seqs 16" in note[0]  # fewer than asked, and it says so
    rc, out, err = run(capsys, "--quiet", "observe", "--model", f"hf:{word_lm}", "--data", f"text:{text}",
                       "--split", "calibration", "--seq-len", 16, "-o", path)
    assert rc == 0, err
    assert "split 'calibration' of text:notes.txt: 2 records, 5 sequences" in err
    assert AttentionStats.load(path).num_sequences == 5

    one = tmp_path / "one.txt"
    one.write_text(" ".join(f"w{i % 50}" for i in range(100)) + "\n")  # one paragraph, 100 tokens
    rc, _, err = run(capsys, "--quiet", "observe", "--model", f"hf:{word_lm}", "--data", f"text:{one}",
                     "-o", path)
    assert rc == 0, err
    assert AttentionStats.load(path).num_sequences == 1
    rc, _, err = run(capsys, "--quiet", "observe", "--model", f"hf:{word_lm}", "--data", f"text:{one}",
                     "--split", "test", "-o", tmp_path / "t.safetensors")
    assert_clean_error(rc, err, "one.txt", "1 record cannot be cut into the 3 splits")
    assert not (tmp_path / "t.safetensors").exists()


def test_shared_options_after_and_before_every_subcommand_that_uses_them():
    from attnprune.cli import build_parser

    parser = build_parser()
    rest = {"observe": ["--model", "m", "-o", "o"], "mask": ["s", "--sparsity", "0.5", "-o", "o"],
            "finetune": ["--model", "m", "--data", "d", "-o", "o"], "eval": [], "demo": [], "bench": [],
            "translate": ["-o", "o"]}
    uses = {"device": ["observe", "finetune", "eval", "demo", "bench", "translate"],
            "seed": ["observe", "mask", "finetune", "eval", "demo", "translate"],
            "backend": ["finetune", "eval", "demo", "bench"]}
    values = {"device": "cuda:3", "seed": "7", "backend": "flex"}
    for option, commands in uses.items():
        want = int(values[option]) if option == "seed" else values[option]
        for command in commands:
            flag = f"--{option}"
            after = parser.parse_args([command, *rest[command], flag, values[option]])
            before = parser.parse_args([flag, values[option], command, *rest[command]])
            both = parser.parse_args([flag, "1" if option == "seed" else "x", command, *rest[command], flag,
                                      values[option]])
            assert getattr(after, option) == getattr(before, option) == getattr(both, option) == want, (option, command)
        for command in set(rest) - set(commands):  # given before a command that does not take it: an error
            with pytest.raises(SystemExit):
                parser.parse_args([f"--{option}", values[option], command, *rest[command]])
    # each command keeps its own default
    assert parser.parse_args(["finetune", *rest["finetune"]]).backend == "auto"
    assert parser.parse_args(["eval"]).backend == "auto" and parser.parse_args(["bench"]).backend == "auto"
    assert parser.parse_args(["demo"]).backend is None  # demo: its preset decides (reference; auto for gpu)
    assert parser.parse_args(["eval"]).seed == 0 and parser.parse_args(["demo"]).device is None


def test_one_list_syntax_commas_spaces_or_both():
    from attnprune.cli import build_parser

    parser = build_parser()
    for words in (["0.5,0.7,0.9"], ["0.5", "0.7", "0.9"], ["0.5,0.7", "0.9"]):
        assert parser.parse_args(["eval", "--sparsities", *words]).sparsities == (0.5, 0.7, 0.9)
        assert parser.parse_args(["bench", "--sparsities", *words]).sparsities == (0.5, 0.7, 0.9)
    assert parser.parse_args(["eval", "--blocks", "token,16", "32"]).blocks == (None, 16, 32)
    assert parser.parse_args(["eval", "--policies", "layer", "random,head"]).policies == ("layer", "random", "head")
    assert parser.parse_args(["bench", "--lengths", "4096", "8192,16384"]).lengths == (4096, 8192, 16384)
    assert parser.parse_args(["bench", "--causal", "0,1"]).causal == (False, True)
    assert parser.parse_args(["bench"]).head_dims == (64, 128)  # defaults stay tuples
    for argv in (["eval", "--sparsities", "0.5,x"], ["bench", "--lengths", "4k"], ["bench", "--causal", "2"],
                 ["eval", "--blocks", "-4"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


@pytest.mark.parametrize("args, words", [(["--kv-heads", "3"], ["--kv-heads", "divide", "16"]),
                                         (["--rounds", "0"], ["--rounds"]),
                                         (["--impls", "cudnn", "banana"], ["banana", "cudnn"])])
def test_kernel_bench_checks_its_arguments_before_the_machine(capsys, tmp_path, args, words):
    """Bad kernel-benchmark arguments are named with a non-zero exit on any machine (here, also without a
    GPU: they come before the check for one), and nothing is written."""
    rc, _, err = run(capsys, "bench", *args, "-o", str(tmp_path / "b.json"))
    assert_clean_error(rc, err, *words)
    assert os.listdir(tmp_path) == []


def test_out_of_memory_is_one_error_line_and_other_errors_still_raise(capsys, monkeypatch):
    """A command that runs out of device memory (torch's ``OutOfMemoryError``) exits 1 with one ``error:`` line
    naming the cause and what to lower, no traceback; any other unexpected exception is not swallowed."""
    import argparse

    from attnprune import cli

    def parser_raising(exc):
        p = argparse.ArgumentParser()
        p.set_defaults(func=lambda args: (_ for _ in ()).throw(exc))
        return p

    monkeypatch.setattr(cli, "build_parser", lambda: parser_raising(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB.\nmore detail")))
    rc = cli.main([])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: out of memory (CUDA out of memory. Tried to allocate 12.00 GiB.)")
    assert "--batch-size" in lines[0] and "--seq-len" in lines[0]
    monkeypatch.setattr(cli, "build_parser", lambda: parser_raising(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([])
