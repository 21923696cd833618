"""The ``introspect`` command: thin, it parses, calls the library and prints.

Each sub-command is a function registered with :func:`command`; adding one is one decorated
function (its ``configure`` callback adds the options).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from introspect.errors import IntrospectError

__all__ = ["command", "main"]

Runner = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    configure: Configure
    run: Runner


_COMMANDS: dict[str, _Command] = {}


def command(name: str, help: str, configure: Configure | None = None) -> Callable[[Runner], Runner]:
    """Register a sub-command ``name``; the decorated function gets the parsed namespace.

    Example:
        >>> @command("hello", "say hello")
        ... def _hello(args):
        ...     print("hello")
        ...     return 0
        >>> main(["hello"])
        hello
        0
    """

    def decorate(run: Runner) -> Runner:
        _COMMANDS[name] = _Command(name, help, configure or (lambda parser: None), run)
        return run

    return decorate


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """Print ``rows`` as an aligned plain-text table.

    Example:
        >>> print_table([["a", 1]], ["name", "n"])
        name  n
        ----  -
        a     1
    """
    text = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _plugins_options(parser: argparse.ArgumentParser) -> None:
    _json_flag(parser)
    parser.add_argument("--all", action="store_true", help="include the built-in adapter plugins")


@command("plugins", "list the loaded plugins (name, distribution, version)", _plugins_options)
def _plugins(args: argparse.Namespace) -> int:
    from introspect.plugins import get_plugin_manager, plugin_infos

    pm = get_plugin_manager()
    infos = [info for info in plugin_infos(pm) if args.all or not info.builtin]
    failures = pm.failures
    if args.json:
        payload = {
            "plugins": [
                {
                    "name": i.name,
                    "distribution": i.distribution,
                    "version": i.version,
                    "builtin": i.builtin,
                    "adapters": list(i.adapters),
                }
                for i in infos
            ],
            "failed": [
                {"name": f.name, "distribution": f.distribution, "error": f.error} for f in failures
            ],
        }
        print(json.dumps(payload, indent=2))
        return 0
    if infos:
        rows = [
            [i.name, i.distribution or "-", i.version or "-", ", ".join(i.adapters)] for i in infos
        ]
        print_table(rows, ["name", "distribution", "version", "adapters"])
    else:
        print("no third-party plugins installed (add --all to list the built-in adapters)")
    for f in failures:
        print(f"failed to load {f.name} ({f.distribution or 'unknown'}): {f.error}")
    return 0


@command("adapters", "list the registered adapters and what they serve", _json_flag)
def _adapters(args: argparse.Namespace) -> int:
    from introspect.plugins import get_registry

    registry = get_registry()
    specs = [registry.specs[name] for name in sorted(registry.specs)]
    if args.json:
        payload = [{"plugin": registry.owners[s.name], **s.model_dump(mode="json")} for s in specs]
        print(json.dumps(payload, indent=2))
        return 0
    rows = [
        [
            s.name,
            registry.owners[s.name],
            ", ".join(s.model_types or s.architectures),
            s.final_norm or "-",
            "refused" if s.unsupported else "yes",
        ]
        for s in specs
    ]
    print_table(rows, ["adapter", "plugin", "serves", "final_norm", "supported"])
    return 0


def _scaffold_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="a transformers model type (e.g. 'llama') or a folder with config.json"
    )
    parser.add_argument(
        "-o", "--output", help="the package folder to create (default: ./introspect-<name>)"
    )
    parser.add_argument("--name", help="the adapter name (default: the model type)")
    parser.add_argument("--distribution", help="the distribution name (default: introspect-<name>)")
    parser.add_argument(
        "--adapter", help="start from this registered adapter's spec instead of detecting one"
    )
    parser.add_argument(
        "--block",
        action="append",
        default=[],
        metavar="PLUGIN",
        help="do not load this plugin (entry point or distribution), e.g. to replace a built-in",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    parser.add_argument(
        "--print", action="store_true", help="print the spec's Python source, write nothing"
    )


@command(
    "scaffold",
    "write a plugin package (spec, entry point, conformance test) for a model",
    _scaffold_options,
)
def _scaffold(args: argparse.Namespace) -> int:
    import tempfile

    from introspect.plugins import get_plugin_manager, new_plugin_manager
    from introspect.scaffold import scaffold, spec_source

    pm = new_plugin_manager(block=args.block) if args.block else get_plugin_manager()
    options = {"adapter": args.adapter, "name": args.name, "distribution": args.distribution}
    if args.print:
        with tempfile.TemporaryDirectory() as tmp:
            result = scaffold(args.model, f"{tmp}/pkg", plugin_manager=pm, **options)
        print(spec_source(result.spec))
        return 0
    result = scaffold(args.model, args.output, plugin_manager=pm, force=args.force, **options)
    print(f"wrote {result.distribution} (adapter {result.spec.name!r}) in {result.directory}:")
    for path in result.files:
        print(f"  {path}")
    print(f"next: cd {result.directory} && pip install -e . && pytest")
    return 0


# -- commands that load a model --------------------------------------------------------------

_MODEL_HELP = (
    "a short name (smollm2, toy-gpt2, toy-llama), a Hugging Face hub id or a local folder "
    "(loaded with trust_remote_code=False)"
)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=_MODEL_HELP)
    parser.add_argument("--adapter", metavar="NAME", help="force this adapter instead of detecting")
    parser.add_argument("--device", help="run on this device, e.g. cuda or cpu (default: cpu)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights first"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (also: INTROSPECT_PROGRESS=0)"
    )
    _json_flag(parser)


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The model, its tokenizer and an Inspector, after checking the adapter name first."""
    from introspect.errors import NoAdapterError
    from introspect.inspector import Inspector
    from introspect.models import load_model
    from introspect.plugins import get_registry

    if args.adapter is not None:
        names = sorted(get_registry().specs)
        if args.adapter not in names:
            raise NoAdapterError(
                f"no adapter named {args.adapter!r}; registered adapters: {', '.join(names)}"
            )
    model, tokenizer = load_model(
        args.model, device=args.device, dtype=args.dtype, progress=not args.no_progress
    )
    return model, tokenizer, Inspector(model, adapter=args.adapter)


