"""attnprune.data: corpora builders (austen, bible-en-es, sentiment), user-data readers, batching.

The corpora need `bash scripts/setup_data.sh` (CI runs it). Builders write their caches into a
per-test temporary ATTNPRUNE_CACHE only where a test rebuilds; the raw inputs are read from the
real cache.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from attnprune import data as D
from attnprune.data import austen, bible, files, sentiment
from attnprune.errors import AttnPruneError, EmptyDatasetError, InvalidArgumentError, MissingDependencyError

pytestmark = pytest.mark.timeout(300)


class CharTokenizer:
    """A stand-in tokenizer: one id per character (ord % 1000), EOS = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 1000 + 1 for c in t] for t in texts]}


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- registry ----------------------------------------------------------------------------------
def test_sources_registered():
    names = D.source_names()
    for n in ("austen", "bible-en-es", "sentiment", "text", "jsonl", "hf"):
        assert n in names
    with pytest.raises(InvalidArgumentError, match="austen"):
        D.load_dataset("no-such-source")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNPRUNE_CACHE", str(tmp_path))
    assert D.cache_dir() == tmp_path
    monkeypatch.delenv("ATTNPRUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.cache_dir() == tmp_path / "xdg" / "attnprune"


def test_dataset_save_load_roundtrip(tmp_path):
    ds = D.Dataset("x", "labelled", {"train": [{"text": "ä b", "label": 1}], "test": [{"text": "c", "label": 0}]},
                   {"k": 1})
    ds.save(tmp_path / "x.json")
    back = D.Dataset.load(tmp_path / "x.json")
    assert back.splits == ds.splits and back.meta == ds.meta and back.kind == "labelled"
    assert back.labels("train") == [1] and back.texts("test") == ["c"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AttnPruneError, match="bad.json"):
        D.Dataset.load(tmp_path / "bad.json")
    with pytest.raises(InvalidArgumentError, match="no split 'valid'"):
        ds["valid"]


def test_split_contiguous():
    recs = [{"i": i} for i in range(100)]
    parts = D.split_contiguous(recs)
    assert list(parts) == ["calibration", "train", "test"]
    assert [len(v) for v in parts.values()] == [10, 80, 10]
    assert [r["i"] for v in parts.values() for r in v] == list(range(100))  # contiguous, in order
    small = D.split_contiguous(recs[:3])
    assert [len(v) for v in small.values()] == [1, 1, 1]
    with pytest.raises(EmptyDatasetError, match="2 records cannot be cut into the 3 splits calibration, train"):
        D.split_contiguous(recs[:2])


def test_a_file_too_short_to_split_is_named(tmp_path):
    (tmp_path / "one.txt").write_text("a single paragraph\n")
    with pytest.raises(EmptyDatasetError, match="one.txt: 1 record cannot be cut into the 3 splits"):
        D.load_dataset(f"text:{tmp_path / 'one.txt'}")
    ds = D.load_dataset(f"text:{tmp_path / 'one.txt'}", fractions={"all": 1.0})  # what observe asks for
    assert ds.sizes() == {"all": 1}


# --- batching --------------------------------------------------------------------------------------
def test_lm_batches_fixed_length_and_order():
    tok = CharTokenizer()
    recs = [{"text": "abcdefghij"}, {"text": "klmnopqrst"}]
    b = D.lm_batches(recs, tok, seq_len=4, batch_size=2)
    ids = torch.cat([x["input_ids"] for x in b])
    assert [x["input_ids"].shape for x in b] == [(2, 4), (2, 4), (1, 4)]  # 22 chars -> 5 rows, tail dropped
    stream = tok(["abcdefghij\n\nklmnopqrst"])["input_ids"][0]
    assert ids.flatten().tolist() == stream[:20]
    eos = D.token_stream(recs, tok, separator="eos")
    assert eos.tolist() == stream[:10] + [0] + stream[12:]
    assert D.lm_batches(recs, tok, seq_len=4, batch_size=8, max_sequences=2)[0]["input_ids"].shape == (2, 4)
    with pytest.raises(EmptyDatasetError):
        D.lm_batches(recs, tok, seq_len=100)
    with pytest.raises(InvalidArgumentError):
        D.lm_batches(recs, tok, seq_len=4, separator="tab")
    with pytest.raises(InvalidArgumentError):
        D.lm_batches(recs, None, seq_len=4)


@pytest.mark.parametrize("separator", ["newline", "eos", "none"])
def test_lm_batches_limit_is_prefix(separator):
    tok = CharTokenizer()
    recs = [{"text": f"paragraph {i} " + "x" * (i % 7)} for i in range(300)]
    full = torch.cat([b["input_ids"] for b in D.lm_batches(recs, tok, seq_len=16, separator=separator)])
    few = torch.cat([b["input_ids"] for b in D.lm_batches(recs, tok, seq_len=16, max_sequences=5,
                                                          separator=separator, batch_size=2)])
    assert few.shape == (5, 16) and torch.equal(few, full[:5])
    toks = [{"input_ids": list(range(i, i + 7))} for i in range(50)]
    assert D.token_stream(toks, max_tokens=10).tolist() == list(range(7)) + [1, 2, 3]


def test_lm_batches_token_records():
    recs = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8]}]
    b = D.lm_batches(recs, None, seq_len=4)
    assert [x["input_ids"].tolist() for x in b] == [[[1, 2, 3, 4]], [[5, 6, 7, 8]]]


