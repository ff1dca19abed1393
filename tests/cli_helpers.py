"""Helpers shared by the CLI tests: run ``attnprune`` in-process and check the one-line error rule."""

from attnprune.cli import main


def run(capsys, *argv):
    """``main(argv)``; returns ``(exit status, stdout, stderr)``."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc, err, *words):
    """Exit status 2, exactly one ``error: ...`` line holding every word, no traceback."""
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def tiny_lm_folder(path, num_words=50):
    """A 1-layer Llama with a word-level tokenizer over ``w0 .. w<num_words-1>``, saved as a Hugging Face
    folder (load it with ``hf:<path>``): the smallest model that reads ``text:`` data."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i + 2 for i in range(num_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(path)
    return path


# ---- file-system faults confined to one folder (they work as root, where chmod does not) ---------

def _under(path, root) -> bool:
    import os

    return os.path.abspath(os.fspath(path)).startswith(os.path.abspath(os.fspath(root)) + os.sep)


def make_read_only(monkeypatch, root):
    """Creating files or folders under ``root`` fails with EROFS, as on a read-only file system."""
    import errno
    import os

    real_open, real_mkdir = os.open, os.mkdir

    def fake_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, root):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        if _under(path, root):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def make_full(monkeypatch, root):
    """Writing bytes to a file under ``root`` fails with ENOSPC, as on a full disk (Linux: /proc/self/fd)."""
    import errno
    import os

    real_write = os.write

    def fake_write(fd, data):
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = ""
        if where and _under(where, root):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", fake_write)
