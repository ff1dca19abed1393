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
