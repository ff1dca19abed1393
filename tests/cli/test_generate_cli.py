"""``attnprune generate`` end to end on a tiny model: pruned and stock caches agree, extend goes past
the calibration, bad input is one clear error before any generation."""

import pytest

from cli_helpers import assert_clean_error, run, tiny_lm_folder


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    from attnprune.cli import main

    d = tmp_path_factory.mktemp("gen")
    assert main(["--quiet", "observe", "--model", "tiny-llama", "--data", "random", "--num-seqs", "4",
                 "--seq-len", "24", "-o", str(d / "st.safetensors")]) == 0
    assert main(["--quiet", "mask", str(d / "st.safetensors"), "--sparsity", "0.6", "-o", str(d / "m.safetensors")]) == 0
    return d / "m.safetensors"


def _ids(out):
    return [int(x) for x in out.split()]


def test_pruned_and_stock_caches_give_the_same_tokens(capsys, mask_file):
    common = ["generate", "--model", "tiny-llama", "--mask", mask_file, "--prompt-ids", "5 6 7 8",
              "--max-new-tokens", 12]
    rc, pruned, err = run(capsys, *common)
    assert rc == 0 and len(_ids(pruned)) == 12
    assert "KV cache holds" in err and "% of a dense cache" in err
    rc, stock, _ = run(capsys, *common, "--cache", "stock")
    assert rc == 0 and _ids(stock) == _ids(pruned)
    rc, dense, _ = run(capsys, "generate", "--model", "tiny-llama", "--prompt-ids", "5 6 7 8", "--max-new-tokens", 12)
    assert rc == 0 and len(_ids(dense)) == 12


def test_cuda_graph_flag_gives_the_generate_tokens(capsys, mask_file):
    """--cuda-graph (decode_greedy; eager on the CPU): the tokens of `generate`, masked and dense."""
    common = ["generate", "--model", "tiny-llama", "--prompt-ids", "5 6 7 8", "--max-new-tokens", 12]
    for extra in (["--mask", mask_file], []):
        rc, ref, _ = run(capsys, *common, *extra)
        rc2, got, err = run(capsys, *common, *extra, "--cuda-graph")
        assert rc == rc2 == 0 and len(_ids(got)) == 12 and _ids(got) == _ids(ref), err


def test_extend_generates_past_the_calibrated_length(capsys, mask_file):
    args = ["generate", "--model", "tiny-llama", "--mask", mask_file, "--prompt-ids", "5 6 7 8", "--max-new-tokens", 40]
    rc, _, err = run(capsys, *args)
    assert_clean_error(rc, err, "43 positions", "calibrated for 24", "--beyond extend")
    rc, out, _ = run(capsys, *args, "--beyond", "extend")
    assert rc == 0 and len(_ids(out)) == 40


def test_text_prompt_with_a_tokenizer(capsys, tmp_path):
    folder = tiny_lm_folder(tmp_path / "lm")
    rc, out, _ = run(capsys, "--quiet", "generate", "--model", f"hf:{folder}", "--prompt", "w1 w2 w3",
                     "--max-new-tokens", 5)
    assert rc == 0 and all(w.startswith("w") for w in out.split()) and len(out.split()) == 5


@pytest.mark.parametrize("extra,words", [
    (["--prompt", "hello"], ["no tokenizer", "--prompt-ids"]),
    (["--prompt-ids", "5 x"], ["--prompt-ids"]),
    (["--prompt-ids", "5 99999"], ["--prompt-ids"]),
    (["--prompt-ids", "5", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--prompt-ids", "5", "--beyond", "dense"], ["--cache pruned", "--cache stock"]),
    (["--prompt-file", "/nonexistent/p.txt"], ["no such file"]),
    (["--prompt-ids", "5", "--cuda-graph", "--sample"], ["--cuda-graph", "--sample"]),
    (["--prompt-ids", "5", "--cuda-graph", "--cache", "stock"], ["--cuda-graph", "--cache stock"]),
])
def test_bad_input_is_one_clear_error(capsys, mask_file, extra, words):
    rc, out, err = run(capsys, "generate", "--model", "tiny-llama", "--mask", mask_file, *extra)
    assert_clean_error(rc, err, *words)
    assert out == ""


def test_missing_mask_file(capsys, tmp_path):
    rc, _, err = run(capsys, "generate", "--model", "tiny-llama", "--mask", tmp_path / "none.safetensors",
                     "--prompt-ids", "5")
    assert_clean_error(rc, err, "no such mask file")
