"""Text helpers: token text to ids, and the warning for a word given without its space."""

from __future__ import annotations

import warnings

import pytest
import torch

from introspect import Inspector, LocatorError
from introspect._text import TokenSpaceWarning, as_token_id, model_inputs_of
from introspect.zoo import load_model


def test_a_target_without_its_leading_space_is_followed_with_a_warning() -> None:
    model, tokenizer = load_model("toy-gpt2", progress=False)
    plain, spaced = tokenizer.encode("Paris"), tokenizer.encode(" Paris")
    assert len(plain) == len(spaced) == 1 and plain != spaced
    with pytest.warns(TokenSpaceWarning, match=r"pass ' Paris' to follow that one"):
        assert as_token_id("Paris", tokenizer, None) == plain[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert as_token_id(" Paris", tokenizer, None) == spaced[0]
        assert as_token_id(7, tokenizer, 10) == 7
    with pytest.warns(TokenSpaceWarning):
        lens = Inspector(model).logit_lens(
            "The capital of France is", tokenizer=tokenizer, targets=["Paris"]
        )
    assert lens.targets == [plain[0]]
    with pytest.raises(LocatorError, match="out of range"):
        as_token_id(12, None, 10)


def test_model_inputs_from_ids_prompts_and_dicts() -> None:
    model, tokenizer = load_model("toy-gpt2", progress=False)
    ids = model_inputs_of(model, torch.tensor([1, 2, 3]), None, "lens", ValueError)
    assert ids["input_ids"].shape == (1, 3)
    assert model_inputs_of(model, {"input_ids": ids["input_ids"]}, None, "lens", ValueError)
    assert model_inputs_of(model, "Hi", tokenizer, "lens", ValueError)["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match="no tokenizer= to read it with"):
        model_inputs_of(model, "Hi", None, "lens", ValueError)
    with pytest.raises(ValueError, match="needs a prompt string"):
        model_inputs_of(model, 3.5, None, "lens", ValueError)
