"""Interactive views of results: one self-contained HTML fragment for a notebook, or a page.

Each view is a :class:`View` built from a result object: :func:`lens_view` (a
:class:`~introspect.LensResult`: rows x positions, the top token and its probability per cell,
the top-k on hover, the targets' ranks), :func:`attention_view` (one or more
:class:`~introspect.AttentionPatterns`: a head or all heads of a block, query rows and key
columns on hover, a token strip coloured by attention), :func:`head_scores_view` (a
:class:`~introspect.HeadScores` grid; a click opens the head's pattern when patterns are
given), :func:`attribution_view` (an :class:`~introspect.Attribution` as sorted bars that sum
to the logit), :func:`patching_view` (a patching table, exact or estimated, on a diverging scale
centred at 0; an estimate beside the exact table), :func:`sae_evaluation_view` (CE and KL
scores, L0, explained variance and dead latents of one SAE or several) and
:func:`sae_features_view` (an SAE's top latents per token). :func:`report_page` composes several
views under one header.

A view is data (the numbers, as compact JSON in the page) and a small script written for this
project that draws it in the browser: no request of any kind leaves the page (its content
security policy forbids them), so it works from ``file://`` and offline. Attention weights are
stored as 8-bit integers (weight = byte x 1/255, within 0.002 of the model's value, the lower
triangle only when the pattern is causal), which keeps a 30-block x 9-head report of a
40-token prompt well under a megabyte of attention data. Every cell carries its coordinates
(``data-block``, ``data-position``, ``data-head``, ``data-query``, ``data-key``) and its value
in ``title`` and ``aria-label``; ``window.introspectViews.select(id, {...})`` drives a view as
hovering and clicking do.

This module reads the result objects through their public attributes and ``to_dict()`` only
(duck-typed by small protocols), so it sits below the analyses that produce them.

Example:
    >>> from introspect import Inspector
    >>> from introspect.zoo import load_model
    >>> model, tok = load_model("toy-gpt2", progress=False)
    >>> lens = Inspector(model).logit_lens("Hi there", tokenizer=tok)
    >>> view = lens_view(lens)
    >>> view.kind, view.html().count('class="iv-view')
    ('lens', 1)
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import os
import re
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch

from introspect._errors import ViewError
from introspect._export import write_atomically
from introspect._text import token_strings
from introspect._version import __version__

__all__ = [
    "PAGE_BUDGET",
    "View",
    "attention_view",
    "attribution_view",
    "byte_label",
    "byte_labels",
    "check_page_budget",
    "forced",
    "head_scores_view",
    "lens_view",
    "model_title",
    "page_bytes",
    "patching_view",
    "prompt_text",
    "prompt_title",
    "report_header",
    "report_page",
    "sae_evaluation_view",
    "sae_features_view",
    "save_view",
    "token_bytes",
    "visible",
    "write_page",
]

PAGE_BUDGET = 4 * 1024 * 1024
"""The most bytes a report page may take before :func:`check_page_budget` refuses it."""

SCALE = 1 / 255
"""Attention weights are stored as bytes: weight = byte x SCALE."""

_SHOWN_BARS = 20
_BLOCK = re.compile(r"^block\[(\d+)\]$")
_COMPONENT = re.compile(r"^block\[(\d+)\]\.(attn|mlp)(?:\.head\[(\d+)\])?$")
_SITE_BLOCK = re.compile(r"^(?:[a-z_]+\.)?block\[(\d+)\]")
_CELLS_LABELLED = 600
"""Up to this many cells a grid writes each value in its cell; beyond, hover shows it."""
_QUANTISED = (
    "attention weights are stored as 8-bit integers (weight = byte \u00d7 1/255, within 0.002 of "
    "the model's value)"
)


class LensLike(Protocol):
    """What :func:`lens_view` reads of a lens result (:class:`~introspect.LensResult` is one)."""

    @property
    def model_class(self) -> str: ...
    @property
    def adapter(self) -> str: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def rows(self) -> list[str]: ...
    @property
    def positions(self) -> list[int]: ...
    @property
    def tokens(self) -> list[str]: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def k(self) -> int: ...
    @property
    def logits(self) -> torch.Tensor | None: ...
    @property
    def targets(self) -> list[int]: ...
    @property
    def lens(self) -> str: ...
    def token_id(self, token: Any) -> int: ...
    def to_dict(
        self, positions: Sequence[int] | None = None, targets: Sequence[Any] | None = None
    ) -> dict[str, Any]: ...


class AttentionLike(Protocol):
    """What :func:`attention_view` reads of one block's patterns (``AttentionPatterns``)."""

    @property
    def block(self) -> int: ...
    @property
    def heads(self) -> list[int]: ...
    @property
    def tokens(self) -> list[str]: ...
    @property
    def pattern(self) -> torch.Tensor: ...
    @property
    def causal(self) -> bool: ...
    @property
    def model_class(self) -> str: ...
    @property
    def model_name(self) -> str: ...
    @property
    def prompt(self) -> str | None: ...
    @property
    def token_labels(self) -> list[str]: ...


class HeadScoresLike(Protocol):
    """What :func:`head_scores_view` reads of head scores (:class:`~introspect.HeadScores`)."""

    @property
    def model_class(self) -> str: ...
    @property
    def model_name(self) -> str: ...
    @property
    def blocks(self) -> list[int]: ...
    def to_dict(self, top: int = 10) -> dict[str, Any]: ...


class AttributionLike(Protocol):
    """What :func:`attribution_view` reads of an :class:`~introspect.Attribution`."""

    @property
    def labels(self) -> list[str]: ...
    @property
    def values(self) -> torch.Tensor: ...
    @property
    def logit(self) -> float | list[float]: ...
    @property
    def token(self) -> int: ...
    @property
    def position(self) -> int: ...
    @property
    def max_diff(self) -> float: ...


class PatchingLike(Protocol):
    """What :func:`patching_view` reads of a patching table (``PatchingResult`` is one)."""

    @property
    def values(self) -> torch.Tensor: ...
    @property
    def locators(self) -> list[str]: ...
    @property
    def positions(self) -> list[int] | None: ...
    @property
    def heads(self) -> list[int] | None: ...
    @property
    def tokens(self) -> list[str]: ...
    @property
    def method(self) -> str: ...
    @property
    def metric(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def exact(self) -> torch.Tensor | None: ...
    def to_dict(self) -> dict[str, Any]: ...


class SAEEvaluationLike(Protocol):
    """What :func:`sae_evaluation_view` reads of an ``evaluate_sae`` result."""

    @property
    def at(self) -> str: ...
    @property
    def tokens(self) -> int: ...
    @property
    def ce_clean(self) -> float: ...
    @property
    def ce_sae(self) -> float: ...
    @property
    def ce_ablate(self) -> float: ...
    @property
    def ce_score(self) -> float: ...
    @property
    def kl_sae(self) -> float: ...
    @property
    def kl_ablate(self) -> float: ...
    @property
    def kl_score(self) -> float: ...
    @property
    def l0(self) -> float: ...
    @property
    def explained_variance(self) -> float: ...
    @property
    def dead(self) -> int: ...
    @property
    def d_sae(self) -> int: ...


class SAEFeaturesLike(Protocol):
    """What :func:`sae_features_view` reads of an SAE's top latents per token."""

    @property
    def at(self) -> str: ...
    @property
    def tokens(self) -> list[str]: ...
    @property
    def top_ids(self) -> torch.Tensor: ...
    @property
    def top_values(self) -> torch.Tensor: ...
    @property
    def latents(self) -> list[int]: ...
    @property
    def activations(self) -> torch.Tensor: ...
    @property
    def d_sae(self) -> int: ...


def visible(token: str, width: int = 0) -> str:
    """A token as a view shows it: each space as ``␣``, what would not print escaped.

    The page's script draws tokens by the same rule, so no two tokens look alike and a
    leading space is never lost; ``width`` cuts a long token with ``…``.

    Example:
        >>> visible(" Paris"), visible("a\\nb"), visible("abcdef", 4)
        ('␣Paris', 'a\\\\nb', 'abc…')
    """
    text = "".join(
        "\u2423" if ch == " " else ch if ch.isprintable() else repr(ch)[1:-1] for ch in token
    )
    if width and len(text) > width:
        text = text[: width - 1] + "\u2026"
    return text


_PRINTED = (".1f", ".2f", ".3f", ".1e")
"""The ways a page prints a stored number: one to three decimals, or two significant digits."""


_BYTE_PIECE = re.compile(r"(?:<0x[0-9A-Fa-f]{2}>)+")


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte (its ``bytes_to_unicode`` inverted)."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    shown += range(ord("®"), ord("ÿ") + 1)
    chars = list(shown)
    extra = 0
    for byte in range(256):
        if byte not in shown:
            shown.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(shown, chars, strict=True)}


def token_bytes(tokenizer: Any, token_id: int) -> bytes | None:
    """The bytes a token stands for, where its vocabulary piece names them: a SentencePiece
    byte piece (``<0xE2>``) or a byte-level BPE piece (``âĢ``); None otherwise.

    Example:
        >>> from introspect.zoo import load_model
        >>> _, tok = load_model("toy-gpt2", progress=False)
        >>> token_bytes(tok, 8582)
        b'\\xf0\\x9f'
    """
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if not callable(convert):
        return None
    try:
        piece = convert(int(token_id))
    except (IndexError, KeyError, TypeError, ValueError, OverflowError):
        return None  # a tokenizer that cannot name the piece: the caller shows the id
    if not isinstance(piece, str) or not piece:
        return None
    if _BYTE_PIECE.fullmatch(piece):
        return bytes.fromhex(piece.replace("<0x", "").replace(">", ""))
    decoder = _byte_level_decoder()
    if all(ch in decoder for ch in piece):
        return bytes(decoder[ch] for ch in piece)
    return None


def byte_label(token: str, token_id: int, tokenizer: Any) -> str:
    """A token's text as pictures and views show it: the text itself, except that a token
    which decodes to an incomplete character (a lone byte of a multi-byte character, drawn as
    the missing glyph ``\ufffd``) is shown by its bytes (``<0xF0><0x9F>``) where the tokenizer
    names them, and by its id (``#8582``) where it does not. Spaces and what would not print
    are left for :func:`visible` to show.

    Example:
        >>> from introspect.zoo import load_model
        >>> _, tok = load_model("toy-gpt2", progress=False)
        >>> byte_label("\ufffd", 8582, tok), byte_label("\ufffd", 8582, None)
        ('<0xF0><0x9F>', '#8582')
        >>> byte_label(" x", 2124, tok)
        ' x'
    """
    if "\ufffd" not in token:
        return token
    data = token_bytes(tokenizer, token_id) if tokenizer is not None else None
    if data is None:
        return f"#{token_id}"
    # Undecodable bytes become lone surrogates (U+DC80..U+DCFF), each shown as its byte.
    return "".join(
        f"<0x{ord(ch) - 0xDC00:02X}>" if 0xDC80 <= ord(ch) <= 0xDCFF else ch
        for ch in data.decode("utf-8", errors="surrogateescape")
    )


def byte_labels(tokenizer: Any, token_ids: Sequence[int], tokens: Sequence[str]) -> list[str]:
    """:func:`byte_label` of each token of a sequence.

    Example:
        >>> from introspect.zoo import load_model
        >>> _, tok = load_model("toy-gpt2", progress=False)
        >>> ids = tok.encode("🙂 x")
        >>> byte_labels(tok, ids, [tok.decode([i]) for i in ids])
        ['<0xF0><0x9F>', '<0x99><0x82>', ' x']
    """
    return [byte_label(text, int(i), tokenizer) for text, i in zip(tokens, token_ids, strict=True)]


def model_title(tokenizer: Any, model_class: str, adapter: str) -> str:
    """The model as a title names it: the tokenizer's ``name_or_path`` (a hub id as given;
    ``org/name`` from a hub cache folder; the last two parts of another absolute folder),
    else its class and adapter.

    Example:
        >>> model_title(None, "GPT2LMHeadModel", "gpt2")
        'GPT2LMHeadModel (gpt2 adapter)'
    """
    named = getattr(tokenizer, "name_or_path", None)
    if not isinstance(named, str) or not named.strip():
        return f"{model_class} ({adapter} adapter)"
    path = Path(named)
    if not path.is_absolute():
        return named
    for part in path.parts:  # .../models--org--name/snapshots/<commit>
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return "/".join(path.parts[-2:])


