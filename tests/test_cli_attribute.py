"""``introspect attribute``: the library's estimate (and exact table) printed, saved as JSON and
drawn, on the zoo's toy models; its refusals are one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from introspect import Inspector, attribution_patching, logit_difference
from introspect._text import encode_prompt
from introspect.cli import main
from introspect.zoo import load_model

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["attribute", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _ioi(model: str, *extra: str) -> list[str]:
    pair = ["--clean", CLEAN, "--corrupted", CORRUPTED]
    return [model, *pair, "--target", " Mary", "--versus", " John", *extra]


def _library(model_name: str) -> tuple[Inspector, Any, Any, Any, Any]:
    """The zoo model's Inspector, the two prompts' inputs and the metric the command uses."""
    model, tokenizer = load_model(model_name, progress=False)
    clean, corrupted = (encode_prompt(tokenizer, text, model) for text in (CLEAN, CORRUPTED))
    metric = logit_difference(tokenizer.encode(" Mary")[0], tokenizer.encode(" John")[0])
    return Inspector(model), clean, corrupted, metric, tokenizer


def test_json_holds_the_library_estimate_and_the_exact_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _run(capsys, *_ioi("toy-llama", "--heads", "--exact", "--json"))
    assert code == 0, err
    payload = json.loads(out)
    insp, clean, corrupted, metric, tokenizer = _library("toy-llama")
    model = insp.model
    options: dict[str, Any] = {"locators": "block[:].attn.z", "heads": "each"}
    estimate = attribution_patching(insp, clean, corrupted, metric, **options)
    exact = insp.patching_sweep(clean, corrupted, metric, **options)
    assert payload["method"] == "AtP*" and payload["axis"] == "head"
    assert payload["locators"] == [f"block[{i}].attn.z" for i in range(4)]
    assert torch.allclose(torch.tensor(payload["estimate"]), estimate, atol=1e-5)
    assert torch.allclose(torch.tensor(payload["exact"]), exact, atol=1e-5)
    assert payload["target"]["id"] == tokenizer.encode(" Mary")[0]
    assert set(payload["agreement"]) >= {"pearson", "spearman", "top", "overlap", "false_negatives"}
    with torch.no_grad():
        assert payload["metric"]["clean"] == pytest.approx(float(metric(model(**clean))), abs=1e-4)
    assert set(payload["seconds"]) == {"estimate", "exact"}


def test_table_by_position_with_the_exact_column_and_a_plot(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "atp.png"
    code, out, err = _run(
        capsys, *_ioi("toy-gpt2", "--at", "block[2:]", "--exact", "-n", "3", "--plot", str(plot))
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("toy-gpt2: AtP* of logit(' Mary') - logit(' John')")
    assert lines[1].startswith("28 cells (2 locators x 14 positions)")
    assert lines[2].split() == ["rank", "locator", "position", "token", "estimate", "exact"]
    assert len(lines) == 3 + 1 + 3 + 2  # header, rule, three cells, agreement, plot
    assert lines[-2].startswith("AtP* against exact patching over 28 cells: Pearson")
    assert lines[-1] == f"wrote {plot}"
    assert plot.read_bytes().startswith(PNG)


def test_plain_atp_and_its_q_cells(capsys: pytest.CaptureFixture[str]) -> None:
    runs = []
    for flags in ((), ("--no-qk-fix",)):
        code, out, err = _run(
            capsys, *_ioi("toy-llama", "--at", "block[3].attn.q", "--heads", "--json", *flags)
        )
        assert code == 0, err
        runs.append(json.loads(out))
    assert [r["method"] for r in runs] == ["AtP*", "AtP"]
    assert len(runs[0]["estimate"][0]) == 4
    assert runs[0]["estimate"] != runs[1]["estimate"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--clean", CLEAN, "--corrupted", CLEAN.replace("John gave", "the man gave")],
            "--clean is 14 tokens and --corrupted 15",
        ),
        (["--clean", CLEAN, "--corrupted", CORRUPTED, "--at", "block[9]"], "out of range"),
        (["--clean", CLEAN, "--corrupted", CORRUPTED, "--plot", "x.txt"], "must end in .png"),
    ],
)
def test_refusals_are_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = _run(capsys, "toy-gpt2", *args, "--target", " Mary", "--versus", " John")
    assert code == 1 and not out
    first, hint = err.splitlines()
    assert first.startswith("introspect: error: ") and message in first
    assert hint == "(run with --debug for the full traceback)"


def test_a_target_of_several_tokens_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    pair = ["--clean", CLEAN, "--corrupted", CORRUPTED]
    code, _, err = _run(capsys, "toy-gpt2", *pair, "--target", " Mary Ann", "--versus", " John")
    assert code == 1
    assert "target ' Mary Ann' is 2 tokens for this tokenizer, not one" in err.splitlines()[0]


def test_grad_drop_gives_the_library_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, *_ioi("toy-gpt2", "--at", "block[:]", "--grad-drop", "--json"))
    assert code == 0, err
    payload = json.loads(out)
    insp, clean, corrupted, metric, _ = _library("toy-gpt2")
    options: dict[str, Any] = {"locators": "block[:]"}
    dropped = attribution_patching(insp, clean, corrupted, metric, grad_drop=True, **options)
    plain = attribution_patching(insp, clean, corrupted, metric, **options)
    assert payload["method"] == "AtP* + GradDrop"
    assert torch.allclose(torch.tensor(payload["estimate"]), dropped, atol=1e-5)
    assert not torch.allclose(dropped, plain, atol=1e-5)  # the flag reached the library
