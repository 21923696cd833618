"""Token windows: a rank's documents tokenized and cut into shards as one process cuts them.

The cuts depend only on the documents (their tokens and their sizes), never on the number of
processes or on what an earlier run left: a resumed run and every rank of several cut where
one uninterrupted process does, so the shards, their batches and their values are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from introspect._scale.corpus import Inputs

_SHARD_TOKENS = 2**15
"""The default most tokens a shard puts through the model (``shard_tokens``): what an
interruption can lose is a few shards of work (about a minute and a half each for SmolLM2 on
two CPU cores), whatever the row size or ``positions``. Tokens, not seconds: the cuts must
be the same in every run, for a resumed run and every rank to cut where one process does."""
_TOKENIZE_CHUNK = 256
_ANCHOR_BYTES = 64 * 2**20
"""Text between anchors (documents where every run starts a shard): at most this much is
tokenized twice, by the rank before a cut between ranks and the rank after it."""


def _tokenizer_fn(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    def tokenize(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        return [list(map(int, ids)) for ids in encoded]

    return tokenize


@dataclass
class _Window:
    """The tokenized documents of one shard to be."""

    first: int
    ids: list[list[int]] = field(default_factory=list)
    truncated: list[list[int]] = field(default_factory=list)
    rows: int = 0
    tokens: int = 0

    @property
    def end(self) -> int:
        return self.first + len(self.ids)


@dataclass(frozen=True)
class _Run:
    """A run of documents a rank extracts: the shards that start in ``[own, until)``.

    The shards of a run are cut as a one-process run cuts them, from a document where every
    run cuts (``start``: the start of the gap, or the last anchor before ``own``), so the rank
    tokenizes from there and keeps the shards that start in its part; the last one goes on
    past ``until`` to where it closes (at the latest ``end``, the end of the gap).
    """

    start: int
    own: int
    until: int
    end: int


def _anchors(weights: torch.Tensor, every: int | None = None) -> frozenset[int]:
    """Documents where every run starts a new shard: the first to begin after each
    ``every`` bytes of text (``_ANCHOR_BYTES``). They bound what a rank tokenizes to find
    where its part's first shard starts."""
    every = every or _ANCHOR_BYTES
    ends = (weights + 1).cumsum(0)
    if not len(ends) or int(ends[-1]) <= every:
        return frozenset()
    starts = ends - (weights + 1)
    marks = torch.arange(every, int(ends[-1]), every, dtype=torch.long)
    found = torch.searchsorted(starts, marks).tolist()
    return frozenset(doc for doc in found if 0 < doc < len(weights))


def _runs(
    share: Sequence[tuple[int, int]],
    remaining: Sequence[tuple[int, int]],
    anchors: frozenset[int],
) -> list[_Run]:
    """The runs of a rank's ``share`` of the ``remaining`` gaps, each with where its shards'
    cuts start (see :class:`_Run`)."""
    runs = []
    for a, b in share:
        gap = next((g for g in remaining if g[0] <= a < g[1]), (a, b))
        start = max([gap[0], *(doc for doc in anchors if gap[0] < doc <= a)])
        runs.append(_Run(start, a, b, gap[1]))
    return runs


def _windows(
    runs: Sequence[_Run],
    inputs: Inputs,
    tokenize: Callable[[list[str]], list[list[int]]],
    max_length: int | None,
    last: bool,
    shard_rows: int,
    anchors: frozenset[int] = frozenset(),
    *,
    shard_tokens: int | None = None,
) -> Iterator[_Window]:
    """The rank's shards to be, tokenized: for each run, the shards that start in its part.

    A shard closes as soon as it reaches ``shard_rows`` rows or ``shard_tokens`` tokens (after
    truncation: what goes through the model), or the next document is an anchor, so the cuts
    depend only on where a run of documents starts, and every run starts at a cut: a resumed
    run, or a rank of several, cuts its documents as a one-process run does. Its shards, and
    the batches of each shard, are the same, and so are the values, bit for bit.
    """
    most = shard_tokens or _SHARD_TOKENS
    for run in runs:
        yield from _run_windows(run, inputs, tokenize, max_length, last, shard_rows, most, anchors)


def _run_windows(
    run: _Run,
    inputs: Inputs,
    tokenize: Callable[[list[str]], list[list[int]]],
    max_length: int | None,
    last: bool,
    shard_rows: int,
    shard_tokens: int,
    anchors: frozenset[int],
) -> Iterator[_Window]:
    window = _Window(run.start)
    for chunk in range(run.start, run.end, _TOKENIZE_CHUNK):
        stop = min(run.end, chunk + _TOKENIZE_CHUNK)
        for k, ids in enumerate(tokenize(inputs.texts(chunk, stop))):
            doc = chunk + k
            if max_length is not None and len(ids) > max_length:
                window.truncated.append([doc, len(ids)])
                ids = ids[:max_length]
            window.ids.append(ids)
            window.rows += (1 if ids else 0) if last else len(ids)
            window.tokens += len(ids)
            if window.rows >= shard_rows or window.tokens >= shard_tokens or doc + 1 in anchors:
                if window.first >= run.own:
                    yield window
                if doc + 1 >= run.until:
                    return  # the next shard starts in another rank's part
                window = _Window(doc + 1)
    if window.ids and window.first >= run.own:
        yield window