def test_random_source_batches():
    if "random" not in D.source_names():
        pytest.skip("the random source (data/random.py) is not in this tree")
    ds = D.load_dataset("random", vocab_size=50, num_seqs=4, seq_len=8)
    b = D.lm_batches(ds["calibration"], None, seq_len=8, batch_size=2)
    assert b[0]["input_ids"].shape[1] == 8


@pytest.fixture(scope="module")
def bert_tok():
    from attnprune.models.real import minilm_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


@pytest.mark.needs_data
def test_classification_batches(bert_tok):
    recs = [{"text": "a good film", "label": 1}, {"text": "bad " * 300, "label": 0}, {"text": "ok", "label": 1}]
    b = D.classification_batches(recs, bert_tok, batch_size=2, max_length=16)
    assert len(b) == 2
    assert b[0]["input_ids"].shape == (2, 16)  # the long text is truncated to max_length
    assert b[1]["input_ids"].shape == (1, 3)  # [CLS] ok [SEP], padded to the longest
    assert b[0]["labels"].tolist() == [1, 0] and b[1]["labels"].tolist() == [1]
    assert b[0]["attention_mask"][0].sum() == 5 and "token_type_ids" in b[0]
    fixed = D.classification_batches(recs, bert_tok, batch_size=2, max_length=16, padding="max_length")
    assert all(x["input_ids"].shape[1] == 16 for x in fixed)
    nolab = D.classification_batches([{"text": "x"}], bert_tok)
    assert "labels" not in nolab[0]
    with pytest.raises(InvalidArgumentError):
        D.classification_batches(recs, bert_tok, padding="some")
    with pytest.raises(EmptyDatasetError):
        D.classification_batches([], bert_tok)


# --- austen --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def austen_dir():
    return austen.data_dir()  # the real cache (before any test swaps ATTNPRUNE_CACHE)


@pytest.fixture(scope="module")
def austen_ds(austen_dir):
    return austen.build(austen_dir)


@pytest.mark.needs_data
def test_austen_splits(austen_ds):
    ds = austen_ds
    assert ds.kind == "text" and list(ds.splits) == ["train", "calibration", "test"]
    # Documented sizes (janeaustenr 1.0.0).
    assert ds.sizes() == {"train": 8449, "calibration": 918, "test": 931}
    words = ds.meta["words"]
    total = sum(words.values())
    assert 700_000 < total < 750_000
    for k, f in austen.FRACTIONS.items():
        assert abs(words[k] / total - f) < 0.01
    keys = {k: {(r["book"], r["index"]) for r in v} for k, v in ds.splits.items()}
    assert sum(len(v) for v in keys.values()) == sum(ds.sizes().values())  # no duplicates
    assert not (keys["train"] & keys["calibration"] or keys["train"] & keys["test"]
                or keys["calibration"] & keys["test"])
    for book in austen.BOOKS.values():  # contiguous: train < calibration < test within a book
        idx = {k: sorted(i for b, i in v if b == book) for k, v in keys.items()}
        assert idx["train"] and idx["calibration"] and idx["test"]
        assert idx["train"][-1] < idx["calibration"][0] <= idx["calibration"][-1] < idx["test"][0]
        assert idx["calibration"] == list(range(idx["calibration"][0], idx["calibration"][-1] + 1))
    assert ds["train"][0]["text"] == "SENSE AND SENSIBILITY"
    assert any(r["text"].startswith("It is a truth universally acknowledged") for r in ds["train"])
    assert ds["test"][-1] == {"text": "Finis", "book": "Persuasion", "index": ds["test"][-1]["index"]}


