"""``introspect scaffold``: a plugin package from a detected or given spec, that passes its test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import transformers

import introspect._spec
from introspect import AdapterSpec, get_registry, new_plugin_manager
from introspect._plugins import IntrospectPluginManager
from introspect._scaffold import model_classes, scaffold, spec_source, write_plugin
from introspect._tiny import tiny_config
from introspect.cli import main


def without_builtin(model_type: str) -> tuple[IntrospectPluginManager, list[str]]:
    registry = get_registry(new_plugin_manager())
    name = registry.by_model_type.get(model_type)
    block = [registry.owners[name]] if name else []
    return new_plugin_manager(block=block), block


def rebuilt(source: str) -> AdapterSpec:
    namespace = dict(vars(introspect._spec))
    exec(source, namespace)
    spec = namespace["ADAPTER"]
    assert isinstance(spec, AdapterSpec)
    return spec


def test_spec_source_round_trips_every_registered_spec() -> None:
    specs = list(get_registry(new_plugin_manager()).specs.values())
    assert specs
    for spec in specs:
        assert rebuilt(spec_source(spec)) == spec, spec.name


@pytest.mark.slow  # the scaffolded package's own pytest, in a process of its own
def test_scaffolded_package_round_trips_and_passes_its_test(tmp_path: Path) -> None:
    pm, _ = without_builtin("gpt2")
    result = scaffold("gpt2", tmp_path / "introspect-gpt2", plugin_manager=pm)
    assert result.distribution == "introspect-gpt2" and result.module == "introspect_gpt2"
    assert result.spec.name == "gpt2"
    assert (result.spec.blocks, result.spec.final_norm, result.spec.lm_head) == (
        "h",
        "ln_f",
        "lm_head",
    )
    # The module's source rebuilds exactly the detected spec.
    module_text = (result.directory / "introspect_gpt2.py").read_text()
    namespace: dict[str, object] = {}
    exec(module_text, namespace)
    assert namespace["ADAPTER"] == result.spec
    assert callable(namespace["register_adapters"])
    pyproject = (result.directory / "pyproject.toml").read_text()
    assert '[project.entry-points.introspect]\nintrospect-gpt2 = "introspect_gpt2"' in pyproject
    # Its own conformance test passes, run as a plugin author would run it.
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=result.directory,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout


def test_scaffold_from_a_local_folder_and_a_given_adapter(tmp_path: Path) -> None:
    folder = tmp_path / "my-llama"
    tiny_config("llama").save_pretrained(folder)
    pm, _ = without_builtin("llama")
    detected = scaffold(str(folder), tmp_path / "detected", plugin_manager=pm)
    assert detected.spec.blocks == "layers" and detected.spec.final_norm == "norm"
    given = scaffold(
        "gpt2",
        tmp_path / "given",
        adapter="gpt2",
        name="gpt2-custom",
        plugin_manager=new_plugin_manager(),
    )
    builtin = get_registry(new_plugin_manager()).specs["gpt2"]
    assert given.spec == builtin.model_copy(update={"name": "gpt2-custom"})
    assert given.distribution == "introspect-gpt2-custom"


def test_scaffold_refuses_a_claimed_type_and_unknown_targets(tmp_path: Path) -> None:
    with pytest.raises(introspect.AdapterConflictError, match="already served by adapter"):
        scaffold("gpt2", tmp_path / "x", plugin_manager=new_plugin_manager())
    with pytest.raises(introspect.AdapterError, match="neither a folder"):
        scaffold("not-a-model-type", tmp_path / "y")


def test_write_plugin_does_not_overwrite(tmp_path: Path) -> None:
    spec = AdapterSpec(name="tiny", model_types=("gpt2",), blocks="h", final_norm="ln_f")
    config = tiny_config("gpt2")
    write_plugin(tmp_path / "pkg", spec, config=config, classes=["GPT2Model"])
    with pytest.raises(FileExistsError):
        write_plugin(tmp_path / "pkg", spec, config=config, classes=["GPT2Model"])
    write_plugin(tmp_path / "pkg", spec, config=config, classes=["GPT2Model"], force=True)


def test_model_classes() -> None:
    assert model_classes("llama") == ["LlamaForCausalLM", "LlamaModel"]
    assert model_classes("bert")[0] == "BertForMaskedLM"
    assert model_classes("t5")[0] == "T5ForConditionalGeneration"
    assert all(hasattr(transformers, name) for name in model_classes("gpt2"))


def test_cli_scaffold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, block = without_builtin("llama")
    blocks = [arg for plugin in block for arg in ("--block", plugin)]
    assert main(["scaffold", "llama", "--print", *blocks]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("ADAPTER = AdapterSpec(") and 'blocks="layers"' in printed
    out = tmp_path / "pkg"
    assert main(["scaffold", "llama", "-o", str(out), *blocks]) == 0
    text = capsys.readouterr().out
    assert "introspect-llama" in text and "pip install -e ." in text
    assert (out / "introspect_llama.py").exists() and (
        out / "tests" / "tiny" / "config.json"
    ).exists()
    # Without blocking the built-in adapter, the command explains the conflict.
    if block:
        assert main(["scaffold", "llama", "-o", str(tmp_path / "other")]) == 1
        assert "already served by adapter" in capsys.readouterr().err


def test_scaffold_refuses_a_name_that_is_not_an_adapter_name(tmp_path: Path) -> None:
    # model_copy skipped validation: this name once wrote a package that failed to import.
    pm, _ = without_builtin("llama")
    with pytest.raises(introspect.AdapterError, match="must be lower-case letters"):
        scaffold("llama", tmp_path / "pkg", name='My Adapter"""', plugin_manager=pm)
    with pytest.raises(introspect.AdapterError, match="distribution name 'a b'"):
        scaffold("llama", tmp_path / "pkg", distribution="a b", plugin_manager=pm)
    assert list(tmp_path.iterdir()) == []
    spec = AdapterSpec(name="tiny", blocks="h").model_copy(update={"name": "Bad Name"})
    with pytest.raises(introspect.AdapterError, match="must be lower-case letters"):
        write_plugin(tmp_path / "pkg", spec, config=tiny_config("gpt2"), classes=["GPT2Model"])
    assert list(tmp_path.iterdir()) == []


def test_cli_scaffold_bad_name_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["scaffold", "llama", "--name", 'My Adapter"""', "-o", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith('introspect: error: adapter name \'My Adapter"""\' must be')
    assert not (tmp_path / "p").exists()


def test_spec_source_quotes_any_text_safely() -> None:
    tricky = 'say "hi" and \'bye\' \\ """ \n\u2028 end ' + "x" * 80
    spec = AdapterSpec(name="tiny", blocks="h", description=tricky, notes=('a "b"', "c'd"))
    source = spec_source(spec)
    assert rebuilt(source) == spec
    assert 'blocks="h"' in source  # plain strings stay double-quoted
