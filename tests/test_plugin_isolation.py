"""One faulty plugin is named, warned about and skipped; every other plugin keeps working.

Faulty plugins are installed for real (a module plus a ``.dist-info`` folder on ``sys.path``),
so they are found through the ``introspect`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _support.models import llama_config
from torch import nn
from transformers import LlamaForCausalLM

import introspect._plugins as plugins
from introspect import AdapterSpec, Inspector, PluginLoadError, hookimpl
from introspect._plugins import (
    PluginWarning,
    call_select_adapter,
    get_registry,
    new_plugin_manager,
    plugin_infos,
)
from introspect.cli import main
from introspect.testing import build_tiny

Install = Callable[[str, str], None]

HEADER = """\
from introspect import AdapterSpec, hookimpl

SPEC = AdapterSpec(name="faulty-arch", model_types=("faulty_arch",), blocks="layers")
"""


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """Install plugin distributions into a folder put on ``sys.path`` for this test only."""
    # Built once, before any faulty plugin is on the path: nothing caches a faulty one.
    plugins.get_plugin_manager()
    modules: list[str] = []

    def install(distribution: str, source: str) -> None:
        module = distribution.replace("-", "_")
        (tmp_path / f"{module}.py").write_text(HEADER + textwrap.dedent(source))
        info = tmp_path / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n"
        )
        (info / "entry_points.txt").write_text(f"[introspect]\n{distribution} = {module}\n")
        modules.append(module)

    monkeypatch.syspath_prepend(str(tmp_path))
    yield install
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture
def llama() -> nn.Module:
    return build_tiny(LlamaForCausalLM, llama_config(2))


RAISING_SELECT = """
@hookimpl
def select_adapter(model, candidates):
    return {"faulty_arch": SPEC}[model.config.model_type]  # KeyError for every other model
