"""bench/oracle_calib.py: masks calibrated on the test windows themselves (a diagnostic, issue 11)."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import torch

from attnprune import data as D
from attnprune.experiments import sweep_loop
from attnprune.experiments.sweep import EvalSettings, run_eval
from attnprune.stats import AttentionStats

ROOT = Path(__file__).resolve().parents[2]
COMMON = dict(model="tiny-llama", data="random", seq_len=32, calib=2, test=2, batch_size=2, blocks=(None,),
              policies=("layer",), scores=("prob",), sparsities=(0.5,), backend="reference", device="cpu",
              heatmaps=False, progress=False)


def _oracle_module():
    spec = importlib.util.spec_from_file_location("oracle_calib", ROOT / "bench" / "oracle_calib.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _means(path) -> dict[str, torch.Tensor]:
    st = AttentionStats.load(path)
    return {n: st.mean(n) for n in st.sites}


def test_oracle_calibrates_on_the_test_windows_and_restores_the_overlap_check(tmp_path, capsys):
    check = sweep_loop.check_disjoint
    rc = _oracle_module().main(["--model", "tiny-llama", "--data", "random", "--seq-len", "32", "--calib", "2",
                                "--test", "2", "--batch-size", "2", "--blocks", "8", "--policies", "layer",
                                "--scores", "prob", "--sparsities", "0.5", "--backend", "reference",
                                "--device", "cpu", "-o", str(tmp_path / "oracle")])
    assert rc == 0, capsys.readouterr().err
    assert sweep_loop.check_disjoint is check  # the rest of the process still refuses overlapping windows
    res = json.loads((tmp_path / "oracle" / "results.json").read_text())
    assert res["data"]["calibration_split"] == "oracle"

    # the same windows observed as an honest run's calibration: the test split's records under another name
    # (scored on the train split, so nothing overlaps)
    ds = D.load_dataset("random")
    renamed = dataclasses.replace(ds, splits={"calibration": ds["test"], "test": ds["train"]})
    run_eval(EvalSettings(out=str(tmp_path / "ref"), **{**COMMON, "blocks": (8,)}), log=lambda *a, **k: None,
             dataset=renamed)
    honest = tmp_path / "honest"
    run_eval(EvalSettings(out=str(honest), **{**COMMON, "blocks": (8,)}), log=lambda *a, **k: None)
    oracle, ref, cal = (_means(p / "stats.safetensors") for p in (tmp_path / "oracle", tmp_path / "ref", honest))
    assert oracle.keys() == ref.keys()
    # same windows, same model, same code: equal but for float32 summation order, which a CPU library may vary
    # between calls. Each mean is a sum of positive probabilities from dot products over the hidden size (32)
    # and softmax sums over 32 keys, through 2 layers: relative error at most 2 * 4 * (32 + 32) * eps32
    tol = 2 * 4 * (32 + 32) * torch.finfo(torch.float32).eps
    for n in oracle:
        torch.testing.assert_close(oracle[n], ref[n], rtol=tol, atol=0, equal_nan=True)  # NaN: never attended
    # and not the calibration split's windows: relative differences far beyond that
    assert any(((oracle[n] - cal[n]).abs() / cal[n]).nan_to_num().max() > 10 * tol for n in oracle)
