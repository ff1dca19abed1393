"""Host work of the masked model per attention call, on the CPU, with the Triton launches stubbed out (issue 9).

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 PYTHONPATH=src python3 bench/host_profile.py [reps] [--profile]

SmolLM2's module structure (30 layers, 9/3 heads) with its head dimension 64 (width 576) but an MLP of 64 and vocabulary 256, 32 tokens, float32,
no_grad; a 50% synthetic 16-block mask through ``backend="triton"`` with every Triton kernel replaced
by a no-op (``attnprune.kernels.attention._kernels``), so what remains is attnprune's own Python/host
work plus the tensor allocations of the call. Printed: median forward wall time of the plain model, of
the model with a pass-through ``intercept`` (capture path only) and of the masked model, and the
per-attention-call difference to the plain model. ``--profile``: the top functions of cProfile on
the masked forward. On the GPU the Triton launch itself (~40 arguments) comes on top of this.
"""
from __future__ import annotations

import cProfile
import copy
import os
import pstats
import statistics
import sys
import time
import types

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402
import transformers  # noqa: E402

import attnprune  # noqa: E402
from attnprune.bench.model import discover_sites, synthetic_mask  # noqa: E402
from attnprune.capture import intercept  # noqa: E402
from attnprune.kernels import attention as kattn  # noqa: E402

REPS = int(next((a for a in sys.argv[1:] if a.isdigit()), "30"))
L = 32


class _NoLaunch:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *a, **kw: None


def _stub_kernels():
    fake = types.SimpleNamespace(_fwd_kernel=_NoLaunch(), _dq_kernel=_NoLaunch(), _dkdv_kernel=_NoLaunch(),
                                 _delta_kernel=_NoLaunch())
    kattn._kernels = lambda: fake


def _median_ms(fn, reps):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main() -> int:
    torch.set_num_threads(1)
    _stub_kernels()
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=64, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    infos = discover_sites(model, cfg.vocab_size, torch.device("cpu"))
    mask = synthetic_mask(infos, L, 0.5, 16)
    ids = torch.randint(0, cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(0))
    masked, passthru, empty = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    calls = len(infos)

    def fwd(m):
        with torch.no_grad():
            return m(input_ids=ids, use_cache=False).logits

    def no_attention(call):  # the capture path with an attention of no cost
        return call.q.new_empty(*call.q.shape[:3], call.v.shape[-1])

    with attnprune.apply(masked, mask, backend="triton"), intercept(passthru, lambda call: None), \
            intercept(empty, no_attention):
        t_plain = _median_ms(lambda: fwd(model), REPS)
        t_pass = _median_ms(lambda: fwd(passthru), REPS)
        t_empty = _median_ms(lambda: fwd(empty), REPS)
        t_mask = _median_ms(lambda: fwd(masked), REPS)
        print(f"plain {t_plain:.2f} ms, pass-through intercept {t_pass:.2f} ms, no-cost attention through the "
              f"capture path {t_empty:.2f} ms, masked (kernels stubbed) {t_mask:.2f} ms per forward; "
              f"{calls} attention calls")
        print(f"per call: capture path {(t_pass - t_plain) / calls * 1e3:.0f} us over plain; masked "
              f"{(t_mask - t_empty) / calls * 1e3:.0f} us over the no-cost attention (apply + backend + launch prep)")
        if "--profile" in sys.argv:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(10):
                fwd(masked)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
            pstats.Stats(pr).sort_stats("cumtime").print_stats("attnprune", 25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
