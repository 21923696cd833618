from __future__ import annotations

import json
import subprocess
import sys

import pytest

from introspect._plugins import AUTHORING_HINT
from introspect.cli import main


def test_adapters_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["adapter", "plugin", "serves"]
    assert "gpt2" in out and "introspect-lm.llama" in out


def test_adapters_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    by_name = {item["name"]: item for item in payload}
    assert by_name["gpt2"]["final_norm"] == "ln_f"
    assert by_name["gpt2"]["plugin"] == "introspect-lm.gpt2"


def test_plugins_lists_built_ins_with_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--all", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    names = {p["name"]: p for p in payload["plugins"]}
    assert names["introspect-lm.gpt2"]["builtin"] is True
    assert names["introspect-lm.gpt2"]["distribution"] == "introspect-lm"
    assert payload["failed"] == []
    assert main(["plugins", "--json"]) == 0
    third_party = json.loads(capsys.readouterr().out)["plugins"]
    assert all(not p["builtin"] for p in third_party)


@pytest.mark.slow  # a process of its own
def test_console_script_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "introspect.cli", "plugins", "--all"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "introspect-lm.gpt2" in done.stdout


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "plugins" in capsys.readouterr().out


@pytest.mark.slow  # a process of its own
def test_a_closed_pipe_is_not_an_error() -> None:
    # stdout is a pipe whose reader is gone, as in `introspect adapters --json | head -1`.
    code = (
        "import os, sys\n"
        "read, write = os.pipe()\n"
        "os.close(read)\n"
        "os.dup2(write, 1)\n"
        "from introspect.cli import main\n"
        "sys.exit(main(['adapters', '--json']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


def test_authoring_hint_names_a_command_that_prints_the_hooks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    command = AUTHORING_HINT.split("`")[1].split()
    assert command[0] == "introspect"
    assert main(command[1:]) == 0
    out = capsys.readouterr().out
    assert "def select_adapter(model: nn.Module, candidates: Sequence[AdapterSpec])" in out
    assert "[project.entry-points.introspect]" in out
    assert "INTROSPECT_STRICT_PLUGINS" in out
