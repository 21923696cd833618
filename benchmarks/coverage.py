"""Coverage of transformers' text language-model types: proven, refused, failing or skipped.

For every model type in transformers' auto mappings for causal, masked and seq2seq language
models, build a tiny random model from its config class (shrunk generically by
``introspect.testing.tiny_config``), then try the built-in adapters and, where none claims the type,
structure detection. Each type ends up as:

- ``proven``: a built-in adapter (or detection) passes every conformance check against the
  model's own ``hidden_states`` and logits;
- ``refused``: an adapter refuses the architecture, or detection cannot prove a layout (the
  reason says why);
- ``failing``: an adapter claims the type but a conformance check fails, or something raised;
- ``skipped``: the type cannot be built tiny here or does not run on token ids alone (missing
  dependency, non-text inputs, a config the generic shrink breaks).

Models are built and checked one at a time in this process, and freed before the next.

Usage::

    python benchmarks/coverage.py                     # print the table and the counts
    python benchmarks/coverage.py --types gpt2,llama  # only these types (alias: --only)
    python benchmarks/coverage.py --write             # also write docs/coverage/<version>.json
                                                      # and regenerate docs/architectures.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.models.auto import modeling_auto

import introspect
from introspect._detect import detect_adapter
from introspect._errors import NoAdapterError, UnsupportedArchitectureError
from introspect._plugins import (
    get_plugin_manager,
    get_registry,
    new_plugin_manager,
    resolve_adapter,
)
from introspect._tiny import tiny_config
from introspect.testing import EXTRA_OVERRIDES, build_tiny, check_conformance, example_inputs

ROOT = Path(__file__).resolve().parent.parent
MAPPINGS = (
    # Seq2seq first, then masked, then causal: a type in several mappings is tested with its
    # most characteristic head (BART as an encoder-decoder, BERT as a masked LM).
    ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("masked", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("causal", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
)
MAX_PARAMS = 30_000_000
TIMEOUT_S = 60


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def raise_timeout(signum: int, frame: Any) -> None:
        raise _Timeout(f"took longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, raise_timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _short(exc: BaseException | str, limit: int = 220) -> str:
    text = str(exc) if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_types() -> dict[str, tuple[str, str]]:
    """Every text LM model type, with the mapping it is tested from and its class name."""
    found: dict[str, tuple[str, str]] = {}
    for kind, attr in MAPPINGS:
        for model_type, class_name in getattr(modeling_auto, attr, {}).items():
            if isinstance(class_name, (tuple, list)):
                class_name = class_name[0]
            found.setdefault(model_type, (kind, class_name))
    return dict(sorted(found.items()))


def _build_failure(cls: Any, model_type: str, exc: Exception) -> str:
    try:
        with torch.device("meta"):
            cls(transformers.AutoConfig.for_model(model_type))
    except Exception as default_exc:
        return "its default config does not build here either: " + _short(default_exc)
    return "tiny model cannot be built: " + _short(exc)


def _count_params(cls: Any, config: Any) -> int | None:
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception:  # some models cannot be built on the meta device: count after building
        return None
    return sum(p.numel() for p in model.parameters())


def check_type(model_type: str, kind: str, class_name: str) -> dict[str, Any]:
    """Build a tiny model of ``model_type`` and say whether introspect proves it."""
    row: dict[str, Any] = {"model_type": model_type, "class": class_name, "kind": kind}

    def done(status: str, how: str = "", reason: str = "") -> dict[str, Any]:
        row.update(status=status, how=how, reason=reason)
        return row

    cls = getattr(transformers, class_name, None)
    if cls is None:
        return done("skipped", reason=f"transformers has no class {class_name}")
    try:
        config = tiny_config(model_type, **EXTRA_OVERRIDES.get(model_type, {}))
    except Exception as exc:
        return done("skipped", reason="tiny config cannot be built: " + _short(exc))
    params = _count_params(cls, config)
    if params is not None and params > MAX_PARAMS:
        return done("skipped", reason=f"still {params / 1e6:.0f}M parameters after shrinking")
    try:
        model = build_tiny(cls, config)
    except Exception as exc:
        return done("skipped", reason=_build_failure(cls, model_type, exc))
    inputs: dict[str, Any] = example_inputs(config)
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False  # tiny hybrids may keep no attention layer to cache
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception as exc:
        return done("skipped", reason="does not run on token ids alone: " + _short(exc))
    pm = new_plugin_manager()
    try:
        spec = resolve_adapter(model, plugin_manager=pm, detect=False)
    except UnsupportedArchitectureError as exc:
        return done("refused", "built-in adapter", _short(exc))
    except NoAdapterError:
        spec = None
    if spec is not None:
        report = check_conformance(model, inputs, adapter=spec)
        if report.passed:
            return done("proven", f"adapter {spec.name}")
        failures = "; ".join(f"{c.name} ({c.max_diff:.2g})" for c in report.failures)
        return done("failing", f"adapter {spec.name}", _short(failures))
    try:
        detected = detect_adapter(model)
    except NoAdapterError as exc:
        reason = str(exc).removeprefix(f"cannot detect the layout of {type(model).__name__}: ")
        return done("refused", "detection", _short(reason.split(". Write an AdapterSpec")[0]))
    return done("proven", "detected", _detected_summary(detected))


def _detected_summary(spec: Any) -> str:
    parts = [f"blocks {spec.blocks}", f"final norm {spec.final_norm or 'none'}"]
    if spec.hidden_states_start != "block_input":
        parts.append("hidden_states[0] = block 0 output")
    if spec.logit_ops:
        parts.append(
            "logit ops " + ", ".join(op.config_attr or str(op.value) for op in spec.logit_ops)
        )
    return "; ".join(parts)


def run(types: list[str] | None = None, *, verbose: bool = True) -> dict[str, Any]:
    """Check every type (or ``types``) and return the results with their counts."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    # Detection reads its logit ops from the shared registry: a plugin that failed to import
    # would quietly change results (its warning is silenced above), so stop instead.
    shared = get_plugin_manager()
    get_registry(shared)
    if shared.failures:
        raise SystemExit(
            "plugins failed to import: "
            + "; ".join(f"{f.name} ({f.error})" for f in shared.failures)
        )
    all_types = model_types()
    selected = {t: all_types[t] for t in types} if types else all_types
    rows = []
    start = time.perf_counter()
    for i, (model_type, (kind, class_name)) in enumerate(selected.items(), 1):
        t0 = time.perf_counter()
        try:
            with _time_limit(TIMEOUT_S):
                row = check_type(model_type, kind, class_name)
        except _Timeout as exc:
            row = {"model_type": model_type, "class": class_name, "kind": kind}
            row.update(status="skipped", how="", reason=str(exc))
        except Exception as exc:
            row = {"model_type": model_type, "class": class_name, "kind": kind}
            row.update(status="failing", how="", reason=_short(exc))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        gc.collect()
        if verbose:
            print(
                f"[{i}/{len(selected)}] {model_type}: {row['status']} {row['how']} "
                f"{row['reason'][:100]}",
                file=sys.stderr,
                flush=True,
            )
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    counts["total"] = len(rows)
    counts["proven by a built-in adapter"] = sum(
        r["status"] == "proven" and r["how"].startswith("adapter") for r in rows
    )
    counts["proven by detection"] = sum(r["how"] == "detected" for r in rows)
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "introspect": introspect.__version__,
        "seconds": round(time.perf_counter() - start, 1),
        "counts": counts,
        "results": rows,
    }


