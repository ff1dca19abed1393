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
    counts = torch.randint(0, 3, (2, 3)).float()
    s.add("l0", torch.rand(2, 2, 3) * counts, counts, q_len=3, k_len=6)
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


# ---- integrity: checksums, value checks, model identity ----------------------------------------

def _observed():
    s = AttentionStats(INFOS, model_name="m", description="d")
    tri = torch.ones(3, 3).tril()
    s.add("l0", torch.rand(2, 3, 3) * tri, tri)
    s.add("l1", torch.rand(3, 2, 4) * 2, torch.full((2, 4), 2.0))
    s.num_sequences = 2
    return s


def _layout(data: bytes) -> tuple[int, dict]:
    """(offset of the data section, the safetensors JSON header) of a safetensors file's bytes."""
    import json
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    return 8 + n, json.loads(data[8:8 + n])


def _patched(tmp_path, data: bytes, name: str, at: int, new: bytes):
    p = tmp_path / name
    p.write_bytes(data[:at] + new + data[at + len(new):])
    return p


def test_flipped_or_nan_data_is_corruption(tmp_path):
    import struct

    p = tmp_path / "s.st"
    _observed().save(p)
    data = p.read_bytes()
    base, tensors = _layout(data)
    start = base + tensors["sum.0"]["data_offsets"][0]  # sum.0[0, 0, 0]: a float64 in [0, 1]
    cases = {"flip": bytes([data[start + 7] ^ 0x40]),  # exponent bit: 0.x becomes ~1e154 or ~1e-155
             "eight": struct.pack("<d", 8.0), "nan": struct.pack("<d", float("nan"))}
    for name, new in cases.items():
        at = start + 7 if name == "flip" else start
        with pytest.raises(CorruptFileError, match="file is corrupted") as e:
            AttentionStats.load(_patched(tmp_path, data, name, at, new))
        assert "l0" in str(e.value) and "observe" in str(e.value)
    count = base + tensors["count.1"]["data_offsets"][0]
    with pytest.raises(CorruptFileError, match="file is corrupted"):
        AttentionStats.load(_patched(tmp_path, data, "count", count, struct.pack("<d", 1.5)))


def test_changed_header_is_corruption(tmp_path):
    p = tmp_path / "s.st"
    _observed().save(p)
    data = p.read_bytes()
    for old, new in ((b'num_sequences\\": 2', b'num_sequences\\": 3'), (b'q_len\\": 3', b'q_len\\": 2')):
        at = data.index(old)
        with pytest.raises(CorruptFileError, match="file is corrupted"):
            AttentionStats.load(_patched(tmp_path, data, "h", at, new))


@pytest.mark.parametrize("delta", [-1, 1, 8, -8, 2**40])
def test_bad_header_length(tmp_path, delta):
    import struct

    p = tmp_path / "s.st"
    _observed().save(p)
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    with pytest.raises(CorruptFileError, match="file is corrupted") as e:
        AttentionStats.load(_patched(tmp_path, data, "len", 0, struct.pack("<Q", n + delta)))
    assert "header" in str(e.value)


def _write_v1(path, sums: dict, counts: dict, **header):
    """A stats file as version 1 wrote it (no checksums)."""
    import json

    from safetensors.torch import save_file

    sites = []
    for i, info in enumerate(INFOS):
        d = info.to_dict()
        if i in sums:
            d["q_len"], d["k_len"] = sums[i].shape[1], sums[i].shape[2]
        sites.append(d)
    h = {"format": "attnprune.stats", "version": 1, "granularity": 1, "model_name": "m",
         "description": "d", "num_sequences": 1, "sites": sites, **header}
    tensors = {f"sum.{i}": t for i, t in sums.items()} | {f"count.{i}": t for i, t in counts.items()}
    save_file(tensors, str(path), metadata={"attnprune": json.dumps(h)})


def test_version_1_files_load_and_are_value_checked(tmp_path):
    ps, ct = torch.rand(2, 2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    _write_v1(tmp_path / "ok", {0: ps}, {0: ct})
    old = AttentionStats.load(tmp_path / "ok")
    assert torch.equal(old.sum("l0"), ps) and old.model_name == "m" and not old.observed("l1")
    bad = {"mean 8": (ps * 8, ct), "nan": (ps.clone().fill_(float("nan")), ct), "negative": (-ps, ct),
           "inf count": (ps, ct * float("inf")), "fractional count": (ps * 0.5, ct * 0.5),
           "negative count": (ps * 0, -ct), "sum without count": (ps, ct * 0),
           "heads": (torch.rand(3, 2, 3, dtype=torch.float64), ct), "grid": (ps, torch.ones(2, 2))}
    for name, (s, c) in bad.items():
        _write_v1(tmp_path / "bad", {0: s}, {0: c})
        with pytest.raises(CorruptFileError, match="file is corrupted") as e:
            AttentionStats.load(tmp_path / "bad")
        assert "l0" in str(e.value), name
    _write_v1(tmp_path / "seqs", {0: ps}, {0: ct}, num_sequences=-1)
    with pytest.raises(CorruptFileError, match="file is corrupted"):
        AttentionStats.load(tmp_path / "seqs")


def test_save_refuses_impossible_values(tmp_path):
    s = _stats()
    s.add("l0", torch.full((2, 2, 2), 3.0), torch.ones(2, 2))  # a mean probability of 3
    with pytest.raises(InvalidArgumentError, match="l0"):
        s.save(tmp_path / "s.st")
    assert not list(tmp_path.iterdir())


def test_mask_file_is_not_stats(tmp_path):
    from attnprune.policies import make_mask

    make_mask(_observed(), 0.5).save(tmp_path / "m.st")
    with pytest.raises(CorruptFileError, match="mask file, not"):
        AttentionStats.load(tmp_path / "m.st")


def test_add_refuses_stats_of_other_models():
    a, b = _observed(), _observed()
    b.model_name = "another model"
    with pytest.raises(MaskMismatchError, match="another model"):
        a + b
    assert (a + _observed()).model_name == "m"


def test_add_refuses_llamas_of_different_widths():
    """Same site names, heads and kv-heads, different hidden sizes: not the same model."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnprune.observe import observe

    def llama(hidden):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=97, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
        return LlamaForCausalLM(cfg).eval()

    ids = torch.randint(0, 97, (2, 8))
    narrow, wide = (observe(llama(h), [ids], progress=False) for h in (32, 64))
    assert narrow.infos == wide.infos
    with pytest.raises(MaskMismatchError):
        narrow + wide
    assert (narrow + narrow).num_sequences == 4
