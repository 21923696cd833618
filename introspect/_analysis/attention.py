"""Attention patterns and head scores: which heads look where, read from ``block[i].attn.pattern``.

:func:`head_scores` finds heads by what they do on sequences built for the purpose:

- ``induction``: each sequence is a run of random tokens repeated (``A B C … A B C …``). An
  induction head, at a token of a later run, attends to the token *after* that token's previous
  occurrence (at ``B`` of the second run, to the ``C`` of the first), so it can copy what came
  next. The score of a head is its mean attention weight from every token of the repeated runs
  (position ``i >= seq_len`` of the random part) to position ``i - seq_len + 1``.
- ``previous-token``: the mean attention weight from every token to the one just before it
  (position ``i - 1``, from ``i = 1``), on the same sequences.

Both are means of attention weights, so they lie in ``[0, 1]``; a head that always attends
exactly so scores 1. The random tokens are drawn with a ``torch.Generator`` seeded by ``seed``
from the vocabulary without the special tokens (those the model's config names, and the
tokenizer's when one is given). Each row of the batch gets its own sequence (more samples for
the same forward), and no token repeats within a run, so a token's previous occurrence is
exactly ``seq_len`` positions back. Every score is computed from the ``pattern`` the
Inspector captures (``block[i].attn.pattern``, equal to Hugging Face's ``output_attentions``),
in one forward.

:func:`attention_patterns` reads one block's patterns on a prompt, for tables and pictures.

Example:
    >>> from introspect import Inspector
    >>> from introspect.zoo import load_model
    >>> model, _ = load_model("toy-llama", progress=False)
    >>> scores = head_scores(Inspector(model), "induction", seq_len=8, batch=2)
    >>> scores.values.shape, scores.input_ids.shape
    (torch.Size([4, 4]), torch.Size([2, 16]))
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from introspect._analysis.lens import _plain, _save_atomically, main_blocks
from introspect._batching import as_int, max_positions
from introspect._errors import AttentionToolError, LocatorError, MissingDependencyError
from introspect._hooks.session import input_device
from introspect._html import (
    attention_view,
    byte_labels,
    forced,
    head_scores_view,
    model_title,
    prompt_text,
    prompt_title,
    save_view,
)
from introspect._locators import Locator
from introspect._text import model_inputs_of, token_strings

if TYPE_CHECKING:
    from introspect._inspector import Inspector

__all__ = [
    "SCORES",
    "AttentionPatterns",
    "HeadScores",
    "attention_patterns",
    "head_scores",
]

SCORES = {
    "induction": "mean attention from each token of a repeated run to the token after its "
    "previous occurrence",
    "previous-token": "mean attention from each token to the token just before it",
}
"""The scores :func:`head_scores` computes, with what each measures."""

_DEFAULT_SEQ_LEN = 50
_DEFAULT_BATCH = 8
_TOP_BOXED = 5
_ANNOTATE_CELLS = 600
_TICK_FONT = 7.0
"""The smallest tick label of a pattern plot, in points."""
_TICK_SPACING = 0.6
"""A tick label's size as a share of the room between two ticks."""
_SPECIAL_CONFIG_IDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "decoder_start_token_id",
)


def _whole(name: str, value: Any, minimum: int, why: str = "") -> int:
    number = as_int(value)
    if number is None or number < minimum:
        raise AttentionToolError(
            f"{name} must be a whole number of at least {minimum}{why}, got {value!r}"
        )
    return number


def _block_indices(insp: Inspector, blocks: int | str | Sequence[int | str] | None) -> list[int]:
    """Block indices of the main stack (ints, negative allowed, or locators like block[2:])."""
    found: list[int] = []
    for loc in main_blocks(insp, blocks, "head_scores reads the patterns of blocks"):
        assert loc.index is not None
        if loc.index not in found:
            found.append(loc.index)
    return found


def _pattern_locators(insp: Inspector, blocks: Sequence[int]) -> list[Locator]:
    """The pattern locators of ``blocks``, each checked to be readable on this model."""
    locs = [insp.locator(f"block[{b}].attn.pattern") for b in blocks]
    for loc in locs:
        insp.module(loc)  # no attention, or no attention function to read: an error now
    return locs


def _special_ids(insp: Inspector, tokenizer: Any) -> set[int]:
    config = getattr(insp.model, "config", None)
    found: set[int] = set()
    for name in _SPECIAL_CONFIG_IDS:
        value = getattr(config, name, None)
        values = value if isinstance(value, list | tuple) else [value]
        found.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    if tokenizer is not None:
        found.update(int(i) for i in getattr(tokenizer, "all_special_ids", None) or ())
    return found