@pytest.mark.needs_data
def test_austen_cached_and_reproducible(austen_ds, austen_dir, empty_cache, monkeypatch):
    # Raw input from the real cache, the built dataset into the empty one.
    monkeypatch.setattr(austen, "data_dir", lambda: austen_dir)
    ds = D.load_dataset("austen")
    assert (empty_cache / "data" / f"austen-v{austen.VERSION}.json").exists()
    again = D.load_dataset("austen")
    assert ds.splits == again.splits == austen_ds.splits


def test_austen_paragraphs():
    lines = ["", "CHAPTER I", "", "It is a truth", "universally acknowledged.", "", "", "Next."]
    assert austen.paragraphs(lines) == ["CHAPTER I", "It is a truth universally acknowledged.", "Next."]


def test_austen_missing(empty_cache, monkeypatch):
    monkeypatch.setattr(austen, "SYSTEM_DIRS", [])
    with pytest.raises(MissingDependencyError, match="r-cran-janeaustenr.*setup_data.sh"):
        austen.build()


# --- bible ------------------------------------------------------------------------------------------------
SAMPLE = (
    '<title type="psalm">A Psalm by David.</title> <l sID="1"/>Psalms 3:1: <w s="1">Yahweh</w>, how!<l eID="1"/>\n'
    '<title type="psalm">A Psalm by David.</title> Psalms 3:2: Many <q marker="">say</q><q>of</q> me.\n'
    'second line of 3:2\n'
    'I John 1:1: That which was from the beginning.\n'
    'John 1:1: In the beginning <note>a footnote</note>was the Word. <div eID="b" type="book"/> glossary text\n'
    'Tobit 1:1: The book of Tobit.\n'
    'tobit continuation\n'
    '(engWEB2015eb)\n'
)


def test_bible_parse():
    v = bible.parse(SAMPLE)
    ps, j, ij = bible.BOOK_ORDER["Psalms"], bible.BOOK_ORDER["John"], bible.BOOK_ORDER["I John"]
    assert v == {
        (ps, 3, 1): "Yahweh, how!",
        (ps, 3, 2): "Many say of me. second line of 3:2",
        (ij, 1, 1): "That which was from the beginning.",
        (j, 1, 1): "In the beginning was the Word.",
    }


def test_bible_join_by_reference():
    en = {(0, 1, 1): "In the beginning", (0, 1, 2): "The earth", (0, 1, 3): "", (1, 1, 1): "Now"}
    es = {(0, 1, 2): "Y la tierra", (0, 1, 3): "Y dijo", (1, 1, 1): "Estos", (0, 1, 1): "EN el principio"}
    pairs = bible.join(en, es)
    assert pairs == [
        {"ref": "Genesis 1:1", "source": "In the beginning", "target": "EN el principio"},
        {"ref": "Genesis 1:2", "source": "The earth", "target": "Y la tierra"},
        {"ref": "Exodus 1:1", "source": "Now", "target": "Estos"},
    ]


def test_bible_chapter_split_proportions():
    chapters = [(b, c) for b in bible.BOOKS for c in range(1, 30)]
    counts = Counter(bible.chapter_split(b, c) for b, c in chapters)
    n = len(chapters)
    assert abs(counts["train"] / n - 0.90) < 0.03
    assert abs(counts["valid"] / n - 0.05) < 0.02 and abs(counts["test"] / n - 0.05) < 0.02
    assert bible.chapter_split("John", 3) == bible.chapter_split("John", 3)


