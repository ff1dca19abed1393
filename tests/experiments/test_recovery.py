"""The recovery experiment (``scripts/recovery.sh`` -> ``attnprune.experiments.recovery``) at a tiny size."""

from __future__ import annotations

import json

import pytest

from cli_helpers import tiny_lm_folder

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def test_recovery_tiny_run(tmp_path, capsys):
    from attnprune.experiments import recovery
    from attnprune.report import ENV_KEYS

    lm = tiny_lm_folder(tmp_path / "lm")
    text = tmp_path / "notes.txt"  # 40 paragraphs of 40 words: calibration 4, train 32, test 4
    text.write_text("\n\n".join(" ".join(f"w{(7 * p + 3 * i) % 50}" for i in range(40)) for p in range(40)) + "\n")
    out = tmp_path / "rec"
    argv = ["--model", f"hf:{lm}", "--data", f"text:{text}", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
            "--calib", "2", "--test", "2", "--sparsities", "0.5,0.9", "--quiet", "--device", "cpu", "--out", str(out)]
    assert recovery.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    meta, res = doc["meta"], doc["results"]
    assert tuple(meta["env"]) == ENV_KEYS and meta["env"]["device"] == "cpu"
    assert meta["steps"] == 2 and meta["train_sequences"] == 4 and meta["test_tokens_predicted"] == 2 * 15
    assert sorted(res) == ["dense", "layer@0.5", "layer@0.9", "random@0.5", "random@0.9"]
    for key, r in res.items():
        if key == "dense":
            continue
        assert abs(r["achieved"] - r["sparsity"]) < 0.1, key
        assert ("dense_ft_then_mask" in r) == (r["policy"] == "layer")  # prune-after-fine-tuning: AP only
        assert r["after_masked_ft"] > 0 and r["train"]["first_loss"] > 0
    # every run starts from the same weights and sees the same data: the first loss of a masked run is
    # that mask's loss on the pretrained model, so the two runs of one policy differ, the dense one is lower
    assert res["dense"]["train"]["first_loss"] < res["layer@0.9"]["train"]["first_loss"]
    for run in ("dense", "layer-0.5", "random-0.9"):
        assert (out / "runs" / run / "metrics.jsonl").is_file()
    md = (out / "recovery.md").read_text()
    assert recovery.table(doc) in md and md.count("| AP (layer) |") == 2
    assert recovery.table(doc) in capsys.readouterr().out
