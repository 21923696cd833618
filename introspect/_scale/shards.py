"""The shards on disk, the documents they lack, and each rank's share of those.

A complete shard describes itself in its header; :func:`_scan` reads those headers (checked to
belong to this run), :func:`_remaining` finds the gaps between the shards, and :func:`_share`
cuts the gaps between ranks by size, the same way on every rank.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from introspect._errors import ExtractionError
from introspect._scale.dataset import TOKEN_COLUMNS, shard_range
from introspect._scale.files import _reason


@dataclass
class _Done:
    """A complete shard, as its header describes it."""

    file: str
    first: int
    end: int
    rows: int
    truncated: list[list[int]]
    empty: list[int]
    shapes: dict[str, list[int]]
    tokens: int = 0


def _scan(folder: Path, fingerprint: str) -> list[_Done]:
    """The complete shards in ``folder``, in document order, checked to belong to this run."""
    from safetensors import safe_open

    found = []
    for name in sorted(os.listdir(folder)):
        docs = shard_range(name)
        if docs is None:
            continue
        try:
            with safe_open(str(folder / name), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["introspect"])
                shapes = {
                    key: list(handle.get_slice(key).get_shape())[1:]
                    for key in handle.keys()  # noqa: SIM118 - safe_open is not a Mapping
                    if key not in TOKEN_COLUMNS
                }
        except Exception as exc:
            raise ExtractionError(
                f"shard {folder / name} cannot be read ({_reason(exc)}): the folder was changed "
                "by hand; rerun with --force to start over"
            ) from None
        if meta.get("fingerprint") != fingerprint:
            raise ExtractionError(
                f"shard {folder / name} belongs to another extraction: rerun with --force to "
                "start over"
            )
        found.append(
            _Done(
                name,
                docs[0],
                docs[1],
                int(meta["rows"]),
                meta["truncated"],
                meta["empty"],
                shapes,
                int(meta.get("tokens", 0)),
            )
        )
    for before, after in itertools.pairwise(found):
        if after.first < before.end:
            raise ExtractionError(
                f"shards {before.file} and {after.file} overlap: the folder was changed by hand; "
                "rerun with --force to start over"
            )
    return found


def _remaining(done: Sequence[_Done], total: int) -> list[tuple[int, int]]:
    gaps = []
    cursor = 0
    for shard in done:
        if shard.first > cursor:
            gaps.append((cursor, shard.first))
        cursor = max(cursor, shard.end)
    if cursor < total:
        gaps.append((cursor, total))
    return gaps


def _share(
    remaining: Sequence[tuple[int, int]], weights: torch.Tensor, rank: int, world: int
) -> list[tuple[int, int]]:
    """Rank ``rank``'s contiguous part of the remaining documents, cut by size."""
    if world == 1 or not remaining:
        return list(remaining)
    docs = torch.cat([torch.arange(a, b) for a, b in remaining])
    cumulative = (weights[docs] + 1).cumsum(0)
    total = int(cumulative[-1])
    cuts = [0]
    for r in range(1, world):
        cuts.append(int(torch.searchsorted(cumulative, total * r // world, right=True)))
    cuts.append(len(docs))
    mine = docs[cuts[rank] : cuts[rank + 1]].tolist()
    runs: list[tuple[int, int]] = []
    for doc in mine:
        if runs and runs[-1][1] == doc:
            runs[-1] = (runs[-1][0], doc + 1)
        else:
            runs.append((doc, doc + 1))
    return runs


def _totals(done: Sequence[_Done]) -> dict[str, int]:
    """The shards in ``done``, and their documents, rows and tokens."""
    return {
        "shards": len(done),
        "documents": sum(shard.end - shard.first for shard in done),
        "rows": sum(shard.rows for shard in done),
        "tokens": sum(shard.tokens for shard in done),
    }
