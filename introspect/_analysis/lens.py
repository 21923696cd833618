"""The logit lens: what the model would predict if it stopped after each block.

Each block's output (the residual stream) goes through exactly what the model applies after
its last block, :meth:`Inspector.logits <introspect.Inspector.logits>`: the final norm and
anything else Hugging Face applies there (``finish``), the unembedding, and the architecture's
logit extras (soft-capping, logit scales). So the lens at the last block *is* the model's own
prediction; :attr:`LensResult.max_diff` reports how far it is from the model's logits (zero up
to float rounding).

Example:
    >>> from introspect import Inspector
    >>> from introspect.zoo import load_model
    >>> model, tokenizer = load_model("toy-gpt2", progress=False)
    >>> lens = Inspector(model).logit_lens("Tokyo is the capital of", tokenizer=tokenizer)
    >>> lens.rows
    ['block[0]', 'block[1]', 'block[2]', 'block[3]']
    >>> lens.max_diff < 1e-4
    True
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from introspect._batching import as_int
from introspect._errors import CaptureError, LocatorError, MissingDependencyError, ViewError
from introspect._export import write_atomically
from introspect._html import (
    byte_label,
    forced,
    lens_view,
    model_title,
    prompt_text,
    prompt_title,
    save_view,
)
from introspect._locators import Locator
from introspect._text import (
    TokenLike,
    as_token_id,
    model_inputs_of,
    show_token,
    token_strings,
)

if TYPE_CHECKING:
    from introspect._model.view import Analysable

__all__ = ["LensResult", "Translators", "logit_lens", "main_blocks", "show_token"]

# show_token lives with the other text helpers; it stays importable from here.


def _plain_char(ch: str) -> str:
    return "\u2423" if ch == " " else ch if ch.isprintable() else repr(ch)[1:-1]


def _plain(token: str, width: int) -> str:
    # A leading space is part of the token (" the" is not "the"): show every space as ␣ and
    # escape what would not print, so no two different tokens look alike in a picture.
    text = "".join(_plain_char(ch) for ch in token)
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text


def _token_label(token: str, token_id: int, tokenizer: Any, width: int) -> str:
    """A token as a picture labels it: :func:`_plain` of its :func:`byte_label` (a lone
    byte of a multi-byte character by its bytes, ``<0xE2><0x80>``, where the tokenizer names
    them, by its id, ``#8582``, where it does not)."""
    return _plain(byte_label(token, token_id, tokenizer), width)


def _format_prob(prob: float) -> str:
    return f"{prob:.3f}" if prob >= 0.001 or prob == 0.0 else f"{prob:.1e}"


# Sizes of the lens picture, in inches.
_CELL_WIDTH = 0.62
_CELL_HEIGHT = 0.3
_MAX_HEATMAP_WIDTH = 30.0
_MAX_HEATMAP_HEIGHT = 24.0
_SIDE_WIDTH = 2.6
_COLORBAR_WIDTH = 0.18
_RANKS_SHOWN = 100
_TARGET_COLORS = ("#e6550d", "#31a354", "#d62728", "#756bb1", "#8c564b")
_LOG_FLOOR = 1e-20
"""The least probability the target panel's log axis reaches."""


class Translators(Protocol):
    """What ``logit_lens(..., tuned=...)`` reads each row through before the model's head.

    :class:`introspect.TunedLens` is one. ``check`` refuses another model and rows without a
    translator (before the forward), ``default_blocks`` names the rows shown when ``blocks``
    is None, ``translate`` maps a row's value to what the head reads.
    """

    def check(self, inspector: Analysable, rows: Sequence[Locator] = ()) -> None: ...

    def default_blocks(self, inspector: Analysable) -> list[int]: ...

    def translate(
        self, inspector: Analysable, hidden: torch.Tensor, row: Locator | str
    ) -> torch.Tensor: ...


@dataclass
class LensResult:
    """The logit lens on one prompt: per row (a block) and position, the top-k next tokens.

    ``top_ids``/``top_probs`` are ``[rows, positions, k]``; ``logits`` (when kept) is
    ``[rows, positions, vocab]`` in float32 on the CPU; ``model_logits`` is the model's own
    ``[positions, vocab]``. Positions are indices into the prompt's tokens, and a row's
    prediction at position ``p`` is for the token after ``tokens[p]``.
    """

    model_class: str
    adapter: str
    num_blocks: int
    token_ids: list[int]
    tokens: list[str]
    rows: list[str]
    positions: list[int]
    k: int
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_tokens: list[list[list[str]]]
    logits: torch.Tensor | None
    model_logits: torch.Tensor | None
    max_diff: float | None
    """Largest |lens logits - model logits| at the last block (None if that row is absent)."""
    targets: list[int] = field(default_factory=list)
    """Token ids to follow: :meth:`table`, :meth:`to_dict` and :meth:`plot` show them."""
    tokenizer: Any = field(default=None, repr=False, compare=False)
    """The tokenizer the prompt was read with (None for token ids): targets may be text."""
    lens: str = "logit"
    """Which read-out: ``"logit"``, or ``"tuned"`` (each row through a tuned lens's
    translator first)."""

    def token_id(self, token: TokenLike) -> int:
        """The id of one token, given as its id or (with a tokenizer) its exact text.

        Text that is not exactly one token is an error that shows how it tokenizes.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> lens = Inspector(model).logit_lens("Hi", tokenizer=tok)
            >>> lens.token_id("a") == tok.encode("a")[0], lens.token_id(7)
            (True, 7)
        """
        vocab = self.logits.shape[-1] if self.logits is not None else None
        return as_token_id(token, self.tokenizer, vocab)

    def _label(self, token_id: int) -> str:
        return token_strings(self.tokenizer, [token_id])[0]

    def _targets(self, targets: Sequence[TokenLike] | None) -> list[int]:
        if targets is None:
            return list(self.targets)
        if isinstance(targets, str | int):
            targets = [targets]
        return [self.token_id(t) for t in targets]

    def column(self, position: int) -> int:
        """The column of a prompt position (negative counts from the end of the prompt).

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-llama", progress=False)
            >>> ids = torch.tensor([[5, 6, 7]])
            >>> lens = Inspector(model).logit_lens(ids, positions=[0, -1])
            >>> lens.positions, lens.column(-1)
            ([0, 2], 1)
        """
        n = len(self.tokens)
        resolved = position + n if position < 0 else position
        if resolved not in self.positions:
            raise CaptureError(
                f"position {position} was not computed: this lens has positions "
                f"{self.positions} of a {n}-token prompt (pass positions=None for all)"
            )
        return self.positions.index(resolved)

    def row(self, block: int | str) -> int:
        """The row of a block: an index (``-1`` is the model's last block) or a locator.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> lens = Inspector(model).logit_lens("Hi", tokenizer=tok, blocks=[-2, -1])
            >>> lens.row(-1), lens.row("block[2]")
            (1, 0)
        """
        text = f"block[{block}]" if isinstance(block, int) else block
        label = text
        loc = Locator.parse(text)
        if loc.is_block and not loc.is_slice and loc.index is not None:
            label = str(loc.resolve_index(self.num_blocks, self.adapter))
        if label not in self.rows:
            raise LocatorError(f"{text} is not a row of this lens; rows: {', '.join(self.rows)}")
        return self.rows.index(label)

    def _need_logits(self) -> torch.Tensor:
        if self.logits is None:
            raise CaptureError("this lens was computed with keep_logits=False: recompute it")
        return self.logits

    def probs_of(self, token: TokenLike, position: int = -1) -> list[float]:
        """The probability of ``token`` (an id, or its text) at ``position``, one per row.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> lens = Inspector(model).logit_lens("Hello", tokenizer=tok)
            >>> len(lens.probs_of("a")) == len(lens.rows)
            True
        """
        token_id = self.token_id(token)
        logits = self._need_logits()[:, self.column(position)]
        return [float(p) for p in logits.softmax(-1)[:, token_id]]

    def ranks_of(self, token: TokenLike, position: int = -1) -> list[int]:
        """The rank of ``token`` (an id, or its text) at ``position`` per row (0 = the top).

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> lens = Inspector(model).logit_lens("Hello", tokenizer=tok)
            >>> lens.ranks_of(int(lens.top_ids[-1, -1, 0]))[-1]
            0
            >>> lens.ranks_of("a") == lens.ranks_of(tok.encode("a")[0])
            True
        """
        token_id = self.token_id(token)
        logits = self._need_logits()[:, self.column(position)]
        target = logits[:, token_id : token_id + 1]
        return [int(n) for n in (logits > target).sum(-1)]

    def first_row_in_top(self, token: TokenLike, k: int = 5, position: int = -1) -> str | None:
        """The first row (in order) where ``token`` (an id, or its text) is in the top ``k``.

        None when it never is.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> lens = Inspector(model).logit_lens("Hello", tokenizer=tok)
            >>> lens.first_row_in_top(int(lens.top_ids[-1, -1, 0]), k=1) is not None
            True
        """
        if as_int(k) is None or k < 1:
            raise CaptureError(f"k must be a whole number of at least 1, got {k!r}")
        for label, rank in zip(self.rows, self.ranks_of(token, position), strict=True):
            if rank < k:
                return label
        return None

    def _follow(self, col: int, ids: Sequence[int]) -> list[tuple[list[int], list[float]]]:
        """Per target id: its rank and probability in every row, at one column."""
        if not ids:
            return []
        logits = self._need_logits()[:, col]
        probs = logits.softmax(-1)
        out = []
        for token_id in ids:
            ranks = (logits > logits[:, token_id : token_id + 1]).sum(-1)
            out.append(([int(n) for n in ranks], [float(x) for x in probs[:, token_id]]))
        return out

    def table(
        self, position: int = -1, targets: Sequence[TokenLike] | None = None
    ) -> tuple[list[str], list[list[str]]]:
        """Headers and rows of the top-k table at one position, for printing.

        Each target (default: :attr:`targets`) adds a column of its rank and probability,
        ``#1`` being the top prediction.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> lens = Inspector(model).logit_lens("Hi", tokenizer=tok, k=2)
            >>> headers, rows = lens.table(targets=["a"])
            >>> headers
            ['block', 'top-1', 'top-2', "'a'"]
            >>> rows[-1][-1].startswith("#")
            True
        """
        col = self.column(position)
        ids = self._targets(targets)
        followed = self._follow(col, ids)
        headers = ["block"] + [f"top-{i + 1}" for i in range(self.k)]
        headers += [show_token(self._label(i), 18) for i in ids]
        rows = []
        for r, label in enumerate(self.rows):
            cells = [
                f"{show_token(self.top_tokens[r][col][j], 18)} {float(self.top_probs[r, col, j]):.3f}"
                for j in range(self.k)
            ]
            cells += [f"#{ranks[r] + 1} {_format_prob(probs[r])}" for ranks, probs in followed]
            rows.append([label, *cells])
        return headers, rows

    def to_dict(
        self, positions: Sequence[int] | None = None, targets: Sequence[TokenLike] | None = None
    ) -> dict[str, Any]:
        """A JSON-ready dict (optionally only some positions).

        With targets (default: :attr:`targets`), each row also has ``targets``: every
        target's ``rank`` (0 = the top, as :meth:`ranks_of`) and ``prob``.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> data = Inspector(model).logit_lens("Hi there", tokenizer=tok).to_dict([-1])
            >>> sorted(data)[:4], data["lens"], len(data["positions"])
            (['adapter', 'k', 'lens', 'max_diff'], 'logit', 1)
            >>> lens = logit_lens(Inspector(model), "Hi", tokenizer=tok, targets=["a"])
            >>> sorted(lens.to_dict()["positions"][0]["rows"][-1]["targets"][0])
            ['id', 'prob', 'rank', 'token']
        """
        cols = (
            [self.column(p) for p in positions]
            if positions is not None
            else list(range(len(self.positions)))
        )
        ids = self._targets(targets)
        labels = [self._label(i) for i in ids]
        out_positions = []
        for col in cols:
            pos = self.positions[col]
            followed = self._follow(col, ids)
            rows = []
            for r, label in enumerate(self.rows):
                row: dict[str, Any] = {
                    "row": label,
                    "top": [
                        {
                            "token": self.top_tokens[r][col][j],
                            "id": int(self.top_ids[r, col, j]),
                            "prob": float(self.top_probs[r, col, j]),
                        }
                        for j in range(self.k)
                    ],
                }
                if ids:
                    row["targets"] = [
                        {"token": text, "id": i, "rank": ranks[r], "prob": probs[r]}
                        for text, i, (ranks, probs) in zip(labels, ids, followed, strict=True)
                    ]
                rows.append(row)
            out_positions.append({"position": pos, "input_token": self.tokens[pos], "rows": rows})
        diff = self.max_diff
        data: dict[str, Any] = {
            "model_class": self.model_class,
            "adapter": self.adapter,
            "lens": self.lens,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "k": self.k,
            "max_diff": diff if diff is None or math.isfinite(diff) else None,
        }
        if ids:
            data["targets"] = [
                {"token": text, "id": i} for text, i in zip(labels, ids, strict=True)
            ]
        data["positions"] = out_positions
        return data

    def plot(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        title: str | None = None,
        dpi: int = 150,
        targets: Sequence[TokenLike] | None = None,
        position: int = -1,
        scale: str = "log",
        model: str | None = None,
    ) -> Any:
        """A heatmap of the top token's probability by row (block) x position, labelled.

        Each cell shows the top next-token prediction (spaces drawn as ``␣``, a lone byte of
        a multi-byte character as ``<0xE2>``); the x axis shows the input tokens; the last
        block's row, the model's own output, says so. Each target (default: :attr:`targets`)
        gets a coloured box around the cells where it is the top prediction, and a panel
        beside the heatmap draws its probability after each block at ``position``, on a log
        axis by default (``scale="log"``: a climb from 1e-6 to 1e-2 shows, where a linear
        axis draws every row before the last few at 0) or ``scale="linear"``. The title names
        the model (``model``, default: the tokenizer's ``name_or_path``) and the prompt. The
        figure's width follows the number of positions. Writes a PNG (or .svg, .pdf;
        atomically) when ``path`` is given; returns the matplotlib Figure.

        Example:
            >>> from importlib.util import find_spec
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> lens = Inspector(model).logit_lens("Hi there", tokenizer=tok)
            >>> figure = lens.plot(targets=["a"]) if find_spec("matplotlib") else None
        """
        if scale not in ("log", "linear"):
            raise ViewError(
                f"scale must be 'log' or 'linear' (the target panel's axis), got {scale!r}"
            )
        ids = self._targets(targets)
        col = self.column(position)
        followed = self._follow(col, ids)
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
            from matplotlib.patches import Rectangle
        except ImportError:
            raise MissingDependencyError(
                'plotting needs matplotlib: pip install matplotlib (or "introspect-lm[demo]")'
            ) from None
        n_rows, n_cols = len(self.rows), len(self.positions)
        # Inches per cell: wide enough for a 10-character token at 7 pt; a long prompt or a
        # deep model shrinks cells and type instead of growing a picture nobody can open.
        col_in = min(_CELL_WIDTH, _MAX_HEATMAP_WIDTH / n_cols)
        row_in = min(_CELL_HEIGHT, _MAX_HEATMAP_HEIGHT / n_rows)
        font = max(4.0, 7.0 * min(col_in / _CELL_WIDTH, row_in / _CELL_HEIGHT))
        heat_w = max(3.0, col_in * n_cols)
        side_w = _SIDE_WIDTH if ids else 0.0
        width = heat_w + side_w + 2.6  # row labels and the colour bar with its label
        height = max(3.0, row_in * n_rows + 2.2)
        probs = self.top_probs[:, :, 0].float().numpy()
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        # Heatmap, colour bar and target panel in one row of a grid, so all three keep the
        # heatmap's full height (a colour bar attached to one of two shared axes shrinks).
        ratios = [heat_w, _COLORBAR_WIDTH] + ([side_w] if ids else [])
        grid = fig.add_gridspec(1, len(ratios), width_ratios=ratios)
        ax = fig.add_subplot(grid[0, 0])
        cax = fig.add_subplot(grid[0, 1])
        side = fig.add_subplot(grid[0, 2], sharey=ax) if ids else None
        image = ax.imshow(probs, aspect="auto", origin="lower", cmap="Blues", vmin=0.0, vmax=1.0)
        for r in range(n_rows):
            for c in range(n_cols):
                ax.text(
                    c,
                    r,
                    _token_label(
                        self.top_tokens[r][c][0], int(self.top_ids[r, c, 0]), self.tokenizer, 10
                    ),
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if float(probs[r, c]) > 0.55 else "black",
                )
        colors = [_TARGET_COLORS[i % len(_TARGET_COLORS)] for i in range(len(ids))]
        for token_id, color in zip(ids, colors, strict=True):
            top1 = (self.top_ids[:, :, 0] == token_id).nonzero().tolist()
            for r, c in top1:
                ax.add_patch(
                    Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=color, linewidth=2.2)
                )
        ax.set_xticks(range(n_cols))
        ax.set_xticklabels(
            [self._shown(p, 12) for p in self.positions],
            rotation=40,
            ha="right",
            fontsize=max(font, 6.0),
        )
        row_labels = list(self.rows)
        last = f"block[{self.num_blocks - 1}]"
        if row_labels and row_labels[-1] == last:
            row_labels[-1] = f"{last} = output"
        ax.set_yticks(range(n_rows))
        ax.set_yticklabels(row_labels, fontsize=7 if n_rows > 16 else 9)
        if row_labels[-1].endswith("= output"):
            # The lens at the last block is the model's own prediction, not a reading of it.
            ax.get_yticklabels()[-1].set_fontweight("bold")
            ax.axhline(n_rows - 1.5, color="black", linewidth=1.0)
        ax.set_xlabel("input token (each cell: the top prediction for the next token)")
        ax.set_ylabel("residual stream after")
        fig.colorbar(image, cax=cax, label="probability of the top token")
        if side is not None:
            where = self.positions[col]
            # On a log axis the lowest decade shown holds the least probability drawn, down to
            # _LOG_FLOOR; anything below (a 0 is float32's underflow) is drawn at the floor.
            drawn = [p for _, probs in followed for p in probs if p > 0]
            floor = max(_LOG_FLOOR, 10 ** math.floor(math.log10(min(drawn)))) if drawn else 1e-6
            clipped = any(p < floor for _, probs in followed for p in probs)
            for token_id, color, (ranks, target_probs) in zip(ids, colors, followed, strict=True):
                shown = [max(p, floor) for p in target_probs] if scale == "log" else target_probs
                label = _token_label(self._label(token_id), token_id, self.tokenizer, 16)
                side.plot(
                    shown,
                    range(n_rows),
                    marker="o",
                    markersize=3,
                    color=color,
                    label=f"{label} (boxed where top-1)",
                )
                # Ranks tell the climb where probabilities are tiny: label the close ones.
                for r, (rank, prob) in enumerate(zip(ranks, shown, strict=True)):
                    if rank < _RANKS_SHOWN:
                        side.annotate(
                            f"#{rank + 1}",
                            (prob, r),
                            xytext=(4, 0),
                            textcoords="offset points",
                            va="center",
                            fontsize=7,
                            color=color,
                        )
            if scale == "log":
                side.set_xscale("log")
                side.set_xlim(floor, 1.0)
            else:
                side.set_xlim(0.0, 1.0)
            side.set_xlabel(
                f"probability after {self._shown(where, 12)} (position {where})"
                + (", log scale" if scale == "log" else "")
                + (f" (below {floor:.0e} drawn at it)" if scale == "log" and clipped else "")
            )
            side.grid(axis="x", alpha=0.3)
            side.legend(loc="lower right", fontsize=8)
            side.tick_params(axis="y", labelleft=False)
        name = model or model_title(self.tokenizer, self.model_class, self.adapter)
        prompt = prompt_title(prompt_text(self.tokenizer, self.token_ids))
        heading = title or f"{self.lens} lens: {name}{prompt}"
        fig.suptitle(textwrap.fill(heading, max(40, int(width * 9))))
        if path is not None:
            _save_atomically(fig, Path(path), dpi)
        return fig

    def _shown(self, position: int, width: int) -> str:
        """The input token at ``position`` as the picture labels it."""
        return _token_label(self.tokens[position], self.token_ids[position], self.tokenizer, width)

    def _repr_html_(self) -> str:
        return lens_view(self).html()

    def to_html(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        targets: Sequence[int | str] | None = None,
        force: bool = False,
        overwrite: bool | None = None,
    ) -> str:
        """The interactive lens grid as one self-contained page (see ``docs/views.md``),
        written atomically to ``path`` when given (an existing file only with ``force``;
        ``overwrite=`` is its deprecated name); returns the page.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> lens = Inspector(model).logit_lens("Hi", tokenizer=tok)
            >>> lens.to_html().startswith("<!doctype html>")
            True
        """
        replace = forced(force, overwrite)  # a contradiction is an error before any work
        return save_view(lens_view(self, targets=targets), path, force=replace)

    def __repr__(self) -> str:
        return (
            f"LensResult({self.model_class}, rows={len(self.rows)}, positions={self.positions}, "
            f"k={self.k}, max_diff={self.max_diff}{', lens=tuned' if self.lens == 'tuned' else ''})"
        )


