"""Running the command in-process, for the command-line tests."""

from __future__ import annotations

import pytest

from introspect.cli import main

__all__ = ["error_line", "run_command"]


def run_command(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``introspect ARGV`` in this process: its exit status, standard output and error."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one error line a failed command prints (above the ``--debug`` hint, no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[1] == "(run with --debug for the full traceback)"
    assert "Traceback" not in err
    assert lines[0].startswith("introspect: error: ")
    return lines[0]
