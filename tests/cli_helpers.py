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