def prompt_text(tokenizer: Any, token_ids: Sequence[int]) -> str | None:
    """The prompt as the model read it (special tokens left out); None without a tokenizer.

    Example:
        >>> from introspect.zoo import load_model
        >>> _, tok = load_model("toy-gpt2", progress=False)
        >>> prompt_text(tok, tok.encode("Hi there")), prompt_text(None, [1, 2])
        ('Hi there', None)
    """
    decode = getattr(tokenizer, "decode", None)
    if not callable(decode) or not token_ids:
        return None
    return str(decode([int(i) for i in token_ids], skip_special_tokens=True))


def prompt_title(prompt: str | None, width: int = 60) -> str:
    """A prompt as a title quotes it (``" on 'text'"``, cut to ``width``; empty without one).

    Example:
        >>> prompt_title("Hi"), prompt_title(None), prompt_title("abcdef", 4)
        (" on 'Hi'", '', " on 'abc…'")
    """
    if not prompt:
        return ""
    return f" on {(prompt if len(prompt) <= width else prompt[: width - 1] + chr(0x2026))!r}"


def _number(value: float, digits: int = 4) -> float | None:
    """A float as a page stores it: the fewest significant digits, ``digits`` or more, that
    the page prints exactly as ``value`` (with one, two or three decimals, or as ``1.2e-05``),
    so what it prints is ``value`` correctly rounded (``None`` for NaN or infinity).

    Four digits alone would round twice: 0.12350000441 is stored as 0.1235, which prints as
    0.123, where the value rounds to 0.124.

    Example:
        >>> _number(0.12345678), _number(0.12350000441), _number(1 / 16)
        (0.1235, 0.123500004, 0.0625)
    """
    if not math.isfinite(value):
        return None
    for precision in range(digits, 18):
        stored = float(f"{value:.{precision}g}")
        if all(format(stored, way) == format(value, way) for way in _PRINTED):
            return stored
    return value


def _full(value: float) -> float | None:
    """A float32 value as a page stores it where it prints three decimals whatever the
    magnitude (a patching table, activations): seven significant digits, a float32's
    precision, or more where the page would print it otherwise (``None`` for NaN or
    infinity)."""
    return _number(value, 7)


def _finite(value: float) -> float | None:
    """A float with every digit (``None`` for NaN or infinity)."""
    return value if math.isfinite(value) else None


def _new_id() -> str:
    return f"iv-{uuid.uuid4().hex[:12]}"


@dataclass
class View:
    """One interactive view: its kind, title, note and the data its script draws.

    :meth:`html` is a fragment for a notebook (``_repr_html_``), :meth:`page` a standalone
    page, :meth:`to_html` writes that page. Each rendering gets fresh element ids, so the same
    view shown twice in a notebook draws twice.

    Example:
        >>> import torch
        >>> from introspect import Attribution
        >>> view = attribution_view(Attribution(["embed", "bias"], torch.tensor([1.0, 0.5]),
        ...                                     1.5, 7, -1, 0.0))
        >>> page = view.page()
        >>> page.startswith("<!doctype html>"), "http" in page.replace("http-equiv", "")
        (True, False)
    """

    kind: str
    title: str
    payload: dict[str, Any]
    note: str = ""
    children: list[View] = field(default_factory=list)

    def html(self) -> str:
        """A self-contained fragment: its style, its script and its data (for notebooks).

        Example:
            >>> import torch
            >>> from introspect import Attribution
            >>> a = Attribution(["embed", "bias"], torch.tensor([1.0, 0.5]), 1.5, 7, -1, 0.0)
            >>> "<script>" in attribution_view(a).html()
            True
        """
        return f"<style>{CSS}</style><script>{SCRIPT}</script>{_fragment(self)}"

    def _repr_html_(self) -> str:
        return self.html()

    def page(self, title: str | None = None, header: Mapping[str, str] | None = None) -> str:
        """This view alone as a full page (see :func:`report_page`).

        Example:
            >>> import torch
            >>> from introspect import Attribution
            >>> a = Attribution(["embed", "bias"], torch.tensor([1.0, 0.5]), 1.5, 7, -1, 0.0)
            >>> "</html>" in attribution_view(a).page(title="one token")
            True
        """
        return report_page([self], header or {}, title=title or self.title)

    def to_html(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        force: bool = False,
        overwrite: bool | None = None,
    ) -> str:
        """The page; written to ``path`` (atomically) when given, refusing an existing file
        unless ``force`` (``overwrite=`` is its deprecated name).

        Example:
            >>> import tempfile, torch
            >>> from introspect import Attribution
            >>> a = Attribution(["embed", "bias"], torch.tensor([1.0, 0.5]), 1.5, 7, -1, 0.0)
            >>> target = Path(tempfile.mkdtemp()) / "dla.html"
            >>> page = attribution_view(a).to_html(target)
            >>> target.read_text(encoding="utf-8") == page
            True
        """
        return save_view(self, path, force=forced(force, overwrite))


