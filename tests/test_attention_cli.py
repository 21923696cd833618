"""Head scores (induction, previous-token), one block's patterns, and their two commands.

Every number is checked against Hugging Face's own ``output_attentions`` of an eager run, or
against a closed form: a head whose queries are zero attends uniformly to the keys before it,
so its scores are known exactly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.cli import error_line, run_command
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

import introspect
from introspect import (
    AttentionToolError,
    Inspector,
    LocatorError,
    MissingPartError,
    attention_patterns,
    head_scores,
)
from introspect._analysis.lens import show_token
from introspect.cli import main
from introspect.testing import build_tiny
from introspect.zoo import load_model

TOKYO = "Tokyo is the capital of Japan."
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")


def llama(layers: int = 2) -> nn.Module:
    config = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return build_tiny(LlamaForCausalLM, config)


def gpt2(layers: int = 2) -> nn.Module:
    config = GPT2Config(
        n_layer=layers, n_embd=32, n_head=4, vocab_size=96, n_positions=128, bos_token_id=1
    )
    return build_tiny(GPT2LMHeadModel, config)


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[None]:
    """Hugging Face's own eager attention, for output_attentions (configs restored after)."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    before = {k: c.__dict__.get("_attn_implementation_internal") for k, c in configs.items()}
    for c in configs.values():
        c.__dict__["_attn_implementation_internal"] = "eager"
    try:
        yield
    finally:
        for k, c in configs.items():
            c.__dict__["_attn_implementation_internal"] = before[k]


