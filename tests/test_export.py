"""Writing captures: the safetensors + JSON pair is one unit, on success and on every failure."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest
import torch

import introspect._export as export
from introspect import Inspector
from introspect._errors import CaptureError
from introspect._export import (
    capture_to_file,
    check_output_path,
    load_capture,
    save_tensors,
    write_atomically,
)
from introspect._text import encode_prompt
from introspect.zoo import load_model


def _old_pair(folder: Path) -> Path:
    out = folder / "pair.safetensors"
    save_tensors(out, {"block[0]": torch.zeros(1, 2, 3)}, {"model": "old"})
    return out


def _assert_old_pair_intact(out: Path) -> None:
    tensors, header = load_capture(out)
    assert header == {"model": "old"}
    assert json.loads(out.with_suffix(".json").read_text()) == {"model": "old"}
    assert torch.equal(tensors["block[0]"], torch.zeros(1, 2, 3))
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def _new(out: Path) -> tuple[Path, Path]:
    return save_tensors(out, {"block[0]": torch.ones(1, 2, 3)}, {"model": "new"}, force=True)


def test_existing_pair_is_refused_without_force(tmp_path: Path) -> None:
    out = _old_pair(tmp_path)
    with pytest.raises(CaptureError, match=r"already exist.*--force \(force=True in Python\)"):
        save_tensors(out, {"block[0]": torch.ones(1)}, {"model": "new"})
    _assert_old_pair_intact(out)
    # A lone sidecar (someone's config.json) is protected too.
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CaptureError, match=r"config\.json already exists"):
        check_output_path(tmp_path / "config.safetensors")
    assert (tmp_path / "config.json").read_text() == "{}"
    _new(out)
    assert load_capture(out)[1] == {"model": "new"}


def test_sidecar_rename_failing_rolls_the_tensors_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _old_pair(tmp_path)
    real = os.replace

    def refuse_json(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith("pair.json") and ".partial" in str(src):
            raise PermissionError(1, "Operation not permitted", str(dst))
        real(src, dst)

    monkeypatch.setattr(export.os, "replace", refuse_json)
    with pytest.raises(PermissionError):
        _new(out)
    _assert_old_pair_intact(out)


def test_interrupt_between_the_renames_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _old_pair(tmp_path)
    real = os.replace

    def interrupted(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith("pair.json") and ".partial" in str(src):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(export.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _new(out)
    _assert_old_pair_intact(out)


def test_ctrl_c_during_the_renames_waits_until_the_pair_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _old_pair(tmp_path)
    real = os.replace

    def signalled(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith("pair.safetensors") and ".partial" in str(src):
            os.kill(os.getpid(), signal.SIGINT)
        real(src, dst)

    monkeypatch.setattr(export.os, "replace", signalled)
    with pytest.raises(KeyboardInterrupt):
        _new(out)
    tensors, header = load_capture(out)
    assert header == json.loads(out.with_suffix(".json").read_text()) == {"model": "new"}
    assert torch.equal(tensors["block[0]"], torch.ones(1, 2, 3))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sidecar_write_failing_leaves_the_old_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _old_pair(tmp_path)
    real = Path.write_text

    def disk_full(self: Path, *args: object, **kwargs: object) -> int:
        if self.name.endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(CaptureError, match="No space left on device; nothing was replaced"):
        _new(out)
    monkeypatch.undo()
    _assert_old_pair_intact(out)


def test_safetensors_error_becomes_a_capture_error(tmp_path: Path) -> None:
    # safetensors reports I/O failures as SafetensorError, which is no OSError.
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with pytest.raises(SafetensorError):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "missing" / "x.safetensors"))
    out = _old_pair(tmp_path)

    def refused(tmp: str) -> None:
        save_file({"x": torch.zeros(1)}, str(tmp_path / "missing" / "x.safetensors"))

    with pytest.raises(SafetensorError):
        write_atomically([(out, refused)])
    _assert_old_pair_intact(out)


def test_a_folder_where_the_sidecar_goes_is_an_error_first(tmp_path: Path) -> None:
    (tmp_path / "pair.json").mkdir()
    with pytest.raises(CaptureError, match="is a folder"):
        save_tensors(tmp_path / "pair.safetensors", {"x": torch.zeros(1)}, {}, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair.json"]


def test_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        out, side = save_tensors(tmp_path / "x.safetensors", {"x": torch.zeros(1)}, {})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert stat.S_IMODE(side.stat().st_mode) == 0o640


def test_one_tensor_under_two_locators_saves_twice_and_loads_equal(tmp_path: Path) -> None:
    shared = torch.randn(1, 3, 4)
    save_tensors(tmp_path / "x.safetensors", {"block[2]": shared, "block[3].input": shared[:]}, {})
    tensors, _ = load_capture(tmp_path / "x.safetensors")
    assert torch.equal(tensors["block[2]"], shared)
    assert torch.equal(tensors["block[3].input"], shared)


@pytest.mark.parametrize(
    ("model_name", "locators", "same"),
    [
        ("toy-gpt2", ["block[2]", "block[3].input"], ("block[2]", "block[3].input")),
        ("toy-llama", ["embed", "block[0].input"], ("embed", "block[0].input")),
        ("toy-llama", ["block[-1]", "final_norm.input"], ("block[3]", "final_norm.input")),
    ],
)
def test_capture_locators_that_are_one_tensor(
    tmp_path: Path, model_name: str, locators: list[str], same: tuple[str, str]
) -> None:
    model, tokenizer = load_model(model_name, progress=False)
    out = tmp_path / "run.safetensors"
    capture_to_file(Inspector(model), encode_prompt(tokenizer, "Hi there", model), locators, out)
    tensors, sidecar = load_capture(out)
    first, second = same
    assert sorted(tensors) == sorted(sidecar["locators"]) == sorted(same)
    assert torch.equal(tensors[first], tensors[second])
