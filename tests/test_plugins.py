from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest
import torch
from _support.models import gpt2_config
from transformers import GPT2LMHeadModel

import introspect._plugins as plugins
from introspect import AdapterConflictError, AdapterSpec, Inspector, hookimpl
from introspect._plugins import PluginWarning, get_registry, new_plugin_manager, plugin_infos
from introspect.testing import build_tiny

ROOT = Path(__file__).resolve().parent.parent


def _plugin(name: str, *specs: AdapterSpec) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
        for spec in specs:
            register(spec)

    module.register_adapters = register_adapters  # type: ignore[attr-defined]
    return module


SPEC_A = AdapterSpec(name="arch-a", model_types=("arch_a",), blocks="layers")


def test_fresh_manager_registers_a_test_plugin() -> None:
    pm = new_plugin_manager(load_entry_points=False, plugins=[_plugin("p1", SPEC_A)])
    registry = get_registry(pm)
    assert registry.specs == {"arch-a": SPEC_A}
    assert registry.owners["arch-a"] == "p1"
    # The cached shared manager is not touched by a fresh one.
    assert "arch-a" not in get_registry().specs


def test_built_ins_load_through_entry_points() -> None:
    pm = new_plugin_manager()
    infos = {info.name: info for info in plugin_infos(pm)}
    assert infos["introspect-lm.gpt2"].builtin
    assert infos["introspect-lm.gpt2"].distribution == "introspect-lm"
    assert infos["introspect-lm.gpt2"].adapters == ("gpt2",)
    assert {"gpt2", "llama"} <= set(get_registry(pm).specs)


def test_two_plugins_claiming_one_architecture_name_both() -> None:
    clash = AdapterSpec(name="arch-b", model_types=("arch_a",), blocks="layers")
    pm = new_plugin_manager(
        load_entry_points=False, plugins=[_plugin("first", SPEC_A), _plugin("second", clash)]
    )
    with pytest.raises(AdapterConflictError) as info:
        get_registry(pm)
    message = str(info.value)
    assert "'arch_a'" in message and "'first'" in message and "'second'" in message


def test_two_plugins_registering_one_name_name_both() -> None:
    twin = SPEC_A.model_copy(update={"model_types": ("other",)})
    pm = new_plugin_manager(
        load_entry_points=False, plugins=[_plugin("one", SPEC_A), _plugin("two", twin)]
    )
    with pytest.raises(AdapterConflictError, match=r"'arch-a'.*'one'.*'two'"):
        get_registry(pm)


def test_plugin_claiming_a_built_in_architecture_conflicts() -> None:
    clash = AdapterSpec(name="my-gpt2", model_types=("gpt2",), blocks="h")
    pm = new_plugin_manager(plugins=[_plugin("introspect-mygpt2", clash)])
    with pytest.raises(AdapterConflictError, match=r"'gpt2'.*introspect-lm\.gpt2.*mygpt2"):
        get_registry(pm)


def test_failing_plugin_is_reported_and_others_load(monkeypatch: pytest.MonkeyPatch) -> None:
    real = list(metadata.entry_points(group="introspect"))
    broken = metadata.EntryPoint(
        name="introspect-broken", value="introspect_no_such_module_xyz", group="introspect"
    )
    monkeypatch.setattr(plugins, "_entry_points", lambda: [broken, *real])
    with pytest.warns(PluginWarning, match=r"'introspect-broken'.*failed to import"):
        pm = new_plugin_manager()
    assert [(f.name, f.stage) for f in pm.failures] == [("introspect-broken", "import")]
    assert "ModuleNotFoundError" in pm.failures[0].error
    assert {"gpt2", "llama"} <= set(get_registry(pm).specs)


def test_select_adapter_hook_overrides_the_match(lm: torch.nn.Module) -> None:
    class Chooser:
        @hookimpl
        def select_adapter(
            self, model: torch.nn.Module, candidates: list[AdapterSpec]
        ) -> AdapterSpec:
            return candidates[0].model_copy(update={"name": "chosen"})

    pm = new_plugin_manager(plugins=[Chooser()])
    assert Inspector(lm, plugin_manager=pm).adapter.name == "chosen"


