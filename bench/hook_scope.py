"""Hook scope of the capture path (issue 9): hooked modules, hook calls and CPU wall time per forward.

    PYTHONPATH=src python3 bench/hook_scope.py 64 100 narrow     # length, reps, full | narrow

SmolLM2 architecture, random weights, float32, on the CPU (``narrow``: its module structure, 30 layers,
397 modules, 9/3 heads, at width 72 and vocabulary 256, so Python overhead dominates). Two copies of the
model (same weights): one plain, one with an all-kept block mask attached through the reference backend;
forwards alternate between them. Prints the modules that still carry the interceptor's hooks after the
first forward, the hook calls of one forward, and the wall-time differences (min and median over reps)
for the mask and for a pass-through ``intercept`` (the capture path alone).
"""
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

import attnprune  # noqa: E402
from attnprune.bench.model import build_model, discover_sites, synthetic_mask  # noqa: E402
from attnprune.capture import Interceptor  # noqa: E402

L, B, REPS = int(sys.argv[1]), 1, int(sys.argv[2])
WIDTH = sys.argv[3] if len(sys.argv) > 3 else "full"
model, cfg, _ = build_model("smollm2", L, torch.device("cpu"), torch.float32)
if WIDTH == "narrow":  # SmolLM2's structure (30 layers, 397 modules, 9/3 heads) at width 72, vocab 256
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=72, intermediate_size=192, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
model.eval()
infos = discover_sites(model, cfg.vocab_size, torch.device("cpu"))
mask = synthetic_mask(infos, L, 0.0, 16)
ids = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(0))
masked = copy.deepcopy(model)

def fwd(m):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits

def ours(h):
    return isinstance(getattr(h, "__self__", None), Interceptor)

def count_hooks(m):
    n, saved = [0], []
    for mod in m.modules():
        for d in (mod._forward_pre_hooks, mod._forward_hooks):
            for k, h in list(d.items()):
                if ours(h):
                    def w(*a, _h=h, **kw):
                        n[0] += 1
                        return _h(*a, **kw)
                    saved.append((d, k, h)); d[k] = w
    fwd(m)
    for d, k, h in saved:
        d[k] = h
    hooked = sum(1 for mod in m.modules() if any(ours(h) for h in mod._forward_pre_hooks.values()))
    return n[0], hooked

ref = fwd(model)
with attnprune.apply(masked, mask, backend="reference"):
    out = fwd(masked)  # first forward (decides mode_needed)
    calls, hooked = count_hooks(masked)
    for _ in range(3):
        fwd(model), fwd(masked)
    td, tm = [], []
    for _ in range(REPS):
        t0 = time.perf_counter(); fwd(model); t1 = time.perf_counter(); fwd(masked); t2 = time.perf_counter()
        td.append((t1 - t0) * 1e3); tm.append((t2 - t1) * 1e3)
    same = torch.equal(out, fwd(masked))
d, m = statistics.median(td), statistics.median(tm)
from attnprune.capture import intercept  # noqa: E402
with intercept(masked, lambda c: None):  # pass-through handler: the capture path alone (SDPA computes)
    for _ in range(3):
        fwd(masked)
    tp, td2 = [], []
    for _ in range(REPS):
        t0 = time.perf_counter(); fwd(model); t1 = time.perf_counter(); fwd(masked); t2 = time.perf_counter()
        td2.append((t1 - t0) * 1e3); tp.append((t2 - t1) * 1e3)
print(f"pass-through intercept: min no mask {min(td2):.2f} ms, intercepted {min(tp):.2f} ms, difference "
      f"{min(tp) - min(td2):.2f} ms; medians {statistics.median(td2):.2f} / {statistics.median(tp):.2f} ms")
print(f"min over reps: no mask {min(td):.2f} ms, mask {min(tm):.2f} ms, difference {min(tm) - min(td):.2f} ms")
print(f"modules {sum(1 for _ in masked.modules())}; after the first forward {hooked} modules carry hooks, "
      f"{calls} hook calls per forward; max |masked - dense| {float((out - ref).abs().max()):.2e}; repeat equal {same}")
print(f"{WIDTH} L={L} B={B} reps={REPS} threads={torch.get_num_threads()}: no mask {d:.2f} ms, all-kept mask (reference) "
      f"{m:.2f} ms, difference {m - d:.2f} ms (median of per-pair differences "
      f"{statistics.median(b - a for a, b in zip(td, tm)):.2f} ms)")