@pytest.mark.needs_data
def test_bible_slice_real():
    ds = bible.build("John 3-4")
    pairs = [r for s in ds.splits.values() for r in s]
    assert len(pairs) == 36 + 54
    by_ref = {r["ref"]: r for r in pairs}
    assert "God so loved the world" in by_ref["John 3:16"]["source"]
    assert "de tal manera amó Dios al mundo" in by_ref["John 3:16"]["target"]
    assert "I John 3:16" not in by_ref
    for split, recs in ds.splits.items():  # whole chapters per split
        for r in recs:
            book, _, cv = r["ref"].rpartition(" ")
            assert bible.chapter_split(book, int(cv.split(":")[0])) == split
    assert all("<" not in r["source"] and "<" not in r["target"] for r in pairs)


@pytest.mark.slow
@pytest.mark.needs_data
def test_bible_full_build():
    ds = D.load_dataset("bible-en-es")  # built into the real cache the first time (~20-40 s)
    sizes = ds.sizes()
    assert sizes == {"train": 28052, "valid": 1513, "test": 1512}  # documented (Debian bookworm modules)
    refs = [r["ref"] for s in ds.splits.values() for r in s]
    assert len(set(refs)) == len(refs)
    john = next(r for r in ds[bible.chapter_split("John", 3)] if r["ref"] == "John 3:16")
    assert "God so loved" in john["source"] and "amó Dios al mundo" in john["target"]
    assert "Tobit" not in " ".join(refs)


def test_bible_missing_diatheke(monkeypatch):
    monkeypatch.setattr(bible.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match="diatheke.*setup_data.sh"):
        bible.build("John 3")


def test_bible_missing_module(monkeypatch):
    monkeypatch.setitem(bible.MODULES, "es", ("noSuchModule", "sword-text-sparv"))
    with pytest.raises(MissingDependencyError, match="sword-text-sparv"):
        bible.build("John 3")


# --- sentiment ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def senti():
    return sentiment.build()


@pytest.mark.needs_data
def test_sentiment_splits_and_labels(senti):
    ds = senti
    assert ds.kind == "labelled"
    assert ds.sizes() == {"calibration": 1000, "train": 7566, "test": 2000}
    ids = {k: {r["id"] for r in v} for k, v in ds.splits.items()}
    texts = {k: {r["text"] for r in v} for k, v in ds.splits.items()}
    for a, b in (("train", "test"), ("train", "calibration"), ("calibration", "test")):
        assert not ids[a] & ids[b] and not texts[a] & texts[b]
    allrecs = [r for v in ds.splits.values() for r in v]
    assert all(r["score"] != 0 and r["label"] == int(r["score"] > 0) for r in allrecs)
    assert all(-4 <= r["score"] <= 4 for r in allrecs)
    pos = sum(r["label"] for r in allrecs) / len(allrecs)
    assert 0.45 < pos < 0.55
    for k in ds.splits:
        assert 0.4 < sum(ds.labels(k)) / len(ds[k]) < 0.6
    first = next(r for r in allrecs if r["id"] == 3)
    assert first == {"text": "Effective but too tepid biopic", "label": 0, "score": -0.6, "id": 3}


def test_sentiment_binarise():
    rows = [(1, 2.5, "good"), (2, -0.1, "bad"), (3, 0.0, "meh"), (4, 1.0, "good"), (5, 0.01, "fine")]
    assert sentiment.binarise(rows) == [
        {"text": "good", "label": 1, "score": 2.5, "id": 1},
        {"text": "bad", "label": 0, "score": -0.1, "id": 2},
        {"text": "fine", "label": 1, "score": 0.01, "id": 5},
    ]


def test_sentiment_missing(empty_cache):
    with pytest.raises(MissingDependencyError, match="vaderSentiment.*setup_data.sh"):
        D.load_dataset("sentiment")


# --- users' files --------------------------------------------------------------------------------------------
def test_text_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("".join(f"Paragraph {i} line one.\nline two.\n\n" for i in range(20)))
    ds = D.load_dataset(f"text:{p}")
    assert ds.kind == "text" and ds.sizes() == {"calibration": 2, "train": 16, "test": 2}
    assert ds["calibration"][0]["text"] == "Paragraph 0 line one.\nline two."
    assert ds["test"][-1]["text"].startswith("Paragraph 19")
    lines = D.load_dataset(f"text:{p}", unit="line")
    assert sum(lines.sizes().values()) == 40