@command("inspect", "show a model's adapter, blocks, locators and index semantics", _model_options)
def _inspect(args: argparse.Namespace) -> int:
    from introspect.describe import describe

    _, _, insp = _load(args)
    info = {"model": args.model, **describe(insp)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"model: {args.model} ({info['model_class']}, {info['parameters']:,} parameters, "
        f"{info['dtype']})"
    )
    print(f"adapter: {info['adapter']}: {info['adapter_description']}")
    print(f"blocks: {info['num_blocks']}")
    print()
    print_table(
        [[e["locator"], e["path"], e["module"]] for e in info["locators"]],
        ["locator", "module path", "module"],
    )
    print()
    print(
        "hidden_states[i] of Hugging Face's output_hidden_states=True, built from these locators:"
    )
    print_table(
        [[e["index"], e["negative"], e["locator"], e["meaning"]] for e in info["hidden_states"]],
        ["i", "negative", "locator", "what it holds"],
    )
    return 0


def _capture_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser)
    parser.add_argument("--prompt", required=True, help="the text to run the model on")
    parser.add_argument(
        "--at",
        action="append",
        required=True,
        metavar="LOCATOR",
        help="what to record, repeatable: block[-1], block[0].input, block[2:5], embed, ...",
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="FILE.safetensors", help="where to write"
    )


@command(
    "capture",
    "record hidden states into FILE.safetensors plus a FILE.json sidecar",
    _capture_options,
)
def _capture(args: argparse.Namespace) -> int:
    from introspect.export import capture_to_file, check_output_path, sidecar_path
    from introspect.models import encode_prompt

    out = check_output_path(args.output)
    model, tokenizer, insp = _load(args)
    for text in args.at:
        insp.locator(text)  # a bad locator is an error before the model runs
    inputs = encode_prompt(tokenizer, args.prompt, model)
    meta = {"model": args.model, "prompt": args.prompt}
    sidecar = capture_to_file(insp, inputs, args.at, out, tokenizer=tokenizer, meta=meta)
    if args.json:
        print(
            json.dumps({"output": str(out), "sidecar": str(sidecar_path(out)), **sidecar}, indent=2)
        )
        return 0
    rows = [
        [key, value["module"], value["side"], "x".join(str(n) for n in value["shape"])]
        for key, value in sidecar["tensors"].items()
    ]
    print_table(rows, ["locator", "module", "side", "shape"])
    print(
        f"wrote {out} and {sidecar_path(out)} ({len(rows)} tensors, {len(sidecar['tokens'])} tokens)"
    )
    return 0


def _verify_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser)
    parser.add_argument(
        "--prompt",
        default="The quick brown fox jumps over the lazy dog.",
        help="the text to check on (random token ids when the model has no tokenizer)",
    )
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance")


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


