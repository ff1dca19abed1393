import pytest
import torch

from attnprune.errors import CorruptFileError, InvalidArgumentError, MaskMismatchError
from attnprune.sites import SiteInfo
from attnprune.stats import AttentionStats

INFOS = [SiteInfo("l0", "causal", 2, 1), SiteInfo("l1", "self", 3, 3)]


def _stats(g=1):
    return AttentionStats(INFOS, granularity=g, model_name="m", description="d")


def test_add_mean_nan_and_order():
    s = _stats()
    ps = torch.rand(2, 3, 4)
    ct = torch.tensor([[1, 0, 2, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float32)
    s.add("l0", ps, ct)
    assert s.sites == ["l0", "l1"]
    m = s.mean("l0")
    assert m.dtype == torch.float32 and m.shape == (2, 3, 4)
    assert torch.isnan(m[:, 0, 1]).all() and torch.isnan(m[:, 2]).all()
    assert torch.allclose(m[:, 0, 2], ps[:, 0, 2] / 2)
    assert s.q_len("l0") == 3 and s.k_len("l0") == 4
    assert not s.observed("l1")
    with pytest.raises(InvalidArgumentError):
        s.mean("l1")
    with pytest.raises(InvalidArgumentError):
        s.add("nope", ps, ct)
    with pytest.raises(MaskMismatchError):
        s.add("l0", torch.rand(3, 3, 4), ct)


def test_grow_to_larger_lengths():
    s = _stats()
    s.add("l0", torch.ones(2, 2, 2), torch.ones(2, 2))
    s.add("l0", torch.ones(2, 3, 4), torch.ones(3, 4))
    assert s.count("l0")[0, 0] == 2 and s.count("l0")[2, 3] == 1 and s.count("l0")[0, 3] == 1
    assert s.sum("l0").dtype == torch.float64
    assert (s.q_len("l0"), s.k_len("l0")) == (3, 4)


def test_block_lengths_kept():
    s = _stats(g=4)
    s.add("l1", torch.rand(3, 2, 3), torch.ones(2, 3), q_len=7, k_len=9)
    assert (s.q_len("l1"), s.k_len("l1")) == (7, 9)


def test_add_operator():
    a, b = _stats(), _stats()
    a.add("l0", torch.full((2, 2, 2), 1.0), torch.ones(2, 2))
    b.add("l0", torch.full((2, 3, 3), 3.0), torch.ones(3, 3))
    b.add("l1", torch.full((3, 1, 1), 5.0), torch.ones(1, 1))
    a.num_sequences, b.num_sequences = 2, 3
    c = a + b
    assert c.num_sequences == 5
    assert torch.allclose(c.mean("l0")[:, :2, :2], torch.full((2, 2, 2), 2.0))
    assert torch.allclose(c.mean("l0")[:, 2, 2], torch.full((2,), 3.0))
    assert torch.equal(c.mean("l1"), torch.full((3, 1, 1), 5.0))
    with pytest.raises(MaskMismatchError):
        a + AttentionStats(INFOS[:1])
    with pytest.raises(MaskMismatchError):
        a + _stats(g=2)


def test_save_load_roundtrip(tmp_path):
    s = _stats(g=2)
    s.add("l0", torch.rand(2, 2, 3), torch.randint(0, 3, (2, 3)).float(), q_len=3, k_len=6)
    s.num_sequences = 7
    p = tmp_path / "a" / "s.safetensors"
    s.save(p)
    r = AttentionStats.load(p)
    assert r.sites == s.sites and r.infos == s.infos and r.granularity == 2
    assert r.model_name == "m" and r.description == "d" and r.num_sequences == 7
    assert torch.equal(r.sum("l0"), s.sum("l0")) and torch.equal(r.count("l0"), s.count("l0"))
    assert (r.q_len("l0"), r.k_len("l0")) == (3, 6)
    assert not r.observed("l1")
    assert [x.name for x in p.parent.iterdir()] == ["s.safetensors"]  # no temporary left over


def test_load_errors(tmp_path):
    s = _stats()
    s.add("l0", torch.rand(2, 2, 2), torch.ones(2, 2))
    p = tmp_path / "s.st"
    s.save(p)
    data = p.read_bytes()
    (tmp_path / "trunc").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk").write_bytes(b"hello world, not a file")
    for name in ("trunc", "junk", "missing"):
        with pytest.raises(CorruptFileError):
            AttentionStats.load(tmp_path / name)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other"))
    with pytest.raises(CorruptFileError):
        AttentionStats.load(tmp_path / "other")


def test_save_failure_leaves_old_file(tmp_path, monkeypatch):
    s = _stats()
    s.add("l0", torch.rand(2, 2, 2), torch.ones(2, 2))
    p = tmp_path / "s.st"
    s.save(p)
    before = p.read_bytes()
    import safetensors.torch as st

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(RuntimeError):
        s.save(p)
    assert p.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_bad_granularity():
    for g in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgumentError):
            AttentionStats(INFOS, granularity=g)


def test_all_reduce_needs_process_group():
    with pytest.raises(InvalidArgumentError):
        _stats().all_reduce()
