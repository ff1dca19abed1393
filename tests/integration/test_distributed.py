"""Two-process gloo observation reduces to the same statistics as one process on all the data."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tiny_models as tm
from attnprune.errors import MaskMismatchError
from attnprune.observe import observe
from attnprune.sites import SiteInfo
from attnprune.stats import AttentionStats


def _data():
    """Batches of different lengths; the ranks' longest sequences differ (the reduce must grow them)."""
    return [tm.batch([6, 3], 6, seed=0), tm.batch([4], 4, seed=1), tm.batch([9, 2, 5], 9, seed=2)]


def _shard(rank):
    return [b for i, b in enumerate(_data()) if i % 2 == rank]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for g in (1, 4):
            stats = observe(tm.mha(), _shard(rank), granularity=g, progress=False)
            stats.all_reduce()
            stats.save(os.path.join(out_dir, f"g{g}rank{rank}.safetensors"))
        other = AttentionStats([SiteInfo("x", "self", 2 + rank, 2)])  # different models on the ranks
        try:
            other.all_reduce()
        except MaskMismatchError as e:
            open(os.path.join(out_dir, f"mismatch{rank}"), "w").write(str(e))
        # same sites, different models (e.g. two widths of one architecture)
        named = AttentionStats([SiteInfo("x", "self", 2, 2)], model_name=f"model-{rank}")
        try:
            named.all_reduce()
        except MaskMismatchError as e:
            open(os.path.join(out_dir, f"named{rank}"), "w").write(str(e))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_process_gloo_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for g, rank in [(1, 0), (1, 1), (4, 0), (4, 1)]:
        single = observe(tm.mha(), _data(), granularity=g, progress=False)
        got = AttentionStats.load(tmp_path / f"g{g}rank{rank}.safetensors")
        assert got.sites == single.sites and got.num_sequences == single.num_sequences == 6
        for s in single.sites:
            assert (got.q_len(s), got.k_len(s)) == (single.q_len(s), single.k_len(s)) == (9, 9)
            assert torch.equal(got.count(s), single.count(s))
            torch.testing.assert_close(got.sum(s), single.sum(s), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(got.mean(s), single.mean(s), equal_nan=True)
    for rank in (0, 1):
        assert "different sites" in (tmp_path / f"mismatch{rank}").read_text()
        assert f"model-{rank}" in (tmp_path / f"named{rank}").read_text()
    # the shards alone differ from the whole (the comparison above can fail)
    part = observe(tm.mha(), _shard(1), progress=False)
    assert part.q_len(single.sites[0]) == 4


def _observe_cli(tmp_path, out: str, nproc: int, num_seqs: int):
    import subprocess
    import sys

    args = ["-m", "attnprune", "--quiet", "observe", "--model", "tiny-llama", "--data", "random", "--num-seqs",
            str(num_seqs), "--seq-len", "16", "--min-len", "5", "--batch-size", "3", "-o", str(tmp_path / out)]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_observe_cli_under_torchrun_equals_one_process(tmp_path):
    """`torchrun -m attnprune observe` splits the batches, all-reduces, and rank 0 writes the same stats."""
    p = _observe_cli(tmp_path, "ddp.safetensors", 2, 10)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("wrote ") == 1  # rank 0 only
    assert _observe_cli(tmp_path, "one.safetensors", 1, 10).returncode == 0
    ddp, one = AttentionStats.load(tmp_path / "ddp.safetensors"), AttentionStats.load(tmp_path / "one.safetensors")
    assert ddp.sites == one.sites and ddp.num_sequences == one.num_sequences == 10
    for s in one.sites:
        assert torch.equal(ddp.count(s), one.count(s))
        torch.testing.assert_close(ddp.sum(s), one.sum(s), atol=1e-6, rtol=1e-6)
    # with fewer batches than processes one rank has nothing: a clear error on every rank, no file
    p = _observe_cli(tmp_path, "few.safetensors", 2, 3)
    assert p.returncode != 0 and "got no batch to observe" in p.stderr
    assert not (tmp_path / "few.safetensors").exists()
