"""What defines an extraction's content: its settings, their fingerprint, the weights'.

A rerun is checked against these before any work (see :mod:`introspect._scale.records`): other
settings, or other weights under the same model name, are refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from introspect._errors import ExtractionError
from introspect._hooks.session import onloaded
from introspect._scale.corpus import Inputs

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DTYPES", "Position", "settings_of", "weights_fingerprint"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""The dtypes activations can be stored in (``--dtype``)."""
Position = Literal["all", "last"]
_SAMPLES = 64
"""Values of each tensor that go into a weights fingerprint."""
_SPREAD = 2654435761
"""Knuth's multiplicative hash constant: spreads the sampled places over a tensor's elements."""


def settings_of(
    *,
    model: str,
    locators: Sequence[str],
    inputs: Inputs,
    positions: str = "all",
    dtype: str = "float16",
    text_field: str = "text",
    max_length: int | None = None,
    adapter: str | None = None,
    model_dtype: str | None = None,
) -> dict[str, Any]:
    """What defines an extraction's content: a rerun with other settings is refused.

    Keys left ``None`` (a maximum length or an adapter not chosen yet) are not compared.
    The batch size, the number of processes and the device are not settings: they change how
    the values are computed, not which.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from introspect._scale.corpus import read_inputs
        >>> path = Path(tempfile.mkdtemp()) / "c.txt"
        >>> _ = path.write_text("hi\\n")
        >>> s = settings_of(model="toy-llama", locators=["block[:]"], inputs=read_inputs([path]))
        >>> s["locators"], s["dtype"], len(s["inputs"][0])
        (['block[:]'], 'float16', 64)
    """
    found: dict[str, Any] = {
        "model": model,
        "locators": [str(loc) for loc in locators],
        "positions": positions,
        "dtype": dtype,
        # A text file has no fields: its --text-field changes nothing.
        "text_field": None if inputs.kinds == {"txt"} else text_field,
        "inputs": inputs.hashes,
        "max_length": max_length,
        "adapter": adapter,
        "model_dtype": model_dtype,
    }
    return {key: value for key, value in found.items() if value is not None}


def _fingerprint(settings: Mapping[str, Any]) -> str:
    text = json.dumps(dict(settings), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sample(tensor: torch.Tensor) -> bytes:
    """``_SAMPLES`` values of ``tensor`` at fixed places, as bytes that do not depend on the
    device (read where the tensor is, only the sample is copied to the CPU)."""
    count = tensor.numel()
    if count == 0:
        return b""
    places = torch.arange(min(count, _SAMPLES), dtype=torch.long)
    if count > _SAMPLES:
        places = (places * _SPREAD + 1) % count
    flat = tensor.detach().reshape(1) if tensor.dim() == 0 else tensor.detach()
    try:
        index = torch.unravel_index(places.to(flat.device), flat.shape)
        picked = flat[index].cpu()
        if picked.is_complex():
            picked = torch.view_as_real(picked.to(torch.complex128))
        elif picked.is_floating_point():
            picked = picked.to(torch.float64)  # exact for every float dtype
        else:
            picked = picked.to(torch.int64)
        return bytes(picked.numpy().tobytes())
    except (RuntimeError, TypeError, NotImplementedError):
        # A tensor type that cannot be indexed or converted (a quantized layout): its name,
        # shape and dtype still count.
        return b"?"


def _offloaded_sample(model: nn.Module, name: str) -> bytes | None:
    """The sample of a state-dict entry that accelerate offloaded (on the meta device here, its
    values held by the module's hook), or None where no hook holds them."""
    prefix, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(prefix)
        with onloaded(module, "fingerprinting"):
            value: torch.Tensor | None = module._parameters.get(leaf)
            if value is None:
                value = module._buffers.get(leaf)
            if value is None or value.is_meta:
                return None
            return _sample(value)
    except (AttributeError, ExtractionError):
        return None


def weights_fingerprint(model: nn.Module) -> str:
    """A fingerprint of ``model``'s weights: a hash of its state dict's names, shapes, dtypes
    and 64 values of each tensor at fixed places.

    It reads a few values per tensor, so it costs little for any size of model, and it is the
    same on any device. Weights that accelerate offloaded are read from its hooks; a tensor
    on the meta device that no hook holds counts by its name, shape and dtype only. Two
    checkpoints of one architecture (another training step, a fine-tune) differ in nearly
    every value, so in the fingerprint.

    Example:
        >>> layer = torch.nn.Linear(4, 2)
        >>> before = weights_fingerprint(layer)
        >>> with torch.no_grad():
        ...     _ = layer.bias.add_(1)
        >>> len(before), before == weights_fingerprint(layer)
        (16, False)
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        digest.update(f"{name}\0{list(tensor.shape)}\0{tensor.dtype}\0".encode())
        sample = _offloaded_sample(model, name) if tensor.is_meta else _sample(tensor)
        digest.update(sample or b"")
    return digest.hexdigest()[:16]
