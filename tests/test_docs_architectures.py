"""docs/architectures.md is generated from the registered specs and must be current."""

from __future__ import annotations

from pathlib import Path

from introspect import AdapterSpec, LogitOp, StackSpec
from introspect.docs_gen import (
    adapters_table,
    builtin_specs,
    coverage_section,
    main,
    render_architectures,
)

PAGE = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"


def test_architectures_page_is_current() -> None:
    expected = render_architectures(coverage_dir=PAGE.parent / "coverage")
    assert PAGE.exists(), "docs/architectures.md is missing: run python -m introspect.docs_gen"
    assert PAGE.read_text() == expected, (
        "docs/architectures.md is out of date with the registered adapters or "
        "docs/coverage/*.json: run python -m introspect.docs_gen (make docs) and commit it"
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
