"""PruneMask / SiteMask: file round trip, corrupted files, model checks, token and block views."""

import json
import os

import pytest
import torch

from attnprune.errors import AttnPruneError, CorruptFileError, InvalidArgumentError, LengthError, MaskMismatchError
from attnprune.mask import PruneMask, SiteMask
from attnprune.policies import make_mask
from attnprune.sites import SiteInfo
from attnprune.stats import AttentionStats


def _stats(L=20, granularity=1):
    g = torch.Generator().manual_seed(0)
    infos = [SiteInfo("enc.0.attn", "self", 2, 2), SiteInfo("dec.0.attn", "causal", 4, 2),
             SiteInfo("dec.0.cross", "cross", 4, 4)]
    st = AttentionStats(infos, granularity=1, model_name="toy", description="toy data")
    tri = torch.ones(L, L).tril()
    st.add("enc.0.attn", torch.rand(2, L, L, generator=g), torch.ones(L, L))
    st.add("dec.0.attn", torch.rand(4, L, L, generator=g) * tri, tri)
    st.add("dec.0.cross", torch.rand(4, L, L - 3, generator=g), torch.ones(L, L - 3))
    st.num_sequences = 3
    return st


@pytest.fixture(scope="module")
def stats():
    return _stats()


@pytest.mark.parametrize("block", [None, 4])
def test_save_load_round_trip(tmp_path, stats, block):
    m = make_mask(stats, 0.7, policy="head", block=block)
    path = tmp_path / "m.safetensors"
    m.save(path)
    back = PruneMask.load(path)
    assert back.sites == m.sites == ["enc.0.attn", "dec.0.attn", "dec.0.cross"]
    assert back.infos == m.infos
    assert back.block == block and back.policy == "head"
    assert back.meta == json.loads(json.dumps(m.meta))
    for s in m.sites:
        assert torch.equal(back[s], m[s])
        assert back.site(s).q_len == m.site(s).q_len and back.site(s).k_len == m.site(s).k_len
    assert back.meta["model"]["name"] == "toy" and back.meta["data"]["description"] == "toy data"
    assert back.meta["data"]["num_sequences"] == 3
    assert back.meta["model"]["num_sites"] == 3
    assert [d["num_heads"] for d in back.meta["model"]["sites"]] == [2, 4, 4]
    assert not [p for p in os.listdir(tmp_path) if p != "m.safetensors"]  # no temp files left


def test_summary_lists_sites_and_sparsities(stats):
    m = make_mask(stats, 0.8)
    text = m.summary()
    for s in m.sites:
        assert s in text
    assert "0.8000" in text and "toy" in text and "layer" in text
    assert "causal" in text and "cross" in text


def test_paper_sparsity_counts_causal_zeros(stats):
    m = make_mask(stats, 0.5)
    causal = m.meta["sites"]["dec.0.attn"]
    L = 20
    kept = int(m["dec.0.attn"].sum())
    assert causal["kept_entries"] == kept
    assert causal["attendable_entries"] == 4 * L * (L + 1) // 2
    assert causal["paper_sparsity"] == pytest.approx(1 - kept / (4 * L * L))
    assert causal["paper_sparsity"] > causal["sparsity"]
    enc = m.meta["sites"]["enc.0.attn"]
    assert enc["paper_sparsity"] == pytest.approx(enc["sparsity"])


# ---- bad files -------------------------------------------------------------------------------

@pytest.fixture()
def saved(tmp_path, stats):
    path = tmp_path / "m.safetensors"
    make_mask(stats, 0.5).save(path)
    return path


def test_truncated_file(saved):
    data = saved.read_bytes()
    for cut in (3, 50, len(data) // 2, len(data) - 1):
        saved.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError, match="m.safetensors"):
            PruneMask.load(saved)


def test_flipped_byte_in_data_is_detected(saved):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0x01  # the end of the file is tensor data
    saved.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        PruneMask.load(saved)


def test_garbage_header(saved):
    data = bytearray(saved.read_bytes())
    data[12:20] = b"\xff" * 8  # inside the JSON header
    saved.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        PruneMask.load(saved)


def test_not_an_attnprune_mask(tmp_path, stats):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(CorruptFileError, match="not an attnprune mask"):
        PruneMask.load(other)
    st = tmp_path / "stats.safetensors"
    stats.save(st)
    with pytest.raises(CorruptFileError, match="format"):
        PruneMask.load(st)
    text = tmp_path / "x.safetensors"
    text.write_text("hello")
    with pytest.raises(CorruptFileError):
        PruneMask.load(text)
    with pytest.raises(AttnPruneError, match="no such"):
        PruneMask.load(tmp_path / "missing.safetensors")