def test_text_folder(tmp_path):
    (tmp_path / "calibration.txt").write_text("a\n\nb\n")
    (tmp_path / "test.txt").write_text("c\n")
    ds = D.load_dataset(f"text:{tmp_path}")
    assert ds.splits == {"calibration": [{"text": "a"}, {"text": "b"}], "test": [{"text": "c"}]}


def test_text_errors(tmp_path):
    with pytest.raises(AttnPruneError, match="missing.txt"):
        D.load_dataset(f"text:{tmp_path / 'missing.txt'}")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(EmptyDatasetError, match="empty.txt"):
        D.load_dataset(f"text:{tmp_path / 'empty.txt'}")
    with pytest.raises(InvalidArgumentError):
        D.load_dataset("text")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(AttnPruneError, match="UTF-8"):
        D.load_dataset(f"text:{tmp_path / 'bin.txt'}")


def test_jsonl_labelled(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps({"sentence": f"s{i}", "label": i % 2, "extra": i}) for i in range(10)) + "\n\n")
    ds = D.load_dataset(f"jsonl:{p}", text_key="sentence")
    assert ds.kind == "labelled" and ds.sizes() == {"calibration": 1, "train": 8, "test": 1}
    assert ds["calibration"][0] == {"sentence": "s0", "label": 0, "extra": 0, "text": "s0"}
    assert ds.labels("test") == [1]


def test_jsonl_unlabelled_folder(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "c"}\n')
    ds = D.load_dataset(f"jsonl:{tmp_path}")
    assert ds.kind == "text" and ds.texts("train") == ["a", "b"] and ds.texts("test") == ["c"]


def test_jsonl_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok", "label": 1}\n{"text": "broken", \n')
    with pytest.raises(files.DataFileError, match=r"bad.jsonl, line 2: not valid JSON"):
        D.load_dataset(f"jsonl:{p}")
    p.write_text('{"text": "ok", "label": 1}\n{"text": "x", "label": "pos"}\n')
    with pytest.raises(files.DataFileError, match=r"line 2: field 'label' must be an integer"):
        D.load_dataset(f"jsonl:{p}")
    p.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(files.DataFileError, match=r"line 3: no string field 'text'"):
        D.load_dataset(f"jsonl:{p}")
    p.write_text('["a list"]\n')
    with pytest.raises(files.DataFileError, match="line 1: expected a JSON object"):
        D.load_dataset(f"jsonl:{p}")
    p.write_text("")
    with pytest.raises(EmptyDatasetError, match="bad.jsonl"):
        D.load_dataset(f"jsonl:{p}")
    with pytest.raises(files.DataFileError, match="nope.jsonl"):
        D.load_dataset(f"jsonl:{tmp_path / 'nope.jsonl'}")


def test_from_hf_plain_objects():
    ds = D.from_hf({"train": [{"text": "a", "label": 1}], "validation": [{"text": "b", "label": 0}]})
    assert ds.kind == "labelled" and list(ds.splits) == ["train", "validation"]
    flat = D.from_hf([{"text": str(i)} for i in range(10)])
    assert flat.kind == "text" and flat.sizes() == {"calibration": 1, "train": 8, "test": 1}
    with pytest.raises(files.DataFileError, match="row 0"):
        D.from_hf([{"body": "x"}, {"body": "y"}, {"body": "z"}])


def test_hf_datasets_roundtrip(tmp_path):
    datasets = pytest.importorskip("datasets", reason="optional: reading HF datasets needs `datasets`")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, 1, 0]}),
        "test": datasets.Dataset.from_dict({"sentence": ["d"], "label": [1]}),
    })
    ds = D.from_hf(dd, text_key="sentence")
    assert ds.kind == "labelled" and ds.texts("train") == ["a", "b", "c"] and ds.labels("test") == [1]
    dd.save_to_disk(str(tmp_path / "saved"))
    again = D.load_dataset(f"hf:{tmp_path / 'saved'}", text_key="sentence")
    assert again.splits == ds.splits
    with pytest.raises(files.DataFileError):
        D.load_dataset(f"hf:{tmp_path / 'nothing'}")