STATUSES = ("proven", "refused", "failing", "skipped")


def print_report(result: dict[str, Any]) -> None:
    from introspect.cli import print_table

    rows = [[r["model_type"], r["status"], r["how"], r["reason"][:90]] for r in result["results"]]
    print_table(rows, ["model type", "status", "how", "reason"])
    counts = result["counts"]
    print(
        f"\ntransformers {result['transformers']}: {counts['total']} types, "
        + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
        + f" ({counts['proven by a built-in adapter']} by a built-in adapter, "
        f"{counts['proven by detection']} by detection) in {result['seconds']}s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", "--only", help="comma-separated model types (default: all)")
    parser.add_argument(
        "--write",
        action="store_true",
        help="write docs/coverage/transformers-<major>.json and regenerate docs/architectures.md",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no per-type progress on stderr")
    args = parser.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
    unknown = sorted(set(types or ()) - set(model_types()))
    if unknown:
        parser.error(
            f"not a text LM model type of transformers {transformers.__version__}: "
            + ", ".join(unknown)
        )
    result = run(types, verbose=not args.quiet)
    print_report(result)
    paths = [args.json] if args.json else []
    if args.write:
        if types:
            parser.error("--write needs the full run (drop --types)")
        major = transformers.__version__.split(".")[0]
        paths.append(ROOT / "docs" / "coverage" / f"transformers-{major}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")
    if args.write:
        # The page generator is a repository tool, not part of the package.
        sys.path.insert(0, str(ROOT / "tools"))
        from docs_gen import write_architectures

        print(f"wrote {write_architectures(ROOT / 'docs' / 'architectures.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
