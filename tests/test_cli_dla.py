"""`introspect dla`: direct logit attribution from the command line, against the library and
the model's own logit."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.cli import error_line, run_command

from introspect import Inspector
from introspect._text import encode_prompt
from introspect.zoo import load_model

PROMPT = "Tokyo is the capital of Japan, and Paris"
TARGET = "42"  # a token id: the same token whichever tokenizer the toy model has


@pytest.fixture(autouse=True)
def _no_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")


@pytest.fixture(scope="module")
def toy() -> tuple[Any, Any, Inspector, dict[str, torch.Tensor]]:
    model, tokenizer = load_model("toy-llama", progress=False)
    inputs = encode_prompt(tokenizer, PROMPT, model)
    return model, tokenizer, Inspector(model), inputs


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run_command(capsys, "dla", "toy-llama", "--prompt", PROMPT, *argv, "--json")
    assert code == 0, err
    return dict(json.loads(out))


@pytest.mark.parametrize("per_head", [False, True])
def test_json_is_the_librarys_attribution_and_sums_to_the_models_logit(
    capsys: pytest.CaptureFixture[str], toy: Any, per_head: bool
) -> None:
    model, _, insp, inputs = toy
    flags = ["--per-head"] if per_head else []
    data = _json(capsys, "--target", TARGET, "-p", "-3", *flags)
    seq = int(inputs["input_ids"].shape[1])
    expected = insp.direct_logit_attribution(inputs, 42, seq - 3, per_head=per_head)
    assert data["labels"] == expected.labels
    assert torch.allclose(torch.tensor(data["values"]), expected.values, atol=1e-6)
    assert (data["token"], data["position"], data["per_head"]) == (42, seq - 3, per_head)
    assert data["target"] == {"text": TARGET, "id": 42} and len(data["tokens"]) == seq
    with torch.no_grad():
        logit = float(model(**inputs).logits[0, seq - 3, 42])
    assert abs(sum(data["values"]) - logit) < 1e-4 and abs(data["logit"] - logit) < 1e-5
    # toy-llama: 4 blocks of 4 heads; the embedding, each sub-layer (or head) and the bias.
    assert len(data["labels"]) == (1 + 4 * (4 + 1) + 1 if per_head else 1 + 4 * 2 + 1)
    assert data["labels"][0] == "embed" and data["labels"][-1] == "bias"


def test_the_table_lists_the_largest_and_sums_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _json(capsys, "--target", TARGET, "--per-head")
    code, out, err = run_command(
        capsys, "dla", "toy-llama", "--prompt", PROMPT, "--target", TARGET, "--per-head", "-n", "4"
    )
    assert code == 0, err
    lines = out.splitlines()
    values = data["values"]
    order = sorted(range(len(values)), key=lambda i: -abs(values[i]))
    assert lines[0].startswith("toy-llama: direct logit attribution of ")
    assert f"(id 42) at position {data['position']} (" in lines[0]
    assert lines[1] == (
        f"its logit {data['logit']:.4f} is the sum of 22 components (max |diff| "
        f"{data['max_diff']:.2g}); the 4 largest, largest first:"
    )
    assert lines[2].split() == ["rank", "component", "contribution"]
    rows = [line.split() for line in lines[4:8]]
    assert rows == [
        [str(rank + 1), data["labels"][i], f"{values[i]:+.4f}"] for rank, i in enumerate(order[:4])
    ]
    rest = sum(values[i] for i in order[4:])
    assert lines[8] == f"the other 18 components sum to {rest:+.4f}"
    assert len(lines) == 9


@pytest.mark.skipif(find_spec("matplotlib") is None, reason="--plot needs matplotlib")
def test_plot_writes_a_bar_chart(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plot = tmp_path / "dla.png"
    code, out, err = run_command(
        capsys, "dla", "toy-gpt2", "--prompt", PROMPT, "--target", TARGET, "--plot", str(plot)
    )
    assert code == 0, err
    assert out.splitlines()[-1] == f"wrote {plot}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["dla.png"]  # no temporary file left


def test_a_position_outside_the_prompt_is_one_line(
    capsys: pytest.CaptureFixture[str], toy: Any
) -> None:
    n = int(toy[3]["input_ids"].shape[1])  # the toy models share one tokenizer
    code, _, err = run_command(
        capsys, "dla", "toy-gpt2", "--prompt", PROMPT, "--target", TARGET, "-p", str(n)
    )
    assert code == 1
    assert error_line(err) == (
        f"introspect: error: --position {n} is out of range for the prompt's {n} tokens "
        f"(use {-n}..{n - 1})"
    )


def test_a_token_outside_the_vocabulary_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_command(capsys, "dla", "toy-gpt2", "--prompt", "Hi", "--target", "99999999")
    assert code == 1 and "99999999" in error_line(err)
