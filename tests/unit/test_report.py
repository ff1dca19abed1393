"""Report files: Markdown, JSON with every number, PNG plots; atomic writes."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from attnprune import plots, report
from attnprune.experiments.sweep_loop import SweepResult


def _result(metric="perplexity"):
    runs = []
    for block in (None, 4):
        for policy in ("layer", "random"):
            for sp in (0.5, 0.9):
                v = (10.0 + sp * (1 if policy == "layer" else 7) + (0.25 if block else 0.0)) if metric == "perplexity" \
                    else (0.9 - sp * (0.05 if policy == "layer" else 0.3))
                runs.append({"block": block, "policy": policy, "sparsity": sp, "achieved": sp - 0.001,
                             "achieved_paper": (1 + sp) / 2, "value": v,
                             "delta": v - (10.0 if metric == "perplexity" else 0.9),
                             "kept_mass": {"l.0.attn": 1 - sp / 2, "l.1.attn": float("nan")},
                             "mean_kept_mass": 1 - sp / 2, "seconds": 1.5})
    dense = {"metric": metric, "value": 10.0 if metric == "perplexity" else 0.9, "count": 123}
    return SweepResult(model="toy", task="causal-lm" if metric == "perplexity" else "classification",
                       metric=metric, dense=dense, runs=runs, config={"seed": 0}, data={"source": "unit"},
                       timings={"observe_s": 2.0})


class _Stats:
    granularity = 1
    sites = ["l.0.attn", "l.1.attn", "l.2.attn"]

    def mean(self, site):
        m = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(len(site))).tril()
        m = m / m.sum(-1, keepdim=True)
        return m.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("nan"))


def test_write_report_files_and_numbers(tmp_path):
    r = _result()
    files = report.write_report(r, tmp_path / "out", stats=_Stats(), title="unit")
    for key in ("json", "markdown", "quality_plot", "kept_mass_plot"):
        assert files[key].is_file() and files[key].stat().st_size > 0
    assert len(files["heatmaps"]) == 1 and files["heatmaps"][0].name == "attention_heatmaps.png"
    for p in (files["quality_plot"], files["kept_mass_plot"], files["heatmaps"][0]):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing temporary left behind
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    doc = json.loads(files["json"].read_text())  # strict JSON: NaN became null
    assert doc["dense"]["value"] == 10.0 and doc["metric"] == "perplexity" and doc["higher_is_better"] is False
    assert len(doc["runs"]) == 8
    for a, b in zip(doc["runs"], r.runs):
        assert a["value"] == b["value"] and a["block"] == b["block"] and a["policy"] == b["policy"]
        assert a["kept_mass"]["l.1.attn"] is None
    assert doc["env"]["torch"] == torch.__version__ and doc["env"]["cpu_count"]
    md = files["markdown"].read_text()
    assert md.startswith("# unit")
    assert "**Dense: 10.000**" in md and "## token level" in md and "## 4x4 blocks" in md
    # the layer row of the token table: sparsity 0.5 -> 10.5 (+0.5, 1.05 times dense), 0.9 -> 10.9 (+0.9)
    assert "| layer | 10.500 (+0.500, x1.050) | 10.900 (+0.900, x1.090) |" in md
    assert "| random | 13.500 (+3.500, x1.350) | 16.300 (+6.300, x1.630) |" in md
    assert "| layer | 10.750 (+0.750, x1.075) | 11.150 (+1.150, x1.115) |" in md  # 4x4 blocks: +0.25
    assert "![quality_vs_sparsity.png](quality_vs_sparsity.png)" in md


def test_accuracy_formatting_and_many_sites(tmp_path):
    class ManySites(_Stats):
        sites = [f"l.{i}.attn" for i in range(5)]

    files = report.write_report(_result("accuracy"), tmp_path, plots=False)
    md = files["markdown"].read_text()
    assert "**Dense: 90.00%**" in md
    assert "| layer | 87.50% (-2.50) | 85.50% (-4.50) |" in md
    assert not list(tmp_path.glob("*.png"))
    paths = report.plot_heatmaps(ManySites(), tmp_path / "h.png", max_rows=2)
    assert [p.name for p in paths] == ["h.png", "h_2.png", "h_3.png"]


def test_without_matplotlib_tables_still_written(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_plt", lambda: None)
    files = report.write_report(_result(), tmp_path, stats=_Stats())
    assert "quality_plot" not in files and not list(tmp_path.glob("*.png"))
    assert "plots skipped" in files["markdown"].read_text()


def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
    files = report.write_report(_result(), tmp_path, plots=False)
    before = files["json"].read_text()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "markdown", boom)
    r = _result()
    r.dense["value"] = 99.0
    with pytest.raises(RuntimeError):
        report.write_report(r, tmp_path, plots=False)
    # the JSON was rewritten atomically before the failure; report.md is untouched and whole
    assert json.loads(files["json"].read_text())["dense"]["value"] == 99.0
    assert json.loads(before)["dense"]["value"] == 10.0
    assert files["markdown"].read_text().startswith("# attnprune evaluation")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pool_ignores_unobserved():
    m = torch.tensor([[[1.0, float("nan")], [0.5, 0.5]]])
    p = plots._pool(m, 1)
    assert p.shape == (1, 1, 1) and p.item() == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert math.isnan(plots._pool(torch.full((1, 2, 2), float("nan")), 1).item())


def test_environment_has_fixed_keys_and_no_host_name(monkeypatch):
    import socket

    env = report.environment()
    assert tuple(env) == report.ENV_KEYS
    assert env["torch"] == torch.__version__ and env["python"] and env["date_utc"].endswith(" UTC")
    assert env["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", env["git_commit"])
    assert env["git_tree"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_tree"])
    assert (env["git_tree"] is None) == (env["git_commit"] is None)  # this checkout: both, else neither
    host = socket.gethostname()
    assert len(host) < 4 or all(host not in str(v) for v in env.values())
    # the device given is the device recorded; the keys stay the same
    env = report.environment("cpu")
    assert env["device"] == "cpu" and tuple(env) == report.ENV_KEYS
    json.dumps(env, allow_nan=False)


class _KindStats:
    """Two sites: an encoder self-attention site and a causal one, each 2 heads x 3 x 3."""

    granularity = 1
    sites = ["enc.attn", "dec.attn"]

    def __init__(self):
        from attnprune.sites import SiteInfo

        self.infos = {"enc.attn": SiteInfo("enc.attn", "self", 2, 2), "dec.attn": SiteInfo("dec.attn", "causal", 2, 2)}
        self._m = {"enc.attn": torch.arange(18, dtype=torch.float32).view(2, 3, 3) / 18,
                   "dec.attn": torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]).expand(2, 3, 3).clone()}
        self._m["dec.attn"][:, 0, 1:] = float("nan")  # never observed (causal future)
        self._m["dec.attn"][:, 1, 2] = float("nan")

    def mean(self, site):
        return self._m[site]


def test_offset_profile_and_patterns_by_site_kind(tmp_path):
    st = _KindStats()
    prof = report.offset_profile(st, max_offset=2)
    assert prof["offsets"].tolist() == [-2, -1, 0, 1, 2] and set(prof) == {"self", "causal", "cross", "offsets"}
    # causal site: offset -1 holds (1,0)=0.5 and (2,1)=0.3 for both heads; -2 holds (2,0)=0.2; +1 never observed
    torch.testing.assert_close(prof["causal"][:3], torch.tensor([0.2, 0.4, (1.0 + 0.5 + 0.5) / 3], dtype=torch.float64))
    assert torch.isnan(prof["causal"][3:]).all() and torch.isnan(prof["cross"]).all()
    enc = st.mean("enc.attn").double()
    assert prof["self"][2] == pytest.approx(float(torch.diagonal(enc, dim1=1, dim2=2).mean()))
    named = report.offset_profile(st, max_offset=2, groups={"self": "encoder", "causal": "decoder", "cross": "x"})
    assert list(named) == ["encoder", "decoder", "x", "offsets"]
    torch.testing.assert_close(named["decoder"], prof["causal"], equal_nan=True)
    pats = report.mean_patterns(st, size=2)
    torch.testing.assert_close(pats["self"][0], enc[:, :2, :2].float().mean(0))
    assert pats["causal"][0][0, 1].isnan() and pats["cross"] == []
    for fn, name in ((report.plot_patterns, "p.png"), (report.plot_offsets, "o.png")):
        out = fn(st, tmp_path / name)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_record_names_the_commit_read_when_attnprune_was_imported(monkeypatch):
    """A long run's result file names the code the process loaded: ``import attnprune`` reads the commit,
    and ``environment()`` reports that one even if the tree has moved on since (simulated here)."""
    import attnprune  # noqa: F401
    import attnprune.environment as E

    assert "commit" in E._AT_IMPORT
    monkeypatch.setitem(E._AT_IMPORT, "commit", "a" * 40)
    assert E.environment("cpu")["git_commit"] == "a" * 40


def _git_in(where):
    """``git(*args) -> stdout`` in ``where`` with a throwaway identity (skips the test when git is missing)."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return lambda *args: subprocess.run(["git", *args], cwd=where, check=True, env=env, capture_output=True,
                                        text=True).stdout.strip()