def test_failed_save_leaves_old_file(tmp_path, stats, monkeypatch):
    path = tmp_path / "m.safetensors"
    make_mask(stats, 0.5).save(path)
    before = path.read_bytes()
    import safetensors.torch

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    from attnprune._io import OutputError

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OutputError, match="disk full"):  # the I/O failure, as one clear error
        make_mask(stats, 0.9).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


# ---- model checks ----------------------------------------------------------------------------

def test_check_model(stats):
    m = make_mask(stats, 0.5)
    m.check_model(stats.infos)  # fits
    renamed = {("dec.0.other" if n == "dec.0.cross" else n): i for n, i in stats.infos.items()}
    with pytest.raises(MaskMismatchError, match="dec.0.cross") as e:
        m.check_model(renamed)
    assert "dec.0.other" in str(e.value)
    heads = dict(stats.infos)
    heads["enc.0.attn"] = SiteInfo("enc.0.attn", "self", 3, 3)
    with pytest.raises(MaskMismatchError, match=r"enc.0.attn \(mask 2, model 3\)"):
        m.check_model(heads)
    with pytest.raises(MaskMismatchError, match="nope"):
        m.site("nope")


# ---- token / block views ---------------------------------------------------------------------

def test_keep_tokens_regions_and_beyond(stats):
    m = make_mask(stats, 0.6)
    sm = m.site("dec.0.attn")
    full = m["dec.0.attn"]
    assert full.shape == (4, 20, 20)
    assert torch.equal(sm.keep_tokens(5, 7), full[:, :5, :7])
    assert torch.equal(sm.keep_tokens(3, 20, q_offset=17), full[:, 17:, :])
    with pytest.raises(LengthError, match="dec.0.attn.*20 x 20"):
        sm.keep_tokens(21, 21)
    with pytest.raises(LengthError):
        sm.keep_tokens(4, 20, q_offset=17)
    dense = sm.keep_tokens(22, 25, beyond="dense")
    assert torch.equal(dense[:, :20, :20], full)
    assert dense[:, 20:].all() and dense[:, :, 20:].all()
    with pytest.raises(InvalidArgumentError):
        sm.keep_tokens(4, 4, beyond="ignore")
    assert sm.keep_tokens(5, 7) is sm.keep_tokens(5, 7)  # cached


def test_block_mask_expands_to_tokens(stats):
    m = make_mask(stats, 0.5, block=8)
    sm = m.site("dec.0.cross")  # 20 x 17 tokens -> 3 x 3 blocks
    kb = sm.keep_blocks
    assert kb.shape == (4, 3, 3)
    want = kb.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :20, :17]
    assert torch.equal(m["dec.0.cross"], want)
    assert torch.equal(sm.keep_tokens(6, 9, q_offset=5), want[:, 5:11, :9])
    assert make_mask(stats, 0.5).site("dec.0.cross").keep_blocks is None


def test_site_mask_validates_shape():
    info = SiteInfo("a", "self", 2, 2)
    with pytest.raises(InvalidArgumentError):
        SiteMask(info, 4, 4, keep=torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(InvalidArgumentError):
        SiteMask(info, 4, 4, keep=torch.ones(2, 4, 4))  # not bool
    SiteMask(info, 5, 9, keep=torch.ones(2, 2, 3, dtype=torch.bool), block=4)


def test_layout_from_blocks_and_tokens():
    from attnprune.kernels import BlockLayout  # noqa: F401  (kernels package must import)

    g = torch.Generator().manual_seed(1)
    info = SiteInfo("a", "self", 2, 2)
    kb = torch.rand(2, 4, 4, generator=g) > 0.5
    sm = SiteMask(info, 60, 64, keep=kb, block=16)
    lay = sm.layout(48, 64, block=(16, 16))
    assert torch.equal(lay.block_mask(), kb[:, :3, :])
    assert sm.layout(48, 64, block=(16, 16)) is lay  # cached
    lay2 = sm.layout(16, 32, block=(16, 16), q_offset=32)
    assert torch.equal(lay2.block_mask(), kb[:, 2:3, :2])
    # a kernel tile unlike the mask's block goes through the token mask
    lay3 = sm.layout(60, 64, block=(32, 32))
    assert torch.equal(lay3.to_dense(60, 64), sm.keep_tokens(60, 64))
    with pytest.raises(LengthError):
        sm.layout(64, 64, block=(16, 16))
    dense = sm.layout(64, 80, block=(16, 16), beyond="dense").block_mask()
    assert dense[:, 3:].all() and dense[:, :, 4:].all()
    # token-level masks are tiled
    tok = torch.rand(2, 40, 40, generator=g) > 0.3
    tm = SiteMask(info, 40, 40, keep=tok)
    assert torch.equal(tm.layout(40, 40, block=(16, 16)).to_dense(40, 40), tok)