def test_one_input_builder_per_task_and_data_kind():
    from types import SimpleNamespace

    from attnprune.data import Dataset
    from attnprune.data.inputs import INPUTS, Labelled, Windows, inputs_for
    from attnprune.errors import InvalidArgumentError

    class Tok:  # one id per word
        eos_token_id = None

        def __call__(self, texts, truncation=False, max_length=None, add_special_tokens=True, **kw):
            ids = [[len(w) for w in t.split()][:max_length if truncation else None] for t in texts]
            return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}

    text = Dataset("t", "text", {"train": [{"text": "a bb ccc dddd"}, {"text": "ee f"}]})
    labelled = Dataset("l", "labelled", {"train": [{"text": "a bb ccc", "label": 1}, {"text": "dd", "label": 0}]})
    lm = SimpleNamespace(task="causal-lm", name="lm", tokenizer=Tok())
    clf = SimpleNamespace(task="classification", name="clf", tokenizer=Tok())
    assert isinstance(inputs_for(lm, text), Windows) and isinstance(inputs_for(clf, labelled), Labelled)
    rows = inputs_for(lm, text).examples(text["train"], lm.tokenizer, seq_len=3)
    assert rows.tolist() == [[1, 2, 3], [4, 2, 1]]  # one stream over the records, cut into windows
    ex = inputs_for(clf, labelled).examples(labelled["train"], clf.tokenizer, seq_len=0, max_length=2)
    assert [e["input_ids"].tolist() for e in ex] == [[1, 2], [2]] and [e["labels"] for e in ex] == [1, 0]
    # training needs the task's own kind; observation reads the texts of any kind
    with pytest.raises(InvalidArgumentError, match="causal-lm model; dataset 'l' is 'labelled', not text or tokens"):
        inputs_for(lm, labelled)
    with pytest.raises(InvalidArgumentError, match="'t' is 'text', not labelled"):
        inputs_for(clf, text)
    assert isinstance(inputs_for(clf, text, any_task=True), Windows)
    with pytest.raises(InvalidArgumentError, match="no tokenizer"):
        inputs_for(SimpleNamespace(task="causal-lm", name="x", tokenizer=None), text)
    tokens = Dataset("r", "tokens", {"train": [{"input_ids": [5, 6, 7, 8]}]})
    assert inputs_for(SimpleNamespace(task="causal-lm", name="x", tokenizer=None), tokens).examples(
        tokens["train"], None, seq_len=2).tolist() == [[5, 6], [7, 8]]
    with pytest.raises(InvalidArgumentError, match="seq2seq model; this command handles"):
        inputs_for(SimpleNamespace(task="seq2seq", name="s", tokenizer=Tok()), text)
    INPUTS.add("seq2seq:text", Windows())  # a new task plugs in by registering its builder
    try:
        assert isinstance(inputs_for(SimpleNamespace(task="seq2seq", name="s", tokenizer=Tok()), text), Windows)
    finally:
        INPUTS._items.pop("seq2seq:text")


@pytest.mark.parametrize("registry", ["models", "data"])
def test_a_broken_loader_module_is_an_import_error_not_an_unknown_name(tmp_path, monkeypatch, capsys, registry):
    """A loader / source module whose own import fails names itself and the failed import; before, a
    missing attnprune module inside it was skipped, so its names were just 'unknown'."""
    import attnprune.data as data
    import attnprune.models as models
    from attnprune.cli import main
    from attnprune.errors import PluginImportError

    (tmp_path / "my_broken_loader.py").write_text("import attnprune.models.no_such_helper\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    if registry == "models":
        monkeypatch.setattr(models, "LOADER_MODULES", [*models.LOADER_MODULES, "my_broken_loader"])
        call, argv = (lambda: models.load_model("mine")), ["observe", "--model", "mine", "-o", tmp_path / "s"]
    else:
        monkeypatch.setattr(data, "SOURCE_MODULES", [*data.SOURCE_MODULES, "my_broken_loader"])
        call, argv = (lambda: data.load_dataset("mine")), ["observe", "--model", "tiny-gpt2", "--data", "mine",
                                                           "-o", tmp_path / "s"]
    with pytest.raises(PluginImportError, match="my_broken_loader.*attnprune.models.no_such_helper") as info:
        call()
    assert isinstance(info.value, ImportError) and isinstance(info.value.__cause__, ModuleNotFoundError)
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "my_broken_loader cannot be imported" in err[0] and "unknown" not in err[0]