def test_git_commit_says_when_tracked_files_differ_from_it(tmp_path):
    """A copied or edited tree is not the commit it names: ``+dirty`` (as on the GPU machine, whose copy of the
    tree carries an older ``.git``); untracked files do not count."""
    from attnprune.environment import _git_commit

    git = _git_in(tmp_path)
    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", ".")
    git("commit", "-qm", "x")
    sha = git("rev-parse", "HEAD")
    assert _git_commit(tmp_path) == sha
    (tmp_path / "new.py").write_text("")
    assert _git_commit(tmp_path) == sha
    (tmp_path / "f.py").write_text("a = 2\n")
    assert _git_commit(tmp_path) == sha + "+dirty"


def test_git_tree_names_the_files_as_they_are_and_writes_nothing(tmp_path):
    """``git_tree`` is the tree id a commit of exactly these files would have (tracked edits and untracked files
    included, ignored ones not), so a ``+dirty`` record can be matched to its commit; computing it adds no object
    to the checkout."""
    from attnprune.environment import _git_tree

    git = _git_in(tmp_path)
    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    (tmp_path / ".gitignore").write_text("*.log\n")
    git("add", ".")
    git("commit", "-qm", "one")
    assert _git_tree(tmp_path) == git("rev-parse", "HEAD^{tree}")
    (tmp_path / "f.py").write_text("a = 2\n")  # a tracked edit, an untracked file, an ignored one
    (tmp_path / "new.py").write_text("b = 1\n")
    (tmp_path / "x.log").write_text("noise\n")
    objects = git("count-objects", "-v")
    tree = _git_tree(tmp_path)
    assert git("count-objects", "-v") == objects  # nothing written into the checkout's object store
    assert tree != git("rev-parse", "HEAD^{tree}")
    git("add", "-A")
    git("commit", "-qm", "two")
    assert tree == git("rev-parse", "HEAD^{tree}")  # the commit of these files, ignored x.log left out


def test_environment_records_the_kernel_switches_set(monkeypatch):
    """Result files name the ATTNPRUNE_* switches that change the computation (not the cache folder)."""
    for k in [k for k in os.environ if k.startswith("ATTNPRUNE_")]:
        monkeypatch.delenv(k)
    assert report.environment("cpu")["switches"] == {}
    monkeypatch.setenv("ATTNPRUNE_FA4_PARTIAL", "split")
    monkeypatch.setenv("ATTNPRUNE_DKDV_SPLIT", "0")
    monkeypatch.setenv("ATTNPRUNE_CACHE", "/tmp/somewhere")
    assert report.environment("cpu")["switches"] == {"ATTNPRUNE_DKDV_SPLIT": "0", "ATTNPRUNE_FA4_PARTIAL": "split"}