def _save_atomically(fig: Any, path: Path, dpi: int) -> None:
    suffix = path.suffix.lstrip(".") or "png"
    with warnings.catch_warnings():
        # Tokens in scripts the default font lacks are drawn as boxes, not errors.
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        write_atomically(
            [(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=suffix, bbox_inches="tight"))]
        )


def main_blocks(
    insp: Analysable, blocks: int | str | Sequence[int | str] | None, what: str
) -> list[Locator]:
    """The main-stack block locators ``blocks`` names: ints (negative allowed) or locators
    such as ``block[10:]``; ``None`` is every block. ``what`` says what the caller reads, in
    errors (``"the logit lens reads block outputs"``).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64))
        >>> [str(x) for x in main_blocks(Inspector(m), [0, "block[-1:]"], "the lens reads")]
        ['block[0]', 'block[2]']
    """
    if blocks is None:
        wanted: list[int | str] = ["block[:]"]
    else:
        wanted = [blocks] if isinstance(blocks, str | int) else list(blocks)
        if not wanted:
            raise LocatorError("blocks is empty: pass None for every block, or e.g. [0, -1]")
    texts = []
    for b in wanted:
        index = as_int(b)
        if index is None and not isinstance(b, str):
            raise LocatorError(
                f"blocks holds {b!r}: each is a block index (an int, -1 = the last block) or "
                "a locator such as 'block[10:]'"
            )
        texts.append(f"block[{index}]" if index is not None else str(b))
    locs = insp.expand(texts)
    for loc in locs:
        if not loc.is_block or loc.sub is not None or loc.side != "output" or loc.stack:
            raise LocatorError(
                f"{what} of the main stack; {loc} is not one "
                "(use e.g. blocks=[0, -1] or blocks=['block[10:]'])"
            )
    return locs


