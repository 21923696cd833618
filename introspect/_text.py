"""Text helpers: a prompt into model inputs, token ids back into strings.

The lens and the capture files need these; they do not need the model zoo.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from introspect._errors import ModelLoadError

__all__ = ["encode_prompt", "token_strings"]


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


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
    device = _device_of(model)
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
