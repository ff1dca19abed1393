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