"""


def test_raising_select_adapter_does_not_break_an_unrelated_model(
    install: Install, llama: nn.Module
) -> None:
    install("introspect-keyerror", RAISING_SELECT)
    pm = new_plugin_manager()
    with pytest.warns(PluginWarning, match=r"'introspect-keyerror'.*select_adapter.*KeyError"):
        insp = Inspector(llama, plugin_manager=pm)
    assert insp.adapter.name == "llama"
    failure = pm.failures[-1]
    assert (failure.name, failure.distribution, failure.stage) == (
        "introspect-keyerror",
        "introspect-keyerror",
        "select_adapter",
    )
    assert failure.error == "KeyError: 'llama'"


def test_select_adapter_returning_junk_is_skipped_and_the_next_plugin_answers(
    llama: nn.Module,
) -> None:
    class Answers:
        @hookimpl
        def select_adapter(self, candidates: list[AdapterSpec]) -> AdapterSpec:
            return candidates[0].model_copy(update={"name": "answered"})

    class Junk:
        @hookimpl
        def select_adapter(self) -> str:
            return "llama"

    # pluggy asks the last registered plugin first: Junk, then Answers.
    pm = new_plugin_manager(plugins=[Answers(), Junk()])
    with pytest.warns(PluginWarning, match=r"select_adapter.*returned a str"):
        assert Inspector(llama, plugin_manager=pm).adapter.name == "answered"
    assert [f.stage for f in pm.failures] == ["select_adapter"]


def test_failing_register_adapters_skips_only_that_plugin(
    install: Install, llama: nn.Module
) -> None:
    install(
        "introspect-halfway",
        """
        @hookimpl
        def register_adapters(register):
            register(SPEC)
            raise RuntimeError("second spec is broken")

        @hookimpl
        def select_adapter(model, candidates):
            raise AssertionError("a skipped plugin is never asked")
        """,
    )
    pm = new_plugin_manager()
    with pytest.warns(PluginWarning, match=r"'introspect-halfway'.*register_adapters.*broken"):
        registry = get_registry(pm)
    # Nothing of a failed plugin is kept, not even the spec it registered before failing.
    assert "faulty-arch" not in registry.specs
    assert {"gpt2", "llama"} <= set(registry.specs)
    assert "introspect-halfway" not in {info.name for info in plugin_infos(pm)}
    assert Inspector(llama, plugin_manager=pm).adapter.name == "llama"
    assert [(f.name, f.stage) for f in pm.failures] == [("introspect-halfway", "register_adapters")]


JUNK = AdapterSpec(name="junk", blocks="layers")


class RegistersADict:
    @hookimpl
    def register_adapters(self, register: Callable[[object], None]) -> None:
        register({"name": "junk", "blocks": "layers"})


class ReturnsAList:
    @hookimpl
    def register_adapters(self) -> list[AdapterSpec]:
        return [JUNK]


@pytest.mark.parametrize(
    ("plugin", "error"),
    [
        (RegistersADict, r"register\(\) with a dict"),
        (ReturnsAList, r"returned a list.*calls register\(spec\)"),
    ],
)
def test_register_adapters_given_or_returning_junk_skips_the_plugin(
    plugin: type, error: str
) -> None:
    pm = new_plugin_manager(plugins=[plugin()])
    with pytest.warns(PluginWarning, match=error):
        registry = get_registry(pm)
    assert "junk" not in registry.specs and "gpt2" in registry.specs
    assert [f.stage for f in pm.failures] == ["register_adapters"]


def test_sys_exit_at_import_is_a_failure_of_that_plugin(install: Install) -> None:
    install("introspect-exits", "import sys\nsys.exit(3)\n")
    with pytest.warns(PluginWarning, match=r"'introspect-exits'.*failed to import.*SystemExit: 3"):
        pm = new_plugin_manager()
    assert [(f.name, f.stage) for f in pm.failures] == [("introspect-exits", "import")]
    assert "gpt2" in get_registry(pm).specs


def test_sys_exit_in_a_hook_is_a_failure_of_that_plugin(llama: nn.Module) -> None:
    class Exits:
        @hookimpl
        def select_adapter(self) -> None:
            sys.exit("no")

    pm = new_plugin_manager(plugins=[Exits()])
    with pytest.warns(PluginWarning, match=r"SystemExit: no"):
        assert Inspector(llama, plugin_manager=pm).adapter.name == "llama"


def test_keyboard_interrupt_in_a_hook_propagates(llama: nn.Module) -> None:
    class Interrupted:
        @hookimpl
        def select_adapter(self) -> None:
            raise KeyboardInterrupt

    pm = new_plugin_manager(plugins=[Interrupted()])
    with pytest.raises(KeyboardInterrupt):
        call_select_adapter(pm, llama, [])
    assert pm.failures == []


def test_misspelt_hook_is_reported_not_silently_ignored(install: Install) -> None:
    install(
        "introspect-typo",
        """
        @hookimpl
        def register_adapter(register):
            register(SPEC)
        """,
    )
    with pytest.warns(PluginWarning, match=r"register_adapter, which is no introspect hook"):
        pm = new_plugin_manager()
    assert "introspect-typo" not in {info.name for info in plugin_infos(pm)}
    assert [(f.name, f.stage) for f in pm.failures] == [("introspect-typo", "register")]


def test_hook_taking_an_unknown_argument_skips_only_that_plugin(
    install: Install, llama: nn.Module
) -> None:
    install(
        "introspect-badargs",
        """
        @hookimpl
        def register_adapters(register):
            register(SPEC)

        @hookimpl
        def select_adapter(mdl, candidates):
            return None
        """,
    )
    with pytest.warns(PluginWarning, match=r"'introspect-badargs'.*could not be registered.*mdl"):
        pm = new_plugin_manager()
    # pluggy had added register_adapters before refusing select_adapter: none of it remains.
    assert "faulty-arch" not in get_registry(pm).specs
    assert Inspector(llama, plugin_manager=pm).adapter.name == "llama"


@pytest.mark.parametrize("how", ["env", "argument"])
def test_strict_mode_raises_plugin_load_error_naming_the_distribution(
    install: Install, monkeypatch: pytest.MonkeyPatch, llama: nn.Module, how: str
) -> None:
    install("introspect-keyerror", RAISING_SELECT)
    if how == "env":
        monkeypatch.setenv("INTROSPECT_STRICT_PLUGINS", "1")
        pm = new_plugin_manager()
    else:
        pm = new_plugin_manager(strict=True)
    with pytest.raises(
        PluginLoadError, match=r"distribution introspect-keyerror.*KeyError"
    ) as info:
        Inspector(llama, plugin_manager=pm)
    assert isinstance(info.value.__cause__, KeyError)


def test_strict_mode_raises_at_import(install: Install) -> None:
    install("introspect-broken-import", "import introspect_no_such_module_xyz\n")
    with pytest.raises(PluginLoadError, match=r"'introspect-broken-import'.*failed to import"):
        new_plugin_manager(strict=True)


def test_cli_plugins_lists_a_failing_plugin_with_its_error(
    install: Install, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install(
        "introspect-raises",
        """
        @hookimpl
        def register_adapters(register):
            raise ValueError("bad config")
        """,
    )
    monkeypatch.setattr(plugins, "get_plugin_manager", lambda: new_plugin_manager())
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert (
        "skipped introspect-raises (introspect-raises): failed in register_adapters: "
        "ValueError: bad config"
    ) in out
    assert main(["plugins", "--all", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["failed"] == [
        {
            "name": "introspect-raises",
            "distribution": "introspect-raises",
            "stage": "register_adapters",
            "error": "ValueError: bad config",
        }
    ]
    assert "introspect-lm.llama" in {p["name"] for p in payload["plugins"]}
