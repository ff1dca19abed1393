"""``attnprune eval``: quality versus attention sparsity for a model on a dataset.

    attnprune eval --model smollm2 --data austen --seq-len 256 --calib 32 --test 16 -o runs/eval
    attnprune eval --model minilm --data sentiment --train 4000 --calib 1000 --test 1000 -o runs/eval-minilm

Causal LMs are scored by perplexity on the dataset's ``test`` split, classifiers by accuracy (a
linear head is first trained on the ``train`` split; ``--finetune`` trains the encoder too).
Attention is observed on the ``calibration`` split, which never overlaps the test split.
Writes ``report.md``, ``results.json``, PNG plots and ``stats.safetensors`` into ``--out``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError
from ..evaluate import DEFAULT_POLICIES, DEFAULT_SPARSITIES, SweepConfig
from .common import check_output_dir, check_policies, usable_device


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
    seed: int = 0
    backend: str = "reference"
    beyond: str = "error"
    device: str | None = None  # None: the GPU when present (a passed-in model stays where it is)
    stats: str | None = None
    heatmaps: bool = True
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
    from ..evaluate import sweep, train_classifier
    from ..models import load_model
    from ..report import write_report
    from ..stats import AttentionStats
    t_start = time.perf_counter()
    # every check that needs no model first: a bad argument must not cost the model load and observation
    out = check_output_dir(s.out)
    config = SweepConfig(sparsities=tuple(s.sparsities), policies=check_policies(s.policies),
                         blocks=tuple(s.blocks), seed=s.seed, backend=s.backend, beyond=s.beyond)
    device = usable_device(s.device) if s.device is not None or loaded is None else None
    stats = AttentionStats.load(s.stats) if s.stats else None
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    ds = dataset if dataset is not None else D.load_dataset(s.data)
    log(f"loaded data {ds.describe()} in {time.perf_counter() - t0:.1f} s")
    for split in (s.calib_split, s.test_split):
        ds[split]  # an unknown split fails here, naming the splits there are
    t0 = time.perf_counter()
    lm = loaded if loaded is not None else load_model(s.model)
    if device is not None:
        lm.model.to(device)
    log(f"loaded model {lm.name} ({lm.task}) in {time.perf_counter() - t0:.1f} s")
    info: dict = {"source": ds.name, "calibration_split": s.calib_split, "test_split": s.test_split}
    timings: dict = {}
    if lm.task == "causal-lm":
        n_calib, n_test = s.calib or 32, s.test or 16
        if ds.kind not in ("text", "tokens"):
            raise InvalidArgumentError(f"{lm.name} is a causal LM; dataset {ds.name!r} is {ds.kind!r}, not text")
        calib = D.lm_batches(ds[s.calib_split], lm.tokenizer, seq_len=s.seq_len, batch_size=s.batch_size,
                             max_sequences=n_calib)
        test = D.lm_batches(ds[s.test_split], lm.tokenizer, seq_len=s.seq_len, batch_size=s.batch_size,
                            max_sequences=n_test)
        n_c = sum(b["input_ids"].shape[0] for b in calib)
        n_t = sum(b["input_ids"].shape[0] for b in test)
        info.update(seq_len=s.seq_len, calibration_sequences=n_c, test_sequences=n_t,
                    calibration_tokens=n_c * s.seq_len, test_tokens=n_t * s.seq_len)
        model, task = lm.model, "causal-lm"
    elif lm.task == "classification":
        if ds.kind != "labelled":
            raise InvalidArgumentError(f"{lm.name} is a classifier; dataset {ds.name!r} is {ds.kind!r}, not labelled")
        n_calib, n_test = s.calib or 1000, s.test or 1000
        recs = {k: _subset(ds[sp], n, s.seed + i) for i, (k, sp, n) in enumerate(
            (("train", s.train_split, s.train), ("calib", s.calib_split, n_calib), ("test", s.test_split, n_test)))}
        bs = max(s.batch_size, 32)
        b = {k: D.classification_batches(v, lm.tokenizer, batch_size=bs, max_length=s.max_length)
             for k, v in recs.items()}
        calib, test = b["calib"], b["test"]
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
        task = "classification"
    else:
        raise InvalidArgumentError(f"eval handles causal-lm and classification models; {lm.name} is {lm.task}")

    def on_run(r: dict) -> None:
        lvl = "token" if r["block"] is None else f"block {r['block']}"
        v = f"{100 * r['value']:.2f}%" if task == "classification" else f"{r['value']:.3f}"
        ach = "-" if r["achieved"] is None else f"{r['achieved']:.3f}"
        log(f"  {lvl:9s} {r['policy']:7s} sparsity {r['sparsity']:<5g} (achieved {ach}): {v}")

    stats_path = out / "stats.safetensors"

    def on_stats(st) -> None:
        st.save(stats_path)
        log(f"observed {len(st.sites)} attention sites on {st.num_sequences} calibration sequences; "
            f"stats saved to {stats_path} (reuse with --stats)")

    def on_dense(d) -> None:
        v = f"{100 * d.value:.2f}%" if task == "classification" else f"{d.value:.3f}"
        log(f"dense {d.metric}: {v} ({d.count} {'examples' if task == 'classification' else 'predicted tokens'}, "
            f"{d.seconds:.1f} s)")

    result, stats, _ = sweep(model, calib, test, task=task, config=config, stats=stats, model_name=lm.name,
                             data_info=info, progress=s.progress, on_run=on_run, on_stats=on_stats,
                             on_dense=on_dense, description=ds.describe(s.calib_split))
    result.timings.update(timings)
    if s.stats:
        stats_path = Path(s.stats)
    result.timings["total_s"] = time.perf_counter() - t_start
    files = write_report(result, out, stats=stats if s.heatmaps else None,
                         title=s.title or f"{lm.name} on {ds.name}: {result.metric} vs attention sparsity")
    files["stats"] = stats_path
    files["result"] = result
    files["seconds"] = time.perf_counter() - t_start
    return files


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


def _block(v: str) -> int | None:
    if v.lower() in ("0", "none", "token"):
        return None
    try:
        b = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size must be an integer or 'token', not {v!r}") from None
    if b < 1:
        raise argparse.ArgumentTypeError(f"block size must be positive, not {b}")
    return b


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsities", type=float, nargs="+", default=None,
                   help=f"target sparsities in [0, 1) (default {' '.join(map(str, DEFAULT_SPARSITIES))})")
    p.add_argument("--policies", nargs="+", default=None,
                   help=f"mask policies (default {' '.join(DEFAULT_POLICIES)})")
    p.add_argument("--blocks", type=_block, nargs="+", default=None,
                   help="granularities: 'token' for token level, an integer b for b x b blocks (default: token 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random policy and torch (default 0)")
    p.add_argument("--backend", default="reference", help="attention backend under the mask (default reference)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the GPU when present, else cpu)")
    p.add_argument("-o", "--out", default=None, help="output folder (default runs/eval-<model>-<data>)")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the attention heatmap plots")


def register(sub) -> None:
    p = sub.add_parser("eval", help="quality vs attention sparsity (perplexity or accuracy), with a report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model spec (smollm2, minilm, hf:<dir>, tiny-gpt2, ...)")
    p.add_argument("--data", default="austen", help="data spec (austen, sentiment, text:<file>, jsonl:<file>, ...)")
    p.add_argument("--seq-len", type=int, default=256, help="causal LM: tokens per sequence (default 256)")
    p.add_argument("--calib", type=int, default=None,
                   help="calibration size: sequences (LM, default 32) or examples (classifier, default 1000)")
    p.add_argument("--test", type=int, default=None,
                   help="test size: sequences (LM, default 16) or examples (classifier, default 1000)")
    p.add_argument("--train", type=int, default=4000, help="classifier: training examples for the head (default 4000)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8; classifiers at least 32)")
    p.add_argument("--max-length", type=int, default=64, help="classifier: max tokens per example (default 64)")
    p.add_argument("--finetune", action="store_true", help="classifier: fine-tune the encoder with the head")
    p.add_argument("--epochs", type=int, default=1, help="classifier with --finetune: fine-tuning epochs (default 1)")
    p.add_argument("--lr", type=float, default=None, help="classifier with --finetune: AdamW learning rate (default 2e-5)")
    p.add_argument("--stats", default=None, help="reuse attention stats observed earlier on the calibration split")
    p.add_argument("--beyond", choices=("error", "dense"), default="error",
                   help="inputs longer than the calibrated length: error (default) or dense there")
    p.add_argument("--calib-split", default="calibration")
    p.add_argument("--test-split", default="test")
    p.add_argument("--train-split", default="train")
    add_sweep_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    s = EvalSettings(
        model=args.model, data=args.data,
        out=args.out or f"runs/eval-{args.model.replace(':', '-')}-{Path(args.data).name.replace(':', '-')}",
        calib_split=args.calib_split, train_split=args.train_split, test_split=args.test_split,
        seq_len=args.seq_len, calib=args.calib, test=args.test, train=args.train, batch_size=args.batch_size,
        max_length=args.max_length, finetune=args.finetune, epochs=args.epochs, lr=args.lr,
        sparsities=tuple(args.sparsities or DEFAULT_SPARSITIES), policies=tuple(args.policies or DEFAULT_POLICIES),
        blocks=tuple(args.blocks) if args.blocks else (None, 16), seed=args.seed, backend=args.backend,
        beyond=args.beyond, device=args.device, stats=args.stats, heatmaps=not args.no_heatmaps,
        progress=not getattr(args, "quiet", False),
    )
    files = run_eval(s)
    print_outputs(files)
    return 0


def print_outputs(files: dict) -> None:
    print("wrote:")
    for k in ("markdown", "json", "quality_plot", "kept_mass_plot", "heatmaps", "stats"):
        v = files.get(k)
        if v is None:
            continue
        for p in (v if isinstance(v, list) else [v]):
            print(f"  {p}")