def _rows(
    insp: Analysable, blocks: Sequence[int | str] | None, include_embed: bool
) -> list[Locator]:
    locs = main_blocks(insp, blocks, "the logit lens reads block outputs")
    if include_embed:
        first = insp.hidden_state_locator(0)
        if first.side != "input":
            raise LocatorError(
                f"adapter {insp.adapter.name!r} has no embedding entry in hidden_states "
                "(its first entry is a block output): drop include_embed"
            )
        locs.insert(0, first)
    return locs


def logit_lens(
    inspector: Analysable,
    inputs: str | torch.Tensor | Mapping[str, Any],
    *,
    tokenizer: Any = None,
    positions: Sequence[int] | None = None,
    k: int = 5,
    blocks: Sequence[int | str] | None = None,
    include_embed: bool = False,
    keep_logits: bool = True,
    batch_index: int = 0,
    targets: Sequence[TokenLike] | None = None,
    tuned: Translators | None = None,
) -> LensResult:
    """Run the model once and read every block's output through the model's own head.

    ``inputs`` is a prompt (with ``tokenizer``), a tensor of token ids or a dict of model
    inputs. ``positions`` (default: all) are prompt positions, negative allowed; ``blocks``
    picks rows (ints or locators such as ``"block[10:]"``, default all); ``include_embed``
    adds the residual stream entering block 0 as a first row. ``batch_index`` picks the
    sequence when ``inputs`` hold a batch. ``targets`` are tokens to follow (ids, or their
    exact text with a tokenizer): the table, the JSON and the plot show their rank and
    probability. ``tuned`` (a :class:`~introspect.TunedLens`) reads each row through its
    translator first: the tuned lens, in the same result (``lens == "tuned"``); its rows
    default to the blocks it has trained translators for and the last block. Every argument
    is checked before the model runs.

    Example:
        >>> from introspect import Inspector
        >>> from introspect.zoo import load_model
        >>> model, tok = load_model("toy-llama", progress=False)
        >>> lens = logit_lens(Inspector(model), "The capital of France is", tokenizer=tok, k=3)
        >>> lens.top_probs.shape[1:] == (len(lens.tokens), 3), lens.max_diff < 1e-4
        (True, True)
    """
    insp = inspector
    k_wanted = as_int(k)
    if k_wanted is None or k_wanted < 1:
        raise CaptureError(f"k must be a whole number of at least 1, got {k!r}")
    index_in_batch = as_int(batch_index)
    if index_in_batch is None:
        raise CaptureError(f"batch_index must be a whole number, got {batch_index!r}")
    chosen: list[int] | None = None
    if positions is not None:
        given = [positions] if isinstance(positions, int) else list(positions)
        if not given:
            raise CaptureError("positions is empty: pass None for every position, or e.g. [-1]")
        chosen = []
        for p in given:
            number = as_int(p)
            if number is None:
                raise CaptureError(
                    f"positions holds {p!r}: each is a whole number, negative counting from "
                    "the end of the prompt"
                )
            chosen.append(number)
    head = insp.module("lm_head")  # a model without a head has nothing to lens: say so now
    vocab = getattr(head, "out_features", None)
    if isinstance(targets, str | int):
        targets = [targets]
    target_ids = [
        as_token_id(t, tokenizer, vocab if isinstance(vocab, int) else None) for t in targets or ()
    ]
    model_inputs = model_inputs_of(insp.model, inputs, tokenizer, "logit_lens", CaptureError)
    if tuned is not None and blocks is None:
        blocks = tuned.default_blocks(insp)
    rows = _rows(insp, blocks, include_embed)
    if tuned is not None:
        tuned.check(insp, rows)  # another model, or a row without a translator: before the run
    ids_key = (
        "decoder_input_ids"
        if insp.adapter.encoder is not None and "decoder_input_ids" in model_inputs
        else "input_ids"
    )
    ids = model_inputs.get(ids_key)
    if not isinstance(ids, torch.Tensor):
        raise CaptureError(
            f"logit_lens needs {ids_key!r} among the inputs to name the prompt's tokens"
        )
    batch = ids.shape[0] if ids.dim() == 2 else 1
    if not -batch <= index_in_batch < batch:
        raise CaptureError(
            f"batch_index {index_in_batch} is out of range for a batch of {batch} "
            f"(use {-batch}..{batch - 1})"
        )
    batch_index = index_in_batch % batch
    seq_ids = ids[batch_index] if ids.dim() == 2 else ids
    n = int(seq_ids.shape[-1])
    wanted = list(range(n)) if chosen is None else chosen
    resolved = []
    for p in wanted:
        if not -n <= p < n:
            raise CaptureError(
                f"position {p} is out of range for a prompt of {n} tokens (use {-n}..{n - 1})"
            )
        resolved.append(p + n if p < 0 else p)
    index = torch.tensor(resolved, dtype=torch.long)

    with torch.no_grad():
        with insp.capture(*rows, detach=True) as cap:
            output = insp.model(**model_inputs)
        per_row = []
        for loc in rows:
            rec = cap[str(loc.with_side("output"))]
            hidden = rec.input if loc.side == "input" else rec.output
            # What follows the last block acts on each position alone (HF itself slices the
            # positions before its head with logits_to_keep), so only the wanted ones run.
            picked = hidden[batch_index : batch_index + 1].index_select(1, index.to(hidden.device))
            if tuned is not None:
                picked = tuned.translate(insp, picked, loc)
            per_row.append(insp.logits(picked)[0].float().cpu())
        stacked = torch.stack(per_row)
        own = output.get("logits") if isinstance(output, Mapping) else None
        model_logits = (
            own[batch_index].index_select(0, index.to(own.device)).float().cpu()
            if isinstance(own, torch.Tensor)
            else None
        )
    top_k = min(k_wanted, stacked.shape[-1])
    top = stacked.softmax(-1).topk(top_k, dim=-1)
    last = f"block[{insp.num_blocks - 1}]"
    labels = [str(loc) for loc in rows]
    max_diff = None
    if model_logits is not None and last in labels:
        max_diff = float((stacked[labels.index(last)] - model_logits).abs().max())
    top_tokens = [
        [token_strings(tokenizer, top.indices[r, c]) for c in range(len(resolved))]
        for r in range(len(rows))
    ]
    return LensResult(
        model_class=type(insp.model).__name__,
        adapter=insp.adapter.name,
        num_blocks=insp.num_blocks,
        token_ids=[int(i) for i in seq_ids.tolist()],
        tokens=token_strings(tokenizer, seq_ids),
        rows=labels,
        positions=resolved,
        k=top_k,
        top_ids=top.indices,
        top_probs=top.values,
        top_tokens=top_tokens,
        logits=stacked if keep_logits else None,
        model_logits=model_logits,
        max_diff=max_diff,
        targets=[as_token_id(t, tokenizer, stacked.shape[-1]) for t in target_ids],
        tokenizer=tokenizer,
        lens="logit" if tuned is None else "tuned",
    )
