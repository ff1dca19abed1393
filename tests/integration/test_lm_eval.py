"""lm-evaluation-harness (``lm_eval``) on a masked model: local tasks (a rolling-perplexity task and a
few-shot multiple-choice task read from jsonl files), a tiny Llama with a word-level tokenizer, the
recipe of docs/lm_eval.md (issue 13). Skipped where ``lm_eval`` is not installed (CI)."""

import json
import math
import os
import random

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("lm_eval.models.huggingface")  # lm_eval's transformers backend (HFLM)

import torch  # noqa: E402

import attnprune  # noqa: E402
from attnprune.apply import OutsideCalibrationWarning, outside_counts  # noqa: E402
from attnprune.errors import LengthError  # noqa: E402
from cli_helpers import tiny_lm_folder  # noqa: E402

CAL = 32  # the mask's calibrated length (tokens)
LONG = 3 * CAL  # an lm_eval max_length past it
TASKS = ["ap_rolling", "ap_choice"]

pytestmark = pytest.mark.slow


def _words(rng, n):
    return " ".join(f"w{rng.randrange(50)}" for _ in range(n))


def _tasks(root):
    """Two lm_eval task configs over local jsonl files: documents of 60-120 words (rolling
    log-likelihood: several windows of ``max_length`` each) and 3-way choices after 20 words."""
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(6):
            f.write(json.dumps({"text": _words(rng, rng.randrange(60, 120))}) + "\n")
    with open(root / "choice.jsonl", "w") as f:
        for _ in range(8):
            f.write(json.dumps({"context": _words(rng, 20), "choices": [_words(rng, 3) for _ in range(3)],
                                "label": rng.randrange(3)}) + "\n")
    head = "dataset_path: json\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n    test: {file}\ntest_split: test\n"
    (root / "tasks").mkdir()
    (root / "tasks" / "ap_rolling.yaml").write_text(
        "task: ap_rolling\n" + head.format(cache=root / "cache", file=root / "docs.jsonl")
        + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (root / "tasks" / "ap_choice.yaml").write_text(
        "task: ap_choice\n" + head.format(cache=root / "cache", file=root / "choice.jsonl")
        + 'fewshot_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
    return root / "tasks"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lm_eval")
    folder = tiny_lm_folder(root / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(2, 52, (4, CAL), generator=g)} for _ in range(4)]
    mask = attnprune.make_mask(attnprune.observe(model, calib, progress=False), 0.7, policy="structured")
    tm = TaskManager(include_path=str(_tasks(root)), include_defaults=False)
    return model, tok, mask, tm


def _evaluate(setup, max_length, mask=None, beyond="error", batch_size=4, num_fewshot=2):
    """simple_evaluate on both tasks, under ``mask`` if given. Returns (per-task metrics, per-task
    log-likelihoods of every request in order, outside_counts or None)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model, tok, _, tm = setup
    lm = HFLM(pretrained=model, tokenizer=tok, max_length=max_length, batch_size=batch_size, device="cpu")
    kw = dict(model=lm, tasks=TASKS, task_manager=tm, num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=True)
    if mask is None:
        out, counts = lm_eval.simple_evaluate(**kw), None
    else:
        with attnprune.apply(model, mask, beyond=beyond):
            out = lm_eval.simple_evaluate(**kw)
        counts = outside_counts(model)
    lls = {}
    for task in TASKS:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        lls[task] = [r if isinstance(r, float) else r[0] for s in samples for r in s["filtered_resps"]]
    return out["results"], lls, counts


def _finite(results):
    rolling, choice = results["ap_rolling"], results["ap_choice"]
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isfinite(rolling[key]) and rolling[key] > 0, (key, rolling[key])
    assert 0.0 <= choice["acc,none"] <= 1.0


def _differ(a, b):
    return max(abs(x - y) for t in TASKS for x, y in zip(a[t], b[t], strict=True)) > 1e-3


def test_max_length_at_the_calibration_runs_masked_under_error(setup):
    """max_length = the calibrated length: every rolling window and every truncated few-shot prompt
    fits, so the default beyond="error" runs, nothing is computed outside, and the masked
    log-likelihoods are not the dense ones."""
    mask = setup[2]
    dense, dense_ll, _ = _evaluate(setup, CAL)
    masked, masked_ll, counts = _evaluate(setup, CAL, mask)
    _finite(dense), _finite(masked)
    assert len(masked_ll["ap_rolling"]) == 6 and len(masked_ll["ap_choice"]) == 8 * 3
    assert counts["entries"] == 0 and counts["total"] > 0 and set(counts["sites"]) == set(mask.sites)
    assert _differ(dense_ll, masked_ll)


def test_past_the_calibration_error_fails_on_the_first_batch(setup):
    with pytest.raises(LengthError, match="calibrated for 32 x 32"):
        _evaluate(setup, LONG, setup[2])


def test_past_the_calibration_extend_runs_counted_and_equals_the_extended_mask(setup):
    """beyond="extend" with max_length = 3x the calibration: it runs, warns once, the counter says
    how much ran outside, and the numbers are those of ``mask.extend(max_length)`` under "error"
    (nothing outside it) and not the dense ones, nor beyond="dense"'s."""
    mask = setup[2]
    with pytest.warns(OutsideCalibrationWarning) as rec:
        ext, ext_ll, counts = _evaluate(setup, LONG, mask, beyond="extend")
    assert len([w for w in rec if issubclass(w.category, OutsideCalibrationWarning)]) == 1
    _finite(ext)
    assert counts["beyond"] == "extend" and counts["entries"] > 0 and 0.3 < counts["share"] < 1.0
    assert all(s["entries"] > 0 and s["calls"] > 0 for s in counts["sites"].values())

    mat, mat_ll, mat_counts = _evaluate(setup, LONG, mask.extend(LONG))
    assert mat_counts["entries"] == 0
    for t in TASKS:
        assert mat_ll[t] == pytest.approx(ext_ll[t], rel=1e-5, abs=1e-4)

    _, dense_ll, _ = _evaluate(setup, LONG)
    with pytest.warns(OutsideCalibrationWarning):
        _, bdense_ll, bdense_counts = _evaluate(setup, LONG, mask, beyond="dense")
    assert bdense_counts["share"] == pytest.approx(counts["share"])  # same windows, same count
    assert _differ(ext_ll, dense_ll) and _differ(ext_ll, bdense_ll) and _differ(bdense_ll, dense_ll)


def test_batch_size_does_not_change_the_masked_numbers(setup):
    """lm_eval pads a batch on the right without an attention mask: causal attention keeps the
    padding out of every real token, so batch 1 and batch 4 give the same log-likelihoods; the
    counter counts a padded sequence as long as its batch's longest (an upper bound)."""
    mask = setup[2]
    _, ll4, c4 = _evaluate(setup, LONG, mask, beyond="extend", batch_size=4, num_fewshot=0)
    _, ll1, c1 = _evaluate(setup, LONG, mask, beyond="extend", batch_size=1, num_fewshot=0)
    for t in TASKS:
        assert ll4[t] == pytest.approx(ll1[t], rel=1e-5, abs=1e-4)
    assert 0 < c1["entries"] <= c4["entries"]
