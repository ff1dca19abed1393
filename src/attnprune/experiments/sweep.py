"""The eval sweep workflow: load a model and data, observe, sweep policies x sparsities x
granularities, write the report (``attnprune eval`` and ``attnprune demo`` run it).

``run_eval(EvalSettings(...))`` scores causal LMs by perplexity on the dataset's test split and
classifiers by accuracy (a linear head first trained on the train split; ``finetune=True`` trains
the encoder too). Attention is observed on the calibration split, which never overlaps the test
split. Writes ``report.md``, ``results.json``, PNG plots and ``stats.safetensors`` into ``out``.
The demo's presets (:data:`DEMO_PRESETS`, :func:`demo_settings`) are settings of this sweep.
Each task prepares its model and batches through :data:`SWEEP_TASKS`; the measuring loop itself
(``sweep``, ``SweepConfig``, ``SweepResult``, re-exported here) is ``sweep_loop.py``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..commands.common import check_output_dir, check_policies, usable_device
from ..errors import InvalidArgumentError
from ..registry import Registry
from .sweep_loop import (DEFAULT_POLICIES, DEFAULT_SPARSITIES, SweepConfig, SweepResult,  # noqa: F401 - re-exported
                         sweep)


@dataclass
class EvalSettings:
    """Everything one evaluation run needs (the CLI and the demo fill it)."""

    model: str = "smollm2"
    data: str = "austen"
    out: str = "runs/eval"
    calib_split: str = "calibration"
    train_split: str = "train"
    test_split: str = "test"
    # causal LM: sequences of seq_len tokens; classification: examples (texts)
    seq_len: int = 256
    calib: int | None = None   # default: 32 sequences (LM) or 1000 examples (classifier)
    test: int | None = None    # default: 16 sequences (LM) or 1000 examples (classifier)
    train: int = 4000
    batch_size: int = 8
    max_length: int = 64
    finetune: bool = False
    lr: float | None = None
    epochs: int = 1
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    policies: tuple[str, ...] = DEFAULT_POLICIES
    blocks: tuple[int | None, ...] = (None, 16)
    scores: tuple[str, ...] = ("prob",)  # what ranks the masks (observe's score); each observed once
    ablation_batches: int | None = None  # score "ablation": profile the first N calibration batches (None: all)
    ablation_base: int | None = None  # score "ablation": around a band of this many blocks (None: the dense model)
    ablation_widths: tuple[int, ...] | None = None  # score "ablation": band widths profiled (None: the default grid)
    ood_data: str | None = None  # causal LM: a second data spec whose ood_split is measured too
    ood_split: str = "test"
    seed: int = 0
    backend: str = "reference"
    beyond: str = "error"
    device: str | None = None  # None: the GPU when present (a passed-in model stays where it is)
    dtype: str = "auto"  # the model's weights: float32, bfloat16, or auto (bfloat16 on CUDA, else float32)
    stats: str | None = None
    heatmaps: bool = True
    save_masks: bool = False  # write every mask to out/masks/<score>-<policy>-<sparsity>-<granularity>.safetensors
    title: str | None = None
    progress: bool = True


def _log(msg: str, progress: bool = True) -> None:
    print(msg, flush=True)


def run_eval(s: EvalSettings, *, log=_log, loaded=None, dataset=None) -> dict:
    """Load model and data, run the sweep, write the report. Returns the files written
    (``report.md``, ``results.json``, plots, ``stats.safetensors``) plus ``"result"``, ``"seconds"``.

    loaded / dataset: an already loaded ``LoadedModel`` / ``Dataset`` to use instead of
    ``s.model`` / ``s.data`` (the model is not modified: masks are applied only inside the sweep)."""
    import torch

    from .. import data as D
    from ..data.inputs import inputs_for
    from ..models import load_model
    from ..report import write_report
    from ..stats import AttentionStats
    t_start = time.perf_counter()
    # every check that needs no model first: a bad argument must not cost the model load and observation
    out = check_output_dir(s.out)
    if s.dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype {s.dtype!r}: use one of {', '.join(DTYPES)}")
    config = SweepConfig(sparsities=tuple(s.sparsities), policies=check_policies(s.policies),
                         blocks=tuple(s.blocks), seed=s.seed, backend=s.backend, beyond=s.beyond,
                         scores=tuple(s.scores), ablation_batches=s.ablation_batches,
                         ablation_base=s.ablation_base, ablation_widths=s.ablation_widths)
    device = usable_device(s.device) if s.device is not None or loaded is None else None
    if config.backend == "auto":  # recorded in the results as the backend that ran
        from ..backends import resolve_backend
        config = dataclasses.replace(config, backend=resolve_backend("auto", device))
    stats = AttentionStats.load(s.stats) if s.stats else None
    if stats is not None and stats.score not in config.scores:
        raise InvalidArgumentError(f"--stats {s.stats} holds score {stats.score!r}; add it to the scores "
                                   f"(now {' '.join(config.scores)}) or observe again")
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    ds = dataset if dataset is not None else D.load_dataset(s.data)
    log(f"loaded data {ds.describe()} in {time.perf_counter() - t0:.1f} s")
    if s.calib_split == s.test_split:
        raise InvalidArgumentError(f"the calibration and test splits are both {s.test_split!r}: masks would be "
                                   "scored on the text they were made from; pick another --calib-split")
    for split in (s.calib_split, s.test_split):
        ds[split]  # an unknown split fails here, naming the splits there are
    ood = None
    if s.ood_data:
        ood = D.load_dataset(s.ood_data)
        ood[s.ood_split]
        log(f"loaded out-of-domain data {ood.describe()}")
    t0 = time.perf_counter()
    lm = loaded if loaded is not None else load_model(s.model)
    if device is not None:
        lm.model.to(device)
    dtype = model_dtype(s.dtype, next(lm.model.parameters()).device)
    if loaded is None and dtype is not None:
        lm.model.to(dtype)
    log(f"loaded model {lm.name} ({lm.task}) in {time.perf_counter() - t0:.1f} s")
    info: dict = {"source": ds.name, "calibration_split": s.calib_split, "test_split": s.test_split,
                  "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", "")}
    timings: dict = {}
    if lm.task not in SWEEP_TASKS:
        raise InvalidArgumentError(f"eval handles {' and '.join(SWEEP_TASKS.names())} models; "
                                   f"{lm.name} is {lm.task}")
    spec = SWEEP_TASKS.get(lm.task)
    if ood is not None and lm.task != "causal-lm":
        raise InvalidArgumentError(f"--ood-data is measured for causal LMs only; {lm.name} is {lm.task}")
    model, calib, test = spec.prepare(s, lm, ds, inputs_for(lm, ds), info, timings, log)
    extra = {}
    if ood is not None:
        name = f"{ood.name}:{s.ood_split}"
        extra[name] = inputs_for(lm, ood).batches(ood[s.ood_split], lm.tokenizer, seq_len=s.seq_len,
                                                  batch_size=s.batch_size, max_items=s.test or 16)
        info["ood_test"] = f"{name}, {sum(b['input_ids'].shape[0] for b in extra[name])} sequences"
    task = lm.task
    from ..report import run_label

    def on_run(r: dict) -> None:
        lvl = "token" if r["block"] is None else f"block {r['block']}"
        v = spec.fmt(r["value"]) + "".join(f", {k} {spec.fmt(x['value'])}" for k, x in (r.get("extra") or {}).items())
        ach = "-" if r["achieved"] is None else f"{r['achieved']:.3f}"
        log(f"  {lvl:9s} {run_label(r):7s} sparsity {r['sparsity']:<5g} (achieved {ach}): {v}")

    stats_path = out / "stats.safetensors"
    stats_files: list = []

    def on_stats(st) -> None:
        path = stats_path if st.score == "prob" else out / f"stats-{st.score}.safetensors"
        st.save(path)
        stats_files.append(path)
        log(f"observed {len(st.sites)} attention sites ({st.score}) on {st.num_sequences} calibration sequences; "
            f"stats saved to {path} (reuse with --stats)")

    def on_dense(d) -> None:
        log(f"dense {d.metric}: {spec.fmt(d.value)} ({d.count} {spec.unit}, {d.seconds:.1f} s)")

    result, stats, masks = sweep(model, calib, test, task=task, config=config, stats=stats, model_name=lm.name,
                                 data_info=info, progress=s.progress, on_run=on_run, on_stats=on_stats,
                                 on_dense=on_dense, description=ds.describe(s.calib_split), extra_tests=extra,
                                 keep_masks=s.save_masks)
    mask_files = []
    for (score, block, policy, sp), m in masks.items():
        (out / "masks").mkdir(exist_ok=True)
        path = out / "masks" / f"{score}-{policy}-{sp:g}-{'token' if block is None else f'b{block}'}.safetensors"
        m.save(path)
        mask_files.append(path)
    result.timings.update(timings)
    if s.stats:
        stats_path = Path(s.stats)
    result.timings["total_s"] = time.perf_counter() - t_start
    files = write_report(result, out, stats=stats if s.heatmaps else None,
                         title=s.title or f"{lm.name} on {ds.name}: {result.metric} vs attention sparsity")
    files["stats"] = stats_files[0] if stats_files and not s.stats else stats_path
    if mask_files:
        files["masks"] = mask_files
    files["result"] = result
    files["seconds"] = time.perf_counter() - t_start
    return files


DTYPES = ("auto", "float32", "bfloat16")


def model_dtype(name: str, device):
    """The ``torch.dtype`` of ``EvalSettings.dtype`` on ``device`` (``auto``: bfloat16 on CUDA, else float32)."""
    import torch

    if name not in DTYPES:
        raise InvalidArgumentError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# --- per task: the model to score and its calibration / test batches ---------------------------------
@dataclass(frozen=True)
class SweepTask:
    """How the sweep prepares one task: ``prepare(settings, loaded, dataset, inputs, info, timings, log)
    -> (model, calibration batches, test batches)`` (filling ``info`` and ``timings``); ``fmt`` shows a
    metric value; ``unit`` names what the test count counts."""

    prepare: Callable
    fmt: Callable[[float], str]
    unit: str


def _prepare_causal_lm(s: EvalSettings, lm, ds, inputs, info: dict, timings: dict, log):
    n_calib, n_test = s.calib or 32, s.test or 16
    calib = inputs.batches(ds[s.calib_split], lm.tokenizer, seq_len=s.seq_len, batch_size=s.batch_size,
                           max_items=n_calib)
    test = inputs.batches(ds[s.test_split], lm.tokenizer, seq_len=s.seq_len, batch_size=s.batch_size,
                          max_items=n_test)
    n_c = sum(b["input_ids"].shape[0] for b in calib)
    n_t = sum(b["input_ids"].shape[0] for b in test)
    info.update(seq_len=s.seq_len, calibration_sequences=n_c, test_sequences=n_t,
                calibration_tokens=n_c * s.seq_len, test_tokens=n_t * s.seq_len)
    return lm.model, calib, test


def _prepare_classification(s: EvalSettings, lm, ds, inputs, info: dict, timings: dict, log):
    from ..evaluate import train_classifier

    n_calib, n_test = s.calib or 1000, s.test or 1000
    recs = {k: _subset(ds[sp], n, s.seed + i) for i, (k, sp, n) in enumerate(
        (("train", s.train_split, s.train), ("calib", s.calib_split, n_calib), ("test", s.test_split, n_test)))}
    bs = max(s.batch_size, 32)
    b = {k: inputs.batches(v, lm.tokenizer, seq_len=s.seq_len, batch_size=bs, max_length=s.max_length)
         for k, v in recs.items()}
    encoder = getattr(lm.model, "base_model", lm.model)
    num_labels = int(lm.extra.get("num_labels", 2))
    t0 = time.perf_counter()
    model = train_classifier(encoder, b["train"], num_labels=num_labels, finetune=s.finetune,
                             epochs=s.epochs, lr=s.lr, seed=s.seed, progress=s.progress)
    timings["train_head_s"] = time.perf_counter() - t0
    log(f"trained a linear head{' and fine-tuned the encoder' if s.finetune else ''} on "
        f"{len(recs['train'])} {s.train_split} examples in {timings['train_head_s']:.1f} s")
    info.update(max_length=s.max_length, subset=f"seeded random subsets (seed {s.seed})",
                train_examples=len(recs["train"]),
                calibration_examples=len(recs["calib"]), test_examples=len(recs["test"]),
                head="mean-pooled linear head" + (", encoder fine-tuned" if s.finetune else ", encoder frozen"),
                test_majority_class_share=round(_majority(recs["test"]), 4))
    return model, b["calib"], b["test"]


SWEEP_TASKS: Registry[SweepTask] = Registry("sweep task")
SWEEP_TASKS.add("causal-lm", SweepTask(_prepare_causal_lm, lambda v: f"{v:.3f}", "predicted tokens"))
SWEEP_TASKS.add("classification", SweepTask(_prepare_classification, lambda v: f"{100 * v:.2f}%", "examples"))


def _majority(records: list) -> float:
    """Share of the most frequent label (the accuracy of always guessing it)."""
    from collections import Counter

    c = Counter(int(r["label"]) for r in records)
    return max(c.values()) / max(1, len(records))


def _subset(records: list, n: int | None, seed: int) -> list:
    """``n`` records drawn without replacement by a seeded permutation (all when ``n`` is None or
    at least the split's size), kept in their original order. A prefix would not do: a split's
    record order can correlate with its labels (the sentiment splits are in id order)."""
    import torch

    if n is None or n >= len(records):
        return list(records)
    idx = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return [records[i] for i in idx.tolist()]


# --- the demo (``attnprune demo``): SmolLM2-135M on Jane Austen, dense vs AP vs random ---------------
DEMO_PRESETS = {
    "small": dict(seq_len=128, calib=8, test=4, batch_size=4, sparsities=(0.5, 0.9),
                  policies=("layer", "random"), blocks=(None,)),
    "default": dict(seq_len=256, calib=32, test=16, batch_size=4, sparsities=(0.5, 0.7, 0.8, 0.9, 0.95),
                    policies=("layer", "random"), blocks=(None,)),
    "large": dict(seq_len=512, calib=64, test=32, batch_size=2, sparsities=(0.5, 0.7, 0.8, 0.9, 0.95),
                  policies=("layer", "head", "global", "random"), blocks=(None, 32)),
    # a GPU: 8k-token windows, the masks the block kernels skip; the paper's rule, the data-free band, the
    # best policy measured at 90% (elastic-floor with the value score) and the random control (issue 11)
    "gpu": dict(seq_len=8192, calib=8, test=8, batch_size=1, sparsities=(0.8, 0.9, 0.95),
                policies=("layer", "streaming", "elastic-floor", "random"), scores=("prob", "value"),
                blocks=(128,)),
}
# per preset: (backend, device) when the command line gives none
DEMO_DEFAULTS = {"gpu": ("auto", "cuda")}


def demo_settings(preset: str, *, model: str = "smollm2", data: str = "austen", out: str | None = None,
                  seed: int = 0, backend: str | None = None, device: str | None = None,
                  progress: bool = True) -> EvalSettings:
    """The ``EvalSettings`` of a demo preset (``backend`` / ``device`` None: the preset's, else
    reference / the default device)."""
    pb, pd = DEMO_DEFAULTS.get(preset, ("reference", None))
    backend, device = backend or pb, device or pd
    return EvalSettings(model=model, data=data, out=out or f"runs/demo-{preset}", seed=seed, backend=backend,
                        device=device, progress=progress, title=f"attnprune demo ({preset}): {model} on {data}",
                        **DEMO_PRESETS[preset])