def _vocab_size(insp: Inspector, tokenizer: Any) -> int:
    rows = getattr(insp.module("embed"), "num_embeddings", None)
    if not isinstance(rows, int):
        rows = getattr(getattr(insp.model, "config", None), "vocab_size", None)
    if not isinstance(rows, int) or rows < 1:
        raise AttentionToolError(
            "cannot tell the size of this model's vocabulary (no num_embeddings on the embedding "
            "and no config.vocab_size): pass tokens= to score on token ids of your own"
        )
    if tokenizer is not None:
        # Embedding matrices are often padded past the tokenizer's last id: those rows were
        # never trained on.
        rows = min(rows, len(tokenizer))
    return rows


def _token_rows(tokens: Any) -> torch.Tensor:
    ids = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise AttentionToolError(
            f"tokens must be token ids, [seq_len] or [batch, seq_len], got "
            f"{tuple(ids.shape)} of {ids.dtype}"
        )
    return ids.long().cpu()


def _random_rows(allowed: torch.Tensor, seq_len: int, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # A permutation per row: no token repeats within a run, so a token's previous occurrence is
    # exactly seq_len back; rows differ from each other.
    rows = [
        allowed[torch.randperm(len(allowed), generator=generator)[:seq_len]] for _ in range(batch)
    ]
    return torch.stack(rows)


def _score(pattern: torch.Tensor, score: str, seq_len: int, offset: int) -> torch.Tensor:
    """Per head, the mean of the weights the score reads; ``pattern`` is ``[b, h, q, k]``."""
    part = pattern[:, :, offset:, offset:].float()
    if score == "induction":
        # diagonal(-(seq_len - 1)) holds part[q, q - seq_len + 1] for q >= seq_len - 1; the
        # first entry (q = seq_len - 1, key 0) is still in the first run.
        picked = part.diagonal(offset=-(seq_len - 1), dim1=2, dim2=3)[:, :, 1:]
    else:
        picked = part.diagonal(offset=-1, dim1=2, dim2=3)
    return picked.mean(dim=(0, 2)).cpu()


@dataclass
class HeadScores:
    """One score for every head: ``values[r, h]`` is head ``h`` of block ``blocks[r]``.

    ``values`` is ``[blocks, heads]`` float32 on the CPU (``nan`` where a block has fewer heads
    than the widest); ``input_ids`` are the sequences the model ran on (``[batch, bos +
    seq_len * repeats]``), so a score can be recomputed by hand.
    """

    score: str
    values: torch.Tensor
    blocks: list[int]
    seq_len: int
    repeats: int
    batch: int
    seed: int | None
    """The seed of the random tokens (``None`` when the tokens were given)."""
    bos: int | None
    """The token id put before each sequence (``None``: none)."""
    input_ids: torch.Tensor
    model_class: str
    adapter: str
    num_blocks: int
    """The model's block count (``blocks`` may be a subset)."""
    model_name: str = ""
    """The model as titles name it, recorded by :func:`head_scores`: the tokenizer's
    ``name_or_path`` (a hub id, or ``org/name`` from a hub cache folder), else the model's class
    and adapter; empty: the class."""

    @property
    def num_heads(self) -> int:
        """Heads per block (the columns of :attr:`values`)."""
        return int(self.values.shape[1])

    def value(self, block: int, head: int) -> float:
        """The score of one head; ``block`` is a block index of the model (negative allowed).

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, _ = load_model("toy-llama", progress=False)
            >>> s = head_scores(Inspector(model), "previous-token", seq_len=6, batch=1)
            >>> s.value(-1, 0) == float(s.values[-1, 0])
            True
        """
        number = as_int(block)
        if number is None:
            raise LocatorError(f"block must be a block index (an int), got {block!r}")
        index = number + self.num_blocks if number < 0 else number
        if index not in self.blocks:
            raise LocatorError(f"block {block} was not scored (scored: {self.blocks})")
        if not -self.num_heads <= head < self.num_heads:
            raise LocatorError(
                f"head {head} is out of range: {self.num_heads} heads (use 0..{self.num_heads - 1})"
            )
        value = float(self.values[self.blocks.index(index), head])
        if math.isnan(value):
            raise LocatorError(f"block[{index}] has no head {head}")
        return value

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(block, head, value)``, highest first.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, _ = load_model("toy-llama", progress=False)
            >>> s = head_scores(Inspector(model), "previous-token", seq_len=6, batch=1)
            >>> best = s.top(3)
            >>> len(best), best[0][2] >= best[1][2] >= best[2][2]
            (3, True)
        """
        wanted = as_int(k)
        if wanted is None or wanted < 1:
            raise AttentionToolError(f"k must be a whole number of at least 1, got {k!r}")
        flat = self.values.flatten()
        order = sorted(
            (i for i in range(flat.numel()) if not math.isnan(float(flat[i]))),
            key=lambda i: (-float(flat[i]), i),
        )
        heads = self.num_heads
        return [(self.blocks[i // heads], i % heads, float(flat[i])) for i in order[:wanted]]

    def boxed(self, top: int = _TOP_BOXED) -> tuple[list[tuple[int, int, float]], int]:
        """The heads :meth:`plot` boxes and how many decimals it writes in the cells.

        The top ``top`` heads by their unrounded score (:meth:`top`); the decimals are the
        fewest, from two up to four, that show the last of them apart from every head left
        out. A head that still shows the last boxed head's value (a tie at four decimals) is
        boxed too, so no box in the picture is arbitrary.

        Example:
            >>> s = HeadScores("induction", torch.tensor([[0.5012, 0.5004, 0.1]]), [0], 5, 2,
            ...                1, 0, None, torch.zeros(1, 10, dtype=torch.long), "X", "x", 1)
            >>> s.boxed(1)
            ([(0, 0, 0.5012000203132629)], 3)
            >>> [(b, h) for b, h, _ in s.boxed(2)[0]], s.boxed(2)[1]
            ([(0, 0), (0, 1)], 2)
        """
        chosen = self.top(top)
        if not chosen:
            return [], 2
        last = chosen[-1][2]
        named = {(b, h) for b, h, _ in chosen}
        rest = [
            (b, h, float(v))
            for r, b in enumerate(self.blocks)
            for h, v in enumerate(self.values[r].tolist())
            if (b, h) not in named and not math.isnan(v)
        ]
        decimals = 2
        while decimals < 4 and any(f"{v:.{decimals}f}" == f"{last:.{decimals}f}" for *_, v in rest):
            decimals += 1
        tied = [cell for cell in rest if f"{cell[2]:.{decimals}f}" == f"{last:.{decimals}f}"]
        return chosen + sorted(tied, key=lambda cell: -cell[2]), decimals

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        """Everything as plain JSON-able data, with the ``top`` heads listed first.

        Example:
            >>> import json
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, _ = load_model("toy-llama", progress=False)
            >>> data = head_scores(Inspector(model), "induction", seq_len=6, batch=1).to_dict(2)
            >>> sorted(data)[:4], len(data["top"]), len(json.dumps(data)) > 0
            (['adapter', 'batch', 'blocks', 'bos'], 2, True)
        """
        return {
            "score": self.score,
            "measures": SCORES[self.score],
            "model_class": self.model_class,
            "adapter": self.adapter,
            "seq_len": self.seq_len,
            "repeats": self.repeats,
            "batch": self.batch,
            "seed": self.seed,
            "bos": self.bos,
            "blocks": list(self.blocks),
            "num_heads": self.num_heads,
            "top": [{"block": b, "head": h, "value": v} for b, h, v in self.top(top)],
            "values": [[None if math.isnan(v) else v for v in row] for row in self.values.tolist()],
            "input_ids": self.input_ids.tolist(),
        }

    def plot(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        title: str | None = None,
        dpi: int = 150,
        top: int = _TOP_BOXED,
        model: str | None = None,
    ) -> Any:
        """A ``[blocks x heads]`` heatmap of the score (0 to 1), the ``top`` heads boxed.

        The boxes follow the unrounded scores (:meth:`top`). Cells carry their value when
        there are few enough to read, with two decimals, or as many (up to four) as tell the
        last boxed head from the first one left out; a head that still shows the same value
        as the last boxed one is boxed too (:meth:`boxed`). The title names ``model``
        (default: :attr:`model_name`, as recorded from the tokenizer). Writes a PNG (or .svg,
        .pdf; atomically) when ``path`` is given; returns the matplotlib Figure.

        Example:
            >>> from importlib.util import find_spec
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, _ = load_model("toy-llama", progress=False)
            >>> s = head_scores(Inspector(model), "induction", seq_len=6, batch=1)
            >>> figure = s.plot() if find_spec("matplotlib") else None
        """
        Figure, FigureCanvasAgg, Rectangle = _matplotlib()
        n_rows, n_cols = self.values.shape
        cell_w = min(0.55, 14.0 / max(n_cols, 1))
        cell_h = min(0.3, 20.0 / max(n_rows, 1))
        width = max(3.5, cell_w * n_cols + 2.4)
        height = max(3.0, cell_h * n_rows + 1.8)
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        values = self.values.float().numpy()
        image = ax.imshow(values, aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0)
        font = max(4.0, 7.0 * min(cell_w / 0.55, cell_h / 0.3))
        boxed, decimals = self.boxed(top) if top else ([], 2)
        if n_rows * n_cols <= _ANNOTATE_CELLS:
            for r in range(n_rows):
                for c in range(n_cols):
                    v = float(values[r, c])
                    if not math.isnan(v):
                        ax.text(
                            c,
                            r,
                            f"{v:.{decimals}f}",
                            ha="center",
                            va="center",
                            fontsize=font,
                            color="white" if v > 0.55 else "black",
                        )
        for block, head, _ in boxed:
            r = self.blocks.index(block)
            ax.add_patch(
                Rectangle((head - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="#e6550d", lw=2.0)
            )
        ax.set_xticks(range(n_cols))
        ax.set_xticklabels([str(h) for h in range(n_cols)], fontsize=8)
        ax.set_yticks(range(n_rows))
        ax.set_yticklabels([f"block[{b}]" for b in self.blocks], fontsize=7 if n_rows > 16 else 9)
        ax.set_xlabel("head")
        ax.set_ylabel("block")
        label = f"{self.score} score"
        fig.colorbar(image, ax=ax, label=label, fraction=0.08, pad=0.02)
        source = (
            f"{self.batch} random sequence{'s' if self.batch != 1 else ''} of {self.seq_len} "
            f"tokens, each repeated {self.repeats} times, seed {self.seed}"
            if self.seed is not None
            else f"given runs of {self.seq_len} tokens, each repeated {self.repeats} times"
        )
        heading = title or f"{self.score} heads: {model or self.model_name or self.model_class}"
        fig.suptitle(textwrap.fill(heading, max(40, int(width * 11))), fontsize=10)
        ranked = len(self.top(top)) if top else 0
        ties = f" ({len(boxed)} with ties)" if len(boxed) > ranked else ""
        which = f"; boxed: the top {ranked}{ties}" if top else ""
        ax.set_title(textwrap.fill(source + which, max(40, int(width * 13))), fontsize=8)
        if path is not None:
            _save_atomically(fig, Path(path), dpi)
        return fig

    def _repr_html_(self) -> str:
        return head_scores_view(self).html()

    def to_html(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        patterns: AttentionPatterns | Sequence[AttentionPatterns] | None = None,
        force: bool = False,
        overwrite: bool | None = None,
    ) -> str:
        """The interactive block x head grid as one self-contained page (with ``patterns``,
        a click on a head opens its pattern), written atomically to ``path`` when given (an
        existing file only with ``force``; ``overwrite=`` is its deprecated name).

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, _ = load_model("toy-llama", progress=False)
            >>> s = head_scores(Inspector(model), "induction", seq_len=6, batch=1)
            >>> s.to_html().count('data-kind="heads"')
            1
        """
        replace = forced(force, overwrite)  # a contradiction is an error before any work
        return save_view(head_scores_view(self, patterns=patterns), path, force=replace)

    def __repr__(self) -> str:
        best = self.top(1)
        where = f", best block[{best[0][0]}] head {best[0][1]} {best[0][2]:.3f}" if best else ""
        return (
            f"HeadScores({self.score}, {self.model_class}, blocks={len(self.blocks)}, "
            f"heads={self.num_heads}{where})"
        )


def _matplotlib() -> tuple[Any, Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:
        raise MissingDependencyError(
            'plotting needs matplotlib: pip install matplotlib (or "introspect-lm[demo]")'
        ) from None
    return Figure, FigureCanvasAgg, Rectangle


def head_scores(
    inspector: Inspector,
    score: str,
    *,
    seq_len: int | None = None,
    repeats: int = 2,
    batch: int | None = None,
    seed: int = 0,
    blocks: int | str | Sequence[int | str] | None = None,
    tokenizer: Any = None,
    bos: int | None = None,
    tokens: Any = None,
) -> HeadScores:
    """Score every attention head on repeated sequences: ``induction`` or ``previous-token``.

    Builds ``batch`` (default 8) sequences of ``seq_len`` (default 50) random token ids, each
    repeated ``repeats`` times, runs the model once while capturing ``block[i].attn.pattern``
    of the chosen ``blocks`` (default: all) and reduces each pattern to one number per head
    (see the module docs for the definitions). The tokens are drawn with a
    ``torch.Generator`` seeded by ``seed``, from the vocabulary without special ids (the
    config's, and ``tokenizer``'s when given; the tokenizer also bounds the vocabulary), so
    the same seed gives the same sequences and the same scores. ``bos`` puts that token id
    before every sequence (e.g. ``tokenizer.bos_token_id``, for models trained with one); it
    is not scored. ``tokens`` (``[seq_len]`` or ``[batch, seq_len]`` ids) replaces the random
    sequences with your own, repeated the same way. Every argument is checked before the
    model runs. Encoder-decoder models are not supported. The patterns of the chosen blocks
    are held until the forward ends (``batch x heads x length**2`` floats per block): on a
    large model, score a few blocks at a time.

    Example:
        >>> from introspect import Inspector
        >>> from introspect.zoo import load_model
        >>> model, _ = load_model("toy-llama", progress=False)
        >>> insp = Inspector(model)
        >>> a = head_scores(insp, "induction", seq_len=10, batch=2, seed=1)
        >>> b = head_scores(insp, "induction", seq_len=10, batch=2, seed=1)
        >>> bool((a.values == b.values).all()), a.values.shape
        (True, torch.Size([4, 4]))
    """
    insp = inspector
    name = score.replace("_", "-").lower() if isinstance(score, str) else score
    if name not in SCORES:
        raise AttentionToolError(f"unknown score {score!r}: use one of {', '.join(SCORES)}")
    minimum_repeats = 2 if name == "induction" else 1
    why = " (an induction head needs a repeat to find)" if name == "induction" else ""
    repeats = _whole("repeats", repeats, minimum_repeats, why)
    seed_value = as_int(seed)
    if seed_value is None:
        raise AttentionToolError(f"seed must be a whole number, got {seed!r}")
    if insp.adapter.encoder is not None:
        raise AttentionToolError(
            f"head_scores runs decoder-only and encoder-only models; {insp.adapter.name!r} is "
            "an encoder-decoder adapter (capture block[i].attn.pattern of a stack yourself)"
        )
    if bos is not None and as_int(bos) is None:
        raise AttentionToolError(f"bos must be a token id (an int) or None, got {bos!r}")
    if tokens is not None:
        if seq_len is not None or batch is not None:
            raise AttentionToolError(
                "seq_len and batch describe random sequences; with tokens= the sequences are "
                "the tokens given: leave seq_len and batch out"
            )
        rows = _token_rows(tokens)
        batch_size, length = int(rows.shape[0]), int(rows.shape[1])
        if length < 2:
            raise AttentionToolError(
                f"tokens holds {length} token per sequence: at least 2 are needed to score"
            )
        used_seed: int | None = None
    else:
        length = _whole("seq_len", _DEFAULT_SEQ_LEN if seq_len is None else seq_len, 2)
        batch_size = _whole("batch", _DEFAULT_BATCH if batch is None else batch, 1)
        used_seed = seed_value
    indices = _block_indices(insp, blocks)
    locs = _pattern_locators(insp, indices)
    vocab = _vocab_size(insp, tokenizer)
    if tokens is None:
        specials = _special_ids(insp, tokenizer)
        allowed = torch.tensor([i for i in range(vocab) if i not in specials], dtype=torch.long)
        if len(allowed) < length:
            raise AttentionToolError(
                f"seq_len {length} is more than the {len(allowed)} distinct non-special tokens "
                "of this vocabulary: use a shorter seq_len"
            )
        rows = _random_rows(allowed, length, batch_size, seed_value)
    else:
        bad = rows[(rows < 0) | (rows >= vocab)]
        if bad.numel():
            raise AttentionToolError(
                f"tokens holds id {int(bad[0])}, outside this model's vocabulary (0..{vocab - 1})"
            )
    offset = 0 if bos is None else 1
    total = offset + length * repeats
    limit = max_positions(insp.model)
    if limit is not None and total > limit:
        # The bos token comes once, before the repeats: 1 + 10 x 2 = 21.
        sum_text = f"{length} x {repeats}" if bos is None else f"1 + {length} x {repeats}"
        raise AttentionToolError(
            f"{sum_text} = {total} tokens is longer than this model's {limit} positions: use a "
            "shorter seq_len or fewer repeats"
        )
    ids = rows.repeat(1, repeats)
    if bos is not None:
        ids = torch.cat([torch.full((batch_size, 1), int(bos), dtype=torch.long), ids], dim=1)
    device = input_device(insp.model)
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids, device=device),
    }
    per_block: list[torch.Tensor] = []
    with torch.no_grad():
        with insp.capture(*locs, detach=True, stop=True) as cap:  # no head, no later block
            insp.model(**inputs)
        for loc in locs:
            per_block.append(_score(cap[str(loc)].output, name, length, offset))
    width = max(int(v.numel()) for v in per_block)
    values = torch.full((len(per_block), width), float("nan"))
    for r, v in enumerate(per_block):
        values[r, : v.numel()] = v
    return HeadScores(
        score=name,
        values=values,
        blocks=indices,
        seq_len=length,
        repeats=repeats,
        batch=batch_size,
        seed=used_seed,
        bos=None if bos is None else int(bos),
        input_ids=ids,
        model_class=type(insp.model).__name__,
        adapter=insp.adapter.name,
        num_blocks=insp.num_blocks,
        model_name=model_title(tokenizer, type(insp.model).__name__, insp.adapter.name),
    )


# -- one block's patterns on a prompt -----------------------------------------------------------


@dataclass
class AttentionPatterns:
    """The attention patterns of one block on one sequence.

    ``pattern`` is ``[heads, query, key]`` float32 on the CPU, for the heads in ``heads`` (all
    of the block's, or the one asked for); ``tokens[i]`` is the token at position ``i`` (both
    axes). Padding positions of the input are left out.
    """

    block: int
    heads: list[int]
    num_heads: int
    token_ids: list[int]
    tokens: list[str]
    pattern: torch.Tensor
    model_class: str
    adapter: str
    causal: bool = field(default=True)
    """Whether every weight above the diagonal is zero (a causal mask): plots grey it out."""
    model_name: str = ""
    """The model as titles name it, recorded by :func:`attention_patterns`: the tokenizer's
    ``name_or_path`` (a hub id, or ``org/name`` from a hub cache folder), else the model's class
    and adapter; empty: the class."""
    prompt: str | None = None
    """The prompt the patterns were read on: the text given, or the token ids decoded by the
    tokenizer (None: token ids without a tokenizer)."""
    labels: list[str] = field(default_factory=list)
    """The tokens as pictures and views label them, recorded with the tokenizer: a lone byte
    of a multi-byte character by its bytes (``<0xF0><0x9F>``, where ``tokens`` holds the
    missing glyph); empty: by its id (``#8582``)."""

    @property
    def token_labels(self) -> list[str]:
        """:attr:`labels`, or (where none were recorded) the tokens with a lone byte by its id.

        Example:
            >>> import torch
            >>> att = AttentionPatterns(0, [0], 1, [7, 8582], ["a", "\ufffd"], torch.eye(2)[None],
            ...                         "GPT2LMHeadModel", "gpt2")
            >>> att.token_labels
            ['a', '#8582']
        """
        if len(self.labels) == len(self.tokens):
            return list(self.labels)
        return byte_labels(None, self.token_ids, self.tokens)

    def _position(self, position: int) -> int:
        n = len(self.tokens)
        number = as_int(position)
        if number is None or not -n <= number < n:
            raise AttentionToolError(
                f"position {position!r} is out of range for a prompt of {n} tokens "
                f"(use {-n}..{n - 1})"
            )
        return number % n

    def of(self, head: int) -> torch.Tensor:
        """The ``[query, key]`` pattern of one head of the block (negative allowed).

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-llama", progress=False)
            >>> att = attention_patterns(Inspector(model), "Hi there", 0, tokenizer=tok)
            >>> att.of(-1).shape == (len(att.tokens), len(att.tokens))
            True
        """
        number = as_int(head)
        if number is None or not -self.num_heads <= number < self.num_heads:
            raise LocatorError(
                f"head {head!r} is out of range for block[{self.block}]: {self.num_heads} "
                f"heads (use 0..{self.num_heads - 1}, or negative from the end)"
            )
        number %= self.num_heads
        if number not in self.heads:
            raise LocatorError(f"head {number} was not read (read: {self.heads})")
        return self.pattern[self.heads.index(number)]

    def strongest(self, position: int = -1, k: int = 1) -> list[list[tuple[int, float]]]:
        """Per head, the ``k`` keys query ``position`` attends to most: ``(key, weight)``.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-llama", progress=False)
            >>> att = attention_patterns(Inspector(model), "Hi there", 0, tokenizer=tok)
            >>> best = att.strongest(-1, k=2)
            >>> len(best) == len(att.heads), best[0][0][1] >= best[0][1][1]
            (True, True)
        """
        q = self._position(position)
        wanted = _whole("k", k, 1)
        row = self.pattern[:, q, :]
        top = row.topk(min(wanted, row.shape[-1]), dim=-1)
        return [
            [(int(i), float(v)) for i, v in zip(idx.tolist(), val.tolist(), strict=True)]
            for idx, val in zip(top.indices, top.values, strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: the tokens and, per head, its ``[query][key]`` weights.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-llama", progress=False)
            >>> data = attention_patterns(Inspector(model), "Hi", 1, head=2, tokenizer=tok).to_dict()
            >>> data["block"], [h["head"] for h in data["heads"]]
            (1, [2])
        """
        return {
            "model_class": self.model_class,
            "adapter": self.adapter,
            "block": self.block,
            "num_heads": self.num_heads,
            "tokens": list(self.tokens),
            "token_ids": list(self.token_ids),
            "heads": [
                {"head": h, "pattern": self.pattern[i].tolist()} for i, h in enumerate(self.heads)
            ],
        }

    def plot(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        title: str | None = None,
        dpi: int = 150,
        model: str | None = None,
        prompt: str | None = None,
    ) -> Any:
        """A grid of the heads' patterns (or one head, large): query down, key across, 0 to 1.

        Tokens label both axes (on the outer panels of a grid) at 7 points or more: where
        there are more tokens than fit at that size, every second (third, ...) token is
        labelled, and only positions where there are too many to read. A lone byte of a
        multi-byte character is labelled by its bytes (``<0xF0><0x9F>``, :attr:`labels`), or by
        its id (``#8582``) where the tokenizer did not name them. The title names ``model``
        and ``prompt`` (default: :attr:`model_name` and :attr:`prompt`, as recorded). Writes a
        PNG (or .svg, .pdf; atomically) when ``path`` is given; returns the matplotlib Figure.

        Example:
            >>> from importlib.util import find_spec
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-llama", progress=False)
            >>> att = attention_patterns(Inspector(model), "Hi there", 0, tokenizer=tok)
            >>> figure = att.plot() if find_spec("matplotlib") else None
        """
        Figure, FigureCanvasAgg, _ = _matplotlib()
        n = len(self.tokens)
        count = len(self.heads)
        single = count == 1
        cols = 1 if single else math.ceil(math.sqrt(count))
        rows = math.ceil(count / cols)
        if single:
            panel = min(12.0, max(4.0, 0.28 * n))
        else:
            panel = min(5.5, max(2.4, 0.17 * n), 22.0 / cols)
        labelled = n <= (80 if single else 48)
        # Tick labels never shrink below _TICK_FONT: where the tokens do not fit at that size,
        # every step-th one is labelled.
        room = panel * 72 * _TICK_SPACING / max(n, 1)
        font = min(9.0, max(_TICK_FONT, room))
        step = max(1, math.ceil(font / room))
        label_room = 1.2 if labelled else 0.5
        width = cols * panel + label_room + 1.0
        height = rows * panel + label_room + 0.9
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
        data = self.pattern.float().clone()
        if self.causal:
            upper = torch.ones(n, n, dtype=torch.bool).triu(1)
            data[:, upper] = float("nan")
        image = None
        labels = [_plain(label, 12) for label in self.token_labels]  # "<0xF0><0x9F>" whole
        for i in range(rows * cols):
            ax = axes[i // cols][i % cols]
            if i >= count:
                ax.set_axis_off()
                continue
            image = ax.imshow(
                data[i].numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest"
            )
            ax.set_facecolor("#eeeeee")
            ax.set_title(f"head {self.heads[i]}", fontsize=10 if single else 8)
            ticks = list(range(0, n, step) if labelled else range(0, n, max(1, n // 10)))
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            if labelled:
                ax.set_xticklabels([labels[t] for t in ticks], rotation=90, fontsize=font)
                ax.set_yticklabels([labels[t] for t in ticks], fontsize=font)
            else:
                ax.tick_params(labelsize=_TICK_FONT)
            ax.tick_params(labelbottom=i // cols == rows - 1 or i + cols >= count)
            ax.tick_params(labelleft=i % cols == 0)
        fig.supxlabel("key (attended to)", fontsize=9)
        fig.supylabel("query (attending)", fontsize=9)
        if image is not None:
            fig.colorbar(image, ax=axes, label="attention weight", shrink=0.8)
        what = f"head {self.heads[0]}" if single else f"{count} heads"
        named = (model or self.model_name or self.model_class) + prompt_title(prompt or self.prompt)
        heading = title or f"attention of block[{self.block}], {what}: {named}"
        fig.suptitle(textwrap.fill(heading, max(40, int(width * 11))), fontsize=10)
        if path is not None:
            _save_atomically(fig, Path(path), dpi)
        return fig

    def _repr_html_(self) -> str:
        return attention_view(self).html()

    def to_html(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        force: bool = False,
        overwrite: bool | None = None,
    ) -> str:
        """The interactive patterns (a head, or all heads) as one self-contained page,
        written atomically to ``path`` when given (an existing file only with ``force``;
        ``overwrite=`` is its deprecated name); returns the page.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-llama", progress=False)
            >>> att = attention_patterns(Inspector(model), "Hi there", 0, tokenizer=tok)
            >>> att.to_html().count('data-kind="attention"')
            1
        """
        replace = forced(force, overwrite)  # a contradiction is an error before any work
        return save_view(attention_view(self), path, force=replace)

    def __repr__(self) -> str:
        return (
            f"AttentionPatterns({self.model_class}, block={self.block}, heads={self.heads}, "
            f"tokens={len(self.tokens)})"
        )


def attention_patterns(
    inspector: Inspector,
    inputs: str | torch.Tensor | Mapping[str, Any],
    block: int,
    *,
    head: int | None = None,
    tokenizer: Any = None,
    batch_index: int = 0,
) -> AttentionPatterns:
    """Run the model once and read the attention patterns of ``block`` (all heads or ``head``).

    ``inputs`` is a prompt (with ``tokenizer``), a tensor of token ids or a dict of model
    inputs; ``batch_index`` picks the sequence of a batch. ``block`` and ``head`` may be
    negative; a block out of range, a head out of range or a model without attention heads is
    an error before the model runs. The forward stops once the block's pattern is recorded.

    Example:
        >>> from introspect import Inspector
        >>> from introspect.zoo import load_model
        >>> model, tok = load_model("toy-llama", progress=False)
        >>> att = attention_patterns(Inspector(model), "Tokyo is", -1, tokenizer=tok)
        >>> att.block, att.heads, bool(att.pattern.sum(-1).allclose(torch.tensor(1.0)))
        (3, [0, 1, 2, 3], True)
    """
    insp = inspector
    number = as_int(block)
    if number is None:
        raise LocatorError(f"block must be a block index (an int, -1 = the last), got {block!r}")
    insp.locator(f"block[{number}]")  # out of range: say so about the block
    loc = insp.locator(f"block[{number}].attn.pattern")
    insp.module(loc)  # no attention heads here: an error before anything runs
    assert loc.index is not None
    heads = insp.num_heads_in()
    if head is not None:
        wanted = as_int(head)
        if wanted is None or not -heads <= wanted < heads:
            raise LocatorError(
                f"head {head!r} is out of range for block[{loc.index}]: {heads} heads (use "
                f"0..{heads - 1}, or negative from the end)"
            )
        chosen = [wanted % heads]
    else:
        chosen = list(range(heads))
    index = as_int(batch_index)
    if index is None:
        raise AttentionToolError(f"batch_index must be a whole number, got {batch_index!r}")
    model_inputs = model_inputs_of(
        insp.model, inputs, tokenizer, "attention_patterns", AttentionToolError
    )
    ids = model_inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise AttentionToolError("attention_patterns needs 'input_ids' among the inputs")
    ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
    batch = int(ids.shape[0])
    if not -batch <= index < batch:
        raise AttentionToolError(
            f"batch_index {index} is out of range for a batch of {batch} (use "
            f"{-batch}..{batch - 1})"
        )
    index %= batch
    with torch.no_grad(), insp.capture(loc, detach=True, stop=True) as cap:
        insp.model(**model_inputs)
    pattern = cap[str(loc)].output[index].float().cpu()
    if pattern.shape[0] != heads:
        raise AttentionToolError(
            f"{loc} has {pattern.shape[0]} heads where the model's config says {heads}"
        )
    seq_ids = ids[index].cpu()
    mask = model_inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and int(mask[index].sum()) < len(seq_ids):
        keep = mask[index].cpu().bool()
        seq_ids = seq_ids[keep]
        pattern = pattern[:, keep][:, :, keep]
    pattern = pattern[chosen]
    n = int(pattern.shape[-1])
    causal = n > 1 and bool((pattern.triu(1) == 0).all())
    token_ids = [int(i) for i in seq_ids.tolist()]
    tokens = token_strings(tokenizer, seq_ids)
    model_class = type(insp.model).__name__
    return AttentionPatterns(
        block=loc.index,
        heads=chosen,
        num_heads=heads,
        token_ids=token_ids,
        tokens=tokens,
        pattern=pattern,
        model_class=model_class,
        adapter=insp.adapter.name,
        causal=causal,
        model_name=model_title(tokenizer, model_class, insp.adapter.name),
        prompt=inputs if isinstance(inputs, str) else prompt_text(tokenizer, token_ids),
        labels=byte_labels(tokenizer, token_ids, tokens),
    )
