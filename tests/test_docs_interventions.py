"""Every ```python block of docs/interventions.md runs, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "docs" / "interventions.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks() -> list[str]:
    return BLOCK.findall(PAGE.read_text(encoding="utf-8"))


def test_the_page_has_examples_for_each_topic() -> None:
    text = "\n".join(_blocks())
    for needle in ("insp.steer(", "insp.ablate(", "patching_sweep(", ".generate(", "run_batch("):
        assert needle in text


def test_every_example_runs() -> None:
    namespace: dict[str, object] = {"__name__": "docs_interventions"}
    for number, source in enumerate(_blocks(), 1):
        code = compile(source, f"{PAGE.name} (python block {number})", "exec")
        exec(code, namespace)