@command(
    "verify",
    "prove the adapter against the model's own outputs (exit 1 when a check fails)",
    _verify_options,
)
def _verify(args: argparse.Namespace) -> int:
    from introspect.models import encode_prompt
    from introspect.progress import steps
    from introspect.testing import check_conformance, example_inputs

    model, tokenizer, insp = _load(args)
    if tokenizer is not None:
        inputs = encode_prompt(tokenizer, args.prompt, model)
    else:
        inputs = example_inputs(model.config, batch=1, model=model)
    with steps("verify", ["running the conformance checks"], enabled=not args.no_progress) as bar:
        report = check_conformance(
            model, inputs, adapter=insp.adapter, atol=args.atol, rtol=args.rtol
        )
        bar.next()
    if args.json:
        payload = {
            "model": args.model,
            "adapter": report.adapter,
            "passed": report.passed,
            "checks": [
                {
                    "check": c.name,
                    "passed": c.passed,
                    "max_diff": _finite(c.max_diff),
                    "detail": c.detail,
                }
                for c in report.checks
            ],
        }
        print(json.dumps(payload, indent=2))
    else:
        rows = [
            [c.name, "ok" if c.passed else "FAIL", f"{c.max_diff:.3g}", c.detail]
            for c in report.checks
        ]
        print_table(rows, ["check", "result", "max |diff|", "detail"])
        failed = len(report.failures)
        total = len(report.checks)
        if failed:
            print(
                f"{args.model}: {failed} of {total} checks FAILED with adapter {report.adapter!r}"
            )
        else:
            print(f"{args.model}: all {total} checks passed with adapter {report.adapter!r}")
    return 0 if report.passed else 1


def _lens_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser)
    parser.add_argument("--prompt", required=True, help="the text to run the model on")
    parser.add_argument("-k", "--top", type=int, default=5, help="how many tokens per block")
    parser.add_argument(
        "-p",
        "--position",
        type=int,
        action="append",
        metavar="N",
        help="prompt position(s) to tabulate, repeatable; negative counts from the end "
        "(default: -1, the last token)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="write a heatmap: top token's probability by block x position, labelled",
    )


@command(
    "lens",
    "logit lens: the top next tokens after every block, as a table (and --plot heatmap)",
    _lens_options,
)
def _lens(args: argparse.Namespace) -> int:
    from importlib.util import find_spec
    from pathlib import Path

    from introspect.errors import CaptureError, MissingDependencyError
    from introspect.lens import show_token

    plot = Path(args.plot).expanduser() if args.plot else None
    if plot is not None:
        if plot.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise CaptureError(f"--plot {args.plot!r} must end in .png, .svg or .pdf")
        if not (plot.parent if str(plot.parent) else Path(".")).is_dir():
            raise CaptureError(f"the folder of --plot {args.plot!r} does not exist: create it")
        if find_spec("matplotlib") is None:
            raise MissingDependencyError(
                '--plot needs matplotlib: pip install matplotlib (or "introspect-lm[demo]")'
            )
    positions = args.position or [-1]
    _, tokenizer, insp = _load(args)
    # The plot shows every position; the table only needs the chosen ones.
    wanted = None if plot is not None else positions
    lens = insp.logit_lens(args.prompt, tokenizer=tokenizer, k=args.top, positions=wanted)
    for p in positions:
        lens.column(p)  # a position outside the prompt is an error before anything prints
    if plot is not None:
        lens.plot(plot, title=f"logit lens: {args.model} on {args.prompt!r}")
    if args.json:
        payload = {"model": args.model, **lens.to_dict(positions)}
        if plot is not None:
            payload["plot"] = str(plot)
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    for n, p in enumerate(positions):
        col = lens.column(p)
        pos = lens.positions[col]
        if n:
            print()
        print(
            f"{args.model}: next-token predictions after each block at position {pos} "
            f"({show_token(lens.tokens[pos])}), top {lens.k}"
        )
        headers, rows = lens.table(p)
        print_table(rows, headers)
    last = f"block[{insp.num_blocks - 1}]"
    if lens.max_diff is not None:
        print(f"{last} reproduces the model's own logits (max |diff| {lens.max_diff:.2g})")
    if plot is not None:
        print(f"wrote {plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered sub-command.

    Example:
        >>> "plugins" in build_parser().format_help()
        True
    """
    parser = argparse.ArgumentParser(
        prog="introspect",
        description="Read and change what every block of a language model receives and produces.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in _COMMANDS.values():
        sub = subs.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(sub)
        sub.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``introspect`` command; returns the exit status.

    Example:
        >>> main(["adapters"]) == 0  # doctest: +ELLIPSIS
        adapter...
        True
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return int(run(args))
    except BrokenPipeError:
        # The reader went away (`introspect lens ... | head`): stop quietly, as Unix tools do,
        # and keep Python from failing again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (IntrospectError, OSError, ValueError) as exc:
        if args.debug:
            traceback.print_exc()
        else:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"introspect: error: {message}", file=sys.stderr)
            print("(run with --debug for the full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("introspect: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
