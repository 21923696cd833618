"""What proof at first use costs: the first Inspector per (adapter, model class), and later ones.

For every model type a built-in adapter serves, build a model of its first causal-LM (else
base) class from a small config (the user's model here), then time, in this one process:

- ``first``: ``Inspector(model)`` with an empty cache (a shrunk clone is built and proven);
- ``disk``: the same with the verdict on disk but not in memory (a new process);
- ``cached``: the same with the verdict in memory, against ``Inspector(model, prove=False)``
  (today's cost without proving), as medians of interleaved repeats.

Usage::

    python benchmarks/proof_first_use.py                  # every built-in adapter's types
    python benchmarks/proof_first_use.py --types gpt2,llama
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import transformers

from introspect import Inspector, _proof
from introspect._plugins import get_registry
from introspect._tiny import EXTRA_OVERRIDES, tiny_config
from introspect.testing import build_tiny

CLASSES = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM", "AutoModel")


def _model(model_type: str) -> Any:
    config = tiny_config(model_type, **EXTRA_OVERRIDES.get(model_type, {}))
    for name in CLASSES:
        auto = getattr(transformers, name)
        try:
            cls = auto._model_mapping[type(config)]
        except KeyError:
            continue
        return build_tiny(cls, config)
    raise LookupError(f"no auto class builds {model_type}")


def _median_us(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="", help="comma-separated model types (default: all)")
    parser.add_argument("--repeats", type=int, default=50, help="repeats for the cached cost")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    wanted = [t for t in args.types.split(",") if t]
    types = sorted({t for spec in get_registry().specs.values() for t in spec.model_types})
    if wanted:
        types = [t for t in types if t in wanted]
    os.environ["INTROSPECT_PROOF_CACHE"] = tempfile.mkdtemp(prefix="introspect-proof-bench-")
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, CPU threads "
        f"{torch.get_num_threads()}"
    )
    print(
        f"{'model type':24} {'class':34} {'status':9} {'first ms':>9} {'disk ms':>8} "
        f"{'cached us':>10} {'unproven us':>12}"
    )
    firsts, ratios = [], []
    for model_type in types:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = _model(model_type)
            except Exception as exc:  # not buildable here (a missing package, ...)
                print(f"{model_type:24} skipped: {type(exc).__name__}: {str(exc)[:60]}")
                continue
            _proof.forget()
            start = time.perf_counter()
            try:
                status = Inspector(model).proof.status
            except Exception as exc:
                print(
                    f"{model_type:24} {type(model).__name__:34} {type(exc).__name__}: {exc}"[:160]
                )
                continue
            first = (time.perf_counter() - start) * 1e3
            _proof.forget()
            start = time.perf_counter()
            Inspector(model)
            disk = (time.perf_counter() - start) * 1e3
            cached = _median_us(lambda m=model: Inspector(m), args.repeats)
            plain = _median_us(lambda m=model: Inspector(m, prove=False), args.repeats)
        firsts.append(first)
        ratios.append(cached / plain)
        print(
            f"{model_type:24} {type(model).__name__:34} {status:9} {first:9.0f} {disk:8.1f} "
            f"{cached:10.0f} {plain:12.0f}"
        )
    if firsts:
        print(
            f"\n{len(firsts)} types: first use median {statistics.median(firsts):.0f} ms, "
            f"max {max(firsts):.0f} ms; cached/unproven Inspector() median "
            f"{statistics.median(ratios):.3f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
