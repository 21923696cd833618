"""How fast is ``introspect extract`` next to the model's own forward pass?

For each model, tokens per second of:

- ``extract``: the whole library call, ``extract(insp, tok, corpus, ["block[:]"], DIR,
  positions="all", dtype="float16")`` into a fresh folder (reading and tokenizing the corpus,
  the forward passes with the capture, casting, the shard writes with fsync, the manifest);
- ``plain forward``: ``model(**batch)`` on the very batches extract runs (same documents, same
  order, same right padding, attention mask and position ids), logits included;
- ``forward to the last block``: the same batches through the base model only
  (``model.model``), without the unembedding — what extract itself has to run, since it stops
  after the last block it records.

After a warm-up, the cases run interleaved, in a shuffled order each round, and the medians
are reported, so drift in the machine's load hits all of them alike. The corpus is the English
text of Python's own documentation topics (``pydoc_data.topics``), cut into paragraphs: it
ships with Python, nothing is downloaded.

Run: ``python benchmarks/extract_throughput.py [--models toy-llama smollm2] [--rounds 5]
[--device cuda] [--docs N] [--max-length N] [--batch-size N] [--shards N] [--threads N]``
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from introspect import Inspector, extract
from introspect._batching import pad_batch
from introspect._scale.corpus import read_inputs
from introspect._scale.windows import _tokenizer_fn, _windows
from introspect.zoo import load_model

DEFAULT_DOCS = {"toy-llama": 1024, "smollm2": 96}


def corpus(folder: Path, docs: int) -> Path:
    """Paragraphs of Python's documentation topics, one per line, in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = [
        " ".join(part.split())
        for name in sorted(topics)
        for part in re.split(r"\n\s*\n", topics[name])
        if len(part.split()) >= 8
    ]
    path = folder / "corpus.txt"
    path.write_text("\n".join(paragraphs[:docs]) + "\n", encoding="utf-8")
    return path


def batches_of(
    tokenizer: Any, path: Path, max_length: int, batch_size: int, pad_id: int, shard_rows: int
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The padded batches extract runs on this corpus (its shards, each longest document
    first), and the number of real tokens in them."""
    found = []
    tokens = 0
    windows = _windows(
        [(0, len(read_inputs([path])))], read_inputs([path]), _tokenizer_fn(tokenizer),
        max_length, False, shard_rows,
    )  # fmt: skip
    for window in windows:
        ids = window.ids
        tokens += sum(len(x) for x in ids)
        order = sorted((i for i, x in enumerate(ids) if x), key=lambda i: (-len(ids[i]), i))
        for start in range(0, len(order), batch_size):
            chunk = [ids[i] for i in order[start : start + batch_size]]
            found.append(pad_batch(chunk, padding_side="right", pad_token_id=pad_id))
    return found, tokens


def cases(
    name: str,
    device: str,
    docs: int,
    max_length: int,
    batch_size: int,
    shards: int,
    scratch: Path,
) -> tuple[dict[str, Callable[[], None]], int]:
    model, tokenizer = load_model(name, device=device, progress=False)
    insp = Inspector(model)
    path = corpus(scratch, docs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Several shards, so that writing one overlaps computing the next, as in a long run.
    _, total = batches_of(tokenizer, path, max_length, batch_size, int(pad_id), 1 << 62)
    shard_rows = max(1, total // shards)
    batches, tokens = batches_of(tokenizer, path, max_length, batch_size, int(pad_id), shard_rows)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    base = model.base_model
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run_extract() -> None:
        out = scratch / "acts"
        shutil.rmtree(out, ignore_errors=True)
        manifest = extract(
            insp, tokenizer, [path], ["block[:]"], out,
            positions="all", dtype="float16", batch_size=batch_size, max_length=max_length,
            shard_rows=shard_rows,
        )  # fmt: skip
        assert manifest["rows"] == tokens, (manifest["rows"], tokens)

    def run_forward(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                for batch in batches:
                    module(**batch, use_cache=False)
            sync()

        return run

    return {
        "extract (all blocks, float16)": run_extract,
        "plain forward": run_forward(model),
        "forward to the last block": run_forward(base),
    }, tokens


def measure(run: dict[str, Callable[[], None]], rounds: int, seed: int) -> dict[str, list[float]]:
    for fn in run.values():  # warm-up: allocator, kernels, page cache
        fn()
    times: dict[str, list[float]] = {name: [] for name in run}
    rng = random.Random(seed)
    for _ in range(rounds):
        names = list(run)
        rng.shuffle(names)
        for name in names:
            start = time.perf_counter()
            run[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["toy-llama", "smollm2"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--docs", type=int, help="paragraphs per model (default: per model)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shards", type=int, default=8, help="shards per extract run")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"{args.rounds} rounds, batch {args.batch_size}, max length {args.max_length}"
    )
    report = {}
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            docs = args.docs or DEFAULT_DOCS.get(name, 256)
            run, tokens = cases(
                name, args.device, docs, args.max_length, args.batch_size, args.shards, Path(tmp)
            )
            times = measure(run, args.rounds, seed=0)
        medians = {case: statistics.median(t) for case, t in times.items()}
        plain = medians["plain forward"]
        body = medians["forward to the last block"]
        print(f"\n{name}: {docs} documents, {tokens:,} tokens")
        print(f"{'case':32} {'median s':>9} {'tokens/s':>10} {'vs plain':>9} {'vs body':>8}")
        for case, median in medians.items():
            print(
                f"{case:32} {median:9.3f} {tokens / median:10,.0f} {plain / median:9.1%} "
                f"{body / median:8.1%}"
            )
        report[name] = {
            "documents": docs,
            "tokens": tokens,
            "median_seconds": medians,
            "tokens_per_second": {case: tokens / m for case, m in medians.items()},
        }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
