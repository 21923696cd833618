"""Text helpers: a prompt into model inputs, token ids back into strings.

The lens and the capture files need these; they do not need the model zoo.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from introspect._batching import as_int
from introspect._errors import LocatorError, ModelLoadError
from introspect._hooks.session import input_device

__all__ = [
    "TokenLike",
    "TokenSpaceWarning",
    "as_token_id",
    "encode_prompt",
    "model_inputs_of",
    "show_token",
    "token_strings",
]

TokenLike = int | str
"""A token: its id, or its text when the tokenizer is known."""


def encode_prompt(tokenizer: Any, prompt: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Tokenize one prompt into a batch of one, on the model's device.

    Example:
        >>> from introspect.zoo import load_model
        >>> model, tokenizer = load_model("toy-gpt2", progress=False)
        >>> encode_prompt(tokenizer, "Hello world", model)["input_ids"].shape[0]
        1
    """
    if tokenizer is None:
        raise ModelLoadError(
            "this model has no tokenizer, so it cannot read a prompt: load a folder or hub id "
            "that ships one, or pass token ids to the library directly"
        )
    if not prompt:
        raise ModelLoadError("the prompt is empty: pass some text, e.g. --prompt 'Hello'")
    encoded: Mapping[str, Any] = tokenizer(prompt, return_tensors="pt")
    device = input_device(model)
    return {k: v.to(device) for k, v in encoded.items() if isinstance(v, torch.Tensor)}


def token_strings(tokenizer: Any, ids: Any) -> list[str]:
    """Each token id decoded on its own (``' Paris'``), or ``'#123'`` without a tokenizer.

    Example:
        >>> token_strings(None, [5, 7])
        ['#5', '#7']
    """
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if tokenizer is None:
        return [f"#{int(i)}" for i in values]
    return [str(tokenizer.decode([int(i)])) for i in values]


def show_token(token: str, width: int = 0) -> str:
    """A token as a table cell: quoted so spaces show, control characters escaped.

    Example:
        >>> show_token(" Paris"), show_token("\\n")
        ("' Paris'", "'\\\\n'")
    """
    text = repr(token)
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def as_token_id(target: TokenLike, tokenizer: Any, vocab: int | None) -> int:
    """One token's id from its id or its exact text (``' Paris'``, with its leading space),
    checked against the vocabulary; text that is several tokens says which.

    Example:
        >>> as_token_id(7, None, 10)
        7
    """
    if isinstance(target, str):
        if tokenizer is None:
            raise LocatorError(
                f"target {show_token(target)} is text, but this lens has no tokenizer to turn "
                "it into a token id: compute the lens with tokenizer=, or pass the token id"
            )
        if not target:
            raise LocatorError(
                "a target is empty text: pass one token's text, e.g. ' Paris' (with its "
                "leading space), or its id"
            )
        ids = [int(i) for i in tokenizer.encode(target, add_special_tokens=False)]
        if len(ids) != 1:
            pieces = " + ".join(
                f"{show_token(text)} (id {i})"
                for text, i in zip(token_strings(tokenizer, ids), ids, strict=True)
            )
            raise LocatorError(
                f"target {show_token(target)} is {len(ids)} tokens for this tokenizer, not one"
                f"{': ' + pieces if pieces else ''}; pass the text or id of a single token"
            )
        number = ids[0]
        if len(target) > 1 and target.isalpha():  # a word, not a piece or a letter
            _warn_if_spaced(target, number, tokenizer)
    else:
        found = as_int(target)
        if found is None:
            raise LocatorError(
                f"a target is one token's text (e.g. ' Paris') or its id (an int), got {target!r}"
            )
        number = found
    if vocab is not None and not 0 <= number < vocab:
        raise LocatorError(
            f"target token id {number} is out of range: this model's vocabulary has ids "
            f"0..{vocab - 1}"
        )
    return number


class TokenSpaceWarning(UserWarning):
    """A target given without its leading space names another token than the word inside a
    sentence (``'Paris'`` is not ``' Paris'``)."""


def _warn_if_spaced(target: str, number: int, tokenizer: Any) -> None:
    spaced = [int(i) for i in tokenizer.encode(" " + target, add_special_tokens=False)]
    if len(spaced) == 1 and spaced[0] != number:
        warnings.warn(
            f"target {show_token(target)} is token {number}, without a leading space; inside "
            f"a sentence the word is usually {show_token(' ' + target)} (token {spaced[0]}): "
            f"pass {show_token(' ' + target)} to follow that one",
            TokenSpaceWarning,
            stacklevel=3,
        )


def model_inputs_of(
    model: nn.Module, inputs: Any, tokenizer: Any, what: str, error: type[Exception]
) -> dict[str, Any]:
    """Model inputs from a prompt (with ``tokenizer``), token ids or a dict of inputs, on the
    model's device; ``what`` names the caller and ``error`` its exception class in errors.

    Example:
        >>> from torch import nn
        >>> model_inputs_of(nn.Linear(2, 2), torch.tensor([1, 2]), None, "lens", ValueError)
        {'input_ids': tensor([[1, 2]])}
    """
    if isinstance(inputs, str):
        if tokenizer is None:
            # The Inspector holds the model only; load_model returned the tokenizer beside it.
            raise error(
                f"{what} got a prompt but no tokenizer= to read it with: pass the tokenizer "
                "that came with the model (model, tokenizer = load_model(...); "
                f"insp.{what}(prompt, tokenizer=tokenizer)), or pass token ids"
            )
        return encode_prompt(tokenizer, inputs, model)
    if isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
        return {"input_ids": ids.to(input_device(model))}
    if isinstance(inputs, Mapping):
        return dict(inputs)
    raise error(
        f"{what} needs a prompt string, a tensor of token ids or a dict of model inputs, "
        f"got {type(inputs).__name__}"
    )
