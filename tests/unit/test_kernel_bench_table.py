"""The kernel benchmark's registry and table (CPU: no timing, rows made here)."""

from attnprune.bench import kernels as bm


def _row(impl, ms, mode="fwd", density=0.1, tflops=None):
    cfg = bm.BenchConfig(head_dim=64, length=4096, density=density, causal=True, batch=8)
    return bm.rows_to_json([bm.BenchRow(cfg, mode, impl, ms, tflops, 0.05)])[0]


def test_every_impl_has_a_factory():
    assert set(bm.IMPLS) == set(bm.IMPL_FNS) and set(bm.DENSE) <= set(bm.IMPLS)


def test_table_picks_the_faster_of_ours_and_compares_with_fa4():
    rows = [_row("cudnn", 4.0), _row("fa4", 1.0), _row("ours", 1.5, tflops=10.0), _row("ours-flash", 1.02, tflops=99.0),
            _row("flex-flash", None)]
    table = bm.markdown_table(rows)
    head, _, line = table.splitlines()
    assert "| cudnn ms | flex-flash ms | fa4 ms | ours ms | ours-flash ms |" in head  # IMPLS order, timed ones only
    assert "| flash ms |" not in head
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-3:] == ["99 (ours-flash)", "3.92x", "1.02"]  # 4.0 / 1.02, 1.02 / 1.0
    assert cells[8] == "—"  # flex-flash failed: no time


def test_run_config_interleaves_rounds_and_reports_their_median():
    """Every implementation is timed once per round, the order rotated each round (so a drift during the
    configuration is shared); the row's time is the median of its rounds; an implementation that cannot
    be built (FA4 missing here) is a row without a time, not a failure; rounds < 1 is refused."""
    import pytest

    calls = []

    def timer(fn, q, k, v, mode):
        calls.append(fn)
        return 1.0 + 0.25 * len(calls)  # a GPU that drifts slower with every call

    cfg = bm.BenchConfig(head_dim=16, length=256, density=0.5, causal=True, batch=1, heads=2, dtype="float32")
    rows = bm.run_config(cfg, impls=("ours", "ours-flash", "fa4"), modes=("fwd",), rounds=3, timer=timer,
                         device="cpu", log=lambda *a: None)
    first = {calls[0]: "ours", calls[1]: "ours-flash"}
    assert [first[f] for f in calls] == ["ours", "ours-flash", "ours-flash", "ours", "ours", "ours-flash"]
    by = {r.impl: r for r in rows}
    assert by["ours"].extra["rounds_ms"] == [1.25, 2.0, 2.25] and by["ours"].ms == 2.0
    assert by["ours-flash"].extra["rounds_ms"] == [1.5, 1.75, 2.5] and by["ours-flash"].ms == 1.75
    assert by["fa4"].ms is None and "Error" in by["fa4"].note
    with pytest.raises(ValueError):
        bm.run_config(cfg, impls=("ours",), modes=("fwd",), rounds=0, timer=timer, device="cpu")


def test_run_config_with_grouped_query_heads_times_the_right_attention():
    """``kv_heads``: k and v get fewer heads than q, and each implementation computes attention with every
    key/value head shared by its group of query heads (checked here against float64 for the Triton
    kernels, run by the interpreter); a head count that does not divide is refused before any work."""
    import pytest
    import torch

    got = {}

    def timer(fn, q, k, v, mode):
        got["shapes"] = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
        got["out"], got["qkv"] = fn(q, k, v).detach(), (q.detach(), k.detach(), v.detach())
        return 1.0

    cfg = bm.BenchConfig(head_dim=16, length=200, density=0.5, causal=True, batch=1, heads=4, dtype="float32",
                         kv_heads=2)
    rows = bm.run_config(cfg, impls=("ours",), modes=("fwd",), rounds=1, timer=timer, device="cpu",
                         log=lambda *a: None)
    assert rows[0].ms == 1.0
    assert got["shapes"] == ((1, 4, 200, 16), (1, 2, 200, 16), (1, 2, 200, 16))
    q, k, v = (t.double() for t in got["qkv"])
    layout = bm.random_block_layout(4, 200, 0.5, causal=True, seed=hash((200, 16, 0.5)) % 2**31, device="cpu")
    blocks = layout.block_mask().cpu()  # [4, 2, 2] of 128-blocks
    allowed = blocks.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :200, :200]
    allowed &= torch.ones(200, 200, dtype=torch.bool).tril()
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)  # query heads 0,1 -> kv 0; 2,3 -> kv 1
    s = (q @ k.transpose(-1, -2)) / 4.0
    ref = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    err = (got["out"].double() - ref).abs().max().item()
    # float32 rounding: dots of 16 terms, softmax and P @ V sums of up to 200 terms, scaled by the values
    assert err <= (16 + 200) * torch.finfo(torch.float32).eps * v.abs().max().item()
    with pytest.raises(ValueError, match="multiple"):
        bm.run_config(bm.BenchConfig(16, 200, 0.5, True, 1, heads=4, dtype="float32", kv_heads=3),
                      impls=("ours",), modes=("fwd",), timer=timer, device="cpu", log=lambda *a: None)
