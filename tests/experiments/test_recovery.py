"""The recovery experiment (``scripts/recovery.sh`` -> ``attnprune.experiments.recovery``) at a tiny size."""

from __future__ import annotations

import json

import pytest

from cli_helpers import tiny_lm_folder

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def _notes(tmp_path):
    """40 paragraphs of 40 words: calibration 4, train 32, test 4."""
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(" ".join(f"w{(7 * p + 3 * i) % 50}" for i in range(40)) for p in range(40)) + "\n")
    return text


def test_recovery_tiny_run(tmp_path, capsys):
    from attnprune.experiments import recovery
    from attnprune.report import ENV_KEYS

    lm = tiny_lm_folder(tmp_path / "lm")
    text = _notes(tmp_path)
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


def test_recovery_block_masks_with_other_policies(tmp_path, capsys):
    """--policies / --block / --score: block masks from block statistics, every non-random policy also
    applied after dense fine-tuning; a bad policy or score stops before the model loads."""
    from attnprune.experiments import recovery

    lm = tiny_lm_folder(tmp_path / "lm")
    text = _notes(tmp_path)
    out = tmp_path / "rec"
    argv = ["--model", f"hf:{lm}", "--data", f"text:{text}", "--steps", "1", "--seq-len", "16", "--batch-size", "2",
            "--calib", "2", "--test", "2", "--sparsities", "0.5", "--policies", "structured", "streaming", "random",
            "--block", "4", "--score", "value", "--quiet", "--device", "cpu", "--out", str(out)]
    assert recovery.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    res = doc["results"]
    assert sorted(res) == ["dense", "random@0.5", "streaming@0.5", "structured@0.5"]
    assert doc["meta"]["block"] == 4 and doc["meta"]["score"] == "value"
    assert "dense_ft_then_mask" in res["structured@0.5"] and "dense_ft_then_mask" not in res["random@0.5"]
    assert "| structured |" in recovery.table(doc) and "| streaming |" in recovery.table(doc)
    for bad, word in ((["--policies", "layr"], "layr"), (["--score", "banana"], "banana")):
        with pytest.raises(SystemExit) as e:
            recovery.main(["--model", "no-such-model", "--out", str(tmp_path / "x"), *bad])
        assert e.value.code == 2 and word in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_recovery_stopped_midway_keeps_finished_rows(tmp_path, monkeypatch):
    """A run cut short (a device time limit) leaves results.json with the rows it finished, marked
    incomplete; the table lists only masks already fine-tuned."""
    from attnprune.experiments import recovery

    lm = tiny_lm_folder(tmp_path / "lm")
    text = _notes(tmp_path)
    out = tmp_path / "rec"
    real, calls = recovery.finetune, []

    def stop_on_third(*args, **kwargs):  # dense, layer, then the random run is "killed"
        calls.append(kwargs["out_dir"].name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(recovery, "finetune", stop_on_third)
    argv = ["--model", f"hf:{lm}", "--data", f"text:{text}", "--steps", "1", "--seq-len", "16", "--batch-size", "2",
            "--calib", "2", "--test", "2", "--sparsities", "0.5", "--quiet", "--device", "cpu", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        recovery.main(argv)
    assert calls == ["dense", "layer-0.5", "random-0.5"]
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["complete"] is False
    assert "after_masked_ft" in doc["results"]["layer@0.5"] and "after_masked_ft" not in doc["results"]["random@0.5"]
    md = (out / "recovery.md").read_text()
    assert "(incomplete)" in md and "| AP (layer) |" in md and "| random |" not in md


def test_recovery_epochs_reuse_the_train_windows(tmp_path, capsys):
    """--epochs E: K steps over ceil(K x batch / E) windows (each seen E times); a bad value stops early."""
    from attnprune.experiments import recovery

    lm = tiny_lm_folder(tmp_path / "lm")
    text = _notes(tmp_path)
    out = tmp_path / "rec"
    argv = ["--model", f"hf:{lm}", "--data", f"text:{text}", "--steps", "3", "--epochs", "2", "--seq-len", "16",
            "--batch-size", "2", "--calib", "2", "--test", "2", "--sparsities", "0.5", "--policies", "layer",
            "--quiet", "--device", "cpu", "--out", str(out)]
    assert recovery.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["train_sequences"] == 3 and doc["meta"]["epochs"] == 2 and doc["meta"]["complete"] is True
    steps = [json.loads(line) for line in (out / "runs" / "layer-0.5" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in steps if "loss" in r]) == 3  # all K steps ran over the 3 windows
    with pytest.raises(SystemExit) as e:
        recovery.main(["--model", "no-such-model", "--epochs", "0", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--epochs" in capsys.readouterr().err


def test_recovery_builds_masks_from_saved_stats(tmp_path, capsys):
    """--stats: the masks come from a saved statistics file (its score recorded, nothing observed); a missing
    file or a --block the file's granularity does not divide stops before the model loads."""
    import torch

    from attnprune.experiments import recovery
    from attnprune.models import load_model
    from attnprune.observe import observe

    lm = tiny_lm_folder(tmp_path / "lm")
    text = _notes(tmp_path)
    model = load_model(f"hf:{lm}")
    ids = torch.randint(3, model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    stats = observe(model.model, [{"input_ids": ids}], granularity=4, score="ablation", progress=False)
    stats.save(tmp_path / "abl.safetensors")
    out = tmp_path / "rec"
    argv = ["--model", f"hf:{lm}", "--data", f"text:{text}", "--steps", "1", "--seq-len", "16", "--batch-size", "2",
            "--calib", "2", "--test", "2", "--sparsities", "0.5", "--policies", "elastic", "--block", "4",
            "--stats", str(tmp_path / "abl.safetensors"), "--quiet", "--device", "cpu", "--out", str(out)]
    assert recovery.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["score"] == "ablation" and sorted(doc["results"]) == ["dense", "elastic@0.5"]
    assert abs(doc["results"]["elastic@0.5"]["achieved"] - 0.5) < 0.15
    for bad, word in ((["--block", "6"], "multiple of 4"), (["--stats", str(tmp_path / "none.safetensors")], "none")):
        with pytest.raises(SystemExit) as e:
            recovery.main(["--model", "no-such-model", "--out", str(tmp_path / "x"),
                           "--stats", str(tmp_path / "abl.safetensors"), "--block", "4", *bad])
        assert e.value.code == 2 and word in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
