"""``attnprune finetune``: fine-tune a model with a prune mask attached.

    attnprune finetune --model smollm2 --data austen --mask mask.safetensors --seq-len 256 \\
        --steps 200 --lr 1e-4 --batch-size 8 --out runs/ft
    attnprune finetune ... --out runs/ft --resume          # continue an interrupted run
    torchrun --nproc-per-node 2 -m attnprune finetune ...   # data-parallel (NCCL on GPUs, gloo on CPU)

Without ``--mask`` the model is fine-tuned densely (the control). Causal LMs train on
``--seq-len``-token windows of the dataset's ``--split`` (default ``train``); classifiers on its
labelled examples (truncated to ``--max-length`` tokens). Writes checkpoints, ``metrics.jsonl``,
``summary.json`` and ``model.safetensors`` (and with ``--save-hf`` a Hugging Face model folder
``hf/``) into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..mask import BEYOND
from ..errors import InvalidArgumentError
from .common import check_output_dir, usable_device, use_shared


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` subcommand."""
    p = sub.add_parser("finetune", help="fine-tune a model with a mask attached (causal LM or classification)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model spec (smollm2, minilm, tiny-gpt2, hf:DIR, ...)")
    p.add_argument("--data", required=True, help="data source (austen, sentiment, text:FILE, jsonl:FILE, random, ...)")
    p.add_argument("--mask", default=None, help="mask file (.safetensors) made for this model; omit for dense fine-tuning")
    p.add_argument("--out", "-o", required=True, help="output folder (checkpoints, metrics.jsonl, weights)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--split", default="train", help="dataset split to train on (default train)")
    p.add_argument("--seq-len", type=int, default=256, help="causal LM: tokens per training sequence (default 256)")
    p.add_argument("--max-length", type=int, default=128, help="classification: truncate texts to this many tokens")
    p.add_argument("--max-examples", type=int, default=None, help="use at most this many sequences/examples")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in total (default 100)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch per process (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--schedule", default="linear", choices=("linear", "cosine", "constant"),
                   help="learning-rate decay after warm-up (default linear)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off; default 1)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on a GPU, fp32 on the CPU (default auto)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default 2)")
    p.add_argument("--log-every", type=int, default=1, help="metrics line every N steps (default 1)")
    p.add_argument("--max-steps-this-run", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps; resume later with --resume")
    use_shared(p, seed=(0, "data order and RNG seed (default 0)"),
               backend=("auto", "attention backend: reference, triton, flex, or auto (default: triton on a GPU, "
                                "else reference)"),
               device=(None, "cpu, cuda, cuda:1 (default: GPU if present)"))
    p.add_argument("--beyond", default="error", choices=BEYOND,
                   help="inputs longer than the mask's calibrated length: error, dense outside it, or extend "
                        "(each head's sinks and band continued)")
    p.add_argument("--save-hf", action="store_true", help="also write a Hugging Face model folder out/hf")
    p.set_defaults(func=cmd_finetune)


def training_examples(loaded, data_spec: str, *, split: str, seq_len: int, max_length: int,
                      max_examples: int | None):
    """Training examples for :func:`attnprune.train.finetune` and a description of them.

    Causal LM: ``LongTensor[n, seq_len]`` windows of the split's token stream. Classification:
    a list of ``{"input_ids", "attention_mask", "labels"}`` dicts, unpadded.
    """
    import torch

    from .. import data
    from ..data.inputs import inputs_for

    if data_spec == "random":
        from ..data.random import RandomTokens

        if loaded.task != "causal-lm":
            raise InvalidArgumentError("--data random only trains causal LMs")
        n = max_examples or 64
        rows = torch.cat([b["input_ids"] for b in RandomTokens(loaded.vocab_size, n, seq_len, 64, seed=1234,
                                                               low=min(3, loaded.vocab_size - 1))])
        return rows, f"random tokens ({n} x {seq_len}, seed 1234)"
    ds = data.load_dataset(data_spec)
    if split not in ds.splits:
        raise InvalidArgumentError(f"dataset {ds.name!r} has no split {split!r}; its splits: "
                                   f"{', '.join(ds.splits)}")
    inputs = inputs_for(loaded, ds)
    examples = inputs.examples(ds[split], loaded.tokenizer, seq_len=seq_len, max_items=max_examples,
                               max_length=max_length)
    if isinstance(examples, torch.Tensor):
        return examples, f"{ds.describe(split)}: {examples.shape[0]} sequences x {seq_len} tokens"
    return examples, f"{ds.describe(split)}: {len(examples)} examples, <= {max_length} tokens"


def cmd_finetune(args) -> int:
    """Run ``attnprune finetune``."""
    from ..mask import PruneMask
    from ..models import load_model
    from ..runtime import init_distributed
    from ..train import CheckpointError, TrainConfig, finetune, list_checkpoints

    out = check_output_dir(args.out)
    cfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      warmup_steps=args.warmup, schedule=args.schedule, weight_decay=args.weight_decay,
                      max_grad_norm=args.max_grad_norm or None, precision=args.precision,
                      checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                      log_every=args.log_every, seed=args.seed, max_steps_this_run=args.max_steps_this_run,
                      backend=args.backend, beyond=args.beyond, device=args.device, progress=not args.quiet)
    cfg.validate()
    mask = PruneMask.load(args.mask) if args.mask else None  # a missing / corrupt file fails before loading
    # the same checks finetune() makes, before the (slow) model load
    if args.resume and not list_checkpoints(out):
        raise CheckpointError(f"--resume: no checkpoint in {out / 'checkpoints'}; start the run without --resume")
    if not args.resume and list_checkpoints(out):
        raise CheckpointError(f"{out} already holds checkpoints; pass --resume to continue that run, "
                              f"or choose another --out")
    usable_device(args.device)  # the device finetune() will pick; an unusable one fails before the model load
    rank, world = init_distributed()
    try:
        loaded = load_model(args.model)
        examples, description = training_examples(loaded, args.data, split=args.split, seq_len=args.seq_len,
                                                   max_length=args.max_length, max_examples=args.max_examples)
        pad = getattr(getattr(loaded.model, "config", None), "pad_token_id", None)
        if isinstance(pad, int):
            cfg.pad_id = pad
        if rank == 0:
            what = f"mask {args.mask} ({mask.policy}, sparsity {mask.sparsity:.3f})" if mask else "no mask (dense)"
            print(f"finetune {loaded.name} ({loaded.task}) on {description}; {what}; world size {world}", flush=True)
        meta = {"model": args.model, "model_name": loaded.name, "data": args.data, "data_description": description,
                "mask": str(args.mask) if args.mask else None}
        result = finetune(loaded.model, examples, mask=mask, task=loaded.task, out_dir=out, config=cfg,
                          resume=args.resume, extra_meta=meta)
        if rank == 0:
            if args.save_hf and result.finished and hasattr(loaded.model, "save_pretrained"):
                _save_hf(loaded, out / "hf")
            state = "finished" if result.finished else f"stopped at step {result.step} of {cfg.steps} (resume with --resume)"
            print(f"{state}; last loss {result.last_loss:.4f}; wrote {out} "
                  f"(metrics.jsonl, checkpoints/{', model.safetensors' if result.weights else ''})", flush=True)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _save_hf(loaded, target: Path) -> None:
    """``save_pretrained`` into a temporary folder beside ``target``, then rename it into place."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".hf.", dir=target.parent))
    try:
        loaded.model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