def hf_attentions(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad(), eager(model):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    return list(out.attentions)


def by_hand(att: torch.Tensor, score: str, seq_len: int, repeats: int, offset: int) -> torch.Tensor:
    """The score of each head from one [batch, heads, q, k] attention tensor, one loop each."""
    n = seq_len * repeats
    if score == "induction":
        pairs = [(offset + i, offset + i - seq_len + 1) for i in range(seq_len, n)]
    else:
        pairs = [(offset + i, offset + i - 1) for i in range(1, n)]
    return torch.stack([att[:, :, q, k] for q, k in pairs], dim=-1).mean(dim=(0, 2))


class Forwards:
    """Counts the model's forwards (a pre-hook on the top module)."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._seen)

    def _seen(self, module: nn.Module, args: Any) -> None:
        self.count += 1


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# -- head_scores ----------------------------------------------------------------------------


def test_the_names_are_public() -> None:
    for name in ("head_scores", "HeadScores", "attention_patterns", "AttentionPatterns"):
        assert name in introspect.__all__ and getattr(introspect, name).__name__ == name


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("score", ["induction", "previous-token"])
def test_scores_equal_output_attentions_by_hand(build: Any, score: str) -> None:
    model = build()
    scores = head_scores(Inspector(model), score, seq_len=7, repeats=3, batch=3, seed=4)
    attentions = hf_attentions(model, scores.input_ids)
    expected = torch.stack([by_hand(a, score, 7, 3, 0) for a in attentions])
    assert scores.values.shape == (2, 4)
    torch.testing.assert_close(scores.values, expected, atol=1e-6, rtol=1e-5)
    assert scores.values.min() > 0 and scores.values.max() < 1
    # A tiny random model attends almost evenly: not all heads score the same.
    assert len({round(v, 6) for v in scores.values.flatten().tolist()}) == 8


def test_the_sequences_are_random_repeated_runs_without_special_tokens() -> None:
    model = llama()
    scores = head_scores(Inspector(model), "induction", seq_len=12, repeats=3, batch=4, seed=9)
    ids = scores.input_ids
    assert ids.shape == (4, 36) and (scores.seq_len, scores.repeats, scores.batch) == (12, 3, 4)
    run = ids[:, :12]
    assert torch.equal(ids, run.repeat(1, 3))
    for row in run.tolist():
        assert len(set(row)) == 12  # no token repeats within a run
        assert not {0, 1, 2} & set(row)  # pad, bos, eos
        assert all(0 <= t < 96 for t in row)
    assert len({tuple(r) for r in run.tolist()}) == 4  # one sequence per row


def test_same_seed_same_scores_other_seed_other_scores() -> None:
    insp = Inspector(llama())
    a = head_scores(insp, "induction", seq_len=10, batch=2, seed=3)
    b = head_scores(insp, "induction", seq_len=10, batch=2, seed=3)
    c = head_scores(insp, "induction", seq_len=10, batch=2, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.values, b.values)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert (a.values - c.values).abs().max() > 1e-4
    # The generator is the function's own: the global random state neither matters nor moves.
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    d = head_scores(insp, "induction", seq_len=10, batch=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state) and torch.equal(a.values, d.values)


def test_uniform_attention_scores_are_known_exactly() -> None:
    """Zero queries: every key before a token gets 1 / (its position + 1)."""
    model = llama()
    for layer in model.model.layers:
        nn.init.zeros_(layer.self_attn.q_proj.weight)
    insp = Inspector(model)
    seq_len, repeats = 6, 2
    n = seq_len * repeats
    induction = head_scores(insp, "induction", seq_len=seq_len, batch=2)
    previous = head_scores(insp, "previous-token", seq_len=seq_len, batch=2)
    exact_induction = sum(1 / (i + 1) for i in range(seq_len, n)) / (n - seq_len)
    exact_previous = sum(1 / (i + 1) for i in range(1, n)) / (n - 1)
    assert exact_induction == pytest.approx(0.1089, abs=1e-4)  # (1/7 + ... + 1/12) / 6
    torch.testing.assert_close(induction.values, torch.full((2, 4), exact_induction))
    torch.testing.assert_close(previous.values, torch.full((2, 4), exact_previous))
    # A BOS token in front shifts every position by one and is not scored.
    with_bos = head_scores(insp, "previous-token", seq_len=seq_len, batch=2, bos=1)
    assert torch.equal(with_bos.input_ids[:, 0], torch.tensor([1, 1]))
    shifted = sum(1 / (i + 2) for i in range(1, n)) / (n - 1)
    torch.testing.assert_close(with_bos.values, torch.full((2, 4), shifted))


def test_a_copying_head_scores_one() -> None:
    """Give every head of block 0 the pattern of a perfect induction head, through an edit."""
    model = llama()
    insp = Inspector(model)
    seq_len = 5

    def induction_pattern(value: torch.Tensor, record: Any) -> torch.Tensor:
        q = torch.arange(value.shape[-2])
        wanted = torch.where(q >= seq_len, q - seq_len + 1, q)
        return torch.nn.functional.one_hot(wanted, value.shape[-1]).to(value.dtype).expand_as(value)

    with insp.edit("block[0].attn.pattern", induction_pattern):
        scores = head_scores(insp, "induction", seq_len=seq_len, batch=2)
        previous = head_scores(insp, "previous-token", seq_len=seq_len, batch=2)
    torch.testing.assert_close(scores.values[0], torch.ones(4))
    assert scores.values[1].max() < 0.5
    assert scores.top(4) == [(0, h, 1.0) for h in range(4)]
    # Such a head never looks at the token just before (seq_len > 2).
    assert torch.equal(previous.values[0], torch.zeros(4))


def test_scores_come_from_the_pattern_locator(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama(layers=3)
    insp = Inspector(model)
    asked: list[tuple[str, ...]] = []
    real = Inspector.capture

    def spy(self: Inspector, *locators: Any, **kwargs: Any) -> Any:
        asked.append(tuple(str(x) for x in locators))
        return real(self, *locators, **kwargs)

    monkeypatch.setattr(Inspector, "capture", spy)
    implementation = model.config._attn_implementation
    forwards = Forwards(model)
    scores = head_scores(insp, "previous-token", seq_len=5, batch=1, blocks=[-1, 0])
    assert asked == [("block[2].attn.pattern", "block[0].attn.pattern")]
    assert forwards.count == 1
    assert scores.blocks == [2, 0] and scores.values.shape == (2, 4)
    # The model is back on its own attention implementation, with no hooks of ours left.
    assert model.config._attn_implementation == implementation != "eager"
    assert not any(m._forward_hooks for m in model.modules())
    assert [len(m._forward_pre_hooks) for m in model.modules() if m._forward_pre_hooks] == [1]
    attentions = hf_attentions(model, scores.input_ids)
    torch.testing.assert_close(
        scores.values[0], by_hand(attentions[2], "previous-token", 5, 2, 0), atol=1e-6, rtol=0
    )


def test_top_value_and_to_dict() -> None:
    scores = head_scores(Inspector(llama()), "induction", seq_len=6, batch=2)
    flat = sorted(
        ((float(scores.values[r, h]), b, h) for r, b in enumerate(scores.blocks) for h in range(4)),
        reverse=True,
    )
    assert scores.top(3) == [(b, h, v) for v, b, h in flat[:3]]
    assert len(scores.top(100)) == 8
    block, head, value = scores.top(1)[0]
    assert scores.value(block, head) == value == scores.value(block - 2, head - 4)
    data = json.loads(json.dumps(scores.to_dict(top=2)))
    assert data["score"] == "induction" and data["seed"] == 0 and data["num_heads"] == 4
    assert data["values"] == scores.values.tolist()
    assert data["top"][0] == {"block": block, "head": head, "value": value}
    assert data["input_ids"] == scores.input_ids.tolist()
    assert "HeadScores(induction, LlamaForCausalLM" in repr(scores)


def test_tokens_of_your_own() -> None:
    model = gpt2()
    run = [10, 11, 12, 13, 10]  # a token may repeat within a run given by hand
    scores = head_scores(Inspector(model), "induction", tokens=run, repeats=2)
    assert scores.input_ids.tolist() == [run + run] and scores.seed is None
    expected = torch.stack(
        [by_hand(a, "induction", 5, 2, 0) for a in hf_attentions(model, scores.input_ids)]
    )
    torch.testing.assert_close(scores.values, expected, atol=1e-6, rtol=1e-5)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (introspect-lm[demo])")
    scores = head_scores(Inspector(llama()), "previous-token", seq_len=6, batch=1)
    figure = scores.plot(tmp_path / "heads.png")
    assert _png_size(tmp_path / "heads.png")[0] > 300
    assert figure.axes[0].get_yticklabels()[1].get_text() == "block[1]"
    assert [p.name for p in tmp_path.iterdir()] == ["heads.png"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"score": "copying"}, "unknown score 'copying': use one of induction, previous-token"),
        ({"seq_len": 1}, "seq_len must be a whole number of at least 2, got 1"),
        ({"seq_len": 2.5}, "seq_len must be a whole number of at least 2, got 2.5"),
        ({"repeats": 1}, "repeats must be a whole number of at least 2 (an induction head"),
        ({"batch": 0}, "batch must be a whole number of at least 1, got 0"),
        ({"seed": "x"}, "seed must be a whole number, got 'x'"),
        ({"blocks": [5]}, "out of range"),
        ({"blocks": []}, "blocks is empty"),
        ({"seq_len": 94}, "seq_len 94 is more than the 93 distinct non-special tokens"),
        ({"tokens": [3, 4], "seq_len": 2}, "with tokens= the sequences are the tokens given"),
        ({"tokens": [3]}, "at least 2 are needed"),
        ({"tokens": [3, 500]}, "tokens holds id 500, outside this model's vocabulary (0..95)"),
        ({"bos": "<s>"}, "bos must be a token id"),
    ],
)
def test_bad_arguments_fail_before_the_model_runs(kwargs: dict[str, Any], message: str) -> None:
    model = llama()
    forwards = Forwards(model)
    arguments = {"score": "induction", **kwargs}
    with pytest.raises((AttentionToolError, LocatorError)) as caught:
        head_scores(Inspector(model), **arguments)
    assert message in str(caught.value)
    assert forwards.count == 0


def test_a_sequence_past_the_position_table_is_refused_with_true_arithmetic() -> None:
    # GPT-2 looks positions up in a table of n_positions rows: a longer sequence cannot run.
    config = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96, n_positions=20)
    model = build_tiny(GPT2LMHeadModel, config)
    forwards = Forwards(model)
    insp = Inspector(model)
    cases = [
        ({"seq_len": 11}, "11 x 2 = 22 tokens"),
        # The bos token comes once, before the two repeats.
        ({"seq_len": 10, "bos": 1}, "1 + 10 x 2 = 21 tokens"),
        ({"seq_len": 7, "repeats": 3, "bos": 1}, "1 + 7 x 3 = 22 tokens"),
    ]
    for kwargs, sum_text in cases:
        with pytest.raises(AttentionToolError) as caught:
            head_scores(insp, "induction", batch=1, **kwargs)
        assert str(caught.value) == (
            f"{sum_text} is longer than this model's 20 positions: use a shorter seq_len or "
            "fewer repeats"
        )
    assert forwards.count == 0
    assert head_scores(insp, "induction", seq_len=10, batch=1).values.shape == (1, 4)
    assert forwards.count == 1


def test_a_rotary_model_runs_past_its_configured_length() -> None:
    # Rotary positions are computed, not looked up: 140 tokens run on a 128-position Llama, as
    # they do in Hugging Face's own forward (the one rule: introspect._batching.max_positions).
    scores = head_scores(Inspector(llama()), "induction", seq_len=70, batch=1)
    assert scores.values.shape == (2, 4) and bool(scores.values.isfinite().all())


def test_a_model_without_attention_is_a_clear_error() -> None:
    model = build_tiny(
        MambaForCausalLM, MambaConfig(num_hidden_layers=2, hidden_size=32, vocab_size=64)
    )
    forwards = Forwards(model)
    with pytest.raises(MissingPartError, match="a Mamba block has no attention"):
        head_scores(Inspector(model), "induction", seq_len=4)
    with pytest.raises(MissingPartError, match="a Mamba block has no attention"):
        attention_patterns(Inspector(model), torch.tensor([[1, 2, 3]]), 0)
    assert forwards.count == 0


# -- attention_patterns ---------------------------------------------------------------------


def test_patterns_equal_output_attentions() -> None:
    model = gpt2(layers=3)
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    insp = Inspector(model)
    att = attention_patterns(insp, ids, -2)
    theirs = hf_attentions(model, ids)[1][0]
    assert att.block == 1 and att.heads == [0, 1, 2, 3] and att.token_ids == ids[0].tolist()
    torch.testing.assert_close(att.pattern, theirs, atol=1e-6, rtol=0)
    assert att.tokens == ["#5", "#17", "#42", "#9", "#77", "#3"] and att.causal
    one = attention_patterns(insp, ids, 1, head=-1)
    assert one.heads == [3]
    torch.testing.assert_close(one.pattern[0], theirs[3], atol=1e-6, rtol=0)
    torch.testing.assert_close(one.of(3), att.of(-1))
    keys = att.strongest(-1, k=2)
    for h, ((k1, w1), (k2, w2)) in enumerate(keys):
        row = theirs[h, -1]
        assert k1 == int(row.argmax()) and w1 == pytest.approx(float(row.max()), abs=1e-6)
        assert w1 >= w2 and k2 != k1


def test_patterns_of_a_padded_batch_drop_the_padding() -> None:
    model = llama()
    ids = torch.tensor([[0, 0, 7, 8, 9], [4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    att = attention_patterns(Inspector(model), {"input_ids": ids, "attention_mask": mask}, 0)
    assert att.token_ids == [7, 8, 9] and att.pattern.shape == (4, 3, 3)
    torch.testing.assert_close(att.pattern.sum(-1), torch.ones(4, 3))
    alone = attention_patterns(Inspector(model), torch.tensor([[7, 8, 9]]), 0)
    assert torch.allclose(att.pattern, alone.pattern, atol=1e-5)


def test_patterns_stop_after_the_block() -> None:
    model = llama(layers=3)
    seen: list[int] = []
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: seen.append(i))
        for i, layer in enumerate(model.model.layers)
    ]
    attention_patterns(Inspector(model), torch.tensor([[1, 2, 3]]), 0)
    for h in handles:
        h.remove()
    assert seen == [0]


@pytest.mark.parametrize(
    ("block", "head", "error", "message"),
    [
        (2, None, LocatorError, "out of range"),
        (-3, None, LocatorError, "out of range"),
        (0, 4, LocatorError, "head 4 is out of range for block[0]: 4 heads (use 0..3"),
        (0, -5, LocatorError, "head -5 is out of range"),
        ("x", None, LocatorError, "block must be a block index"),
    ],
)
def test_bad_block_or_head_fails_before_the_model_runs(
    block: Any, head: Any, error: type[Exception], message: str
) -> None:
    model = llama()
    forwards = Forwards(model)
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(")):
        attention_patterns(Inspector(model), torch.tensor([[1, 2]]), block, head=head)
    assert forwards.count == 0


def test_pattern_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (introspect-lm[demo])")
    insp = Inspector(llama())
    ids = torch.arange(3, 13).unsqueeze(0)
    grid = attention_patterns(insp, ids, 1).plot(tmp_path / "grid.png")
    single = attention_patterns(insp, ids, 1, head=2).plot(tmp_path / "one.png")
    assert len([ax for ax in grid.axes if ax.get_images()]) == 4
    assert [ax.get_title() for ax in single.axes if ax.get_images()] == ["head 2"]
    labels = [t.get_text() for t in grid.axes[0].get_yticklabels()]
    assert labels == [f"#{i}" for i in range(3, 13)]
    assert _png_size(tmp_path / "grid.png")[0] > 500 and _png_size(tmp_path / "one.png")[0] > 500


class _Named:
    """A tokenizer under a hub name, as one loaded with ``from_pretrained`` is named."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tokenizer, self.name_or_path = tokenizer, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._tokenizer, attribute)


def _suptitle(figure: Any) -> str:
    return str(figure.get_suptitle()).replace("\n", " ")


def test_patterns_and_scores_record_the_model_the_prompt_and_byte_labels() -> None:
    from introspect._html import attention_view, head_scores_view

    model, tok = load_model("toy-gpt2", progress=False)
    insp = Inspector(model)
    hub = "HuggingFaceTB/SmolLM2-135M"
    named = _Named(tok, hub)
    # The tokenizer's name_or_path names the model, the text given is the prompt.
    att = attention_patterns(insp, TOKYO, 1, tokenizer=named)
    assert (att.model_name, att.prompt) == (hub, TOKYO)
    assert att.labels == att.tokens == [tok.decode([i]) for i in tok.encode(TOKYO)]
    assert attention_view(att).title == f"attention of block[1]: {hub} on {TOKYO!r}"
    # Token ids: the prompt is what the tokenizer decodes; the two halves of "🙂" (each a
    # lone byte, decoded as U+FFFD) are labelled by their bytes.
    ids = [40, 588, 8582, 25081, 257]  # "I like" + the bytes of "🙂" + " a"
    assert tok.decode([8582]) == "\ufffd"
    by_ids = attention_patterns(insp, torch.tensor([ids]), 0, tokenizer=tok)
    assert by_ids.prompt == tok.decode(ids) == "I like🙂 a"
    assert by_ids.labels == ["I", " like", "<0xF0><0x9F>", "<0x99><0x82>", " a"]
    assert by_ids.tokens[2:4] == ["\ufffd", "\ufffd\ufffd"]  # the text itself is unchanged
    assert by_ids.model_name == "toy-gpt2"  # the zoo names its tokenizer after the model
    # Without a tokenizer: no prompt text, ids as tokens.
    bare = attention_patterns(insp, torch.tensor([ids]), 0)
    assert bare.prompt is None and bare.token_labels == bare.tokens
    scores = head_scores(insp, "induction", seq_len=6, batch=1, tokenizer=named)
    assert scores.model_name == hub
    assert head_scores_view(scores).title == f"induction heads: {hub}"
    unnamed = head_scores(insp, "induction", seq_len=6, batch=1)
    assert unnamed.model_name == "GPT2LMHeadModel (gpt2 adapter)"
    if importlib.util.find_spec("matplotlib") is not None:
        assert _suptitle(att.plot()) == f"attention of block[1], 4 heads: {hub} on {TOKYO!r}"
        assert _suptitle(att.plot(model="mine", prompt="other")) == (
            "attention of block[1], 4 heads: mine on 'other'"
        )
        assert _suptitle(scores.plot()) == f"induction heads: {hub}"
        ticks = [t.get_text() for t in by_ids.plot().axes[0].get_yticklabels()]
        assert ticks == ["I", "\u2423like", "<0xF0><0x9F>", "<0x99><0x82>", "\u2423a"]


def test_results_made_without_the_new_fields_still_work() -> None:
    # Built as before (positional fields only): titles fall back on the class, a lone byte
    # on its id.
    att = introspect.AttentionPatterns(
        0, [0], 1, [7, 8582], ["a", "\ufffd"], torch.eye(2)[None], "LlamaForCausalLM", "llama"
    )
    assert (att.model_name, att.prompt, att.labels) == ("", None, [])
    assert att.token_labels == ["a", "#8582"]
    assert introspect.attention_view(att).title == "attention of block[0]: LlamaForCausalLM"
    ids = torch.zeros(1, 4, dtype=torch.long)
    scores = introspect.HeadScores(
        "induction", torch.tensor([[0.5]]), [0], 2, 2, 1, 0, None, ids, "LlamaForCausalLM", "x", 1
    )
    assert scores.model_name == ""
    assert introspect.head_scores_view(scores).title == "induction heads: LlamaForCausalLM"


# -- the commands ---------------------------------------------------------------------------


def test_heads_command_matches_the_library(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_command(
        capsys, "heads", "toy-llama", "--seq-len", "8", "--batch", "2", "-n", "3"
    )
    assert code == 0
    model, tokenizer = load_model("toy-llama", progress=False)
    scores = head_scores(Inspector(model), "induction", seq_len=8, batch=2, tokenizer=tokenizer)
    lines = out.strip().splitlines()
    assert lines[0] == (
        "toy-llama: induction score of 16 heads (4 blocks x 4 heads) on 2 random sequences of "
        "8 tokens, each repeated 2 times (seed 0)"
    )
    assert lines[1].startswith("(the mean attention from each token of a repeated run")
    rows = [line.split() for line in lines[4:]]
    assert rows == [
        [str(rank), f"block[{b}]", str(h), f"{v:.3f}"]
        for rank, (b, h, v) in enumerate(scores.top(3), start=1)
    ]


def test_heads_json_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (introspect-lm[demo])")
    plot = tmp_path / "heads.png"
    argv = ["heads", "toy-llama", "--score", "previous-token", "--seq-len", "6", "--seed", "2"]
    code, out, _ = run_command(capsys, *argv, "--batch", "3", "--plot", str(plot), "--json")
    assert code == 0
    data = json.loads(out)
    model, tokenizer = load_model("toy-llama", progress=False)
    scores = head_scores(
        Inspector(model), "previous-token", seq_len=6, batch=3, seed=2, tokenizer=tokenizer
    )
    assert data["model"] == "toy-llama" and data["plot"] == str(plot)
    assert data["score"] == "previous-token" and (data["seed"], data["batch"]) == (2, 3)
    assert data["values"] == scores.values.tolist() and len(data["top"]) == 10
    attentions = hf_attentions(model, torch.tensor(data["input_ids"]))
    expected = torch.stack([by_hand(a, "previous-token", 6, 2, 0) for a in attentions])
    torch.testing.assert_close(torch.tensor(data["values"]), expected, atol=1e-6, rtol=1e-5)
    assert _png_size(plot)[1] > 300
    # An existing plot is replaced, as lens --plot does.
    code, out, _ = run_command(capsys, *argv, "--plot", str(plot))
    assert code == 0 and out.strip().splitlines()[-1] == f"wrote {plot}"
    assert [p.name for p in tmp_path.iterdir()] == ["heads.png"]


def test_heads_on_a_prompt_and_with_bos(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_command(capsys, "heads", "toy-gpt2", "--prompt", TOKYO, "--bos", "--json")
    assert code == 0
    data = json.loads(out)
    model, tokenizer = load_model("toy-gpt2", progress=False)
    run = tokenizer(TOKYO, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    assert data["input_ids"] == [[bos, *run, *run]] and data["seed"] is None
    assert data["prompt"] == TOKYO and data["bos"] == bos
    attentions = hf_attentions(model, torch.tensor(data["input_ids"]))
    expected = torch.stack([by_hand(a, "induction", len(run), 2, 1) for a in attentions])
    torch.testing.assert_close(torch.tensor(data["values"]), expected, atol=1e-6, rtol=1e-5)


def test_attention_command_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_command(capsys, "attention", "toy-llama", "--prompt", TOKYO, "--block", "-1")
    assert code == 0
    model, tokenizer = load_model("toy-llama", progress=False)
    att = attention_patterns(Inspector(model), TOKYO, 3, tokenizer=tokenizer)
    lines = out.strip().splitlines()
    last = len(att.tokens) - 1
    assert lines[0].startswith(f"toy-llama: block[3], 4 heads: the keys position {last} (")
    assert lines[1].split() == ["head", "key", "1", "key", "2"]
    for head, keys, line in zip(att.heads, att.strongest(-1, k=2), lines[3:], strict=True):
        assert line.split()[0] == str(head)
        for key, weight in keys:
            assert f"{key} {show_token(att.tokens[key], 14)} {weight:.3f}" in line


def test_attention_json_equals_output_attentions(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (introspect-lm[demo])")
    plot = tmp_path / "attn.png"
    argv = ["attention", "toy-gpt2", "--prompt", TOKYO, "-b", "2", "--head", "1", "--json"]
    code, out, _ = run_command(capsys, *argv, "--plot", str(plot))
    assert code == 0
    data = json.loads(out)
    model, tokenizer = load_model("toy-gpt2", progress=False)
    ids = tokenizer(TOKYO, return_tensors="pt")["input_ids"]
    theirs = hf_attentions(model, ids)[2][0]
    assert data["block"] == 2 and data["token_ids"] == ids[0].tolist()
    assert data["tokens"] == [tokenizer.decode([i]) for i in ids[0].tolist()]
    assert [h["head"] for h in data["heads"]] == [1] and data["plot"] == str(plot)
    torch.testing.assert_close(torch.tensor(data["heads"][0]["pattern"]), theirs[1])
    one = _png_size(plot)
    code, _, _ = run_command(
        capsys, "attention", "toy-gpt2", "--prompt", TOKYO, "-b", "2", "--plot", str(plot)
    )
    assert code == 0 and _png_size(plot) != one  # the grid of four replaced the single head
    assert [p.name for p in tmp_path.iterdir()] == ["attn.png"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["attention", "toy-llama", "--prompt", "hi", "--block", "4"],
            "block[4] is out of range for llama (4 blocks: use -4..3)",
        ),
        (
            ["attention", "toy-llama", "--prompt", "hi", "--block", "0", "--head", "4"],
            "head 4 is out of range for block[0]: 4 heads (use 0..3, or negative from the end)",
        ),
        (
            ["attention", "toy-llama", "--prompt", "a b", "--block", "0", "-p", "9"],
            "position 9 is out of range for a prompt of",
        ),
    ],
)
def test_command_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run_command(capsys, *argv)
    assert code == 1 and out == ""
    assert message in error_line(err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["attention", "toy-llama", "--prompt", "hi", "-b", "0", "--plot", "a.txt"],
            "must end in .png, .svg or .pdf",
        ),
        (["heads", "toy-llama", "--plot", "no/such/dir/h.png"], "does not exist: create it"),
        (
            ["heads", "toy-llama", "--prompt", "hi", "--seq-len", "5", "--seed", "1"],
            "--seq-len, --seed choose random tokens",
        ),
        (["heads", "toy-llama", "--repeats", "1"], "--score induction needs --repeats 2 or more"),
        (["attention", "toy-llama", "--prompt", "", "-b", "0"], "the prompt is empty"),
    ],
)
def test_bad_options_fail_before_the_model_loads(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argv: list[str],
    message: str,
) -> None:
    import introspect.zoo

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not load")

    monkeypatch.setattr(introspect.zoo, "load_model", boom)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_command(capsys, *argv)
    assert code == 1 and message in error_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["1", "x"])
