"""Padded batches: masks, position ids, and where each example's real tokens are.

A batch of prompts of different lengths is padded on the left or on the right; the attention
mask says which positions are real. A plain forward on such a batch must also get position ids
derived from the mask (as ``generate`` does), or rotary and learned positions shift on the padded
examples. Everything here works for either padding side.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any, Literal

import torch

from introspect._errors import CaptureError, IntrospectError

__all__ = [
    "PaddingSide",
    "Positions",
    "as_int",
    "check_positions",
    "context_length",
    "encode_batch",
    "gather_positions",
    "last_token_positions",
    "max_positions",
    "pad_batch",
    "position_ids_from_mask",
    "position_index",
    "real_token_positions",
]

PaddingSide = Literal["left", "right"]


def _check_mask(mask: Any) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        what = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise CaptureError(
            f"an attention mask must be a [batch, seq] tensor, got {what}: pass the mask the "
            "tokenizer returned (attention_mask)"
        )
    return mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a padded batch, as ``generate`` derives them: real tokens count from 0.

    Padding positions get 1 (any valid position: their outputs are never read).

    Example:
        >>> position_ids_from_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist()
        [[1, 1, 0, 1], [0, 1, 2, 3]]
    """
    mask = _check_mask(attention_mask)
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


_LENGTH_ATTRIBUTES = (
    "n_positions",
    "max_position_embeddings",
    "n_ctx",
    "max_seq_len",
    "max_sequence_length",
    "max_positions",
)
"""Where configs state the length a model was built for, in the order they are read."""

_COMPUTED_POSITIONS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_emb_base")
"""Config attributes of rotary models that compute each position's rotation on the fly."""

_HEAD_COUNTS = ("num_attention_heads", "n_head", "n_heads", "num_heads")