def forced(force: bool, overwrite: bool | None) -> bool:
    """Whether a ``to_html(path, force=..., overwrite=...)`` may replace an existing file.

    ``overwrite=`` is the deprecated name of ``force=`` (the views' first release replaced an
    existing file unless ``overwrite=False``; every writer of the project now refuses one
    unless forced): it still works, with a :class:`DeprecationWarning`. Called by the
    ``to_html`` methods, so the warning points at their caller.

    Example:
        >>> import warnings
        >>> forced(False, None), forced(True, None)
        (False, True)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     forced(False, True), str(caught[0].message)[:53]
        (True, 'to_html(overwrite=True) is deprecated: use force=True')
    """
    if overwrite is None:
        return bool(force)
    if force and not overwrite:
        raise ViewError(
            "force=True and overwrite=False disagree: pass force= alone (overwrite= is its "
            "deprecated name)"
        )
    warnings.warn(
        f"to_html(overwrite={overwrite!r}) is deprecated: use force={overwrite!r} (an existing "
        "file is refused unless force=True); overwrite= goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return bool(overwrite)


def _json(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    # Inside <script>: no "</script>", no HTML parsing surprises, no JS line terminators.
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text


def _fragment(view: View, uid: str | None = None, link: str | None = None) -> str:
    """One view's markup (fresh ids unless ``uid``); ``link`` is the id of an attention view
    its head clicks open (its own child's when it has one)."""
    children = [(_new_id(), child) for child in view.children]
    payload = dict(view.payload)
    if children:
        link = children[0][0]
    if link is not None:
        payload["link"] = link
    inner = "".join(_markup(cid, child, child.payload) for cid, child in children)
    return _markup(uid or _new_id(), view, payload, inner)


def _markup(uid: str, view: View, payload: Mapping[str, Any], inner: str = "") -> str:
    note = f'<p class="iv-note">{html.escape(view.note)}</p>' if view.note else ""
    return (
        f'<div class="iv-view iv-{view.kind}" id="{uid}" data-kind="{view.kind}">'
        f"<h3>{html.escape(view.title)}</h3>{note}"
        '<div class="iv-body">This interactive view is drawn by its inline script: it shows '
        "where scripts run (a trusted notebook, or the page opened in a browser).</div>"
        '<div class="iv-legend"></div><div class="iv-error" hidden></div>'
        f'<script type="application/json" class="iv-data">{_json(payload)}</script>'
        f'<script>window.introspectViews&&introspectViews.mount("{uid}")</script>'
        f"</div>{inner}"
    )


def lens_view(
    result: LensLike, *, targets: Sequence[int | str] | None = None, title: str | None = None
) -> View:
    """The lens as a grid: rows (blocks, the model's output on top) x prompt positions.

    Each cell shows the top next-token prediction (spaces as ``␣``) shaded by its probability,
    with the top-k and every target's rank in its tooltip and in the side panel; cells where a
    target (default: the result's :attr:`~introspect.LensResult.targets`; ids or text) is the
    top prediction are outlined in its colour, and a column per target gives its rank in every
    row at the chosen position (click an input token to choose it).

    Example:
        >>> from introspect import Inspector
        >>> from introspect.zoo import load_model
        >>> model, tok = load_model("toy-gpt2", progress=False)
        >>> lens = Inspector(model).logit_lens("Hi there", tokenizer=tok, targets=[" the"])
        >>> view = lens_view(lens)
        >>> len(view.payload["top"]) == len(lens.rows) * len(lens.positions) * lens.k
        True
    """
    if not result.rows or not result.positions or not result.tokens or result.k < 1:
        raise ViewError(
            f"this lens is empty ({len(result.rows)} rows x {len(result.positions)} positions): "
            "nothing to draw; compute it with at least one block and one position"
        )
    ids = [result.token_id(t) for t in (result.targets if targets is None else targets)]
    tokenizer = getattr(result, "tokenizer", None)
    kept = result.logits is not None
    data = result.to_dict(targets=ids if kept else [])
    rows, positions = result.rows, result.positions
    top: list[int] = []
    probs: list[float | None] = []
    vocab: dict[int, str] = {}
    per_target: list[tuple[list[int], list[float | None]]] = [([], []) for _ in ids]
    by_row = [[entry["rows"][r] for entry in data["positions"]] for r in range(len(rows))]
    for r in range(len(rows)):
        for cell in by_row[r]:
            for item in cell["top"]:
                top.append(int(item["id"]))
                probs.append(_number(float(item["prob"])))
                vocab[int(item["id"])] = byte_label(str(item["token"]), int(item["id"]), tokenizer)
            for j, followed in enumerate(cell.get("targets", [])):
                per_target[j][0].append(int(followed["rank"]))
                per_target[j][1].append(_number(float(followed["prob"])))
    names = byte_labels(tokenizer, ids, token_strings(tokenizer, ids))
    last = f"block[{result.num_blocks - 1}]"
    row_labels = [f"{row} = output" if row == last else row for row in rows]
    blocks = [int(m.group(1)) if (m := _BLOCK.match(row)) else None for row in rows]
    payload = {
        "kind": "lens",
        "title": f"{result.lens} lens",
        "rows": rows,
        "rowLabels": row_labels,
        "blocks": blocks,
        "positions": positions,
        "tokens": byte_labels(tokenizer, result.token_ids, result.tokens),
        "k": int(data["k"]),
        "top": top,
        "probs": probs,
        "vocab": vocab,
        "output": rows[-1] == last,
        "targets": [
            {
                "id": i,
                "token": name,
                "ranks": per_target[j][0] if kept else None,
                "probs": per_target[j][1] if kept else None,
            }
            for j, (i, name) in enumerate(zip(ids, names, strict=True))
        ],
    }
    note = (
        "Each cell: the top prediction for the next token after that input token, read "
        "through the model's own head from the residual stream after the row's block, shaded "
        "by its probability. Hover for the top "
        f"{data['k']}; click an input token to follow the targets' ranks there."
    )
    if ids and not kept:
        note += " Target ranks need the logits (computed with keep_logits=False)."
    name = model_title(tokenizer, result.model_class, result.adapter)
    prompt = prompt_title(prompt_text(tokenizer, result.token_ids))
    heading = title or f"{result.lens} lens: {name}{prompt}"
    return View("lens", heading, payload, note)


def _quantised(pattern: torch.Tensor, causal: bool) -> str:
    """``[heads, n, n]`` weights as base64 bytes (the lower triangle, row by row, if causal)."""
    scaled = (pattern.detach().float().cpu().clamp(0.0, 1.0) / SCALE).round().to(torch.uint8)
    n = int(scaled.shape[-1])
    if causal:
        below = torch.tril_indices(n, n)
        scaled = scaled[:, below[0], below[1]]
    return base64.b64encode(scaled.contiguous().numpy().tobytes()).decode("ascii")


def attention_view(
    patterns: AttentionLike | Sequence[AttentionLike], *, title: str | None = None
) -> View:
    """Attention patterns of one or more blocks on one prompt: a head, or all heads at once.

    Pick a block and a head (or all heads as small multiples); hover a query token (a row
    label, or a token of the strip) to light its row, a key token (a column label) to light its
    column, a cell for both. The strip above the patterns colours each token by the attention
    from the chosen query (or, for a key, to it). Weights are stored as 8-bit integers.

    Example:
        >>> from introspect import Inspector, attention_patterns
        >>> from introspect.zoo import load_model
        >>> model, tok = load_model("toy-llama", progress=False)
        >>> insp = Inspector(model)
        >>> blocks = [attention_patterns(insp, "Hi there", b, tokenizer=tok) for b in (0, 1)]
        >>> view = attention_view(blocks)
        >>> [b["block"] for b in view.payload["blocks"]], view.payload["blocks"][0]["causal"]
        ([0, 1], True)
    """
    found = list(patterns) if isinstance(patterns, Sequence) else [patterns]
    if not found:
        raise ViewError("no attention patterns to draw: pass one block's patterns or several")
    tokens = list(found[0].tokens)
    blocks = []
    for item in found:
        shape = tuple(item.pattern.shape)
        if not tokens or not item.heads or shape[0] == 0 or shape[-1] == 0:
            raise ViewError(
                f"the patterns of block[{item.block}] are empty ({len(item.heads)} heads x "
                f"{len(item.tokens)} tokens): nothing to draw"
            )
        if list(item.tokens) != tokens:
            raise ViewError(
                f"block[{item.block}]'s patterns were read on another prompt than "
                f"block[{found[0].block}]'s: one view shows one prompt"
            )
        if shape != (len(item.heads), len(tokens), len(tokens)):
            raise ViewError(
                f"block[{item.block}]'s pattern is {list(shape)}, not [heads, query, key] = "
                f"[{len(item.heads)}, {len(tokens)}, {len(tokens)}]"
            )
        blocks.append(
            {
                "block": int(item.block),
                "heads": [int(h) for h in item.heads],
                "causal": bool(item.causal),
                "data": _quantised(item.pattern, bool(item.causal)),
            }
        )
    which = (
        f"block[{blocks[0]['block']}]"
        if len(blocks) == 1
        else f"{len(blocks)} blocks (block[{blocks[0]['block']}]..block[{blocks[-1]['block']}])"
    )
    labels = found[0].token_labels  # a lone byte by its bytes, as the tokenizer names them
    payload = {"kind": "attention", "tokens": labels, "scale": SCALE, "blocks": blocks}
    note = (
        "Query (attending) down, key (attended to) across. Hover a query or key token to light "
        f"its row or column; {_QUANTISED}."
    )
    name = found[0].model_name or found[0].model_class
    heading = title or f"attention of {which}: {name}{prompt_title(found[0].prompt)}"
    return View("attention", heading, payload, note)


def head_scores_view(
    scores: HeadScoresLike,
    *,
    patterns: AttentionLike | Sequence[AttentionLike] | None = None,
    title: str | None = None,
    top: int = 5,
) -> View:
    """Head scores as a block x head grid, the ``top`` heads outlined.

    With ``patterns`` (the blocks' :class:`~introspect.AttentionPatterns` on a prompt), an
    attention view follows the grid and clicking a head opens its pattern there; in a
    :func:`report_page` the grid opens the report's attention section instead.

    Example:
        >>> from introspect import Inspector, head_scores
        >>> from introspect.zoo import load_model
        >>> model, _ = load_model("toy-llama", progress=False)
        >>> scores = head_scores(Inspector(model), "previous-token", seq_len=6, batch=1)
        >>> view = head_scores_view(scores)
        >>> len(view.payload["values"]) == scores.values.numel()
        True
    """
    data = scores.to_dict(top=top)
    values = [v for row in data["values"] for v in row]
    if not values or all(v is None for v in values):
        raise ViewError("these head scores are empty (no block or no head scored): nothing to draw")
    payload = {
        "kind": "heads",
        "title": f"{data['score']} score per head",
        "score": data["score"],
        "blocks": [int(b) for b in data["blocks"]],
        "numHeads": int(data["num_heads"]),
        "values": [None if v is None else _number(float(v)) for v in values],
        "top": data["top"],
    }
    source = (
        f"{data['batch']} random sequence(s) of {data['seq_len']} tokens repeated "
        f"{data['repeats']} times (seed {data['seed']})"
        if data["seed"] is not None
        else f"given runs of {data['seq_len']} tokens repeated {data['repeats']} times"
    )
    note = f"Score: {data['measures']}, on {source}; outlined: the top {len(data['top'])}."
    children = [] if patterns is None else [attention_view(patterns)]
    if children:
        note += " Click a head to open its pattern on the prompt below."
    heading = title or f"{data['score']} heads: {scores.model_name or scores.model_class}"
    return View("heads", heading, payload, note, children)


def attribution_view(
    attribution: AttributionLike,
    *,
    token_text: str | None = None,
    row: int = 0,
    shown: int = _SHOWN_BARS,
    title: str | None = None,
) -> View:
    """Direct logit attribution as bars, one per component (per head with ``per_head``).

    Sorted by size (a button switches to model order); the largest ``shown`` first, the rest
    summed in one line and available with a click; the last line is the sum of every
    component, equal to the model's logit shown beside it. ``token_text`` names the token (the
    result holds its id); ``row`` picks a row of a batched attribution.

    Example:
        >>> import torch
        >>> from introspect import Attribution
        >>> a = Attribution(["embed", "block[0].attn.head[1]", "bias"],
        ...                 torch.tensor([1.0, -0.25, 0.5]), 1.25, 7, -1, 0.0)
        >>> view = attribution_view(a, token_text=" Paris")
        >>> view.payload["parts"][1], view.payload["logit"]
        ([0, 'attn', 1], 1.25)
    """
    values = attribution.values
    if values.dim() == 2:
        if not -values.shape[0] <= row < values.shape[0]:
            raise ViewError(f"row {row} is out of range for a batch of {values.shape[0]}")
        values = values[row]
    logit = attribution.logit
    chosen_logit = float(logit[row] if isinstance(logit, list) else logit)
    if not attribution.labels or values.numel() == 0:
        raise ViewError("this attribution has no components: nothing to draw")
    parts: list[list[int | str | None]] = []
    for label in attribution.labels:
        found = _COMPONENT.match(label)
        if found:
            head = found.group(3)
            parts.append([int(found.group(1)), found.group(2), None if head is None else int(head)])
        else:
            parts.append([None, label, None])
    text = token_text if token_text is not None else f"#{attribution.token}"
    payload = {
        "kind": "dla",
        "title": f"direct logit attribution to {text!r}",
        "labels": list(attribution.labels),
        "parts": parts,
        "values": [float(v) for v in values.double().tolist()],
        "logit": chosen_logit,
        "token": int(attribution.token),
        "tokenText": text,
        "position": int(attribution.position),
        "maxDiff": float(attribution.max_diff),
        "shown": max(1, int(shown)),
    }
    note = (
        f"Each component's direct contribution to the logit of {visible(text)!r} (id "
        f"{attribution.token}) at position {attribution.position}, read through the final norm "
        f"with its scale frozen; they sum to the model's logit {chosen_logit:.3f} (up to "
        f"{attribution.max_diff:.1e})."
    )
    return View("dla", title or f"direct logit attribution: {visible(text)}", payload, note)


def _block_of(locator: str) -> int | None:
    found = _SITE_BLOCK.match(locator)
    return int(found.group(1)) if found else None


def patching_view(result: PatchingLike, *, title: str | None = None) -> View:
    """A patching table as a grid on a diverging scale centred at 0, with its legend.

    Rows are the locators; columns are positions (with their tokens) or, with ``heads``,
    heads; a table of locators x heads x positions is drawn as small multiples, one grid per
    head. Blue cells raise the metric, red ones lower it, on one scale for every grid. When
    the result holds the exact table beside an estimate (``exact``), both are drawn side by
    side on that one scale, and hovering a cell lights it in both and shows both values and
    their difference (the note gives their agreement).

    Example:
        >>> import torch
        >>> from introspect import PatchingResult
        >>> table = PatchingResult(torch.tensor([[0.5, -1.0], [0.0, 2.0]]),
        ...                        ["block[0]", "block[1]"], [0, 1], tokens=["a", "b"])
        >>> view = patching_view(table)
        >>> view.payload["values"], view.payload["scale"]
        ([0.5, -1.0, 0.0, 2.0], 2.0)
    """
    rows = list(result.locators)
    heads, positions = result.heads, result.positions
    panels: list[int | None]
    if heads is not None and positions is not None:
        panels, columns, axis = list(heads), list(positions), "position"
        shape: tuple[int, ...] = (len(rows), len(panels), len(columns))
    elif heads is not None:
        panels, columns, axis = [None], list(heads), "head"
        shape = (len(rows), len(columns))
    else:
        panels, columns, axis = [None], list(positions or []), "position"
        shape = (len(rows), len(columns))
    if not rows or not columns or not panels:
        raise ViewError(
            f"this patching table is empty ({len(rows)} locators x {len(columns)} {axis}s): "
            "nothing to draw; patch at least one locator at one position or head"
        )
    tables = [(result.method, result.values)]
    if result.exact is not None:
        tables.append(("exact patching", result.exact))
    flat: list[float | None] = []
    for name, table in tables:
        if tuple(table.shape) != shape:
            raise ViewError(
                f"the {name} table is {list(table.shape)}, not {list(shape)} "
                f"({len(rows)} locators{' x heads' if heads is not None else ''}"
                f"{' x positions' if axis == 'position' else ''}): label it as it was computed"
            )
        grid = table.detach().double().cpu()
        grid = grid.permute(1, 0, 2) if grid.dim() == 3 else grid.unsqueeze(0)
        flat.extend(_full(float(v)) for v in grid.flatten().tolist())
    scale = max((abs(v) for v in flat if v is not None), default=0.0) or 1.0
    metric = result.metric or "the metric"
    payload = {
        "kind": "patching",
        "title": f"{result.method} of {metric}",
        "tables": [name for name, _ in tables],
        "rows": rows,
        "blocks": [_block_of(row) for row in rows],
        "axis": axis,
        "columns": [int(c) for c in columns],
        "panels": panels,
        "tokens": list(result.tokens),
        "values": flat,
        "scale": scale,
    }
    site = "head" if heads is not None and axis == "head" else "site"
    note = (
        f"Each cell: how much {metric} changes when that {site} of the corrupted run takes its "
        f"value from the clean run ({result.method}). Blue raises it, red lowers it, on one "
        f"scale for every grid (|value| up to {scale:.3g})."
    )
    agreement = result.to_dict().get("agreement")
    if agreement:
        pearson, spearman = agreement.get("pearson"), agreement.get("spearman")
        note += (
            f" {result.method} against exact patching over {agreement['cells']} cells: Pearson "
            f"{'n/a' if pearson is None else f'{pearson:.3f}'}, Spearman "
            f"{'n/a' if spearman is None else f'{spearman:.3f}'}; of the exact top "
            f"{agreement['top']}, {agreement['overlap']} are in the estimate's top "
            f"{agreement['top']}."
        )
    named = [x for x in (result.model, result.metric) if x and x != "the metric"]
    heading = title or result.method + (f": {', '.join(named)}" if named else "")
    return View("patching", heading, payload, note)


_SAE_METRICS = (
    (
        "ceScore",
        "CE score",
        "score",
        "(CE zero-ablated \u2212 CE spliced) / (CE zero-ablated \u2212 CE clean): 1 is the "
        "model's own loss, 0 zero ablation's",
    ),
    ("klScore", "KL score", "score", "(KL zero-ablated \u2212 KL spliced) / KL zero-ablated"),
    (
        "explainedVariance",
        "explained variance",
        "score",
        "1 \u2212 \u03a3\u2016x \u2212 x\u0302\u2016\u00b2 / \u03a3\u2016x \u2212 x\u0304\u2016\u00b2 over the tokens",
    ),
    ("l0", "L0", "count", "mean number of non-zero latents per token"),
    ("dead", "dead latents", "dead", "latents that never fired on these tokens"),
)


def sae_evaluation_view(
    evaluations: SAEEvaluationLike | Sequence[SAEEvaluationLike],
    *,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> View:
    """One SAE's evaluation, or several side by side: a row per SAE, a bar per figure.

    The CE score, KL score and explained variance are drawn as bars on 0..1 (1 is best), L0
    against the largest L0 shown and the dead latents as a share of ``d_sae``; hovering a
    row shows the losses behind the scores. ``names`` label the rows (default: each SAE's
    site and width).

    Example:
        >>> from introspect import SAEEvaluation
        >>> e = SAEEvaluation("block[1]", 40, 2.0, 2.2, 4.0, 0.9, 0.1, 1.0, 0.9, 12.0, 0.8, 3, 64)
        >>> view = sae_evaluation_view(e)
        >>> view.payload["rows"][0]["values"]["ceScore"], view.payload["rows"][0]["block"]
        (0.9, 1)
    """
    found = [evaluations] if not isinstance(evaluations, Sequence) else list(evaluations)
    if not found:
        raise ViewError("no SAE evaluation to draw: pass one evaluate_sae result or several")
    labels = list(names) if names is not None else [f"{e.at} (d_sae {e.d_sae})" for e in found]
    if names is None and len(set(labels)) < len(labels):
        labels = [f"{label} #{n}" for n, label in enumerate(labels, start=1)]
    if len(labels) != len(found):
        raise ViewError(
            f"{len(labels)} names for {len(found)} evaluations: give one name per evaluation"
        )
    rows = []
    for label, e in zip(labels, found, strict=True):
        rows.append(
            {
                "name": label,
                "at": e.at,
                "block": _block_of(e.at),
                "tokens": int(e.tokens),
                "dSae": int(e.d_sae),
                "values": {
                    "ceScore": _finite(float(e.ce_score)),
                    "klScore": _finite(float(e.kl_score)),
                    "explainedVariance": _finite(float(e.explained_variance)),
                    "l0": _finite(float(e.l0)),
                    "dead": int(e.dead),
                },
                "ce": [_finite(float(v)) for v in (e.ce_clean, e.ce_sae, e.ce_ablate)],
                "kl": [_finite(float(v)) for v in (e.kl_sae, e.kl_ablate)],
            }
        )
    payload = {
        "kind": "sae-eval",
        "title": "SAE evaluation",
        "metrics": [
            {"key": key, "name": name, "bar": bar, "means": means}
            for key, name, bar, means in _SAE_METRICS
        ],
        "rows": rows,
    }
    note = (
        "Scores as bars on 0..1 (1 is best; CE and KL scores compare the spliced model with "
        "the model itself and with the site zero-ablated), L0 against the largest shown, dead "
        "latents as a share of d_sae. Hover a row for the losses behind its scores."
    )
    which = found[0].at if len(found) == 1 else f"{len(found)} SAEs"
    return View("sae-eval", title or f"SAE evaluation: {which}", payload, note)


def sae_features_view(features: SAEFeaturesLike, *, title: str | None = None) -> View:
    """An SAE's top latents per token: a token strip and, per token, its top latents.

    Hover a token for its top latents (bars by activation); hover a latent to shade every
    token by that latent's activation (relative to its largest on these tokens).

    Example:
        >>> import torch
        >>> from introspect import top_features
        >>> f = torch.zeros(3, 16)
        >>> f[0, 4], f[2, 4], f[2, 9] = 1.0, 0.5, 2.0
        >>> view = sae_features_view(top_features(f, k=2, tokens=["a", " b", " c"]))
        >>> view.payload["top"][2], view.payload["latents"]
        ([[9, 2.0], [4, 0.5]], [4, 9])
    """
    tokens = list(features.tokens)
    n = len(tokens)
    ids, values = features.top_ids, features.top_values
    if n == 0 or ids.numel() == 0 or not features.latents:
        raise ViewError(
            f"these SAE features are empty ({n} tokens, {len(features.latents)} latents that "
            "fired): nothing to draw; run the model on some tokens inside the splice"
        )
    if tuple(ids.shape[:1]) != (n,) or ids.shape != values.shape:
        raise ViewError(
            f"top latents of shape {list(ids.shape)} do not match {n} tokens: one row per token"
        )
    top = [
        [[int(i), _full(float(v))] for i, v in zip(row_ids, row_values, strict=True) if v != 0]
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]
    acts = features.activations.detach().double().cpu()
    if tuple(acts.shape) != (len(features.latents), n):
        raise ViewError(
            f"activations of shape {list(acts.shape)} are not [latents, tokens] = "
            f"[{len(features.latents)}, {n}]"
        )
    payload = {
        "kind": "sae-features",
        "title": f"top SAE latents at {features.at}",
        "at": features.at,
        "block": _block_of(features.at),
        "tokens": tokens,
        "latents": [int(f) for f in features.latents],
        "acts": [_full(float(v)) for v in acts.flatten().tolist()],
        "top": top,
        "dSae": int(features.d_sae),
    }
    note = (
        f"The SAE at {features.at} ({features.d_sae} latents). Hover a token for its top "
        "latents; hover a latent to shade every token by its activation."
    )
    return View("sae-features", title or f"SAE latents per token: {features.at}", payload, note)


def page_bytes(num_blocks: int, num_heads: int, num_tokens: int, k: int = 5) -> int:
    """About how many bytes a report of this size takes (attention of every block and head,
    the lens, the script).

    Example:
        >>> 0 < page_bytes(30, 9, 40) < 1_000_000
        True
    """
    stored = num_heads * num_tokens * (num_tokens + 1) // 2  # causal: the lower triangle
    attention = num_blocks * (4 * ((stored + 2) // 3) + 80)
    lens = num_blocks * num_tokens * k * 16
    return attention + lens + len(SCRIPT) + len(CSS) + 16_000


def check_page_budget(
    num_blocks: int, num_heads: int, num_tokens: int, *, budget: int = PAGE_BUDGET, k: int = 5
) -> int:
    """Refuse a report that would pass ``budget`` bytes, saying how many blocks would fit.

    Returns the estimate (:func:`page_bytes`) when it fits.

    Example:
        >>> check_page_budget(30, 9, 40) < PAGE_BUDGET
        True
        >>> check_page_budget(30, 9, 400)
        Traceback (most recent call last):
        ...
        introspect._errors.ViewError: a 400-token prompt makes a report of about 28.5 MB ...
    """
    size = page_bytes(num_blocks, num_heads, num_tokens, k)
    if size <= budget:
        return size
    fit = 0
    while fit < num_blocks and page_bytes(fit + 1, num_heads, num_tokens, k) <= budget:
        fit += 1
    shorter = num_tokens
    while shorter > 1 and page_bytes(num_blocks, num_heads, shorter, k) > budget:
        shorter -= 1
    blocks = (
        f"show at most {fit} blocks (e.g. --blocks 0:{fit}, blocks=range({fit})) or " if fit else ""
    )
    raise ViewError(
        f"a {num_tokens}-token prompt makes a report of about {size / 2**20:.1f} MB "
        f"({num_blocks} blocks x {num_heads} heads of attention), over the page budget of "
        f"{budget / 2**20:.1f} MB: {blocks}use a prompt of at most {shorter} tokens"
    )


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def report_header(
    *, model: str, adapter: str, command: str | None = None, **more: str
) -> dict[str, str]:
    """A report header: the model, the adapter, the versions in use, the command and more.

    Example:
        >>> header = report_header(model="toy-gpt2", adapter="gpt2", prompt="Hi")
        >>> list(header)
        ['model', 'adapter', 'prompt', 'introspect', 'transformers', 'torch']
    """
    found = {"model": model, "adapter": adapter, **more}
    found.update(
        introspect=__version__, transformers=_installed("transformers"), torch=torch.__version__
    )
    if command is not None:
        found["command"] = command
    return found


_PAGE_GUARD = (
    "(function(){var e=window.introspectErrors=[];function r(m){e.push(String(m));"
    'var o=document.getElementById("introspect-errors");if(o){o.textContent=e.join("\\n");'
    'o.setAttribute("data-count",e.length);o.hidden=false}}window.introspectErrors.record=r;'
    'addEventListener("error",function(x){r(x.message||"error")});'
    'addEventListener("unhandledrejection",function(x){r("unhandled rejection: "+x.reason)});'
    "var c=console.error;console.error=function(){r(Array.prototype.join.call(arguments,' '));"
    "return c.apply(console,arguments)}})();"
)
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'"
)


def report_page(
    sections: Sequence[View], header: Mapping[str, str], *, title: str | None = None
) -> str:
    """One self-contained page: a header (model, adapter, versions, command) and the views.

    The style and the script are inline once; a content security policy forbids every
    request, so the page shows the same offline and from ``file://``. A head scores grid
    without patterns of its own opens the page's first attention view when a head is
    clicked. Page errors (and console errors) are collected in ``#introspect-errors``.

    Example:
        >>> import torch
        >>> from introspect import Attribution
        >>> a = Attribution(["embed", "bias"], torch.tensor([1.0, 0.5]), 1.5, 7, -1, 0.0)
        >>> page = report_page([attribution_view(a)], {"model": "toy"}, title="report")
        >>> page.count('data-kind="dla"'), "<dt>model</dt><dd>toy</dd>" in page
        (1, True)
    """
    if not sections:
        raise ViewError("a report needs at least one view: pass the views to show")
    heading = title or "introspect report"
    ids = [_new_id() for _ in sections]
    attention_id = next(
        (i for i, v in zip(ids, sections, strict=True) if v.kind == "attention"), None
    )
    body = [
        f'<section id="section-{n}">'
        f"{_fragment(view, uid, attention_id if view.kind == 'heads' else None)}</section>"
        for n, (uid, view) in enumerate(zip(ids, sections, strict=True))
    ]
    items = "".join(
        f"<dt>{html.escape(key)}</dt><dd>{html.escape(str(value))}</dd>"
        for key, value in header.items()
    )
    nav = " \u00b7 ".join(
        f'<a href="#section-{n}">{html.escape(view.title)}</a>' for n, view in enumerate(sections)
    )
    kinds = {view.kind for view in sections} | {c.kind for v in sections for c in v.children}
    stored = f" In this page {_QUANTISED}." if "attention" in kinds else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(heading)}</title><style>{CSS}{_PAGE_CSS}</style>"
        f"<script>{_PAGE_GUARD}</script><script>{SCRIPT}</script></head><body>"
        '<output id="introspect-errors" data-count="0" hidden></output>'
        f'<header class="iv-view iv-report-head"><h1>{html.escape(heading)}</h1>'
        f'<dl class="iv-header">{items}</dl><p class="iv-note">Self-contained: this page makes '
        f"no network request and works offline.{stored}</p>"
        f'<nav class="iv-note">{nav}</nav></header>'
        f"{''.join(body)}</body></html>\n"
    )


def write_page(path: str | os.PathLike[str], page: str, *, overwrite: bool = True) -> Path:
    """Write a page atomically (a reader never sees half of it); refuse an existing file
    unless ``overwrite``, and a folder that does not exist.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "page.html"
        >>> write_page(target, "<p>hi</p>").read_text()
        '<p>hi</p>'
        >>> write_page(target, "<p>again</p>", overwrite=False)
        Traceback (most recent call last):
        ...
        introspect._errors.ViewError: ... exists: give another path, or overwrite=True to replace it
    """
    target = Path(path)
    if target.is_dir():
        raise ViewError(f"{target} is a folder: give the path of an .html file to write")
    if target.exists() and not overwrite:
        raise ViewError(f"{target} exists: give another path, or overwrite=True to replace it")
    if not target.parent.is_dir():
        raise ViewError(f"cannot write {target}: the folder {target.parent} does not exist")

    def write(tmp: str) -> None:
        Path(tmp).write_text(page, encoding="utf-8")

    write_atomically([(target, write)])
    return target


def save_view(
    view: View, path: str | os.PathLike[str] | None = None, *, force: bool = False
) -> str:
    """The view as a page; written to ``path`` (atomically) when given, refusing an existing
    file unless ``force``. The results' ``to_html(path, force=...)`` call this.

    Example:
        >>> import tempfile, torch
        >>> from introspect import Attribution
        >>> a = Attribution(["embed", "bias"], torch.tensor([1.0, 0.5]), 1.5, 7, -1, 0.0)
        >>> target = Path(tempfile.mkdtemp()) / "dla.html"
        >>> page = save_view(attribution_view(a), target)
        >>> save_view(attribution_view(a), target)
        Traceback (most recent call last):
        ...
        introspect._errors.ViewError: ... exists: give another path, or force=True to replace it
    """
    page = view.page()
    if path is not None:
        target = Path(path)
        if target.exists() and not target.is_dir() and not force:
            raise ViewError(f"{target} exists: give another path, or force=True to replace it")
        write_page(target, page)
    return page


_PAGE_CSS = (
    "body{margin:0;padding:12px 16px;background:#fff;color:#1f2328}"
    "@media (prefers-color-scheme:dark){body{background:#0d1117;color:#e6edf3}}"
    ".iv-report-head h1{font-size:18px;margin:0 0 .4em}"
    ".iv-header{display:grid;grid-template-columns:max-content 1fr;gap:2px 1em;margin:0}"
    ".iv-header dt{color:var(--iv-muted)}.iv-header dd{margin:0;font-family:ui-monospace,"
    "Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all}"
    ".iv-view a{color:inherit}section{margin:1em 0}"
    "#introspect-errors{display:block;color:#d1242f;white-space:pre-wrap}"
)


CSS = """.iv-view{--iv-fg:var(--jp-ui-font-color0,var(--vscode-editor-foreground,#1f2328));--iv-bg:var(--jp-layout-color0,var(--vscode-editor-background,#fff));--iv-muted:#59636e;--iv-line:#d0d7de;--iv-scale:31,94,168;--iv-pos:31,94,168;--iv-neg:200,60,40;--iv-mark:#e6550d;--iv-row:rgba(230,85,13,.16);--iv-masked:rgba(128,128,128,.12);color:var(--iv-fg);background:var(--iv-bg);font:12px/1.35 system-ui,-apple-system,"Segoe UI",sans-serif;margin:.5em 0;padding:.6em;border:1px solid var(--iv-line);border-radius:6px;max-width:100%;box-sizing:border-box}
@media (prefers-color-scheme:dark){.iv-view{--iv-fg:var(--jp-ui-font-color0,var(--vscode-editor-foreground,#e6edf3));--iv-bg:var(--jp-layout-color0,var(--vscode-editor-background,#0d1117));--iv-muted:#9198a1;--iv-line:#3d444d;--iv-scale:88,166,255;--iv-pos:88,166,255;--iv-neg:255,123,99;--iv-row:rgba(255,166,87,.22)}}
[data-jp-theme-light=false] .iv-view,body.vscode-dark .iv-view,.iv-dark .iv-view{--iv-muted:#9198a1;--iv-line:#3d444d;--iv-scale:88,166,255;--iv-pos:88,166,255;--iv-neg:255,123,99;--iv-row:rgba(255,166,87,.22)}
[data-jp-theme-light=true] .iv-view,body.vscode-light .iv-view{--iv-muted:#59636e;--iv-line:#d0d7de;--iv-scale:31,94,168;--iv-pos:31,94,168;--iv-neg:200,60,40;--iv-row:rgba(230,85,13,.16)}
.iv-view h3{font-size:13px;margin:0 0 .3em}
.iv-view code,.iv-cell,.iv-tok,.iv-colhead,.iv-rowhead,.iv-bar-label{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.iv-note,.iv-legend{color:var(--iv-muted);font-size:11px;margin:.3em 0}
.iv-legend{display:flex;gap:.5em;align-items:center;flex-wrap:wrap}
.iv-ramp{display:inline-block;width:120px;height:10px;border:1px solid var(--iv-line);background:linear-gradient(90deg,rgba(var(--iv-scale),0),rgba(var(--iv-scale),1))}
.iv-swatch{display:inline-block;width:14px;height:10px}
.iv-body{display:flex;gap:1em;align-items:flex-start;flex-wrap:wrap}
.iv-attention .iv-body,.iv-dla .iv-body{display:block}
.iv-scroll{overflow:auto;max-width:100%;max-height:80vh}
.iv-table{border-collapse:collapse}
.iv-table td,.iv-table th{padding:1px 3px;white-space:pre;text-align:center}
.iv-cell{min-width:2.4em;max-width:7em;overflow:hidden;font-size:10.5px;border:1px solid var(--iv-bg);cursor:default}
.iv-ink{color:#fff}
.iv-rowhead{text-align:right!important;font-weight:normal;color:var(--iv-muted)}
.iv-output{font-weight:bold;color:var(--iv-fg);border-bottom:2px solid var(--iv-fg)}
.iv-colhead{font-weight:normal;color:var(--iv-muted);cursor:pointer}
.iv-on{color:var(--iv-mark)!important;font-weight:bold}
.iv-sel{outline:2px solid var(--iv-mark);outline-offset:-2px}
.iv-rank{font-size:10.5px;font-weight:bold;text-align:left!important}
.iv-side{min-width:14em;max-width:22em;font-size:11.5px}
.iv-side-title{font-weight:bold;margin-bottom:.3em}
.iv-side ol{margin:0 0 .4em;padding-left:1.6em}
.iv-side li{display:flex;gap:.4em;align-items:center}
.iv-side li code{min-width:7em}
.iv-minibar{display:inline-block;height:8px;background:rgba(var(--iv-scale),.8);max-width:6em;min-width:1px}
.iv-num{font-variant-numeric:tabular-nums}
.iv-score.iv-top{box-shadow:inset 0 0 0 2px var(--iv-mark)}
.iv-score{cursor:pointer}
.iv-controls{display:flex;gap:.4em;flex-wrap:wrap;align-items:center;margin:.2em 0 .4em}
.iv-btn,.iv-controls select{font:inherit;color:inherit;background:transparent;border:1px solid var(--iv-line);border-radius:4px;padding:1px 6px;cursor:pointer}
.iv-btn.iv-on{border-color:var(--iv-mark)}
.iv-strip{display:flex;flex-wrap:wrap;gap:2px;align-items:center;margin:.3em 0}
.iv-strip-title{color:var(--iv-muted);margin-right:.4em}
.iv-tok{padding:0 3px;border:1px solid var(--iv-line);border-radius:3px;white-space:pre;cursor:default}
.iv-panels{display:flex;flex-wrap:wrap;gap:.8em;align-items:flex-start}
.iv-panel{margin:0}
.iv-panel figcaption{font-size:11px;color:var(--iv-muted)}
.iv-matrix{display:grid;gap:0}
.iv-a{display:block;min-width:0}
.iv-masked{background:var(--iv-masked)}
.iv-a.iv-row,.iv-a.iv-col{box-shadow:inset 0 0 0 1px var(--iv-mark)}
.iv-a.iv-sel{outline:2px solid var(--iv-mark);outline-offset:-1px}
.iv-matrix .iv-rowhead{font-size:10px;padding-right:4px;white-space:pre;line-height:1}
.iv-matrix .iv-colhead{font-size:10px;writing-mode:vertical-rl;transform:rotate(180deg);white-space:pre;padding-bottom:3px;overflow:hidden;max-height:7em}
.iv-corner{font-size:9px;color:var(--iv-muted)}
.iv-bars{display:grid;grid-template-columns:max-content minmax(12em,1fr) max-content;gap:1px .6em;align-items:center;max-width:60em}
.iv-bar-row{display:contents}
.iv-bar-row.iv-rest,.iv-bar-row.iv-total{display:block;grid-column:1/-1;color:var(--iv-muted);padding-top:.2em}
.iv-bar-row.iv-total{color:var(--iv-fg);font-weight:bold;border-top:1px solid var(--iv-line)}
.iv-bar-row.iv-sel>*{color:var(--iv-mark);font-weight:bold}
.iv-bar-row.iv-sel{outline:none}
.iv-track{position:relative;height:12px;background:linear-gradient(90deg,transparent calc(50% - .5px),var(--iv-line) calc(50% - .5px),var(--iv-line) calc(50% + .5px),transparent calc(50% + .5px))}
.iv-bar{position:absolute;top:1px;bottom:1px}
.iv-pos{background:rgba(var(--iv-pos),.85)}
.iv-neg{background:rgba(var(--iv-neg),.85)}
.iv-bar-label{text-align:right;font-size:11px}
.iv-diverging{background:linear-gradient(90deg,rgba(var(--iv-neg),1),rgba(var(--iv-neg),0) 50%,rgba(var(--iv-pos),0) 50%,rgba(var(--iv-pos),1))}
.iv-pair{display:flex;gap:1em;flex-wrap:wrap;align-items:flex-start}
.iv-caption{caption-side:top;text-align:left;font-weight:bold;font-size:11px;padding-bottom:2px}
.iv-patch{cursor:default}
.iv-metric{text-align:left!important;min-width:9em;max-width:none}
.iv-metric-track{display:inline-block;width:5em;margin-right:.4em;vertical-align:middle;background:var(--iv-masked)}
.iv-features{margin:0;padding-left:1.6em}
.iv-features li{display:flex;gap:.4em;align-items:center;cursor:default}
.iv-features li.iv-on code{color:var(--iv-mark);font-weight:bold}
.iv-error{color:#d1242f;font-weight:bold}"""
"""The views' style: colours from the notebook's theme where it has one, light and dark."""

SCRIPT = r"""(function () {
  "use strict";
  var VERSION = 2;
  if (window.introspectViews && window.introspectViews.version >= VERSION) return;
  var IV = { version: VERSION, views: {}, errors: [] };
  window.introspectViews = IV;
  var TARGET = ["#e6550d", "#31a354", "#d62728", "#756bb1", "#8c564b"];
  var ESC = { "\n": "\\n", "\t": "\\t", "\r": "\\r" };
  var HIDDEN = /[\p{C}\p{Z}]/u;

  function hex(c, n) { return c.toString(16).padStart(n, "0"); }
  // The token as the cell shows it: a space is drawn as U+2423, what would not print is escaped
  // the way Python's repr escapes it, so no two different tokens look alike.
  function visible(t, width) {
    var out = [];
    for (var ch of t) {
      var c = ch.codePointAt(0);
      if (ch === " ") out.push("\u2423");
      else if (HIDDEN.test(ch)) out.push(ESC[ch] || (c < 0x100 ? "\\x" + hex(c, 2) : c < 0x10000 ? "\\u" + hex(c, 4) : "\\U" + hex(c, 8)));
      else out.push(ch);
    }
    var s = out.join("");
    var chars = Array.from(s);
    if (width && chars.length > width) s = chars.slice(0, width - 1).join("") + "\u2026";
    return s;
  }
  IV.visible = visible;

  function el(tag, cls, attrs, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (attrs) for (var k in attrs) if (attrs[k] !== null && attrs[k] !== undefined) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function label(e, text) { e.title = text; e.setAttribute("aria-label", text); }
  // v with f decimals as Python's format writes it: toFixed rounds the exact value of v, but
  // an exact tie (0.0625 to three decimals) away from zero, where Python takes the even digit.
  function fixed(v, f) {
    var s = v.toFixed(f), a = Math.abs(v);
    if (!(a < 1e21) || a < 5 * Math.pow(10, -f - 1)) return s;
    var exact = a.toFixed(100), dot = exact.indexOf("."), at = dot + 1 + f;
    if (exact.charAt(at) !== "5" || /[1-9]/.test(exact.slice(at + 1))) return s;
    var kept = f ? exact.slice(0, at) : exact.slice(0, dot);
    return +kept.charAt(kept.length - 1) % 2 === 0 ? (v < 0 ? "-" : "") + kept : s;
  }
  IV.fixed = fixed;
  function fmt(v) { return v === 0 || (v >= 0.001 && v < 1000) ? fixed(v, 3) : v.toExponential(1); }
  IV.fmt = fmt;
  function signed(v) { return (v >= 0 ? "+" : "\u2212") + fixed(Math.abs(v), 3); }
  // One sequential scale for every view: the scale colour over the theme's background.
  function shade(e, v) {
    e.style.background = "rgba(var(--iv-scale)," + Math.max(0, Math.min(1, v)).toFixed(3) + ")";
    e.classList.toggle("iv-ink", v > 0.55);
  }
  function swap(list, cls, next) {
    list.forEach(function (e) { e.classList.remove(cls); });
    next.forEach(function (e) { e.classList.add(cls); });
    return next;
  }
  function tokenAt(d, p) { return "'" + visible(d.tokens[p], 16) + "'"; }
  function bytes(b64) {
    var raw = atob(b64), out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }
  function legend(root, lo, hi, what) {
    var box = root.querySelector(".iv-legend");
    if (!box) return;
    box.appendChild(el("span", "", null, lo));
    box.appendChild(el("span", "iv-ramp", { role: "img", "aria-label": what + ": " + lo + " (pale) to " + hi + " (dark)" }));
    box.appendChild(el("span", "", null, hi + " \u2014 " + what));
  }

  // -- lens: rows (blocks) x positions, top token and probability per cell ------------------
  function lens(root, d, body) {
    var R = d.rows.length, C = d.positions.length, K = d.k;
    var st = { row: R - 1, position: d.positions[C - 1], focus: null };
    var table = el("table", "iv-table iv-lens", { role: "grid", "aria-label": d.title });
    var cells = [], heads = [], cols = [], targetCells = [];
    var col = function (p) { return d.positions.indexOf(p); };
    function describe(r, c) {
      var base = (r * C + c) * K, p = d.positions[c], parts = [];
      for (var j = 0; j < K; j++) parts.push((j + 1) + ". '" + visible(d.vocab[d.top[base + j]]) + "' " + fmt(d.probs[base + j]));
      var text = d.rowLabels[r] + ", after " + tokenAt(d, p) + " (position " + p + "): " + parts.join("; ");
      d.targets.forEach(function (g) {
        if (g.ranks) text += "; target '" + visible(g.token) + "' #" + (g.ranks[r * C + c] + 1) + " " + fmt(g.probs[r * C + c]);
      });
      return text;
    }
    for (var r = R - 1; r >= 0; r--) {
      var tr = el("tr");
      var th = el("th", "iv-rowhead" + (d.output && r === R - 1 ? " iv-output" : ""), { scope: "row", "data-row": d.rows[r] }, d.rowLabels[r]);
      heads[r] = th;
      tr.appendChild(th);
      cells[r] = [];
      for (var c = 0; c < C; c++) {
        var base = (r * C + c) * K, id = d.top[base];
        var td = el("td", "iv-cell", {
          "data-block": d.blocks[r], "data-row": d.rows[r], "data-position": d.positions[c],
          "data-token": d.vocab[id], "data-token-id": id, "data-prob": d.probs[base], tabindex: "-1"
        }, visible(d.vocab[id], 8));
        shade(td, d.probs[base]);
        label(td, describe(r, c));
        d.targets.forEach(function (g, j) {
          if (g.id === id) { td.style.boxShadow = "inset 0 0 0 2px " + TARGET[j % TARGET.length]; td.setAttribute("data-target-top", j); }
        });
        tr.appendChild(td);
        cells[r][c] = td;
      }
      targetCells[r] = d.targets.map(function (g, j) {
        var td = el("td", "iv-rank", { "data-row": d.rows[r], "data-target": j, style: "color:" + TARGET[j % TARGET.length] });
        tr.appendChild(td);
        return td;
      });
      table.appendChild(tr);
    }
    var foot = el("tr", "iv-foot");
    foot.appendChild(el("th", "", { scope: "col" }, "input \u2192"));
    d.positions.forEach(function (p) {
      var th = el("th", "iv-colhead", { scope: "col", "data-position": p, tabindex: "-1" }, visible(d.tokens[p], 8));
      label(th, "input token " + p + ": " + tokenAt(d, p) + " (click: follow the targets here)");
      cols.push(th);
      foot.appendChild(th);
    });
    d.targets.forEach(function (g, j) {
      foot.appendChild(el("th", "iv-rank", { scope: "col", style: "color:" + TARGET[j % TARGET.length] }, "'" + visible(g.token, 10) + "'"));
    });
    table.appendChild(foot);
    var wrap = el("div", "iv-scroll");
    wrap.appendChild(table);
    body.appendChild(wrap);
    var side = el("div", "iv-side", { "aria-live": "polite" });
    body.appendChild(side);
    var on = { cells: [], heads: [] };

    function drawTargets() {
      var c = col(st.position);
      for (var r = 0; r < R; r++) d.targets.forEach(function (g, j) {
        var td = targetCells[r][j];
        var text = g.ranks ? "#" + (g.ranks[r * C + c] + 1) : "";
        td.textContent = text;
        td.setAttribute("data-position", st.position);
        td.setAttribute("data-rank", g.ranks ? g.ranks[r * C + c] : "");
        if (g.ranks) label(td, "'" + visible(g.token) + "' after " + tokenAt(d, st.position) + ", " + d.rowLabels[r] + ": rank #" + (g.ranks[r * C + c] + 1) + ", probability " + fmt(g.probs[r * C + c]));
      });
    }
    function draw() {
      var c = col(st.position), r = st.row;
      on.cells = swap(on.cells, "iv-sel", [cells[r][c]]);
      on.heads = swap(on.heads, "iv-on", [heads[r], cols[c]]);
      side.textContent = "";
      side.appendChild(el("div", "iv-side-title", null, d.rowLabels[r] + " after " + tokenAt(d, st.position)));
      var ol = el("ol");
      var base = (r * C + c) * K;
      for (var j = 0; j < K; j++) {
        var li = el("li", "", { "data-token-id": d.top[base + j] });
        var bar = el("span", "iv-minibar");
        bar.style.width = (d.probs[base + j] * 100).toFixed(1) + "%";
        li.appendChild(el("code", "", null, visible(d.vocab[d.top[base + j]], 16)));
        li.appendChild(bar);
        li.appendChild(el("span", "iv-num", null, fmt(d.probs[base + j])));
        ol.appendChild(li);
      }
      side.appendChild(ol);
      d.targets.forEach(function (g, j) {
        side.appendChild(el("div", "", { style: "color:" + TARGET[j % TARGET.length] },
          "'" + visible(g.token, 16) + "': " + (g.ranks ? "#" + (g.ranks[r * C + c] + 1) + ", " + fmt(g.probs[r * C + c]) : "rank not kept")));
      });
      drawTargets();
    }
    function select(s) {
      if (s.row !== undefined) st.row = d.rows.indexOf(s.row);
      if (s.block !== undefined) st.row = d.blocks.indexOf(Number(s.block));
      if (s.position !== undefined) st.position = Number(s.position);
      if (st.row < 0 || col(st.position) < 0) throw new Error("no such cell: " + JSON.stringify(s));
      draw();
      return state();
    }
    function state() { return { row: d.rows[st.row], block: d.blocks[st.row], position: st.position }; }
    body.addEventListener("mouseover", function (e) {
      var t = e.target.closest(".iv-cell");
      if (t) select({ row: t.getAttribute("data-row"), position: t.getAttribute("data-position") });
    });
    body.addEventListener("click", function (e) {
      var t = e.target.closest(".iv-colhead,.iv-cell");
      if (t) select({ position: t.getAttribute("data-position") });
    });
    legend(root, "0", "1", "probability of the top token");
    draw();
    return { select: select, state: state };
  }

  // -- attention: one block's heads, query x key ---------------------------------------------
  function attention(root, d, body) {
    var n = d.tokens.length, tri = n * (n + 1) / 2;
    var blocks = {}, order = [];
    d.blocks.forEach(function (b) { blocks[b.block] = b; order.push(b.block); });
    var first = d.blocks[0];
    var st = { block: first.block, head: first.heads.length === 1 ? first.heads[0] : "all", query: n - 1, key: null, focus: "query" };
    var controls = el("div", "iv-controls");
    var area = el("div", "iv-panels");
    var strip = el("div", "iv-strip", { "aria-live": "polite" });
    var blockPick = null;
    if (order.length > 1) {
      blockPick = el("select", "", { "aria-label": "block" });
      order.forEach(function (b) { blockPick.appendChild(el("option", "", { value: b }, "block[" + b + "]")); });
      blockPick.addEventListener("change", function () { select({ block: blockPick.value }); });
      controls.appendChild(blockPick);
    }
    var headBar = el("span", "iv-heads", { role: "group", "aria-label": "head" });
    controls.appendChild(headBar);
    body.appendChild(controls);
    body.appendChild(strip);
    body.appendChild(area);
    var rows = [], colsOf = [], rowHeads = [], colHeads = [], lit = { row: [], col: [], sel: [], lab: [] };

    function weight(b, hi, q, k) {
      if (!b.bytes) b.bytes = bytes(b.data);
      if (b.causal) return k > q ? null : b.bytes[hi * tri + q * (q + 1) / 2 + k] * d.scale;
      return b.bytes[(hi * n + q) * n + k] * d.scale;
    }
    function shownHeads(b) { return st.head === "all" ? b.heads : [st.head]; }
    function render() {
      var b = blocks[st.block];
      if (blockPick) blockPick.value = String(st.block);
      headBar.textContent = "";
      var choices = b.heads.length > 1 ? ["all"].concat(b.heads) : b.heads;
      choices.forEach(function (h) {
        var btn = el("button", "iv-btn" + (h === st.head ? " iv-on" : ""), { type: "button", "data-head": h, "aria-pressed": String(h === st.head) }, h === "all" ? "all heads" : "head " + h);
        btn.addEventListener("click", function () { select({ head: h }); });
        headBar.appendChild(btn);
      });
      area.textContent = "";
      rows = []; colsOf = []; rowHeads = []; colHeads = [];
      for (var q = 0; q < n; q++) { rows[q] = []; colsOf[q] = []; }
      var heads = shownHeads(b), single = heads.length === 1;
      var size = single ? Math.max(4, Math.min(22, Math.floor(440 / n))) : Math.max(2, Math.min(18, Math.floor(200 / n)));
      heads.forEach(function (h) {
        var hi = b.heads.indexOf(h);
        var panel = el("figure", "iv-panel", { "data-block": b.block, "data-head": h });
        panel.appendChild(el("figcaption", "", null, "head " + h));
        var grid = el("div", "iv-matrix" + (single ? " iv-labelled" : ""), { role: "grid", "aria-label": "block[" + b.block + "] head " + h + ": query (down) x key (across)" });
        grid.style.gridTemplateColumns = (single ? "max-content " : "") + "repeat(" + n + "," + size + "px)";
        grid.style.gridAutoRows = size + "px";
        if (single) {
          grid.appendChild(el("span", "iv-corner", null, "q\\k"));
          for (var k0 = 0; k0 < n; k0++) {
            var ch = el("span", "iv-colhead iv-keyhead", { "data-key": k0 }, visible(d.tokens[k0], 6));
            label(ch, "key " + k0 + ": " + tokenAt(d, k0));
            colHeads[k0] = ch;
            grid.appendChild(ch);
          }
          grid.style.gridAutoRows = "auto";
        }
        for (var q1 = 0; q1 < n; q1++) {
          if (single) {
            var rh = el("span", "iv-rowhead iv-queryhead", { "data-query": q1 }, visible(d.tokens[q1], 10));
            label(rh, "query " + q1 + ": " + tokenAt(d, q1));
            rowHeads[q1] = rh;
            grid.appendChild(rh);
          }
          for (var k = 0; k < n; k++) {
            var w = weight(b, hi, q1, k);
            var cell = el("span", "iv-a" + (w === null ? " iv-masked" : ""), {
              "data-block": b.block, "data-head": h, "data-query": q1, "data-key": k,
              "data-weight": w === null ? "" : w.toFixed(4), role: "gridcell"
            });
            if (single) cell.style.height = size + "px";
            if (w !== null) shade(cell, w);
            label(cell, "block[" + b.block + "] head " + h + ": query " + q1 + " " + tokenAt(d, q1) + " \u2192 key " + k + " " + tokenAt(d, k) + ": " + (w === null ? "masked" : w.toFixed(3)));
            rows[q1].push(cell);
            colsOf[k].push(cell);
            grid.appendChild(cell);
          }
        }
        panel.appendChild(grid);
        area.appendChild(panel);
      });
      highlight();
    }
    function stripHead() {
      var b = blocks[st.block];
      return st.head === "all" ? (st.stripHead !== undefined && b.heads.indexOf(st.stripHead) >= 0 ? st.stripHead : b.heads[0]) : st.head;
    }
    function highlight() {
      var b = blocks[st.block], h = stripHead(), hi = b.heads.indexOf(h);
      var useRow = st.focus !== "key" && st.query !== null, useCol = st.focus !== "query" && st.key !== null;
      lit.row = swap(lit.row, "iv-row", useRow ? rows[st.query] : []);
      lit.col = swap(lit.col, "iv-col", useCol ? colsOf[st.key] : []);
      lit.sel = swap(lit.sel, "iv-sel", useRow && useCol ? rows[st.query].filter(function (c) { return c.getAttribute("data-key") === String(st.key); }) : []);
      lit.lab = swap(lit.lab, "iv-on", [useRow ? rowHeads[st.query] : null, useCol ? colHeads[st.key] : null].filter(Boolean));
      strip.textContent = "";
      var from = !useCol || useRow;
      var what = from
        ? "attention from " + tokenAt(d, st.query) + " (query " + st.query + ")"
        : "attention to " + tokenAt(d, st.key) + " (key " + st.key + ")";
      strip.appendChild(el("span", "iv-strip-title", null, "block[" + b.block + "] head " + h + ", " + what + ":"));
      for (var p = 0; p < n; p++) {
        var w = from ? weight(b, hi, st.query, p) : weight(b, hi, p, st.key);
        var tok = el("span", "iv-tok" + ((from ? p === st.query : p === st.key) ? " iv-sel" : ""), {
          "data-block": b.block, "data-head": h, "data-position": p,
          "data-query": from ? st.query : p, "data-key": from ? p : st.key,
          "data-weight": w === null ? "" : w.toFixed(4)
        }, visible(d.tokens[p], 12));
        if (w !== null) shade(tok, w);
        label(tok, "position " + p + " " + tokenAt(d, p) + ": " + (w === null ? "masked" : w.toFixed(3)) + " (hover: attention from here)");
        strip.appendChild(tok);
      }
    }
    function select(s) {
      if (s.block !== undefined) {
        var nb = Number(s.block);
        if (!blocks[nb]) throw new Error("block " + s.block + " is not in this view");
        if (nb !== st.block) {
          st.block = nb;
          if (st.head !== "all" && blocks[nb].heads.indexOf(st.head) < 0) st.head = "all";
          st.redraw = true;
        }
      }
      if (s.head !== undefined) {
        var h = s.head === "all" ? "all" : Number(s.head);
        if (h !== "all" && blocks[st.block].heads.indexOf(h) < 0) throw new Error("head " + s.head + " is not in this view");
        if (h !== st.head) { st.head = h; st.redraw = true; }
        if (h !== "all") st.stripHead = h;
      }
      if (s.stripHead !== undefined) st.stripHead = Number(s.stripHead);
      if (s.query !== undefined) st.query = s.query === null ? null : Number(s.query);
      if (s.key !== undefined) st.key = s.key === null ? null : Number(s.key);
      st.focus = s.query !== undefined && s.key !== undefined ? "cell" : s.key !== undefined ? "key" : s.query !== undefined ? "query" : st.focus;
      if (st.redraw) { st.redraw = false; render(); } else highlight();
      return state();
    }
    function state() { return { block: st.block, head: st.head, query: st.query, key: st.key, focus: st.focus, stripHead: stripHead() }; }
    body.addEventListener("mouseover", function (e) {
      var t = e.target;
      if (t.classList.contains("iv-a")) select({ query: t.getAttribute("data-query"), key: t.getAttribute("data-key"), stripHead: t.getAttribute("data-head") });
      else if (t.classList.contains("iv-queryhead")) select({ query: t.getAttribute("data-query") });
      else if (t.classList.contains("iv-keyhead")) select({ key: t.getAttribute("data-key") });
      else if (t.classList.contains("iv-tok")) select({ query: t.getAttribute("data-position") });
    });
    legend(root, "0", "1", "attention weight (8-bit: byte \u00d7 1/255)");
    render();
    return { select: select, state: state };
  }

  // -- head scores: block x head ---------------------------------------------------------------
  function heads(root, d, body) {
    var B = d.blocks.length, H = d.numHeads, st = { block: null, head: null };
    var table = el("table", "iv-table iv-scores", { role: "grid", "aria-label": d.title });
    var cells = {}, lit = [];
    var top = {};
    d.top.forEach(function (t) { top[t.block + ":" + t.head] = true; });
    var hd = el("tr");
    hd.appendChild(el("th", "", { scope: "col" }, "block \\ head"));
    for (var h0 = 0; h0 < H; h0++) hd.appendChild(el("th", "iv-colhead", { scope: "col", "data-head": h0 }, String(h0)));
    table.appendChild(hd);
    d.blocks.forEach(function (b, r) {
      var tr = el("tr");
      tr.appendChild(el("th", "iv-rowhead", { scope: "row", "data-block": b }, "block[" + b + "]"));
      for (var h = 0; h < H; h++) {
        var v = d.values[r * H + h];
        var td = el("td", "iv-cell iv-score" + (top[b + ":" + h] ? " iv-top" : ""), { "data-block": b, "data-head": h, "data-value": v === null ? "" : v, tabindex: "-1" },
          v === null || B * H > 600 ? "" : fixed(v, 2));
        if (v !== null) shade(td, v);
        label(td, "block[" + b + "] head " + h + ": " + d.score + " score " + (v === null ? "(no such head)" : fixed(v, 3)) + (d.link ? " (click: its pattern on the prompt)" : ""));
        cells[b + ":" + h] = td;
        tr.appendChild(td);
      }
      table.appendChild(tr);
    });
    var wrap = el("div", "iv-scroll");
    wrap.appendChild(table);
    body.appendChild(wrap);
    function select(s) {
      var key = Number(s.block) + ":" + Number(s.head);
      if (!cells[key]) throw new Error("no head " + JSON.stringify(s));
      st.block = Number(s.block); st.head = Number(s.head);
      lit = swap(lit, "iv-sel", [cells[key]]);
      if (d.link && IV.views[d.link] && s.follow !== false) {
        var other = IV.views[d.link];
        try { other.select({ block: st.block, head: st.head }); st.linked = true; }
        catch (err) { st.linked = false; }
      }
      return state();
    }
    function state() { return { block: st.block, head: st.head, linked: !!st.linked }; }
    body.addEventListener("click", function (e) {
      var t = e.target.closest(".iv-score");
      if (t && t.getAttribute("data-value") !== "") {
        select({ block: t.getAttribute("data-block"), head: t.getAttribute("data-head") });
        var target = document.getElementById(d.link);
        if (target && target.scrollIntoView) target.scrollIntoView({ block: "nearest" });
      }
    });
    legend(root, "0", "1", d.score + " score");
    return { select: select, state: state };
  }

  // -- direct logit attribution: one bar per component ----------------------------------------
  function dla(root, d, body) {
    var N = d.labels.length, st = { component: null, all: N <= d.shown, byValue: true };
    var maxAbs = Math.max.apply(null, d.values.map(Math.abs).concat([1e-12]));
    var controls = el("div", "iv-controls");
    var more = el("button", "iv-btn", { type: "button", "data-action": "all" });
    var sort = el("button", "iv-btn", { type: "button", "data-action": "sort" });
    if (N > d.shown) controls.appendChild(more);
    controls.appendChild(sort);
    body.appendChild(controls);
    var list = el("div", "iv-bars", { role: "list", "aria-label": d.title });
    body.appendChild(list);
    var rows = {}, lit = [];
    function row(i) {
      var v = d.values[i], part = d.parts[i];
      var r = el("div", "iv-bar-row", { role: "listitem", "data-component": d.labels[i], "data-block": part[0], "data-part": part[1], "data-head": part[2], "data-value": v });
      r.appendChild(el("span", "iv-bar-label", null, d.labels[i]));
      var track = el("span", "iv-track");
      var bar = el("span", "iv-bar " + (v >= 0 ? "iv-pos" : "iv-neg"));
      var w = (Math.abs(v) / maxAbs) * 50;
      bar.style.width = w.toFixed(2) + "%";
      bar.style.left = (v >= 0 ? 50 : 50 - w).toFixed(2) + "%";
      track.appendChild(bar);
      r.appendChild(track);
      r.appendChild(el("span", "iv-num", null, signed(v)));
      label(r, d.labels[i] + ": " + signed(v) + " to the logit of '" + visible(d.tokenText) + "'");
      rows[d.labels[i]] = r;
      return r;
    }
    function draw() {
      list.textContent = "";
      rows = {};
      var idx = d.values.map(function (_, i) { return i; });
      if (st.byValue) idx.sort(function (a, b) { return Math.abs(d.values[b]) - Math.abs(d.values[a]) || a - b; });
      var shown = st.all ? idx : idx.slice(0, d.shown);
      shown.forEach(function (i) { list.appendChild(row(i)); });
      var rest = idx.length - shown.length, restSum = 0;
      idx.slice(shown.length).forEach(function (i) { restSum += d.values[i]; });
      if (rest) list.appendChild(el("div", "iv-bar-row iv-rest", { role: "listitem", "data-value": restSum }, rest + " more components: " + signed(restSum)));
      var total = d.values.reduce(function (a, b) { return a + b; }, 0);
      var tot = el("div", "iv-bar-row iv-total", { role: "listitem", "data-total": total },
        "sum of all " + N + " = " + total.toFixed(3) + "; the model's logit = " + fixed(d.logit, 3));
      list.appendChild(tot);
      more.textContent = st.all ? "show the top " + d.shown : "show all " + N;
      sort.textContent = st.byValue ? "model order" : "largest first";
      lit = st.component && rows[st.component] ? swap([], "iv-sel", [rows[st.component]]) : [];
    }
    function select(s) {
      if (s.all !== undefined) st.all = !!s.all;
      if (s.byValue !== undefined) st.byValue = !!s.byValue;
      if (s.component !== undefined) {
        if (d.labels.indexOf(s.component) < 0) throw new Error("no component " + s.component);
        st.component = s.component;
        if (!rows[s.component]) st.all = true;
      }
      draw();
      return state();
    }
    function state() { return { component: st.component, all: st.all, byValue: st.byValue }; }
    more.addEventListener("click", function () { select({ all: !st.all }); });
    sort.addEventListener("click", function () { select({ byValue: !st.byValue }); });
    list.addEventListener("mouseover", function (e) {
      var t = e.target.closest(".iv-bar-row[data-component]");
      if (t && t.getAttribute("data-component") !== st.component) select({ component: t.getAttribute("data-component") });
    });
    var box = root.querySelector(".iv-legend");
    if (box) {
      box.appendChild(el("span", "iv-swatch iv-pos", { role: "img", "aria-label": "raises the logit" }));
      box.appendChild(el("span", "", null, "raises the logit"));
      box.appendChild(el("span", "iv-swatch iv-neg", { role: "img", "aria-label": "lowers the logit" }));
      box.appendChild(el("span", "", null, "lowers it; bar length: |value| / " + maxAbs.toFixed(3)));
    }
    draw();
    return { select: select, state: state };
  }

  // -- patching: locators x positions (or heads), a table per method side by side ----------------
  function diverge(e, v, scale) {
    if (v === null) { e.classList.add("iv-masked"); return; }
    var a = Math.min(1, Math.abs(v) / scale);
    e.style.background = "rgba(var(" + (v >= 0 ? "--iv-pos" : "--iv-neg") + ")," + a.toFixed(3) + ")";
    e.classList.toggle("iv-ink", a > 0.55);
  }
  function short(v) { return v === null ? "" : Math.abs(v) >= 9.995 ? fixed(v, 1) : fixed(v, 2); }
  function patching(root, d, body) {
    var T = d.tables.length, P = d.panels.length, R = d.rows.length, C = d.columns.length;
    var cells = {}, lit = [], small = T * P * R * C <= 600, best = 0;
    var st = { panel: 0, row: 0, column: 0 };
    function at(t, p, r, c) { return d.values[((t * P + p) * R + r) * C + c]; }
    function head(p, c) { return d.axis === "head" ? d.columns[c] : d.panels[p]; }
    function position(c) { return d.axis === "position" ? d.columns[c] : null; }
    function column(c) {
      var x = d.columns[c];
      return d.axis === "head" ? "head " + x : "position " + x + (d.tokens[x] !== undefined ? " " + tokenAt(d, x) : "");
    }
    function where(p, r, c) { return d.rows[r] + (d.panels[p] !== null ? " head " + d.panels[p] : "") + ", " + column(c); }
    function values(p, r, c) {
      return d.tables.map(function (name, t) { var v = at(t, p, r, c); return name + " " + (v === null ? "n/a" : signed(v)); }).join("; ");
    }
    for (var i = 0; i < P * R * C; i++) if (Math.abs(d.values[i] || 0) > Math.abs(d.values[best] || 0)) best = i;
    st = { panel: Math.floor(best / (R * C)), row: Math.floor(best / C) % R, column: best % C };
    var area = el("div", "iv-panels");
    d.panels.forEach(function (ph, p) {
      var fig = el("figure", "iv-panel", { "data-head": ph });
      if (ph !== null) fig.appendChild(el("figcaption", "", null, "head " + ph));
      var pair = el("div", "iv-pair");
      d.tables.forEach(function (name, t) {
        var table = el("table", "iv-table iv-patch-table", { role: "grid", "data-table": t, "aria-label": name + (ph !== null ? ", head " + ph : "") });
        table.appendChild(el("caption", "iv-caption", null, name));
        var hd = el("tr");
        hd.appendChild(el("th", "", { scope: "col" }, d.axis === "head" ? "locator \\ head" : "locator \\ position"));
        d.columns.forEach(function (x, c) {
          var text = d.axis === "head" ? String(x) : x + (d.tokens[x] !== undefined ? " " + visible(d.tokens[x], 8) : "");
          var th = el("th", "iv-colhead", { scope: "col", "data-position": position(c), "data-head": d.axis === "head" ? x : null }, text);
          label(th, column(c));
          hd.appendChild(th);
        });
        table.appendChild(hd);
        d.rows.forEach(function (loc, r) {
          var tr = el("tr");
          tr.appendChild(el("th", "iv-rowhead", { scope: "row", "data-locator": loc, "data-block": d.blocks[r] }, loc));
          for (var c = 0; c < C; c++) {
            var v = at(t, p, r, c);
            var td = el("td", "iv-cell iv-patch", {
              "data-table": t, "data-method": name, "data-locator": loc, "data-block": d.blocks[r],
              "data-position": position(c), "data-head": head(p, c), "data-panel": p, "data-row": r,
              "data-column": c, "data-value": v === null ? "" : v, tabindex: "-1"
            }, small ? short(v) : "");
            diverge(td, v, d.scale);
            label(td, where(p, r, c) + ": " + values(p, r, c));
            var key = p + ":" + r + ":" + c;
            (cells[key] = cells[key] || []).push(td);
            tr.appendChild(td);
          }
          table.appendChild(tr);
        });
        var box = el("div", "iv-scroll");
        box.appendChild(table);
        pair.appendChild(box);
      });
      fig.appendChild(pair);
      area.appendChild(fig);
    });
    var side = el("div", "iv-side", { "aria-live": "polite" });
    body.appendChild(area);
    body.appendChild(side);
    function draw() {
      lit = swap(lit, "iv-sel", cells[st.panel + ":" + st.row + ":" + st.column]);
      side.textContent = "";
      side.appendChild(el("div", "iv-side-title", null, where(st.panel, st.row, st.column)));
      var vals = d.tables.map(function (_, t) { return at(t, st.panel, st.row, st.column); });
      d.tables.forEach(function (name, t) {
        side.appendChild(el("div", "iv-num", { "data-table": t, "data-value": vals[t] === null ? "" : vals[t] }, name + ": " + (vals[t] === null ? "n/a" : signed(vals[t]))));
      });
      if (T > 1 && vals[0] !== null && vals[1] !== null) {
        side.appendChild(el("div", "iv-num", { "data-difference": vals[0] - vals[1] }, "difference: " + signed(vals[0] - vals[1])));
      }
    }
    function select(s) {
      var p = s.panel !== undefined ? Number(s.panel) : P > 1 && s.head !== undefined ? d.panels.indexOf(Number(s.head)) : st.panel;
      var r = s.row !== undefined ? Number(s.row) : s.locator !== undefined ? d.rows.indexOf(s.locator) : st.row;
      var c = s.column !== undefined ? Number(s.column) : st.column;
      if (s.column === undefined && d.axis === "head" && s.head !== undefined) c = d.columns.indexOf(Number(s.head));
      if (s.column === undefined && d.axis === "position" && s.position !== undefined) c = d.columns.indexOf(Number(s.position));
      if (!(p >= 0 && p < P && r >= 0 && r < R && c >= 0 && c < C)) throw new Error("no such cell: " + JSON.stringify(s));
      st = { panel: p, row: r, column: c };
      draw();
      return state();
    }
    function state() {
      return { locator: d.rows[st.row], position: position(st.column), head: head(st.panel, st.column),
        values: d.tables.map(function (_, t) { return at(t, st.panel, st.row, st.column); }) };
    }
    body.addEventListener("mouseover", function (e) {
      var t = e.target.closest(".iv-patch");
      if (t) select({ panel: t.getAttribute("data-panel"), row: t.getAttribute("data-row"), column: t.getAttribute("data-column") });
    });
    var box = root.querySelector(".iv-legend");
    if (box) {
      box.appendChild(el("span", "", null, signed(-d.scale)));
      box.appendChild(el("span", "iv-ramp iv-diverging", { role: "img", "aria-label": "change of the metric: " + signed(-d.scale) + " (red) through 0 (blank) to " + signed(d.scale) + " (blue)" }));
      box.appendChild(el("span", "", null, signed(d.scale) + " \u2014 change of the metric (blue raises it, red lowers it; 0 is blank)"));
    }
    draw();
    return { select: select, state: state };
  }

  // -- SAE evaluation: a row per SAE, a bar per figure -------------------------------------------
  function saeEval(root, d, body) {
    var M = d.metrics, st = { row: 0, metric: M[0].key }, cells = {}, rows = [], lit = [];
    var maxL0 = Math.max.apply(null, d.rows.map(function (x) { return x.values.l0 || 0; }).concat([1e-12]));
    function text(m, x) {
      var v = x.values[m.key];
      if (v === null) return "n/a";
      if (m.bar === "dead") return v + " / " + x.dSae + " (" + (100 * v / x.dSae).toFixed(1) + "%)";
      return m.bar === "count" ? fixed(v, 1) : fixed(v, 3);
    }
    function share(m, x) {
      var v = x.values[m.key];
      if (v === null) return 0;
      return m.bar === "dead" ? v / x.dSae : m.bar === "count" ? v / maxL0 : v;
    }
    var table = el("table", "iv-table iv-sae-table", { role: "grid", "aria-label": d.title });
    var hd = el("tr");
    hd.appendChild(el("th", "", { scope: "col" }, "SAE"));
    M.forEach(function (m) { var th = el("th", "iv-colhead", { scope: "col", "data-metric": m.key }, m.name); label(th, m.name + ": " + m.means); hd.appendChild(th); });
    table.appendChild(hd);
    d.rows.forEach(function (x, r) {
      var tr = el("tr", "iv-sae-row", { "data-row": r, "data-block": x.block, "data-at": x.at });
      var th = el("th", "iv-rowhead", { scope: "row", "data-row": r, "data-block": x.block }, x.name);
      rows.push(th);
      tr.appendChild(th);
      M.forEach(function (m) {
        var v = x.values[m.key], f = share(m, x);
        var td = el("td", "iv-cell iv-metric", { "data-row": r, "data-metric": m.key, "data-block": x.block, "data-value": v === null ? "" : v, tabindex: "-1" });
        var track = el("span", "iv-track iv-metric-track");
        var bar = el("span", "iv-bar " + (m.bar === "dead" || f < 0 ? "iv-neg" : "iv-pos"));
        bar.style.left = "0";
        bar.style.width = (Math.max(0, Math.min(1, Math.abs(f))) * 100).toFixed(1) + "%";
        track.appendChild(bar);
        td.appendChild(track);
        td.appendChild(el("span", "iv-num", null, text(m, x)));
        label(td, x.name + ": " + m.name + " " + text(m, x) + " (" + m.means + ")");
        cells[r + ":" + m.key] = td;
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    var wrap = el("div", "iv-scroll");
    wrap.appendChild(table);
    var side = el("div", "iv-side", { "aria-live": "polite" });
    body.appendChild(wrap);
    body.appendChild(side);
    function draw() {
      var x = d.rows[st.row];
      lit = swap(lit, "iv-sel", [cells[st.row + ":" + st.metric]]);
      rows.forEach(function (th, r) { th.classList.toggle("iv-on", r === st.row); });
      side.textContent = "";
      side.appendChild(el("div", "iv-side-title", null, x.name + " on " + x.tokens + " tokens"));
      [["CE clean", x.ce[0]], ["CE spliced", x.ce[1]], ["CE zero-ablated", x.ce[2]], ["KL spliced", x.kl[0]], ["KL zero-ablated", x.kl[1]]].forEach(function (pair) {
        side.appendChild(el("div", "iv-num", { "data-name": pair[0], "data-value": pair[1] === null ? "" : pair[1] }, pair[0] + ": " + (pair[1] === null ? "n/a" : fixed(pair[1], 4))));
      });
    }
    function select(s) {
      var r = s.row !== undefined ? Number(s.row) : st.row, m = s.metric !== undefined ? s.metric : st.metric;
      if (!d.rows[r] || !M.some(function (x) { return x.key === m; })) throw new Error("no such cell: " + JSON.stringify(s));
      st = { row: r, metric: m };
      draw();
      return state();
    }
    function state() { return { row: st.row, metric: st.metric, name: d.rows[st.row].name }; }
    body.addEventListener("mouseover", function (e) {
      var t = e.target.closest(".iv-metric");
      if (t) select({ row: t.getAttribute("data-row"), metric: t.getAttribute("data-metric") });
    });
    var box = root.querySelector(".iv-legend");
    if (box) {
      box.appendChild(el("span", "iv-swatch iv-pos", { role: "img", "aria-label": "a score, L0" }));
      box.appendChild(el("span", "", null, "score on 0..1 (1 is best); L0 against the largest shown"));
      box.appendChild(el("span", "iv-swatch iv-neg", { role: "img", "aria-label": "dead latents, a negative score" }));
      box.appendChild(el("span", "", null, "dead latents as a share of d_sae; a score below 0"));
    }
    draw();
    return { select: select, state: state };
  }

  // -- SAE features: a token strip, the top latents of a token, a latent over the tokens -------
  function saeFeatures(root, d, body) {
    var n = d.tokens.length, index = {}, most = {};
    d.latents.forEach(function (f, i) {
      index[f] = i;
      var m = 0;
      for (var p = 0; p < n; p++) m = Math.max(m, d.acts[i * n + p] || 0);
      most[f] = m;
    });
    function act(f, p) { return d.acts[index[f] * n + p] || 0; }
    var last = n - 1;
    while (last > 0 && !d.top[last].length) last--;
    var st = { position: n - 1, feature: d.top[last].length ? d.top[last][0][0] : d.latents[0] };
    var strip = el("div", "iv-strip", { "aria-live": "polite" });
    var side = el("div", "iv-side", { "aria-live": "polite" });
    body.appendChild(strip);
    body.appendChild(side);
    function draw() {
      strip.textContent = "";
      strip.appendChild(el("span", "iv-strip-title", null, "latent " + st.feature + " over the tokens:"));
      for (var p = 0; p < n; p++) {
        var v = act(st.feature, p);
        var tok = el("span", "iv-tok" + (p === st.position ? " iv-sel" : ""), { "data-position": p, "data-block": d.block, "data-feature": st.feature, "data-value": v }, visible(d.tokens[p], 12));
        shade(tok, most[st.feature] > 0 ? v / most[st.feature] : 0);
        label(tok, "position " + p + " " + tokenAt(d, p) + ": latent " + st.feature + " " + fmt(v) + " (hover: its top latents)");
        strip.appendChild(tok);
      }
      side.textContent = "";
      side.appendChild(el("div", "iv-side-title", null, "top latents after " + tokenAt(d, st.position) + " (position " + st.position + ")"));
      var top = d.top[st.position];
      if (!top.length) side.appendChild(el("div", "iv-note", null, "no latent fired here"));
      var ol = el("ol", "iv-features");
      top.forEach(function (pair) {
        var li = el("li", pair[0] === st.feature ? "iv-on" : "", { "data-feature": pair[0], "data-position": st.position, "data-block": d.block, "data-value": pair[1], tabindex: "-1" });
        var bar = el("span", "iv-minibar");
        bar.style.width = (top[0][1] > 0 ? (pair[1] / top[0][1]) * 100 : 0).toFixed(1) + "%";
        li.appendChild(el("code", "", null, "#" + pair[0]));
        li.appendChild(bar);
        li.appendChild(el("span", "iv-num", null, fmt(pair[1])));
        label(li, "latent " + pair[0] + " at position " + st.position + ": " + fmt(pair[1]) + " (hover: it over every token)");
        ol.appendChild(li);
      });
      side.appendChild(ol);
    }
    function select(s) {
      var p = s.position !== undefined ? Number(s.position) : st.position;
      var f = s.feature !== undefined ? Number(s.feature) : st.feature;
      if (!(p >= 0 && p < n) || index[f] === undefined) throw new Error("no such token or latent: " + JSON.stringify(s));
      if (p !== st.position || f !== st.feature) { st = { position: p, feature: f }; draw(); }
      return state();
    }
    function state() { return { position: st.position, feature: st.feature }; }
    body.addEventListener("mouseover", function (e) {
      var t = e.target.closest(".iv-tok,.iv-features li");
      if (!t) return;
      if (t.classList.contains("iv-tok")) select({ position: t.getAttribute("data-position") });
      else select({ feature: t.getAttribute("data-feature") });
    });
    legend(root, "0", "its largest", "activation of the chosen latent on these tokens");
    draw();
    return { select: select, state: state };
  }

  var KINDS = { lens: lens, attention: attention, heads: heads, dla: dla, patching: patching, "sae-eval": saeEval, "sae-features": saeFeatures };
  function fail(root, message) {
    IV.errors.push(message);
    var box = root.querySelector(".iv-error") || root;
    box.hidden = false;
    box.textContent = "This view could not be drawn: " + message;
    if (window.console) console.error("introspect view " + root.id + ": " + message);
  }
  IV.mount = function (id) {
    var root = document.getElementById(id);
    if (!root || IV.views[id]) return IV.views[id];
    try {
      var data = JSON.parse(root.querySelector("script.iv-data").textContent);
      var body = root.querySelector(".iv-body");
      body.textContent = "";
      IV.views[id] = KINDS[data.kind](root, data, body);
      IV.views[id].kind = data.kind;
      root.setAttribute("data-ready", "true");
    } catch (err) {
      fail(root, String(err && err.message || err));
    }
    return IV.views[id];
  };
  IV.select = function (id, selection) {
    var view = IV.views[id];
    if (!view) throw new Error("no view " + id);
    return view.select(selection || {});
  };
  IV.state = function (id) { return IV.views[id] ? IV.views[id].state() : null; };
  IV.ids = function (kind) {
    return Array.prototype.map.call(document.querySelectorAll(".iv-view[data-ready]" + (kind ? "[data-kind='" + kind + "']" : "")), function (e) { return e.id; });
  };
})();
"""
"""The views' script: draws each view from its data and keeps ``window.introspectViews``."""
