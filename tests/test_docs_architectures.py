"""docs/architectures.md is generated from the registered specs and must be current."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from introspect import AdapterSpec, LogitOp, StackSpec

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "architectures.md"


def _load_tool(name: str) -> object:
    # tools/ is the repository's, not the package's: load it by path.
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_docs_gen: object = _load_tool("docs_gen")
adapters_table = _docs_gen.adapters_table  # type: ignore[attr-defined]
builtin_specs = _docs_gen.builtin_specs  # type: ignore[attr-defined]
coverage_section = _docs_gen.coverage_section  # type: ignore[attr-defined]
main = _docs_gen.main  # type: ignore[attr-defined]
render_architectures = _docs_gen.render_architectures  # type: ignore[attr-defined]


def test_architectures_page_is_current() -> None:
    expected = render_architectures(coverage_dir=PAGE.parent / "coverage")
    assert PAGE.exists(), "docs/architectures.md is missing: run python tools/docs_gen.py"
    assert PAGE.read_text() == expected, (
        "docs/architectures.md is out of date with the registered adapters or "
        "docs/coverage/*.json: run python tools/docs_gen.py (make docs) and commit it"
    )


def test_every_builtin_adapter_is_listed() -> None:
    text = PAGE.read_text()
    specs = builtin_specs()
    assert {"gpt2", "llama"} <= {spec.name for spec in specs}
    for spec in specs:
        assert f"| `{spec.name}`" in text, spec.name


def test_table_states_the_facts() -> None:
    spec = AdapterSpec(
        name="demo",
        model_types=("demo",),
        embed="embed_tokens",
        blocks="decoder.layers|layers",
        attn="self_attn",
        final_norm="norm",
        modules={"project_out": "project_out"},
        after_blocks=("final_norm", "project_out"),
        hidden_states_start="block_output",
        lm_head="lm_head",
        logit_ops=(LogitOp(kind="softcap", config_attr="final_logit_softcapping"),),
        stack_name="decoder",
        encoder=StackSpec(blocks="encoder.layers"),
    )
    table = adapters_table([spec])
    assert "`decoder.layers` or `layers`" in table
    assert "`norm` → `project_out`" in table
    assert "no embedding entry" in table
    assert "`lm_head` → softcap(`final_logit_softcapping`)" in table
    assert "`demo` (encoder)" in table
    assert "none: `hidden_states[-1]` is the raw last block output" in table  # the encoder


def test_coverage_section_and_check(tmp_path: Path) -> None:
    assert "No coverage data yet" in coverage_section([])
    page = tmp_path / "architectures.md"
    assert main(["--check", str(page)]) == 1
    assert main([str(page)]) == 0
    assert main(["--check", str(page)]) == 0
    assert page.read_text().startswith("# Supported architectures")


def test_attention_layouts_are_current() -> None:
    page = ROOT / "docs" / "attention.md"
    render_attention = _docs_gen.render_attention  # type: ignore[attr-defined]
    text = page.read_text()
    assert render_attention(text) == text, (
        "the head layouts table in docs/attention.md is out of date with the adapters: run "
        "python tools/docs_gen.py (make docs) and commit it"
    )
    for spec in builtin_specs():
        if spec.heads:
            assert f"| `{spec.name}` | `" in text, spec.name
