"""Edges of the capture engine where a wrong answer would be silent: steps that are not one
sequence (beam search, no KV cache, independent forwards), a mask passed positionally, compiled
models, and transform arguments checked before the model runs."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from _support.models import FAMILIES, gpt2_config, llama_config
from torch import nn
from transformers import GPT2LMHeadModel, GPT2Model, LlamaForCausalLM, LlamaModel

from introspect import Inspector
from introspect._errors import CaptureError
from introspect._hooks.capture import (
    Capture,
    Target,
    Transform,
    call_argument,
    call_attention_mask,
    check_not_compiled,
)
from introspect.testing import build_tiny

ATOL = 1e-5
NEW_TOKENS = 4
PROMPT = torch.tensor([[5, 17, 42, 9, 77, 3], [8, 1, 99, 23, 4, 60]])


def _generate(model: nn.Module, **kwargs: Any) -> Any:
    return model.generate(  # type: ignore[operator]
        input_ids=PROMPT,
        attention_mask=torch.ones_like(PROMPT),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        output_hidden_states=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5 names the cache argument `cache`, 4.x `past_key_values`.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# -- concat: only steps that continue one another ------------------------------------------------


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_concat_equals_hf_hidden_states_of_every_step_joined(lm: nn.Module, sample: bool) -> None:
    insp = Inspector(lm)
    torch.manual_seed(0)
    with torch.no_grad(), insp.capture("block[1]") as cap:
        out = _generate(lm, do_sample=sample)
    theirs = torch.cat([step[2] for step in out.hidden_states], dim=1)
    joined = cap.concat("block[1]")
    assert joined.shape == (2, PROMPT.shape[1] + NEW_TOKENS - 1, 64)
    assert torch.allclose(joined, theirs, atol=ATOL)


def test_concat_refuses_beam_search_whose_steps_are_still_hf_hidden_states(lm: nn.Module) -> None:
    insp = Inspector(lm)
    with torch.no_grad(), insp.capture("block[1]") as cap:
        out = _generate(lm, num_beams=3, num_return_sequences=3, do_sample=False)
    # Each step, as recorded, is what Hugging Face itself reports for that step...
    for step, entries in enumerate(out.hidden_states):
        assert torch.allclose(cap.steps("block[1]")[step], entries[2], atol=ATOL)
    # ...but the beams were reordered between steps, so rows do not continue one another.
    assert not torch.equal(
        out.beam_indices[:, : NEW_TOKENS - 1], torch.arange(6)[:, None].expand(6, NEW_TOKENS - 1)
    )
    with pytest.raises(CaptureError, match=r"reordered between step.*beam search"):
        cap.concat("block[1]")


def test_concat_refuses_generation_without_a_kv_cache(lm: nn.Module) -> None:
    insp = Inspector(lm)
    with torch.no_grad(), insp.capture("block[1]") as cap:
        out = _generate(lm, use_cache=False, do_sample=False)
    with pytest.raises(CaptureError, match=r"starts again at position 0.*use_cache=False"):
        cap.concat("block[1]")
    # What the message points to: the last step holds every position.
    last = cap.steps("block[1]")[-1]
    assert torch.allclose(last[:, -1:], out.hidden_states[-1][2][:, -1:], atol=ATOL)
    with torch.no_grad():
        full = lm(out.sequences[:, :-1], output_hidden_states=True).hidden_states[2]
    assert torch.allclose(last, full, atol=ATOL)


def test_concat_refuses_two_independent_forwards(lm: nn.Module) -> None:
    insp = Inspector(lm)
    with torch.no_grad(), insp.capture("block[0]") as cap:
        lm(PROMPT)
        lm(PROMPT[:, :2])
    with pytest.raises(CaptureError, match=r"starts again at position 0.*ran twice"):
        cap.concat("block[0]")


def test_concat_joins_a_forward_continued_by_hand_through_its_cache(lm: nn.Module) -> None:
    insp = Inspector(lm)
    kwarg = _cache_kwarg(lm)
    with torch.no_grad(), insp.capture("block[1]") as cap:
        first = lm(PROMPT[:, :4], use_cache=True)
        cache = first.get("cache", first.get("past_key_values"))
        lm(PROMPT[:, 4:], **{kwarg: cache}, use_cache=True)
    with torch.no_grad():
        full = lm(PROMPT, output_hidden_states=True).hidden_states[2]
    assert torch.allclose(cap.concat("block[1]"), full, atol=ATOL)


@pytest.mark.parametrize("how", ["replaced", "in place"])
def test_concat_refuses_a_cache_reordered_between_two_forwards(lm: nn.Module, how: str) -> None:
    """Beam search moves rows of the cache between steps; so may a hand-written loop."""
    insp = Inspector(lm)
    kwarg = _cache_kwarg(lm)
    with torch.no_grad(), insp.capture("block[1]") as cap:
        first = lm(PROMPT[:, :4], use_cache=True)
        cache = first.get("cache", first.get("past_key_values"))
        if how == "replaced":
            cache.reorder_cache(torch.tensor([1, 0]))
        else:
            layer = cache.layers[0] if hasattr(cache, "layers") else None
            keys = layer.keys if layer is not None else cache.key_cache[0]
            keys.copy_(keys.flip(0))
        lm(PROMPT[:, 4:], **{kwarg: cache}, use_cache=True)
    with pytest.raises(CaptureError, match="cannot join the steps"):
        cap.concat("block[1]")
    assert len(cap.steps("block[1]")) == 2


# -- a mask passed positionally ----------------------------------------------------------------

RIGHT_PADDED = torch.tensor([[5, 17, 42, 9], [8, 1, 0, 0]])
RIGHT_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])


@pytest.mark.parametrize(
    "model_cls",
    [LlamaModel, LlamaForCausalLM, GPT2Model, GPT2LMHeadModel],
    ids=lambda c: c.__name__,
)
def test_a_positional_attention_mask_finds_the_real_last_token(model_cls: type[nn.Module]) -> None:
    config = llama_config() if "Llama" in model_cls.__name__ else gpt2_config()
    model = build_tiny(model_cls, config)
    mask_at = list(inspect.signature(model.forward).parameters).index("attention_mask")
    args = [RIGHT_PADDED, *([None] * (mask_at - 1)), RIGHT_MASK]
    assert call_attention_mask(model, tuple(args), {}) is RIGHT_MASK
    insp = Inspector(model)
    with torch.no_grad():
        with insp.capture("block[1]") as cap:
            model(*args)
        with insp.capture("block[1]", positions="last") as last:
            model(*args)
        # Right padding leaves positions alone: each example alone is the reference.
        alone = [
            model(RIGHT_PADDED[i : i + 1, :n], output_hidden_states=True).hidden_states[2][0, -1]
            for i, n in enumerate(RIGHT_MASK.sum(1).tolist())
        ]
    expected = torch.stack(alone)
    assert cap["block[1]"].attention_mask is RIGHT_MASK
    assert torch.allclose(cap.last_token("block[1]"), expected, atol=ATOL)
    assert torch.allclose(last["block[1]"].output[:, 0], expected, atol=ATOL)


def test_call_argument_reads_keywords_and_positions() -> None:
    model = build_tiny(LlamaModel, llama_config(2))
    ids = torch.tensor([[1, 2]])
    assert call_argument(model, (ids,), {"position_ids": ids}, "position_ids") is ids
    assert call_argument(model, (ids, None, ids), {}, "position_ids") is ids
    assert call_argument(model, (ids,), {}, "position_ids") is None
    assert call_attention_mask(model, (ids,), {"attention_mask": "not a tensor"}) is None


# -- compiled models ---------------------------------------------------------------------------


def _llama() -> LlamaForCausalLM:
    model = build_tiny(LlamaForCausalLM, llama_config(2))
    assert isinstance(model, LlamaForCausalLM)
    return model


def test_a_model_compiled_with_its_compile_method_is_refused_when_the_capture_opens() -> None:
    model = _llama()
    model.compile(backend="eager")
    with pytest.raises(CaptureError, match=r"compiled with model\.compile\(\).*force_eager"):
        check_not_compiled(model)
    cap = Capture([Target("block[0]", model.model.layers[0])], root=model.model, model=model)
    with pytest.raises(CaptureError, match="compiled"), cap:
        pass
    assert not model.model.layers[0]._forward_hooks and not model.model._forward_pre_hooks


def test_a_compiled_model_records_when_run_eagerly() -> None:
    model = _llama()
    ids = PROMPT[:, :3]
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[1]
        model.compile(backend="eager")
        target = Target("block[0]", model.model.layers[0])
        eager = torch.compiler.set_stance("force_eager")
        with eager, Capture([target], root=model.model, model=model) as cap:
            model(ids)
    assert torch.allclose(cap["block[0]"].output, expected, atol=ATOL)


def test_a_torch_compile_wrapper_that_skipped_the_hooks_is_named() -> None:
    model = _llama()
    compiled = torch.compile(model, backend="eager")
    ids = PROMPT[:, :3]
    with torch.no_grad():
        compiled(ids)  # compiled before the capture adds its hooks
        with pytest.raises(CaptureError, match=r"torch\.compile"):
            check_not_compiled(compiled)  # type: ignore[arg-type]
        target = Target("block[0]", model.model.layers[0])
        with Capture([target], root=model.model, model=model) as cap:
            compiled(ids)
        with pytest.raises(CaptureError, match="although the model ran: the model is compiled"):
            cap["block[0]"]
        # Through the Inspector, the message names compilation too instead of only
        # "run the model inside the with block".
        with Inspector(model).capture("block[0]") as cap2:
            compiled(ids)
        with pytest.raises(CaptureError, match=r"torch\.compile"):
            cap2["block[0]"]


# -- transform arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:99", 3])
def test_a_bad_capture_device_is_refused_before_the_model_runs(device: Any) -> None:
    insp = Inspector(build_tiny(GPT2LMHeadModel, gpt2_config(2)))
    with pytest.raises(CaptureError, match="device"):
        insp.capture("block[0]", device=device)


@pytest.mark.parametrize("dtype", ["float64", "bogus", torch.int64, 16])
def test_a_bad_capture_dtype_is_refused(dtype: Any) -> None:
    if dtype == "float64":
        assert Transform(dtype=dtype).dtype is torch.float64
        return
    with pytest.raises(CaptureError, match="floating-point torch dtype"):
        Transform(dtype=dtype)


def test_a_dtype_named_by_a_string_is_converted(family: str) -> None:
    config_fn, head_cls, _ = FAMILIES[family]
    model = build_tiny(head_cls, config_fn())
    insp = Inspector(model)
    assert Transform(dtype="torch.bfloat16", device="cpu").device == torch.device("cpu")
    with torch.no_grad(), insp.capture("block[0]", dtype="float16", device="cpu") as cap:  # type: ignore[arg-type]
        out = model(PROMPT, output_hidden_states=True)
    assert cap["block[0]"].output.dtype is torch.float16
    assert torch.allclose(
        cap["block[0]"].output.float(), out.hidden_states[1], atol=1e-2, rtol=1e-2
    )


# -- repr ----------------------------------------------------------------------------------------


def test_capture_repr_says_targets_state_records_and_stop() -> None:
    model = build_tiny(GPT2LMHeadModel, gpt2_config(2))
    insp = Inspector(model)
    cap = insp.capture("block[0]", "block[-1]", stop=True)
    assert repr(cap) == (
        "Capture(targets=['block[0]', 'block[1]'], inactive, recorded=[], stop=True, stopped=False)"
    )
    with torch.no_grad(), cap:
        assert repr(cap).startswith("Capture(targets=['block[0]', 'block[1]'], active,")
        model(PROMPT)
    assert repr(cap) == (
        "Capture(targets=['block[0]', 'block[1]'], inactive, recorded=['block[0]', 'block[1]'], "
        "stop=True, stopped=True)"
    )
    with torch.no_grad(), insp.capture("block[0]") as steps:
        model.generate(PROMPT, max_new_tokens=3, do_sample=False)  # type: ignore[operator]
    assert repr(steps) == (
        "Capture(targets=['block[0]'], inactive, recorded=['block[0]' (3 steps)], stop=False)"
    )


# -- capture positions during generate count in the whole sequence, as edits do ----------------


@pytest.mark.parametrize("positions", [[0], [1, 6], slice(0, 2), [-1], "last"])
def test_capture_positions_during_generate_are_those_of_the_whole_sequence(
    family: str, positions: Any
) -> None:
    config_fn, lm_cls, _ = FAMILIES[family]
    model = build_tiny(lm_cls, config_fn())
    insp = Inspector(model)
    ids = torch.tensor([[5, 17, 42, 9, 77]])
    with torch.no_grad(), insp.capture("block[0]", positions=positions) as cap:
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad(), insp.capture("block[0]") as full:
        model(out[:, :-1])
    whole = full["block[0]"].output  # every position the generation fed back
    if positions in ("last", [-1]):
        want = whole[:, [4, 5, 6]]  # the newest token of each call
    elif isinstance(positions, slice):
        want = whole[:, positions]
    else:
        want = whole[:, [p for p in positions if p < whole.shape[1]]]
    assert torch.allclose(cap.concat("block[0]"), want, atol=ATOL)
