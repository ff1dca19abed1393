"""Static profile of the Triton kernels as compiled for an H100/H200 (sm90), without a GPU.

Triton compiles for a target it is not running on (``triton.compile(..., target=GPUTarget("cuda", 90, 32))``,
with the ptxas of its wheel), so the SASS of the project's kernels can be read on a CPU machine: the
instruction count, special-function ops (``MUFU``: exp2, tanh, reciprocal), global loads (``LDG``), local-memory traffic (``LDL``/``STL``: register spills) and the
shared memory a program needs (which bounds how many programs an SM holds). These are not times: they
say what a change does to the code, before a GPU measures what it does to the speed.

    python3 bench/sass_stats.py                 # the kernels as configured (CONFIGS), this process's variant
    python3 bench/sass_stats.py --ab-bits       # ATTNPRUNE_TRITON_BITS=rows vs gather, one process each
    python3 bench/sass_stats.py --json out.json
    python3 bench/sass_stats.py --softcap       # the same with Gemma 2's logit soft-capping compiled in
    python3 bench/sass_stats.py --softcap --fast-tanh   # capping through the hardware tanh (FAST_TANH)

Kernels: ``_fwd_kernel``, ``_dq_kernel``, ``_dkdv_kernel`` at head dims 64 and 128 with their tuned tile
configuration (``kernels.attention.CONFIGS``), 128 x 128 layout blocks, bf16, not causal, no key padding, with
and without token-exact bitmasks (``HAS_BITS``). The compiler is this machine's Triton (3.9 in CI), not the
GPU machine's (3.6): counts differ between versions; compare variants compiled by the same one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

_PTR = {"LSE": "*fp32", "DELTA": "*fp32", "KPM": "*i8", "BITS": "*i32", "FPTR": "*i32", "FCLEAN": "*i32",
        "FCOL": "*i32", "SINK": "*fp32", "FCODE": "*i32", "BPTR": "*i32", "BCLEAN": "*i32", "BROW": "*i32", "BCODE": "*i32"}
_BF16 = {"Q", "K", "V", "O", "KD", "VD", "DO", "DQ", "DK", "DV_"}
_FLOAT = {"qk_scale", "sm_scale"}


def compile_stats(kernel: str, d: int, has_bits: bool, cfg=None, softcap: bool = False, fast_tanh: bool = False) -> dict:
    """Compile one kernel for sm90 and count its SASS (``cfg``: a ``KernelConfig``, default the tuned one)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from attnprune.kernels import _triton as T
    from attnprune.kernels.attention import get_config

    fn = getattr(T, f"_{kernel}_kernel")
    cfg = cfg or get_config(kernel, d, (128, 128))
    cx = dict(BQ=128, BK=128, NW=4, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D=d, DV=d, CAUSAL=False,
              HAS_KPM=False, HAS_BITS=has_bits)
    # logit soft-capping (Gemma 2) is compiled in only when asked: the constants of a cap of 50 at d**-0.5
    cx.update(SOFTCAP=softcap, CAP_IN=(d ** -0.5) / 50.0 if softcap else 0.0, CAP_OUT=50.0 * 1.4426950408889634
              if softcap else 0.0, FAST_TANH=fast_tanh)
    if kernel == "fwd":
        cx["USE_TMA"] = False  # masked tiles never use TMA; keep the loads comparable
    else:
        cx["PRESCALE"] = bool(cfg.prescale)
    sig = {}
    for name in fn.arg_names:
        sig[name] = ("constexpr" if name in cx else _PTR.get(name) or ("*bf16" if name in _BF16 else None)
                     or ("fp32" if name in _FLOAT else "i32"))
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ins = _instructions(k.asm["cubin"])
    return {"kernel": kernel, "d": d, "bits": has_bits, "softcap": softcap, "fast_tanh": fast_tanh, "tile": f"{cfg.block_m}x{cfg.block_n}",
            "warps": cfg.num_warps, "stages": cfg.num_stages,
            "instructions": len(ins), "LDG": sum(1 for i in ins if re.match(r"(@!?U?P\d+ )?LDG", i)),
            "MUFU": sum(1 for i in ins if re.match(r"(@!?U?P\d+ )?MUFU", i)),
            "LDL+STL": sum(1 for i in ins if re.match(r"(@!?U?P\d+ )?(LDL|STL)", i)),
            "shared_bytes": k.metadata.shared}


def _instructions(cubin: bytes) -> list[str]:
    """The SASS instructions of a cubin, from ``cuobjdump -sass`` (Triton's wheel carries it); parsed here
    rather than with ``triton.tools.disasm``, whose 4-hex-digit address pattern stops at 4096 instructions
    in Triton 3.6."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.check_output([knobs.nvidia.cuobjdump.path, "-sass", f.name], text=True)
    return [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", text)]


def run_all(softcap: bool = False, fast_tanh: bool = False) -> list[dict]:
    return [compile_stats(kn, d, bits, softcap=softcap, fast_tanh=fast_tanh) for kn in ("fwd", "dq", "dkdv") for d in (64, 128)
            for bits in (False, True)]


def _child(variant: str) -> list[dict]:
    env = dict(os.environ, ATTNPRUNE_TRITON_BITS=variant, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"sass-{variant}-"))
    out = subprocess.run([sys.executable, __file__, "--json", "-"], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ab-bits", action="store_true", help="compare ATTNPRUNE_TRITON_BITS=rows with gather")
    ap.add_argument("--json", default=None, help="write the rows as JSON here ('-': stdout only)")
    ap.add_argument("--softcap", action="store_true", help="the kernels with logit soft-capping compiled in")
    ap.add_argument("--fast-tanh", action="store_true", help="with --softcap: the hardware tanh.approx (FAST_TANH)")
    a = ap.parse_args()
    if a.json == "-":
        print(json.dumps(run_all()))
        return
    if a.ab_bits:
        rows, gather = _child("rows"), _child("gather")
        print("| kernel | d | tile | bitmask | instructions rows / gather | LDG | LDL+STL | shared KiB |")
        print("|---|---|---|---|---|---|---|---|")
        for r, g in zip(rows, gather):
            print(f"| {r['kernel']} | {r['d']} | {r['tile']} | {'yes' if r['bits'] else 'no'} | "
                  f"{r['instructions']} / {g['instructions']} | {r['LDG']} / {g['LDG']} | "
                  f"{r['LDL+STL']} / {g['LDL+STL']} | {r['shared_bytes'] / 1024:.1f} / {g['shared_bytes'] / 1024:.1f} |")
        result = {"rows": rows, "gather": gather}
    else:
        result = run_all(a.softcap, a.fast_tanh)
        for r in result:
            print(json.dumps(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
