"""introspect report: one self-contained page, refused before any work when it cannot be
written or would not fit its size budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from _support.cli import run_command

PROMPT = "The capital of France is"


def test_report_writes_one_page_with_every_view(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    code, printed, _ = run_command(
        capsys,
        "report",
        "toy-gpt2",
        "--prompt",
        PROMPT,
        "--target",
        " Paris",
        "--out",
        str(out),
        "--no-progress",
    )
    assert code == 0 and printed.startswith(f"wrote {out} (")
    page = out.read_text(encoding="utf-8")
    for kind in ("lens", "attention", "heads", "dla"):
        assert page.count(f'data-kind="{kind}"') == 1
    assert "--target &#x27; Paris&#x27;" in page and "<dt>adapter</dt><dd>gpt2</dd>" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # nothing half-written


def test_report_refuses_an_existing_file_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    out.write_text("mine")
    args = ["report", "toy-gpt2", "--prompt", "Hi", "--out", str(out), "--no-progress"]
    code, _, err = run_command(capsys, *args)
    assert code == 1 and "exists: pass --force" in err and out.read_text() == "mine"
    code, _, _ = run_command(capsys, *args, "--blocks", "0:2", "--force")
    page = out.read_text(encoding="utf-8")
    assert code == 0 and "attention of 2 blocks (block[0]..block[1])" in page


def test_report_refuses_a_prompt_too_long_for_the_page(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    long = " ".join(["word"] * 800)
    code, _, err = run_command(
        capsys,
        "report",
        "toy-gpt2",
        "--prompt",
        long,
        "--out",
        str(tmp_path / "r.html"),
        "--no-progress",
    )
    assert code == 1
    line = err.splitlines()[0]
    assert "800-token prompt" in line and "MB" in line and "--blocks 0:" in line
    assert not (tmp_path / "r.html").exists()


def test_report_checks_its_output_path_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_command(
        capsys, "report", "toy-gpt2", "--prompt", "Hi", "--out", str(tmp_path / "r.png")
    )
    assert code == 1 and "must end in .html" in err
