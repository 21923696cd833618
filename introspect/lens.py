"""The logit lens: what the model would predict if it stopped after each block.

Each block's output (the residual stream) goes through exactly what the model applies after
its last block, :meth:`Inspector.logits <introspect.Inspector.logits>`: the final norm and
anything else Hugging Face applies there (``finish``), the unembedding, and the architecture's
logit extras (soft-capping, logit scales). So the lens at the last block *is* the model's own
prediction; :attr:`LensResult.max_diff` reports how far it is from the model's logits (zero up
to float rounding).

Example:
    >>> from introspect import Inspector
    >>> from introspect.models import load_model
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
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from introspect.errors import CaptureError, LocatorError, MissingDependencyError
from introspect.locators import Locator
from introspect.models import encode_prompt, token_strings

if TYPE_CHECKING:
    from introspect.inspector import Inspector

__all__ = ["LensResult", "logit_lens", "show_token"]


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


def _plain(token: str, width: int) -> str:
    text = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if not text.strip():
        text = text.replace(" ", "\u2423")  # a visible space: a blank cell would read as missing
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text


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

    def column(self, position: int) -> int:
        """The column of a prompt position (negative counts from the end of the prompt).

        Example:
            >>> from introspect import Inspector
            >>> from introspect.models import load_model
            >>> model, tok = load_model("toy-llama", progress=False)
            >>> lens = Inspector(model).logit_lens("a b c", tokenizer=tok, positions=[0, -1])
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
            >>> from introspect.models import load_model
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

    def probs_of(self, token_id: int, position: int = -1) -> list[float]:
        """The probability of ``token_id`` at ``position``, one value per row.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.models import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> lens = Inspector(model).logit_lens("Hello", tokenizer=tok)
            >>> len(lens.probs_of(0)) == len(lens.rows)
            True
        """
        logits = self._need_logits()[:, self.column(position)]
        return [float(p) for p in logits.softmax(-1)[:, token_id]]

    def ranks_of(self, token_id: int, position: int = -1) -> list[int]:
        """The rank of ``token_id`` at ``position`` per row (0 = the top prediction).

        Example:
            >>> from introspect import Inspector
            >>> from introspect.models import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> lens = Inspector(model).logit_lens("Hello", tokenizer=tok)
            >>> lens.ranks_of(int(lens.top_ids[-1, -1, 0]))[-1]
            0
        """
        logits = self._need_logits()[:, self.column(position)]
        target = logits[:, token_id : token_id + 1]
        return [int(n) for n in (logits > target).sum(-1)]

    def first_row_in_top(self, token_id: int, k: int = 5, position: int = -1) -> str | None:
        """The first row (in order) where ``token_id`` is among the top ``k``, or None.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.models import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> lens = Inspector(model).logit_lens("Hello", tokenizer=tok)
            >>> lens.first_row_in_top(int(lens.top_ids[-1, -1, 0]), k=1) is not None
            True
        """
        for label, rank in zip(self.rows, self.ranks_of(token_id, position), strict=True):
            if rank < k:
                return label
        return None

    def table(self, position: int = -1) -> tuple[list[str], list[list[str]]]:
        """Headers and rows of the top-k table at one position, for printing.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.models import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> headers, rows = Inspector(model).logit_lens("Hi", tokenizer=tok, k=2).table()
            >>> headers
            ['block', 'top-1', 'top-2']
        """
        col = self.column(position)
        headers = ["block"] + [f"top-{i + 1}" for i in range(self.k)]
        rows = []
        for r, label in enumerate(self.rows):
            cells = [
                f"{show_token(self.top_tokens[r][col][j], 18)} {float(self.top_probs[r, col, j]):.3f}"
                for j in range(self.k)
            ]
            rows.append([label, *cells])
        return headers, rows

    def to_dict(self, positions: Sequence[int] | None = None) -> dict[str, Any]:
        """A JSON-ready dict (optionally only some positions).

        Example:
            >>> from introspect import Inspector
            >>> from introspect.models import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> data = Inspector(model).logit_lens("Hi there", tokenizer=tok).to_dict([-1])
            >>> sorted(data)[:4], len(data["positions"])
            (['adapter', 'k', 'max_diff', 'model_class'], 1)
        """
        cols = (
            [self.column(p) for p in positions]
            if positions is not None
            else list(range(len(self.positions)))
        )
        out_positions = []
        for col in cols:
            pos = self.positions[col]
            out_positions.append(
                {
                    "position": pos,
                    "input_token": self.tokens[pos],
                    "rows": [
                        {
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
                        for r, label in enumerate(self.rows)
                    ],
                }
            )
        diff = self.max_diff
        return {
            "model_class": self.model_class,
            "adapter": self.adapter,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "k": self.k,
            "max_diff": diff if diff is None or math.isfinite(diff) else None,
            "positions": out_positions,
        }

    def plot(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        title: str | None = None,
        dpi: int = 150,
    ) -> Any:
        """A heatmap of the top token's probability by row (block) x position, labelled.

        Each cell shows the top next-token prediction; the x axis shows the input tokens.
        Writes a PNG (atomically) when ``path`` is given; returns the matplotlib Figure.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.models import load_model
            >>> model, tok = load_model("toy-gpt2", progress=False)
            >>> fig = Inspector(model).logit_lens("Hi there", tokenizer=tok).plot()
            >>> type(fig).__name__
            'Figure'
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise MissingDependencyError(
                'plotting needs matplotlib: pip install matplotlib (or "introspect-lm[demo]")'
            ) from None
        n_rows, n_cols = len(self.rows), len(self.positions)
        probs = self.top_probs[:, :, 0].float().numpy()
        fig = Figure(figsize=(max(6.0, 1.1 * n_cols + 2.8), max(3.5, 0.3 * n_rows + 1.8)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        image = ax.imshow(probs, aspect="auto", origin="lower", cmap="Blues", vmin=0.0, vmax=1.0)
        for r in range(n_rows):
            for c in range(n_cols):
                value = float(probs[r, c])
                ax.text(
                    c,
                    r,
                    _plain(self.top_tokens[r][c][0], 10),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.55 else "black",
                )
        ax.set_xticks(range(n_cols))
        ax.set_xticklabels(
            [_plain(self.tokens[p], 12) for p in self.positions], rotation=40, ha="right"
        )
        ax.set_yticks(range(n_rows))
        ax.set_yticklabels(self.rows, fontsize=7 if n_rows > 16 else 9)
        ax.set_xlabel("input token (each cell: the top prediction for the next token)")
        ax.set_ylabel("residual stream after")
        ax.set_title(title or f"logit lens: {self.model_class} ({self.adapter} adapter)")
        fig.colorbar(image, ax=ax, label="probability of the top token")
        with warnings.catch_warnings():
            # Tokens in scripts the default font lacks are drawn as boxes, not errors.
            warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
            fig.tight_layout()
            if path is not None:
                _save_atomically(fig, Path(path), dpi)
        return fig

    def __repr__(self) -> str:
        return (
            f"LensResult({self.model_class}, rows={len(self.rows)}, positions={self.positions}, "
            f"k={self.k}, max_diff={self.max_diff})"
        )


def _save_atomically(fig: Any, path: Path, dpi: int) -> None:
    from introspect.export import write_atomically

    suffix = path.suffix.lstrip(".") or "png"
    write_atomically([(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=suffix))])


def _as_inputs(insp: Inspector, inputs: Any, tokenizer: Any) -> dict[str, Any]:
    if isinstance(inputs, str):
        return encode_prompt(tokenizer, inputs, insp.model)
    if isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
        return {"input_ids": ids}
    if isinstance(inputs, Mapping):
        return dict(inputs)
    raise CaptureError(
        f"logit_lens needs a prompt string, a tensor of token ids or a dict of model inputs, "
        f"got {type(inputs).__name__}"
    )


def _rows(
    insp: Inspector, blocks: Sequence[int | str] | None, include_embed: bool
) -> list[Locator]:
    texts = [f"block[{b}]" if isinstance(b, int) else b for b in (blocks or ["block[:]"])]
    locs = insp.expand(texts)
    for loc in locs:
        if not loc.is_block or loc.sub is not None or loc.side != "output" or loc.stack:
            raise LocatorError(
                f"the logit lens reads block outputs of the main stack; {loc} is not one "
                "(use e.g. blocks=[0, -1] or blocks=['block[10:]'])"
            )
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
    inspector: Inspector,
    inputs: str | torch.Tensor | Mapping[str, Any],
    *,
    tokenizer: Any = None,
    positions: Sequence[int] | None = None,
    k: int = 5,
    blocks: Sequence[int | str] | None = None,
    include_embed: bool = False,
    keep_logits: bool = True,
    batch_index: int = 0,
) -> LensResult:
    """Run the model once and read every block's output through the model's own head.

    ``inputs`` is a prompt (with ``tokenizer``), a tensor of token ids or a dict of model
    inputs. ``positions`` (default: all) are prompt positions, negative allowed; ``blocks``
    picks rows (ints or locators such as ``"block[10:]"``, default all); ``include_embed``
    adds the residual stream entering block 0 as a first row. ``batch_index`` picks the
    sequence when ``inputs`` hold a batch.

    Example:
        >>> from introspect import Inspector
        >>> from introspect.models import load_model
        >>> model, tok = load_model("toy-llama", progress=False)
        >>> lens = logit_lens(Inspector(model), "The capital of France is", tokenizer=tok, k=3)
        >>> lens.top_probs.shape[1:], lens.max_diff < 1e-4
        (torch.Size([5, 3]), True)
    """
    insp = inspector
    if k < 1:
        raise CaptureError(f"k must be at least 1, got {k}")
    insp.module("lm_head")  # a model without a head has nothing to lens: say so now
    model_inputs = _as_inputs(insp, inputs, tokenizer)
    rows = _rows(insp, blocks, include_embed)
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
    if not -batch <= batch_index < batch:
        raise CaptureError(f"batch_index {batch_index} is out of range for a batch of {batch}")
    batch_index %= batch
    seq_ids = ids[batch_index] if ids.dim() == 2 else ids
    n = int(seq_ids.shape[-1])
    wanted = list(range(n)) if positions is None else [int(p) for p in positions]
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
            per_row.append(insp.logits(picked)[0].float().cpu())
        stacked = torch.stack(per_row)
        own = output.get("logits") if isinstance(output, Mapping) else None
        model_logits = (
            own[batch_index].index_select(0, index.to(own.device)).float().cpu()
            if isinstance(own, torch.Tensor)
            else None
        )
    top_k = min(k, stacked.shape[-1])
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
    )
