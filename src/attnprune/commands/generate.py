"""``attnprune generate``: text generation with a prune mask attached.

    attnprune generate --model smollm2 --mask mask.safetensors --prompt "It is a truth universally"
    attnprune generate --model smollm2 --mask mask.safetensors --prompt-file prompt.txt --beyond extend \\
        --max-new-tokens 256 --cache pruned
    attnprune generate --model tiny-llama --mask mask.safetensors --prompt-ids "5 17 3"   # no tokenizer

Prints the generated continuation (text, or token ids for models without a tokenizer) on stdout and
one line on stderr: new tokens, tokens/s and, with ``--cache pruned`` (the default), the key/value
bytes the cache holds against a dense cache's. ``--cache stock`` uses transformers' default cache.
Decoding is greedy unless ``--sample`` (then ``--temperature`` / ``--top-k``, seeded by ``--seed``).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

from ..errors import InvalidArgumentError
from ..mask import BEYOND
from .common import usable_device, use_shared


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand."""
    p = sub.add_parser("generate", help="generate text with a mask attached (pruned KV cache, --beyond extend)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a causal LM spec (smollm2, tiny-llama, hf:DIR, ...)")
    p.add_argument("--mask", default=None, help="mask file made for this model; omit to generate densely")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="a file holding the prompt text")
    src.add_argument("--prompt-ids", help="prompt token ids, e.g. '5 17 3' (models without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--beyond", choices=BEYOND, default="error",
                   help="past the mask's calibrated length: error (default), dense, or extend")
    p.add_argument("--cache", choices=("pruned", "stock"), default="pruned",
                   help="pruned: attnprune.PrunedKVCache (default); stock: transformers' default cache")
    p.add_argument("--cuda-graph", action="store_true",
                   help="greedy decoding through attnprune.decode_greedy: one decode step captured as a CUDA graph "
                        "and replayed (into the pruned cache, or a StaticCache without --mask); eager on the CPU")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample (default 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="with --sample (default 50)")
    use_shared(p, seed=(0, "sampling seed (default 0)"),
               backend=("auto", "attention backend for the prompt: auto (default), reference, triton, flex, flash"),
               device=(None, "cpu, cuda, cuda:1 (default: GPU if present)"))
    p.set_defaults(func=cmd_generate)


def _check(args) -> None:
    if args.max_new_tokens < 1:
        raise InvalidArgumentError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.cache == "pruned" and args.beyond == "dense":
        raise InvalidArgumentError("--cache pruned needs --beyond error or extend: past the calibrated length "
                                   "'dense' reads every key again; use --cache stock with --beyond dense")
    if args.cuda_graph and (args.sample or (args.mask is not None and args.cache == "stock")):
        raise InvalidArgumentError("--cuda-graph decodes greedily into the pruned cache (or, without --mask, a "
                                   "StaticCache): drop --sample / --cache stock, or drop --cuda-graph")
    if args.sample and (args.temperature <= 0 or args.top_k < 1):
        raise InvalidArgumentError("--temperature must be > 0 and --top-k >= 1")
    if args.prompt_file is not None and not Path(args.prompt_file).is_file():
        raise InvalidArgumentError(f"--prompt-file {args.prompt_file}: no such file")
    if args.mask is not None and not Path(args.mask).is_file():
        raise InvalidArgumentError(f"--mask {args.mask}: no such mask file")


def _prompt_ids(args, loaded):
    import torch

    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise InvalidArgumentError(f"--prompt-ids must be integers, got {args.prompt_ids!r}") from None
        if not ids or min(ids) < 0 or max(ids) >= loaded.vocab_size:
            raise InvalidArgumentError(f"--prompt-ids must be 1 or more ids in 0..{loaded.vocab_size - 1}")
        return torch.tensor([ids])
    if loaded.tokenizer is None:
        raise InvalidArgumentError(f"model {args.model!r} has no tokenizer: give the prompt as --prompt-ids")
    text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise InvalidArgumentError("the prompt is empty")
    return ids


def cmd_generate(args) -> int:
    import contextlib

    import torch

    from .. import PrunedKVCache, apply
    from ..mask import PruneMask
    from ..models import load_model

    _check(args)
    device = usable_device(args.device)
    mask = PruneMask.load(args.mask) if args.mask is not None else None
    loaded = load_model(args.model)
    if loaded.task != "causal-lm":
        raise InvalidArgumentError(f"model {args.model!r} is a {loaded.task} model; generate needs a causal LM")
    model = loaded.model.to(device).eval()
    ids = _prompt_ids(args, loaded).to(device)
    if mask is not None and args.beyond == "error":
        need = ids.shape[1] + args.max_new_tokens - 1  # the last new token is not fed back
        have = min(mask.site(n).q_len for n in mask.sites)
        if need > have:
            raise InvalidArgumentError(
                f"the prompt ({ids.shape[1]} tokens) and {args.max_new_tokens} new tokens need {need} positions, "
                f"but the mask is calibrated for {have}: pass --beyond extend, or ask for fewer tokens")
    kw = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=args.sample,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    if args.sample:
        kw.update(temperature=args.temperature, top_k=args.top_k)
    torch.manual_seed(args.seed)
    ctx = apply(model, mask, backend=args.backend, beyond=args.beyond) if mask is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        cache = PrunedKVCache(model, mask) if mask is not None and args.cache == "pruned" else None
        if cache is not None:  # transformers 5.24 names it `cache`, earlier versions `past_key_values`
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            kw[name] = cache
        t0 = time.perf_counter()
        if args.cuda_graph:
            from ..decode_loop import decode_greedy

            out = decode_greedy(model, ids, cache, args.max_new_tokens)
        else:
            out = model.generate(ids, **kw)
        seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    if loaded.tokenizer is not None:
        print(loaded.tokenizer.decode(new, skip_special_tokens=True))
    else:
        print(" ".join(str(int(t)) for t in new))
    line = f"generate: {new.numel()} new tokens in {seconds:.2f} s ({new.numel() / seconds:.1f} tokens/s)"
    if cache is not None:
        b = cache.kv_bytes()
        line += f"; KV cache holds {_size(b['held'])}, {100 * b['share']:.1f}% of a dense cache's {_size(b['dense'])}"
    if not args.quiet:
        print(line, file=sys.stderr)
    return 0


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
