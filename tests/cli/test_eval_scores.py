"""attnprune eval --scores / --ood-data / --save-masks and attnprune bench --model --masks, end to end on
a tiny model (CPU): what a long-context study runs, at toy size."""

import json

from cli_helpers import assert_clean_error, run

from attnprune.mask import PruneMask


def test_eval_scores_ood_and_saved_masks_feed_the_model_bench(capsys, tmp_path):
    out = tmp_path / "run"
    rc, _, err = run(capsys, "--quiet", "eval", "--model", "tiny-llama", "--data", "random", "--seq-len", "32",
                     "--calib", "4", "--test", "2", "--blocks", "8", "--scores", "prob", "influence",
                     "--policies", "layer", "streaming", "--sparsities", "0.5", "--ood-data", "random",
                     "--ood-split", "train", "--save-masks", "--no-heatmaps", "-o", out)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    keys = sorted((r["score"], r["policy"]) for r in res["runs"])
    assert keys == [("influence", "layer"), ("prob", "layer"), ("prob", "streaming")]
    assert set(res["extra_dense"]) == {"random:train"}
    assert all(set(r["extra"]) == {"random:train"} for r in res["runs"])
    assert (out / "stats.safetensors").is_file() and (out / "stats-influence.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert "layer (influence)" in report and "on random:train" in report
    files = sorted(p.name for p in (out / "masks").iterdir())
    assert files == ["influence-layer-0.5-b8.safetensors", "prob-layer-0.5-b8.safetensors",
                     "prob-streaming-0.5-b8.safetensors"]
    m = PruneMask.load(out / "masks" / "prob-layer-0.5-b8.safetensors")
    run_sp = next(r["achieved"] for r in res["runs"] if (r["score"], r["policy"]) == ("prob", "layer"))
    assert m.block == 8 and abs(m.sparsity - run_sp) < 1e-9

    js = tmp_path / "mb.json"
    rc, _, err = run(capsys, "--quiet", "bench", "--model", "tiny-llama", "--lengths", "16", "--sparsities", "0.5",
                     "--block", "8", "--masks", out / "masks" / "prob-layer-0.5-b8.safetensors",
                     "--model-modes", "prefill", "--warmup", "0", "--reps", "1", "-o", js)
    assert rc == 0, err
    data = json.loads(js.read_text())
    assert data["backend"] == "reference" and data["backend_asked"] == "auto"  # auto on the CPU
    rows = data["rows"]
    assert {r["length"] for r in rows} == {16, 32}  # the mask's calibrated length is added
    ap = [r for r in rows if r["variant"] == "ap-mask"]
    assert len(ap) == 1 and ap[0]["length"] == 32 and ap[0]["note"] == "prob-layer-0.5-b8"
    assert abs(ap[0]["achieved_sparsity"] - round(m.sparsity, 4)) < 1e-9
    matched = [r for r in rows if r["note"] == "density of prob-layer-0.5-b8"]
    assert len(matched) == 1 and matched[0]["length"] == 32 and matched[0]["variant"] == "masked"


def test_model_bench_rejects_a_mask_of_another_model(capsys, tmp_path):
    from attnprune import make_mask, observe
    from attnprune.models import load_model

    lm = load_model("tiny-gpt2")
    st = observe(lm.model, [{"input_ids": __import__("torch").randint(3, 50, (1, 16))}], progress=False)
    f = tmp_path / "gpt2.safetensors"
    make_mask(st, 0.5, block=8).save(f)
    rc, _, err = run(capsys, "bench", "--model", "tiny-llama", "--masks", f, "-o", tmp_path / "mb.json")
    assert_clean_error(rc, err, "gpt2", "tiny-llama")
    assert not (tmp_path / "mb.json").exists()
    rc, _, err = run(capsys, "bench", "--model", "tiny-llama", "--masks", tmp_path / "nope.safetensors",
                     "-o", tmp_path / "mb.json")
    assert_clean_error(rc, err, "nope.safetensors")
