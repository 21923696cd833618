"""One rank's forward passes: a shard's documents through the model, its rows into tensors.

Batches are padded on the right, with the attention mask and position ids from it, so each
document's values equal a capture of it run alone; the rows come out in document order.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from introspect._batching import pad_batch, position_ids_from_mask
from introspect._errors import ExtractionError
from introspect._hooks.session import input_device
from introspect._locators import Locator
from introspect._scale.dataset import FORMAT, TOKEN_COLUMNS
from introspect._scale.windows import _Window

if TYPE_CHECKING:
    from introspect._inspector import Inspector


def _value(cap: Any, loc: Locator) -> Any:
    record = cap[str(loc.with_side("output"))]
    return record.input if loc.side == "input" else record.output


class _Engine:
    """One rank's extraction: the model, the locators, the batches, the shard buffers."""

    def __init__(
        self,
        insp: Inspector,
        locs: list[Locator],
        *,
        last: bool,
        store: torch.dtype,
        batch_size: int,
        pad_id: int,
    ) -> None:
        self.insp = insp
        self.model = insp.model
        self.locs = locs
        self.keys = [str(loc) for loc in locs]
        self.last = last
        self.store = store
        self.batch_size = batch_size
        self.pad_id = pad_id
        # Offloaded weights (accelerate) are on the meta device: its hooks move the inputs.
        self.device = input_device(self.model)
        forward = getattr(self.model, "forward", None)
        try:
            params = inspect.signature(forward).parameters if forward else {}
        except (TypeError, ValueError):
            params = {}
        self.takes_positions = "position_ids" in params
        self.takes_cache = "use_cache" in params
        # The head and anything after the last locator need not run: stop there.
        self.stop = True
        self.shapes: dict[str, list[int]] = {}
        self.source_dtype = torch.float32

    def _forward(
        self, batch: Mapping[str, torch.Tensor], *, positions: Literal["last"] | None
    ) -> Any:
        inputs = {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }
        extra: dict[str, Any] = {"use_cache": False} if self.takes_cache else {}
        if self.takes_positions:
            inputs["position_ids"] = batch["position_ids"].to(self.device)
        cap = self.insp.capture(*self.locs, stop=self.stop, detach=True, positions=positions)
        with torch.no_grad(), cap:
            self.model(**inputs, **extra)
        return cap

    def probe(self, token: int) -> dict[str, list[int]]:
        """Run three tokens once: every locator must record a ``[batch, seq, ...]`` tensor."""
        batch = pad_batch([[token] * 3], padding_side="right", pad_token_id=self.pad_id)
        cap = self._forward(batch, positions=None)
        for loc, key in zip(self.locs, self.keys, strict=True):
            value = _value(cap, loc)
            if not isinstance(value, torch.Tensor):
                raise ExtractionError(
                    f"{key} records {type(value).__name__}, not a tensor: extract a block or a "
                    "module whose output is a hidden state"
                )
            if value.dim() < 2 or tuple(value.shape[:2]) != (1, 3):
                raise ExtractionError(
                    f"{key} records a tensor of shape {list(value.shape)}, not [batch, seq, ...]: "
                    "extract locators whose values have one row per token"
                )
            if not value.is_floating_point():
                raise ExtractionError(f"{key} records {value.dtype} values, not floating point")
            self.source_dtype = value.dtype
            self.shapes[key] = list(value.shape[2:])
        return self.shapes

    def bytes_per_row(self) -> int:
        item = torch.empty((), dtype=self.store).element_size()
        values = sum(math.prod(shape) * item for shape in self.shapes.values())
        return values + 8 * len(TOKEN_COLUMNS)

    def shard(
        self, window: _Window, fingerprint: str, rank: int = 0
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The shard of ``window``: its rows in document order, and its header."""
        lengths = [len(ids) for ids in window.ids]
        per_doc = [(1 if n else 0) if self.last else n for n in lengths]
        offsets = [0]
        for n in per_doc:
            offsets.append(offsets[-1] + n)
        rows = offsets[-1]
        counts = torch.tensor(per_doc, dtype=torch.long)
        docs = torch.arange(window.first, window.end, dtype=torch.long)
        tensors: dict[str, torch.Tensor] = {
            key: torch.empty((rows, *self.shapes[key]), dtype=self.store) for key in self.keys
        }
        if self.last:
            pos = torch.tensor([n - 1 for n in lengths if n], dtype=torch.long)
            token_ids = torch.tensor([ids[-1] for ids in window.ids if ids], dtype=torch.long)
        else:
            token_ids = torch.tensor(list(itertools.chain.from_iterable(window.ids)))
            starts = torch.tensor(offsets[:-1], dtype=torch.long).repeat_interleave(counts)
            pos = torch.arange(rows, dtype=torch.long) - starts
        tensors["doc"] = docs.repeat_interleave(counts)
        tensors["pos"] = pos.reshape(rows)
        tensors["token_id"] = token_ids.to(torch.long).reshape(rows)
        # Longest first: documents of similar length share a batch, so little is padding.
        order = sorted((i for i, n in enumerate(lengths) if n), key=lambda i: (-lengths[i], i))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            self._batch(chunk, window, offsets, tensors)
        header = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "rank": rank,
            "docs": [window.first, window.end],
            "rows": rows,
            "tokens": sum(lengths),
            "truncated": window.truncated,
            "empty": [window.first + i for i, n in enumerate(lengths) if not n],
        }
        return tensors, {"introspect": json.dumps(header)}

    def _batch(
        self,
        chunk: list[int],
        window: _Window,
        offsets: list[int],
        tensors: dict[str, torch.Tensor],
    ) -> None:
        batch = _pad_right([window.ids[i] for i in chunk], self.pad_id)
        cap = self._forward(batch, positions="last" if self.last else None)
        if self.last:
            dest = torch.tensor([offsets[i] for i in chunk], dtype=torch.long)
            for loc, key in zip(self.locs, self.keys, strict=True):
                value = _value(cap, loc)[:, 0]
                tensors[key].index_copy_(0, dest, value.to(self.store).to("cpu"))
            return
        if _copies_rows(self.device):
            # Right padding: each document's rows are the first of its example, and go to
            # consecutive rows of the shard; one copy casts and places them.
            for loc, key in zip(self.locs, self.keys, strict=True):
                value, target = _value(cap, loc), tensors[key]
                for row, i in enumerate(chunk):
                    start, stop = offsets[i], offsets[i + 1]
                    target[start:stop].copy_(value[row, : stop - start])
            return
        # On an accelerator: gather and cast there, then one transfer per locator.
        dest = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in chunk])
        real = batch["attention_mask"].flatten().nonzero().squeeze(1).to(self.device)
        for loc, key in zip(self.locs, self.keys, strict=True):
            picked = _value(cap, loc).flatten(0, 1).index_select(0, real)
            tensors[key].index_copy_(0, dest, picked.to(self.store).to("cpu"))

    def check_range(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Refuse float16 values that are not finite: past its range, a value becomes inf."""
        if self.store != torch.float16 or self.source_dtype == torch.float16:
            return
        import numpy as np

        for key in self.keys:
            # numpy, not torch: this runs on the writer thread, and a torch operation there
            # would share torch's thread pool with the forward pass (both slow down).
            if not bool(np.isfinite(tensors[key].numpy()).all()):
                raise ExtractionError(
                    f"{key} has values float16 cannot hold (beyond its range of +-65504, or not "
                    "finite): rerun with --dtype bfloat16 or --dtype float32 (and --force)"
                )


def _pad_right(sequences: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``pad_batch(..., padding_side="right")``, built with a few tensor operations."""
    lengths = torch.tensor([len(ids) for ids in sequences], dtype=torch.long)
    longest = int(lengths.max()) if len(sequences) else 0
    mask = torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    ids[mask] = torch.tensor(list(itertools.chain.from_iterable(sequences)), dtype=torch.long)
    mask = mask.long()
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}


def _copies_rows(device: torch.device) -> bool:
    """Whether rows are copied document by document (on the CPU: one pass, no gather), or
    gathered where the model runs and sent over once (on an accelerator)."""
    return device.type == "cpu"