def test_a_plugin_registered_after_the_registry_was_built_is_seen() -> None:
    class LateGPT2(GPT2LMHeadModel):
        """A class only the late plugin's adapter claims (GPT-2's layout under another name)."""

    model = build_tiny(LateGPT2, gpt2_config())
    pm = new_plugin_manager()
    assert "late-gpt2" not in get_registry(pm).specs  # built, and cached, without it
    assert Inspector(model, plugin_manager=pm).adapter.name == "gpt2"  # matched by model type
    late = (
        get_registry(pm)
        .specs["gpt2"]
        .model_copy(update={"name": "late-gpt2", "model_types": (), "architectures": ("LateGPT2",)})
    )
    plugin = _plugin("introspect-late", late)
    pm.register(plugin)
    assert get_registry(pm).specs["late-gpt2"] == late
    assert get_registry(pm).owners["late-gpt2"] == "introspect-late"
    assert Inspector(model, plugin_manager=pm).adapter.name == "late-gpt2"
    pm.unregister(plugin)
    assert "late-gpt2" not in get_registry(pm).specs
    assert Inspector(model, plugin_manager=pm).adapter.name == "gpt2"


def test_block_disables_a_built_in() -> None:
    pm = new_plugin_manager(block=["introspect-lm.gpt2"])
    assert "gpt2" not in get_registry(pm).specs
    assert "llama" in get_registry(pm).specs


def test_load_plugins_env_restricts_third_party(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_LOAD_PLUGINS", "nothing-by-that-name")
    pm = new_plugin_manager()
    assert all(info.builtin for info in plugin_infos(pm))
    assert "gpt2" in get_registry(pm).specs


def test_trace_env_prints_every_hook_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], lm: torch.nn.Module
) -> None:
    class Chooser:
        @hookimpl
        def select_adapter(self) -> None:
            return None

    monkeypatch.setenv("INTROSPECT_TRACE_PLUGINS", "1")
    pm = new_plugin_manager(plugins=[Chooser()])
    Inspector(lm, plugin_manager=pm)
    err = capsys.readouterr().err
    # register_adapters used to be called around pluggy, so tracing never showed it.
    assert "register_adapters [hook]" in err
    assert "register_adapters of 'introspect-lm.gpt2'" in err
    assert "select_adapter [hook]" in err


def test_every_adapter_module_has_an_entry_point_and_vice_versa() -> None:
    modules = {
        f"introspect.adapters.{path.stem}"
        for path in (ROOT / "adapters").glob("*.py")
        if path.stem != "__init__"
    }
    # tomllib is 3.11+; on 3.10 its forerunner tomli reads the same.
    toml = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    pyproject = toml.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["introspect"]
    # Besides the adapters, one built-in plugin: detection, the select_adapter of last resort.
    assert set(declared.values()) == modules | {"introspect._detect"}
    # Entry-point name = distribution name + module, so pluggy never skips a repeated name.
    assert all(
        name == f"introspect-lm.{value.rsplit('.', 1)[1].lstrip('_')}"
        for name, value in declared.items()
    )
    # The installed metadata says the same (a stale editable install fails here: reinstall).
    installed = {
        ep.name: ep.value
        for ep in metadata.distribution("introspect-lm").entry_points
        if ep.group == "introspect"
    }
    assert installed == declared


def _test_plugin_installed() -> bool:
    return any(
        ep.name == "introspect-testplugin" for ep in metadata.entry_points(group="introspect")
    )


def test_third_party_plugin_is_discovered_through_its_entry_point() -> None:
    if not _test_plugin_installed():
        if os.environ.get("INTROSPECT_REQUIRE_TEST_PLUGIN"):
            pytest.fail("tests/plugins/introspect-testplugin is not installed")
        pytest.skip("install it with: pip install -e tests/plugins/introspect-testplugin")
    from introspect_testplugin import TinyNet  # type: ignore[import-not-found]

    pm = new_plugin_manager()
    infos = {info.name: info for info in plugin_infos(pm)}
    info = infos["introspect-testplugin"]
    assert (info.distribution, info.version, info.builtin) == (
        "introspect-testplugin",
        "0.0.1",
        False,
    )
    assert info.adapters == ("tinynet",)
    model = TinyNet().eval()
    insp = Inspector(model, plugin_manager=pm)
    assert insp.adapter.name == "tinynet"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        logits = model(ids)
    with torch.no_grad():
        assert torch.allclose(insp.logits(cap["block[-1]"].output), logits, atol=1e-6)