_PADDING_OFFSET_POSITIONS = frozenset(
    {"roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "data2vec-text"}
)
"""Model types whose position ids start after the padding index (``pad_token_id + 1``, as
fairseq numbered them): the first ``pad_token_id + 1`` rows of their table are never a real
token's, so ``max_position_embeddings`` 514 runs 512 tokens (tests/test_batching.py runs each
at its limit and one past it)."""


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    if config is None:
        return None
    text = getattr(config, "get_text_config", None)
    if callable(text) and not any(_length_in(config, name) for name in _LENGTH_ATTRIBUTES):
        # A multimodal config states the text model's length in its text sub-config.
        config = text()
    return config


def _length_in(config: Any, name: str) -> int | None:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def context_length(model_or_config: Any) -> int | None:
    """The length a model was built for, as its config states it; ``None`` when it states none.

    The first of ``n_positions``, ``max_position_embeddings``, ``n_ctx``, ``max_seq_len``,
    ``max_sequence_length`` and ``max_positions`` that is a positive int (read from the text
    sub-config of a multimodal config). Whether a longer sequence can run at all is
    :func:`max_positions`'s answer; this length is the sensible default for cutting documents.

    Example:
        >>> from transformers import GPT2Config, LlamaConfig
        >>> context_length(GPT2Config(n_positions=512)), context_length(LlamaConfig())
        (512, 2048)
    """
    config = _config_of(model_or_config)
    for name in _LENGTH_ATTRIBUTES:
        found = _length_in(config, name)
        if found is not None:
            return found
    return None


def max_positions(model_or_config: Any) -> int | None:
    """The longest sequence a model can run, or ``None`` when no length makes it fail.

    The rule, the one every length check of introspect applies: a model whose positions are
    looked up in a table of :func:`context_length` rows cannot run past it (the lookup fails
    with an ``IndexError`` or a shape error deep in the forward). That is every model with a
    context length except

    - rotary models (a config with ``rope_parameters``, ``rope_theta``, ``rope_scaling`` or
      ``rotary_emb_base``: Llama, Mistral, Qwen, GPT-NeoX, ...), which compute each
      position's rotation and run longer sequences (how well they do there is another matter);
    - models without attention (no head count in the config: RWKV), which have no positions.

    So GPT-2, OPT, GPT-Neo, BERT and BART (learned tables), GPT-J and CodeGen (a rotary table
    computed once, of that many rows) and MPT (an ALiBi bias built to that length) have a
    maximum; models that state no length (BLOOM's ALiBi, T5's relative buckets, Mamba) have
    none. RoBERTa and its kin number positions from ``pad_token_id + 1``, so their maximum is
    that much below the table's length (514 rows: 512 tokens).

    Example:
        >>> from transformers import GPT2Config, LlamaConfig
        >>> max_positions(GPT2Config(n_positions=512)), max_positions(LlamaConfig())
        (512, None)
    """
    config = _config_of(model_or_config)
    length = context_length(config)
    if length is None:
        return None
    if any(getattr(config, name, None) is not None for name in _COMPUTED_POSITIONS):
        return None
    if not any(_length_in(config, name) for name in _HEAD_COUNTS):
        return None
    if getattr(config, "model_type", None) in _PADDING_OFFSET_POSITIONS:
        pad = getattr(config, "pad_token_id", None)
        length -= (pad if isinstance(pad, int) and pad >= 0 else 0) + 1
    return length


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each example's last real token, whatever the padding side.

    A row with no real token gets the last position.

    Example:
        >>> last_token_positions(torch.tensor([[0, 1, 1], [1, 1, 0], [1, 0, 0]])).tolist()
        [2, 1, 0]
    """
    mask = _check_mask(attention_mask)
    seq = mask.shape[1]
    return (seq - 1 - mask.ne(0).flip(1).int().argmax(1)).long()


def real_token_positions(attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """For each example, the indices of its real (unpadded) tokens, in order.

    Example:
        >>> [p.tolist() for p in real_token_positions(torch.tensor([[0, 1, 1], [1, 1, 0]]))]
        [[1, 2], [0, 1]]
    """
    mask = _check_mask(attention_mask)
    return [row.nonzero().flatten() for row in mask.ne(0)]


def pad_batch(
    sequences: Sequence[Sequence[int] | torch.Tensor],
    *,
    padding_side: PaddingSide = "left",
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Pad token-id sequences into one batch: ``input_ids``, ``attention_mask``, ``position_ids``.

    Left padding is what ``generate`` expects for decoder-only models; position ids are derived
    from the mask either way, so each example sees the positions it would see alone.

    Example:
        >>> batch = pad_batch([[5, 6, 7], [8]], padding_side="left")
        >>> batch["input_ids"].tolist(), batch["position_ids"].tolist()
        ([[5, 6, 7], [0, 0, 8]], [[0, 1, 2], [1, 1, 0]])
    """
    if padding_side not in ("left", "right"):
        raise CaptureError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows = [torch.as_tensor(s, dtype=torch.long).flatten() for s in sequences]
    if not rows or any(r.numel() == 0 for r in rows):
        raise CaptureError("pad_batch needs at least one sequence, and no empty sequence")
    longest = max(r.numel() for r in rows)
    ids = torch.full((len(rows), longest), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        n = row.numel()
        where = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        ids[i, where] = row
        mask[i, where] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": position_ids_from_mask(mask),
    }


def encode_batch(
    prompts: Sequence[str] | Sequence[Sequence[int]],
    tokenizer: Any = None,
    *,
    padding_side: PaddingSide = "left",
    pad_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize (if given strings) and pad prompts into one batch with mask-derived positions.

    ``tokenizer`` is any callable returning ``{"input_ids": ...}`` for one string (a Hugging
    Face tokenizer works); token-id lists need none. ``pad_token_id`` defaults to the
    tokenizer's pad token, else its end-of-sequence token, else 0.

    Example:
        >>> encode_batch([[1, 2, 3], [4, 5]], padding_side="right")["attention_mask"].tolist()
        [[1, 1, 1], [1, 1, 0]]
    """
    sequences: list[Any] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise CaptureError(
                    "prompts are strings but no tokenizer was given: pass tokenizer=..., or "
                    "pass lists of token ids"
                )
            encoded = tokenizer(prompt, return_tensors="pt")
            sequences.append(torch.as_tensor(encoded["input_ids"]).flatten())
        else:
            sequences.append(prompt)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "eos_token_id", None)
    return pad_batch(sequences, padding_side=padding_side, pad_token_id=int(pad_token_id or 0))


def call_positions(
    attention_mask: torch.Tensor | None, batch: int, seq: int, device: torch.device
) -> torch.Tensor:
    """Index of each example's last real token within a call of ``seq`` positions.

    During cached generation a call covers only the last ``seq`` columns of the mask; without a
    mask the last position is the last real token.

    Example:
        >>> call_positions(torch.tensor([[1, 1, 0], [0, 1, 1]]), 2, 3, torch.device("cpu")).tolist()
        [1, 2]
    """
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
        return torch.full((batch,), seq - 1, dtype=torch.long, device=device)
    local = attention_mask[:, -seq:] if attention_mask.shape[1] >= seq else attention_mask
    return last_token_positions(local).to(device)


Positions = int | Sequence[int] | slice | torch.Tensor | Literal["last"] | None
"""What ``positions=`` accepts: see :func:`check_positions` and :func:`position_index`."""

_VALID = (
    "use None (every position), 'last' (each example's last real token), an int, a list of "
    "ints, a slice, or an integer tensor [batch] / [batch, k] of per-example positions"
)


def as_int(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer scalar (Python, NumPy or torch), else
    ``None`` (for anything ``int()`` would round or coerce: ``2.5``, ``True``, ``"3"``).

    Example:
        >>> as_int(3), as_int(torch.tensor(4)), as_int(2.5), as_int(True), as_int("3")
        (3, 4, None, None, None)
    """
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_meta:
            return None
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return None
        return int(value.item())
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_positions(positions: Any, error: type[IntrospectError] = CaptureError) -> Positions:
    """Validate ``positions=`` before any model runs and return it in its plain form.

    Integer scalars of any kind (Python, NumPy, 0-dim torch) are ints and a lone int becomes a
    one-item list; a list, tuple or range becomes a list of ints; a slice keeps int bounds;
    a tensor must hold integers, shape ``[batch]`` or ``[batch, k]``. Floats, booleans, empty
    or repeated positions, strings other than ``"last"``, NumPy arrays (ambiguous between the
    list and the per-example meanings) and unordered collections are refused with ``error``.

    Example:
        >>> import numpy as np
        >>> check_positions(np.int64(2)), check_positions(range(2)), check_positions("last")
        ([2], [0, 1], 'last')
        >>> try:
        ...     check_positions([1.5])
        ... except CaptureError as exc:
        ...     print(str(exc).split(":")[0])
        positions must be integers, got 1.5 (float)
    """
    if positions is None:
        return None
    if isinstance(positions, str):
        if positions == "last":
            return "last"
        raise error(
            f"positions={positions!r} is not understood: the only string is 'last' (each "
            f"example's last real token; the first token is positions=[0]); {_VALID}"
        )
    single = as_int(positions)
    if single is not None:
        return [single]
    if isinstance(positions, torch.Tensor):
        return _check_tensor(positions, error)
    if isinstance(positions, slice):
        bounds = []
        for name in ("start", "stop", "step"):
            bound = getattr(positions, name)
            number = None if bound is None else as_int(bound)
            if bound is not None and number is None:
                raise error(f"a positions slice needs int bounds, got {name}={bound!r}; {_VALID}")
            bounds.append(number)
        if bounds[2] == 0:
            raise error("a positions slice cannot have step 0")
        return slice(*bounds)
    if isinstance(positions, bool) or type(positions).__name__ in ("bool", "bool_"):
        raise error(f"positions={positions!r} is a boolean, not a position; {_VALID}")
    if hasattr(positions, "ndim") and hasattr(positions, "dtype"):
        raise error(
            "positions is an array: pass positions.tolist() for the same positions in every "
            "example, or torch.as_tensor(positions) for one position (or row) per example"
        )
    if isinstance(positions, (Set, Mapping)) or not isinstance(positions, Iterable):
        raise error(
            f"positions={positions!r} ({type(positions).__name__}) is not understood; {_VALID}"
        )
    items: list[int] = []
    for item in positions:
        number = as_int(item)
        if number is None:
            raise error(
                f"positions must be integers, got {item!r} ({type(item).__name__}): a position "
                "is an index into the sequence (for per-example positions pass a tensor)"
            )
        items.append(number)
    if not items:
        raise error(f"positions={positions!r} selects no position; {_VALID}")
    if len(set(items)) != len(items):
        raise error(f"positions {items} name a position more than once: list each one once")
    return items


def _check_tensor(positions: torch.Tensor, error: type[IntrospectError]) -> torch.Tensor:
    if positions.dtype == torch.bool:
        raise error(
            "a boolean positions mask is not supported: pass per-example indices, e.g. "
            "introspect.last_token_positions(mask)"
        )
    if positions.is_floating_point() or positions.is_complex():
        raise error(
            f"a positions tensor must hold integers, got {positions.dtype} (it would be "
            "truncated): convert it with .long() if the values are whole numbers"
        )
    if positions.is_meta:
        raise error("a positions tensor is on the meta device (it holds no values)")
    if positions.dim() not in (1, 2) or positions.numel() == 0:
        raise error(
            f"a positions tensor gives one position (or row of positions) per example: shape "
            f"[batch] or [batch, k], got {tuple(positions.shape)}"
        )
    if positions.dim() == 2 and positions.shape[1] > 1:
        ordered = positions.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise error("a positions tensor names a position twice in one example: list it once")
    return positions


def _per_row(positions: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    rows = positions.long()
    if rows.dim() == 1:
        rows = rows.unsqueeze(1)
    if rows.dim() != 2 or rows.shape[0] != batch:
        raise CaptureError(
            f"a positions tensor gives one position (or row of positions) per example: expected "
            f"shape [{batch}] or [{batch}, k], got {tuple(positions.shape)}"
        )
    if rows.numel() and (int(rows.min()) < -seq or int(rows.max()) >= seq):
        raise CaptureError(
            f"positions {rows.flatten().tolist()} are out of range for a sequence of {seq}"
        )
    return rows % seq


def position_index(
    positions: Any,
    batch: int,
    seq: int,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> list[int] | torch.Tensor | None:
    """Resolve ``positions=`` for a call of ``batch`` x ``seq`` tokens.

    ``None``: every position. An int, a list of ints or a slice: the same positions in every
    example (negative counts from the end). ``"last"``: each example's last real token, read
    from the attention mask (either padding side). A tensor: per example, shape ``[batch]`` or
    ``[batch, k]``. Returns ``None`` (all), a list of non-negative indices shared by every
    example, or a ``[batch, k]`` tensor of per-example indices.

    Example:
        >>> position_index([0, -1], batch=2, seq=5)
        [0, 4]
        >>> position_index("last", 2, 3, torch.tensor([[1, 1, 0], [1, 1, 1]])).tolist()
        [[1], [2]]
    """
    positions = check_positions(positions)
    if positions is None:
        return None
    if isinstance(positions, str):
        where = device if device is not None else torch.device("cpu")
        return call_positions(attention_mask, batch, seq, where).unsqueeze(1)
    if isinstance(positions, torch.Tensor):
        rows = _per_row(positions, batch, seq)
        return rows.to(device) if device is not None else rows
    if isinstance(positions, slice):
        return list(range(seq))[positions]
    assert isinstance(positions, list)
    out = []
    for p in positions:
        if not -seq <= p < seq:
            raise CaptureError(
                f"position {p} is out of range for a sequence of {seq} tokens (use "
                f"{-seq}..{seq - 1})"
            )
        out.append(p % seq)
    return out


def later_call_index(
    positions: Any,
    batch: int,
    seq: int,
    offset: int | None,
    device: torch.device | None = None,
) -> list[int] | torch.Tensor:
    """Positions of a later call of one sequence (``offset`` tokens before it, in its KV cache).

    Non-negative positions count in the whole sequence, as edits count them: a call holds those
    in ``offset .. offset + seq`` (an empty list when it holds none, e.g. a prompt position at a
    later generation step); negative ones count from the newest token. A per-example tensor
    must place every example's positions in the same call. ``offset=None`` (a cache whose
    length cannot be read) allows only negative positions.

    Example:
        >>> later_call_index([0, 5], batch=1, seq=1, offset=5)
        [0]
        >>> later_call_index([0], batch=1, seq=1, offset=5)
        []
    """
    positions = check_positions(positions)
    if offset is None:
        if isinstance(positions, list) and all(p < 0 for p in positions):
            return position_index(positions, batch, seq, None, device) or []
        raise CaptureError(
            f"this call holds {seq} token(s) after a KV cache whose length cannot be read, so "
            f"positions={positions} cannot be placed: use negative positions or 'last'"
        )
    total = offset + seq
    if isinstance(positions, slice):
        return [a - offset for a in range(total)[positions] if a >= offset]
    if isinstance(positions, torch.Tensor):
        rows = _per_row(positions, batch, total) - offset
        inside = rows >= 0
        if bool(inside.all()):
            return rows.to(device) if device is not None else rows
        if not bool(inside.any()):
            return []
        raise CaptureError(
            f"per-example positions {positions.tolist()} fall in different calls for different "
            f"examples (this call holds positions {offset}..{total - 1}): capture without "
            "positions and index the joined steps instead"
        )
    assert isinstance(positions, list)
    local = []
    for p in positions:
        if p >= total:
            continue  # a later token's: recorded when the call that holds it runs
        if p < -total:
            raise CaptureError(f"position {p} is out of range for a sequence of {total} tokens")
        absolute = p % total
        if absolute >= offset and absolute - offset not in local:
            # [5, -1] at the step holding position 5 name one token: record it once.
            local.append(absolute - offset)
    return local


def gather_positions(value: torch.Tensor, index: list[int] | torch.Tensor) -> torch.Tensor:
    """``value[:, index]`` for shared indices, or each example's own rows for a tensor index.

    Example:
        >>> v = torch.arange(6.0).reshape(2, 3, 1)
        >>> gather_positions(v, torch.tensor([[2], [0]])).flatten().tolist()
        [2.0, 3.0]
    """
    if isinstance(index, torch.Tensor):
        rows = torch.arange(value.shape[0], device=value.device).unsqueeze(1)
        return value[rows, index.to(value.device)]
    return value[:, index]
