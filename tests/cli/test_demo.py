"""End to end on the real SmolLM2-135M and real Jane Austen text, with tiny settings.

Observe on the Austen calibration split, make masks, evaluate on the test split, write the report:
what ``attnprune demo`` does, at a size a CI machine runs in about a minute.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnprune.errors import MissingDependencyError


@pytest.fixture(scope="module")
def smollm2_and_austen():
    from attnprune import data as D
    from attnprune.models import load_model

    try:
        return load_model("smollm2"), D.load_dataset("austen")
    except MissingDependencyError as e:  # set-up not run: say so rather than fail obscurely
        pytest.skip(f"real model or corpus missing: {e}")


@pytest.mark.slow
@pytest.mark.needs_data
def test_demo_pipeline_on_smollm2_and_austen(tmp_path, smollm2_and_austen):
    from attnprune import data as D
    from attnprune.experiments.sweep import demo_settings as settings
    from attnprune.experiments.sweep import run_eval

    lm, ds = smollm2_and_austen
    s = settings("small", out=str(tmp_path / "demo"), progress=False)
    s.seq_len, s.calib, s.test, s.batch_size = 32, 4, 2, 2
    s.sparsities, s.policies, s.blocks = (0.0, 0.7), ("layer", "random"), (None, 8)
    files = run_eval(s, log=lambda m: None, loaded=lm, dataset=ds)
    r = files["result"]

    # the report files exist and hold the numbers
    for k in ("markdown", "json", "quality_plot", "kept_mass_plot", "stats"):
        assert files[k].is_file(), k
    assert files["heatmaps"] and all(p.is_file() for p in files["heatmaps"])
    doc = json.loads(files["json"].read_text())
    assert doc["dense"]["value"] == r.dense["value"] and len(doc["runs"]) == 2 * 2 * 2
    assert doc["data"]["calibration_sequences"] == 4 and doc["data"]["test_sequences"] == 2

    # dense perplexity, recomputed independently from transformers' own loss on the same windows
    test = D.lm_batches(ds["test"], lm.tokenizer, seq_len=32, batch_size=2, max_sequences=2)
    with torch.no_grad():
        losses = [float(lm.model(input_ids=b["input_ids"], labels=b["input_ids"]).loss) for b in test]
    counts = [b["input_ids"].shape[0] * 31 for b in test]
    nll = sum(l * c for l, c in zip(losses, counts)) / sum(counts)
    assert r.dense["count"] == sum(counts)
    # (transformers averages in float32, we sum in float64: agreement to ~1e-5 nats)
    assert r.dense["nll"] == pytest.approx(nll, abs=1e-4)
    assert r.dense["value"] == pytest.approx(math.exp(nll), rel=1e-4)

    # 0% sparsity keeps every attendable entry and reproduces the dense perplexity; 70% changes it
    for run in r.runs:
        if run["sparsity"] == 0.0:
            assert run["achieved"] == 0.0
            assert run["value"] == pytest.approx(r.dense["value"], rel=1e-5, abs=0)
        else:
            assert run["achieved"] >= 0.69 if run["block"] is None else run["achieved"] > 0.3
            assert abs(run["value"] - r.dense["value"]) > 1e-3 * r.dense["value"]

    # calibration and test windows are disjoint
    calib = D.lm_batches(ds["calibration"], lm.tokenizer, seq_len=32, batch_size=2, max_sequences=4)
    rows_c = {tuple(x.tolist()) for b in calib for x in b["input_ids"]}
    rows_t = {tuple(x.tolist()) for b in test for x in b["input_ids"]}
    assert not rows_c & rows_t


def test_demo_cli_parses_presets():
    from attnprune.cli import build_parser
    from attnprune.commands.demo import PRESETS

    p = build_parser()
    for name in PRESETS:
        args = p.parse_args(["demo", "--preset", name, "-o", "x"])
        assert args.preset == name and args.out == "x"
    with pytest.raises(SystemExit):
        p.parse_args(["demo", "--preset", "huge"])


def test_gpu_preset_defaults_and_clean_error_without_a_gpu(capsys, tmp_path):
    from cli_helpers import assert_clean_error, run

    from attnprune.experiments.sweep import demo_settings

    s = demo_settings("gpu")
    assert (s.backend, s.device, s.seq_len, s.blocks) == ("auto", "cuda", 8192, (128,))
    assert {"layer", "elastic-floor", "random"} <= set(s.policies) and "value" in s.scores  # the best 90% policy
    assert demo_settings("default").backend == "reference"  # the CPU presets keep the reference backend
    assert demo_settings("gpu", backend="triton", device="cuda:1").backend == "triton"
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the preset would run")
    rc, _, err = run(capsys, "demo", "--preset", "gpu", "-o", tmp_path / "run")
    assert_clean_error(rc, err, "cuda")
    assert not (tmp_path / "run").exists()