def test_a_short_seq_len_is_a_usage_error(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["heads", "toy-llama", "--seq-len", value])
    assert exited.value.code == 2
    assert f"--seq-len: {value!r}" in capsys.readouterr().err


def test_a_model_without_heads_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = tmp_path / "mamba"
    config = MambaConfig(num_hidden_layers=2, hidden_size=32, vocab_size=64)
    build_tiny(MambaForCausalLM, config).save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's progress bar
    for argv in (
        ["heads", str(folder)],
        ["attention", str(folder), "--prompt", "hi", "--block", "0"],
    ):
        code, out, err = run_command(capsys, *argv)
        assert code == 1 and out == ""
        line = error_line(err)
        assert line.startswith("introspect: error: block[0].attn.pattern does not exist")
        assert "a Mamba block has no attention" in line


def test_a_model_built_for_sdpa_is_reloaded_eager_to_show_patterns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """transformers 4.x fixes BERT's attention class at load time: a pattern needs an eager
    load, which the command does by itself, saying so (5.x switches per call: no reload)."""
    from transformers import BertConfig, BertForMaskedLM

    from introspect._hooks.heads import fixed_implementation

    folder = tmp_path / "bert"
    config = BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=64,
        attn_implementation="sdpa",
    )
    build_tiny(BertForMaskedLM, config).save_pretrained(folder)
    loaded, _ = load_model(str(folder), progress=False, attn_implementation="sdpa")
    fixed = fixed_implementation(loaded.bert.encoder.layer[0].attention.self) is not None
    capsys.readouterr()
    argv = ["heads", str(folder), "--seq-len", "5", "--batch", "1", "--json"]
    code, out, err = run_command(capsys, *argv)
    assert code == 0, err
    assert ("reloading" in err and "--attn-implementation eager" in err) == fixed
    eager, _ = load_model(str(folder), progress=False, attn_implementation="eager")
    expected = head_scores(Inspector(eager), "induction", seq_len=5, batch=1)
    shown = json.loads(out)
    assert shown["score"] == "induction"
    got = torch.tensor(shown["values"]) if "values" in shown else None
    if got is not None:
        assert torch.allclose(got, expected.values, atol=1e-3)
    code, out, err = run_command(capsys, *argv[:-1], "--attn-implementation", "eager")
    assert code == 0 and "reloading" not in err
