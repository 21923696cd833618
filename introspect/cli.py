"""The ``introspect`` command: thin, it parses, calls the library and prints.

Each sub-command is a function registered with :func:`command`; adding one is one decorated
function (its ``configure`` callback adds the options).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from introspect._errors import IntrospectError, MissingPartError, ModelLoadError

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
    parser.add_argument(
        "--help-authoring",
        action="store_true",
        help="print how to write an adapter plugin (hooks, entry point, debugging) and exit",
    )


@command("plugins", "list the loaded plugins (name, distribution, version)", _plugins_options)
def _plugins(args: argparse.Namespace) -> int:
    import warnings

    from introspect._plugins import PluginWarning, authoring_help, get_plugin_manager, plugin_infos

    if args.help_authoring:
        print(authoring_help())
        return 0
    # The listing names each failed plugin with its error below; a warning would repeat it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
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
                {
                    "name": f.name,
                    "distribution": f.distribution,
                    "stage": f.stage,
                    "error": f.error,
                }
                for f in failures
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
        where = {"import": "failed to import", "register": "could not be registered"}.get(
            f.stage, f"failed in {f.stage}"
        )
        print(f"skipped {f.name} ({f.distribution or 'unknown'}): {where}: {f.error}")
    return 0


@command("adapters", "list the registered adapters and what they serve", _json_flag)
def _adapters(args: argparse.Namespace) -> int:
    from introspect._plugins import get_registry

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

    from introspect._plugins import get_plugin_manager, new_plugin_manager
    from introspect._scaffold import scaffold, spec_source

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


def _device_map_option(parser: argparse.ArgumentParser) -> None:
    """``--device-map``, read by :func:`_load` (every command that loads a model offers it)."""
    parser.add_argument(
        "--device-map",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="spread the model over the available devices (and offload what does not fit) "
        "with accelerate, as from_pretrained(device_map=...) does; instead of --device",
    )


def _model_argument(parser: argparse.ArgumentParser, help: str = _MODEL_HELP) -> None:
    """The ``MODEL`` argument of a command that loads it: its name is checked by :func:`main`
    before anything heavy is imported."""
    parser.add_argument("model", help=help)
    parser.set_defaults(_loads_model=True)


def _model_options(parser: argparse.ArgumentParser) -> None:
    _model_argument(parser)
    parser.add_argument("--adapter", metavar="NAME", help="force this adapter instead of detecting")
    parser.add_argument("--device", help="run on this device, e.g. cuda or cpu (default: cpu)")
    _device_map_option(parser)
    parser.add_argument(
        "--dtype",
        "--model-dtype",
        dest="dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the weights' dtype: cast the model's weights to it once loaded (default: as "
        "loaded); in extract, --dtype is the dtype activations are stored in and "
        "--model-dtype this one",
    )
    parser.add_argument(
        "--attn-implementation",
        metavar="NAME",
        help="load with this attention implementation (eager, sdpa, ...; eager computes the "
        "attention patterns a model built for sdpa on transformers 4.x cannot show)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (also: INTROSPECT_PROGRESS=0)"
    )
    _json_flag(parser)


def _eager_needed(exc: BaseException) -> bool:
    """Whether ``exc`` refuses attention patterns because the model was loaded for sdpa."""
    return "attn_implementation='eager'" in str(exc)


def _reload_eager(args: argparse.Namespace, why: BaseException) -> tuple[Any, Any, Any]:
    """Load the model again with eager attention, saying so (the only way to show patterns)."""
    first = str(why).split(":")[0]
    print(
        f"note: {first}: reloading {args.model} with --attn-implementation eager, the only way "
        "to read its attention patterns on this transformers",
        file=sys.stderr,
    )
    args.attn_implementation = "eager"
    return _load(args)


def _load(args: argparse.Namespace, *, prove: bool = True) -> tuple[Any, Any, Any]:
    """The model, its tokenizer and an Inspector, after checking the cheap options first."""
    from introspect._errors import NoAdapterError
    from introspect._inspector import Inspector
    from introspect._plugins import get_registry
    from introspect.zoo import check_device, load_model

    if args.adapter is not None:
        names = sorted(get_registry().specs)
        if args.adapter not in names:
            raise NoAdapterError(
                f"no adapter named {args.adapter!r}; registered adapters: {', '.join(names)}"
            )
    if args.device is not None:
        check_device(args.device)
    model, tokenizer = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        progress=not args.no_progress,
        device_map=getattr(args, "device_map", None),
        attn_implementation=getattr(args, "attn_implementation", None),
    )
    return model, tokenizer, Inspector(model, adapter=args.adapter, prove=prove)


@command("inspect", "show a model's adapter, blocks, locators and index semantics", _model_options)
def _inspect(args: argparse.Namespace) -> int:
    from introspect._describe import describe

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
    parser.add_argument(
        "--force", action="store_true", help="replace FILE.safetensors and FILE.json if they exist"
    )


@command(
    "capture",
    "record hidden states into FILE.safetensors plus a FILE.json sidecar",
    _capture_options,
)
def _capture(args: argparse.Namespace) -> int:
    from introspect._export import capture_to_file, check_output_path, sidecar_path
    from introspect._locators import Locator
    from introspect._text import encode_prompt

    # Everything that can be checked without the model is checked before it loads.
    out = check_output_path(args.output, force=args.force)
    for text in args.at:
        Locator.parse(text)
    model, tokenizer, insp = _load(args)
    for text in args.at:
        insp.locator(text)  # a bad locator is an error before the model runs
    inputs = encode_prompt(tokenizer, args.prompt, model)
    meta = {"model": args.model, "prompt": args.prompt}
    sidecar = capture_to_file(
        insp, inputs, args.at, out, tokenizer=tokenizer, meta=meta, force=args.force
    )
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
    parser.add_argument(
        "--atol", type=_tolerance, default=1e-5, help="absolute tolerance (default: %(default)s)"
    )
    parser.add_argument(
        "--rtol", type=_tolerance, default=1e-4, help="relative tolerance (default: %(default)s)"
    )


def _tolerance(text: str) -> float:
    """A tolerance: a finite number, zero or more (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, e.g. 1e-5") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be a finite number, zero or more, e.g. 1e-5"
        )
    return value


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


@command(
    "verify",
    "prove the adapter against the model's own outputs (exit 1 when a check fails)",
    _verify_options,
)
def _verify(args: argparse.Namespace) -> int:
    from introspect._errors import FactError
    from introspect._inspector import Inspector
    from introspect._progress import steps
    from introspect._proof import Check, Proof, forget
    from introspect._text import encode_prompt
    from introspect.testing import check_conformance, example_inputs

    # Not proven on loading: a fact that fails is what this command shows in detail.
    model, tokenizer, insp = _load(args, prove=False)
    if tokenizer is not None:
        inputs = encode_prompt(tokenizer, args.prompt, model)
    else:
        inputs = example_inputs(model.config, batch=1, model=model)
    labels = ["running the conformance checks", "proving on a shrunk clone"]
    with steps("verify", labels, enabled=not args.no_progress) as bar:
        report = check_conformance(
            model, inputs, adapter=insp.adapter, atol=args.atol, rtol=args.rtol
        )
        bar.next()
        forget()  # prove again (from the disk cache where it holds a verdict)
        try:
            first_use = Inspector(model, insp.adapter).proof
        except FactError as exc:
            checks = tuple(c for c in exc.checks if isinstance(c, Check))
            first_use = Proof("failed", checks, str(exc).partition(":")[0])
        bar.next()
    report.checks.extend(
        Check(f"first use: {c.name}", c.passed, c.max_diff, c.detail) for c in first_use.checks
    )
    if args.json:
        payload = {
            "model": args.model,
            "adapter": report.adapter,
            "passed": report.passed,
            "first_use": {"status": first_use.status, "reason": first_use.reason},
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
        print(
            f"proof at first use (a shrunk clone of {type(model).__name__}): {first_use.status}"
            + (f" ({first_use.reason})" if first_use.reason else "")
        )
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
    parser.add_argument(
        "-k", "--top", type=int, default=5, help="how many tokens per block (default: %(default)s)"
    )
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
        "--target",
        action="append",
        metavar="TOKEN",
        help="a token to follow through the blocks, repeatable, e.g. ' Paris' (its exact "
        "text, leading space included, or its id): its rank and probability after every block",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="write a heatmap: top token's probability by block x position, labelled; with "
        "--target, the target's cells are boxed and its probability is drawn beside",
    )
    parser.add_argument(
        "--tuned",
        metavar="LENS_DIR",
        help="read each block through this tuned lens (a folder introspect tune-lens or "
        "AlignmentResearch/tuned-lens wrote); rows: the blocks it has translators for, and "
        "the last",
    )


def _plot_path(text: str | None) -> Path | None:
    """The ``--plot`` file, checked before the model loads (an existing file is replaced)."""
    from importlib.util import find_spec

    from introspect._errors import CaptureError, MissingDependencyError

    if not text:
        return None
    plot = Path(text).expanduser()
    if plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise CaptureError(f"--plot {text!r} must end in .png, .svg or .pdf")
    if not (plot.parent if str(plot.parent) else Path(".")).is_dir():
        raise CaptureError(f"the folder of --plot {text!r} does not exist: create it")
    if plot.is_dir():
        raise CaptureError(f"--plot {text!r} is a folder: name a file, e.g. {text}/plot.png")
    if find_spec("matplotlib") is None:
        raise MissingDependencyError(
            '--plot needs matplotlib: pip install matplotlib (or "introspect-lm[demo]")'
        )
    return plot


def _lens_target_summary(lens: Any, target: int, position: int) -> str:
    """One line on where a followed token rises through the blocks."""
    from introspect._analysis.lens import show_token
    from introspect._text import token_strings

    name = show_token(token_strings(lens.tokenizer, [target])[0])
    rank = lens.ranks_of(target, position)[-1]
    prob = lens.probs_of(target, position)[-1]
    top5 = lens.first_row_in_top(target, 5, position)
    top1 = lens.first_row_in_top(target, 1, position)
    path = (
        "never in the top 5"
        if top5 is None
        else f"first in the top 5 after {top5}, "
        + ("never top-1" if top1 is None else f"first top-1 after {top1}")
    )
    return f"{name}: {path} (after {lens.rows[-1]}: #{rank + 1}, p {prob:.3g})"


@command(
    "lens",
    "logit lens: the top next tokens after every block, as a table (and --plot heatmap)",
    _lens_options,
)
def _lens(args: argparse.Namespace) -> int:
    from introspect._analysis.lens import logit_lens, show_token
    from introspect._analysis.tuned import TunedLens

    plot = _plot_path(args.plot)
    positions = args.position or [-1]
    # The lens folder is read before the model loads; checked against the model before it runs.
    tuned = TunedLens.load(args.tuned) if args.tuned is not None else None
    _, tokenizer, insp = _load(args)
    if tuned is not None:
        _check_tuned(args, tuned, insp)
    # The plot shows every position; the table only needs the chosen ones.
    wanted = None if plot is not None else positions
    # A digit-only target is a token id; anything else is a token's text.
    targets = [int(t) if t.isdigit() else t for t in args.target or ()]
    lens = logit_lens(
        insp,
        args.prompt,
        tokenizer=tokenizer,
        k=args.top,
        positions=wanted,
        targets=targets,
        tuned=tuned,
    )
    for p in positions:
        lens.column(p)  # a position outside the prompt is an error before anything prints
    if plot is not None:
        title = f"{lens.lens} lens: {args.model} on {args.prompt!r}"
        lens.plot(plot, title=title, position=positions[0])
    if args.json:
        payload = {"model": args.model, **lens.to_dict(positions)}
        if tuned is not None:
            payload["tuned"] = args.tuned
        if plot is not None:
            payload["plot"] = str(plot)
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    for n, p in enumerate(positions):
        col = lens.column(p)
        pos = lens.positions[col]
        if n:
            print()
        through = f" through the tuned lens {args.tuned}" if tuned is not None else ""
        print(
            f"{args.model}: next-token predictions after each block{through} at position {pos} "
            f"({show_token(lens.tokens[pos])}), top {lens.k}"
        )
        headers, rows = lens.table(p)
        print_table(rows, headers)
        for target in lens.targets:
            print(_lens_target_summary(lens, target, p))
    last = f"block[{insp.num_blocks - 1}]"
    if lens.max_diff is not None:
        print(f"{last} reproduces the model's own logits (max |diff| {lens.max_diff:.2g})")
    if plot is not None:
        print(f"wrote {plot}")
    return 0


def _check_tuned(args: argparse.Namespace, tuned: Any, insp: Any) -> None:
    """A lens for another model's shape is an error; one named for another model, a warning."""
    tuned.check(insp)  # width and block count: one line, before any forward
    name = tuned.base_model_name_or_path
    own = getattr(getattr(insp.model, "config", None), "name_or_path", "") or ""
    if name and name != own and not _same_model(args.model, name):
        warnings.warn(
            f"{args.tuned} was tuned for {name!r}, not {args.model!r}: its width and block "
            "count match, its translators may not",
            stacklevel=2,
        )


def _report_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser)
    parser.add_argument("--prompt", required=True, help="the text to run the model on")
    parser.add_argument(
        "--target",
        action="append",
        metavar="TOKEN",
        help="a token to follow, repeatable, e.g. ' Paris' (its exact text, leading space "
        "included, or its id): its rank in the lens and its logit attribution per head "
        "(default: the model's top prediction)",
    )
    parser.add_argument(
        "--blocks",
        metavar="A:B",
        help="only these blocks: a slice (0:8, 20:) or a comma list (0,5,-1); default: every "
        "block (a long prompt on a deep model may need fewer to fit the page)",
    )
    parser.add_argument(
        "--score",
        choices=["induction", "previous-token"],
        default="induction",
        help="the head score of the grid (default: %(default)s)",
    )
    parser.add_argument("--out", required=True, metavar="FILE.html", help="where to write the page")
    parser.add_argument("--force", action="store_true", help="replace FILE.html if it exists")


def _report_blocks(text: str | None) -> list[int | str] | None:
    """``--blocks``: a slice (``0:8``) or a comma list (``0,5,-1``) of block indices."""
    from introspect._errors import LocatorError

    if text is None:
        return None
    if ":" in text:
        return [f"block[{text}]"]
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise LocatorError(
            f"--blocks {text!r} is neither a slice (0:8, 20:) nor a comma list of block "
            "indices (0,5,-1)"
        ) from None


def _report_out(text: str, force: bool) -> Path:
    """``--out``, checked before the model loads."""
    from introspect._errors import ViewError

    out = Path(text).expanduser()
    if out.suffix.lower() not in (".html", ".htm"):
        raise ViewError(f"--out {text!r} must end in .html: the report is one HTML page")
    if out.is_dir():
        raise ViewError(f"--out {text!r} is a folder: name a file, e.g. {text}/report.html")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise ViewError(f"the folder of --out {text!r} does not exist: create it")
    if out.exists() and not force:
        raise ViewError(f"{text} exists: pass --force to replace it, or choose another --out")
    return out


@command(
    "report",
    "one self-contained HTML page: the lens, the attention of every block and head, head "
    "scores and logit attribution for a prompt",
    _report_options,
)
def _report(args: argparse.Namespace) -> int:
    import shlex

    from introspect._html import write_page
    from introspect._report import build_report

    out = _report_out(args.out, args.force)
    blocks = _report_blocks(args.blocks)
    targets = [int(t) if t.isdigit() else t for t in args.target or ()]
    _, tokenizer, insp = _load(args)
    words = ["introspect", "report", args.model, "--prompt", args.prompt]
    for t in args.target or ():
        words += ["--target", t]
    if args.blocks:
        words += ["--blocks", args.blocks]
    words += ["--out", args.out]

    def build() -> str:
        return build_report(
            insp,
            args.prompt,
            tokenizer=tokenizer,
            targets=targets,
            blocks=blocks,
            score=args.score,
            model_name=args.model,
            command=shlex.join(words),
        )

    try:
        page = build()
    except MissingPartError as exc:
        if args.attn_implementation is not None or not _eager_needed(exc):
            raise
        _, tokenizer, insp = _reload_eager(args, exc)
        page = build()
    write_page(out, page)  # atomic: a reader never sees half a page
    size = len(page.encode("utf-8"))
    if args.json:
        print(json.dumps({"model": args.model, "out": str(out), "bytes": size}))
    else:
        print(f"wrote {out} ({size / 1024:.0f} KB)")
    return 0


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value

    return parse


def _cell(tokens: Sequence[str], key: int, weight: float) -> str:
    from introspect._analysis.lens import show_token

    return f"{key} {show_token(tokens[key], 14)} {weight:.3f}"


def _attention_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser)
    parser.add_argument("--prompt", required=True, help="the text to run the model on")
    parser.add_argument(
        "-b",
        "--block",
        type=int,
        required=True,
        metavar="N",
        help="the block whose attention to show; negative counts from the end",
    )
    parser.add_argument(
        "--head",
        type=int,
        metavar="H",
        help="one head (drawn large with --plot); default: every head of the block",
    )
    parser.add_argument(
        "-p",
        "--position",
        type=int,
        default=-1,
        metavar="N",
        help="the query position the table reads; negative counts from the end (default: -1)",
    )
    parser.add_argument(
        "-k",
        "--top",
        type=_whole_number(1),
        default=2,
        help="keys per head in the table (default: %(default)s)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="write the block's patterns as a grid of heatmaps (one per head; one large with "
        "--head), query down, key across, tokens on both axes",
    )


@command(
    "attention",
    "one block's attention patterns: the keys each head reads most (and --plot heatmaps)",
    _attention_options,
)
def _attention(args: argparse.Namespace) -> int:
    from introspect._analysis.attention import attention_patterns
    from introspect._analysis.lens import show_token

    plot = _plot_path(args.plot)
    _, tokenizer, insp = _load(args)
    # The block and the head are checked against the model before it runs.
    try:
        att = attention_patterns(insp, args.prompt, args.block, head=args.head, tokenizer=tokenizer)
    except MissingPartError as exc:
        if args.attn_implementation is not None or not _eager_needed(exc):
            raise
        _, tokenizer, insp = _reload_eager(args, exc)
        att = attention_patterns(insp, args.prompt, args.block, head=args.head, tokenizer=tokenizer)
    strongest = att.strongest(args.position, k=args.top)
    query = args.position % len(att.tokens)
    if plot is not None:
        att.plot(plot, title=f"attention of block[{att.block}]: {args.model} on {args.prompt!r}")
    if args.json:
        payload = {"model": args.model, **att.to_dict()}
        if plot is not None:
            payload["plot"] = str(plot)
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    heads = f"head {att.heads[0]}" if len(att.heads) == 1 else f"{len(att.heads)} heads"
    print(
        f"{args.model}: block[{att.block}], {heads}: the keys position {query} "
        f"({show_token(att.tokens[query])}) attends to most, of {len(att.tokens)} tokens "
        "(each: position, token, weight)"
    )
    rows = [
        [head, *(_cell(att.tokens, key, weight) for key, weight in keys)]
        for head, keys in zip(att.heads, strongest, strict=True)
    ]
    width = max(len(keys) for keys in strongest)
    print_table(rows, ["head", *(f"key {i + 1}" for i in range(width))])
    if plot is not None:
        print(f"wrote {plot}")
    return 0


def _heads_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser)
    parser.add_argument(
        "--score",
        choices=["induction", "previous-token"],
        default="induction",
        help="what to score each head on (default: induction)",
    )
    parser.add_argument(
        "--prompt",
        help="score on this text's tokens, repeated, instead of random tokens (optional)",
    )
    parser.add_argument(
        "--seq-len",
        type=_whole_number(2),
        metavar="N",
        help="random tokens per run (default: 50)",
    )
    parser.add_argument(
        "--repeats",
        type=_whole_number(1),
        default=2,
        metavar="N",
        help="how many times each run is repeated (default: 2; induction needs 2 or more)",
    )
    parser.add_argument(
        "--batch",
        type=_whole_number(1),
        metavar="N",
        help="random sequences, one per row, scored together (default: 8)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", help="seed of the random tokens (default: 0)"
    )
    parser.add_argument(
        "--bos",
        action="store_true",
        help="put the tokenizer's (else the config's) BOS token before every sequence",
    )
    parser.add_argument(
        "-n",
        "--top",
        type=_whole_number(1),
        default=10,
        help="how many heads to list (default: %(default)s)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="write a blocks x heads heatmap of the score, the top heads boxed",
    )


@command(
    "heads",
    "score every attention head (induction, previous-token) on repeated token sequences",
    _heads_options,
)
def _heads(args: argparse.Namespace) -> int:
    from introspect._analysis.attention import SCORES, head_scores
    from introspect._errors import AttentionToolError

    plot = _plot_path(args.plot)
    if args.prompt is not None:
        given = [
            flag
            for flag, value in (
                ("--seq-len", args.seq_len),
                ("--batch", args.batch),
                ("--seed", args.seed),
            )
            if value is not None
        ]
        if given:
            raise AttentionToolError(
                f"{', '.join(given)} choose random tokens; with --prompt the sequence is the "
                "prompt's tokens: leave them out"
            )
    if args.score == "induction" and args.repeats < 2:
        raise AttentionToolError("--score induction needs --repeats 2 or more (a repeat to find)")
    model, tokenizer, insp = _load(args)
    bos = None
    if args.bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            bos = getattr(getattr(model, "config", None), "bos_token_id", None)
        if not isinstance(bos, int):
            raise AttentionToolError(
                f"--bos: {args.model} names no BOS token (neither its tokenizer nor its config)"
            )
    options: dict[str, Any] = {}
    if args.prompt is not None:
        if tokenizer is None:
            raise AttentionToolError(
                f"{args.model} has no tokenizer, so it cannot read --prompt: leave it out to "
                "score on random tokens"
            )
        options["tokens"] = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    else:
        options.update(seq_len=args.seq_len, batch=args.batch, seed=args.seed or 0)
    try:
        scores = head_scores(
            insp, args.score, repeats=args.repeats, tokenizer=tokenizer, bos=bos, **options
        )
    except MissingPartError as exc:
        if args.attn_implementation is not None or not _eager_needed(exc):
            raise
        model, tokenizer, insp = _reload_eager(args, exc)
        scores = head_scores(
            insp, args.score, repeats=args.repeats, tokenizer=tokenizer, bos=bos, **options
        )
    if plot is not None:
        scores.plot(plot, top=min(args.top, 10))
    if args.json:
        payload = {"model": args.model, **scores.to_dict(args.top)}
        if args.prompt is not None:
            payload["prompt"] = args.prompt
        if plot is not None:
            payload["plot"] = str(plot)
        print(json.dumps(payload, indent=2))
        return 0
    blocks, heads = scores.values.shape
    source = (
        f"{scores.batch} random sequence{'s' if scores.batch != 1 else ''} of "
        f"{scores.seq_len} tokens, each repeated {scores.repeats} times (seed {scores.seed})"
        if args.prompt is None
        else f"the prompt's {scores.seq_len} tokens, repeated {scores.repeats} times"
    )
    print(
        f"{args.model}: {scores.score} score of {blocks * heads} heads ({blocks} blocks x "
        f"{heads} heads) on {source}"
    )
    print(f"(the {SCORES[scores.score]})")
    print_table(
        [
            [rank + 1, f"block[{block}]", head, f"{value:.3f}"]
            for rank, (block, head, value) in enumerate(scores.top(args.top))
        ],
        ["rank", "block", "head", "score"],
    )
    if plot is not None:
        print(f"wrote {plot}")
    return 0


def _attribute_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser)
    parser.add_argument(
        "--clean", required=True, metavar="TEXT", help="the prompt whose values are patched in"
    )
    parser.add_argument(
        "--corrupted",
        required=True,
        metavar="TEXT",
        help="the prompt they are patched into (as many tokens as --clean)",
    )
    parser.add_argument(
        "--target",
        required=True,
        metavar="TOKEN",
        help="the metric is logit(TOKEN) - logit(--versus) at the last position: one token's "
        "exact text, leading space included (e.g. ' Mary'), or its id",
    )
    parser.add_argument("--versus", required=True, metavar="TOKEN", help="the other token")
    parser.add_argument(
        "--at",
        action="append",
        metavar="LOCATORS",
        help="the sites to patch, repeatable (default: block[:]; with --heads block[:].attn.z)",
    )
    parser.add_argument(
        "--heads",
        action="store_true",
        help="one cell per head (locator x head, each head at every position) instead of one "
        "per position (locator x position)",
    )
    parser.add_argument(
        "--no-qk-fix",
        action="store_true",
        help="plain AtP: q and k cells to first order too (default: AtP*, their softmax exact)",
    )
    parser.add_argument(
        "--grad-drop",
        action="store_true",
        help="AtP*'s GradDrop: one more backward per block, each with the gradient through that "
        "block's update stopped, averaged (catches effects that cancel along one path)",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="also run exact activation patching (one forward per cell) and compare",
    )
    parser.add_argument(
        "-n",
        "--top",
        type=_whole_number(1),
        default=10,
        help="how many cells to list (default: %(default)s)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="write a heatmap of the estimate (locator x head or position), with --exact the "
        "exact table beside it",
    )


@command(
    "attribute",
    "attribution patching: each site's share of a clean/corrupted difference, from one backward",
    _attribute_options,
)
def _attribute(args: argparse.Namespace) -> int:
    import time

    import torch

    from introspect._analysis.atp import attribution_patching, patching_agreement, plot_patching
    from introspect._analysis.patching import logit_difference
    from introspect._errors import InterventionError
    from introspect._locators import Locator
    from introspect._text import as_token_id, encode_prompt, show_token, token_strings

    plot = _plot_path(args.plot)
    at = args.at or (["block[:].attn.z"] if args.heads else ["block[:]"])
    for text in at:
        Locator.parse(text)  # a malformed locator is an error before the model loads
    for flag, value in (("--clean", args.clean), ("--corrupted", args.corrupted)):
        if not value:
            raise InterventionError(f"{flag} is empty: pass some text, e.g. {flag} 'Hello'")
    model, tokenizer, insp = _load(args)
    clean = encode_prompt(tokenizer, args.clean, model)
    corrupted = encode_prompt(tokenizer, args.corrupted, model)
    counts = [int(clean["input_ids"].shape[1]), int(corrupted["input_ids"].shape[1])]
    if counts[0] != counts[1]:
        raise InterventionError(
            f"--clean is {counts[0]} tokens and --corrupted {counts[1]} for this tokenizer: "
            "position p of one is patched into position p of the other, so they need the same "
            "number of tokens (swap words that are one token each)"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids = [
        as_token_id(int(t) if t.isdigit() else t, tokenizer, vocab)
        for t in (args.target, args.versus)
    ]
    metric = logit_difference(ids[0], ids[1])
    names = [str(loc) for loc in insp.expand(at)]
    options: dict[str, Any] = {"locators": names, "heads": "each" if args.heads else None}

    def estimate() -> Any:
        return attribution_patching(
            insp,
            clean,
            corrupted,
            metric,
            qk_fix=not args.no_qk_fix,
            grad_drop=args.grad_drop,
            **options,
        )

    start = time.perf_counter()
    try:
        values = estimate()
    except InterventionError as exc:
        if args.attn_implementation is not None or not _eager_needed(exc):
            raise
        model, tokenizer, insp = _reload_eager(args, exc)
        start = time.perf_counter()
        values = estimate()
    seconds = {"estimate": time.perf_counter() - start}
    exact = None
    if args.exact:
        start = time.perf_counter()
        exact = insp.patching_sweep(clean, corrupted, metric, **options)
        seconds["exact"] = time.perf_counter() - start
    with torch.no_grad():
        scores = [float(metric(model(**inputs))) for inputs in (clean, corrupted)]
    method = ("AtP" if args.no_qk_fix else "AtP*") + (" + GradDrop" if args.grad_drop else "")
    tokens = token_strings(tokenizer, clean["input_ids"][0])
    columns = [str(h) for h in range(values.shape[1])] if args.heads else tokens
    agreement = patching_agreement(values, exact, top=args.top) if exact is not None else None
    labels = [show_token(t) for t in token_strings(tokenizer, ids)]
    if plot is not None:
        plot_patching(
            values,
            plot,
            rows=names,
            columns=columns
            if args.heads
            else [f"{p} {show_token(t)}" for p, t in enumerate(tokens)],
            xlabel="head" if args.heads else "position",
            title=f"{method}: {args.model}, logit({labels[0]}) - logit({labels[1]})",
            exact=exact,
        )
    order = values.flatten().abs().argsort(descending=True)[: args.top].tolist()
    cells = [divmod(int(i), values.shape[1]) for i in order]
    if args.json:
        payload: dict[str, Any] = {
            "model": args.model,
            "clean": args.clean,
            "corrupted": args.corrupted,
            "target": {"text": args.target, "id": ids[0]},
            "versus": {"text": args.versus, "id": ids[1]},
            "metric": {"clean": scores[0], "corrupted": scores[1]},
            "method": method,
            "locators": names,
            "axis": "head" if args.heads else "position",
            "tokens": tokens,
            "estimate": values.tolist(),
        }
        if exact is not None and agreement is not None:
            payload["exact"] = exact.tolist()
            payload["agreement"] = agreement.to_dict()
        payload["seconds"] = seconds
        if plot is not None:
            payload["plot"] = str(plot)
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    axis = "head" if args.heads else "position"
    print(
        f"{args.model}: {method} of logit({labels[0]}) - logit({labels[1]}) at the last "
        f"position: clean {scores[0]:.3f}, corrupted {scores[1]:.3f}"
    )
    print(
        f"{values.numel()} cells ({len(names)} locators x {values.shape[1]} {axis}s), each the "
        "metric's change when that site takes its clean value; the largest:"
    )
    rows = []
    for rank, (r, c) in enumerate(cells):
        where = [str(c)] if args.heads else [str(c), show_token(tokens[c], 14)]
        row = [rank + 1, names[r], *where, f"{float(values[r, c]):.4f}"]
        if exact is not None:
            row.append(f"{float(exact[r, c]):.4f}")
        rows.append(row)
    headers = ["rank", "locator", *(["head"] if args.heads else ["position", "token"])]
    headers += ["estimate", *(["exact"] if exact is not None else [])]
    print_table(rows, headers)
    if agreement is not None:
        missed = ", ".join(f"{names[i]} {axis} {j}" for i, j in agreement.false_negatives)
        print(
            f"{method} against exact patching over {agreement.cells} cells: Pearson "
            f"{agreement.pearson:.3f}, Spearman {agreement.spearman:.3f}, top {agreement.top}: "
            f"{agreement.overlap} shared{f' (missed: {missed})' if missed else ''}; "
            f"{seconds['estimate']:.2f} s against {seconds['exact']:.2f} s"
        )
    if plot is not None:
        print(f"wrote {plot}")
    return 0


def _dla_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser)
    parser.add_argument("--prompt", required=True, help="the text to run the model on")
    parser.add_argument(
        "--target",
        required=True,
        metavar="TOKEN",
        help="the token whose logit is taken apart: its exact text, leading space included "
        "(e.g. ' Paris'), or its id",
    )
    parser.add_argument(
        "-p",
        "--position",
        type=int,
        default=-1,
        metavar="N",
        help="the prompt position whose next-token logit is taken apart; negative counts "
        "from the end (default: -1, the last token)",
    )
    parser.add_argument(
        "--per-head",
        action="store_true",
        help="one component per attention head (block[i].attn.head[h]) instead of one per "
        "attention layer",
    )
    parser.add_argument(
        "-n",
        "--top",
        type=_whole_number(1),
        default=10,
        help="how many components to list, largest first (default: %(default)s; --json and "
        "--plot have them all)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="write a bar chart: every component's contribution, in the order the residual "
        "stream adds them (red raises the logit, blue lowers it)",
    )


def _plot_dla(labels: Sequence[str], values: Sequence[float], path: Path, title: str) -> None:
    """A bar per component, in stream order, written atomically to ``path``."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from introspect._analysis.lens import _save_atomically

    count = len(labels)
    width = min(18.0, max(5.0, 0.25 * count + 1.5))
    fig = Figure(figsize=(width, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = ["#b2182b" if v >= 0 else "#2166ac" for v in values]
    ax.bar(range(count), list(values), color=colours, width=0.8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    step = max(1, math.ceil(count / 70))  # at most 70 names under the bars
    ax.set_xticks(
        range(0, count, step),
        [labels[i] for i in range(0, count, step)],
        rotation=90,
        fontsize=7 if count > 24 else 8,
    )
    ax.set_xlim(-0.6, count - 0.4)
    ax.set_ylabel("contribution to the logit")
    ax.set_title(textwrap.fill(title, max(40, int(width * 11))), fontsize=10)
    _save_atomically(fig, path, 150)


@command(
    "dla",
    "direct logit attribution: what the embedding, each attention and MLP (or head) write "
    "into one token's logit",
    _dla_options,
)
def _dla(args: argparse.Namespace) -> int:
    from introspect._errors import CaptureError

    if not args.target:
        raise CaptureError("--target is empty: pass a token's text (e.g. ' Paris') or its id")
    plot = _plot_path(args.plot)

    from introspect._analysis.attribution import direct_logit_attribution
    from introspect._text import encode_prompt, show_token, token_strings

    model, tokenizer, insp = _load(args)
    inputs = encode_prompt(tokenizer, args.prompt, model)
    tokens = token_strings(tokenizer, inputs["input_ids"][0])
    if not -len(tokens) <= args.position < len(tokens):
        raise CaptureError(
            f"--position {args.position} is out of range for the prompt's "
            f"{_count(len(tokens), 'token')} (use {-len(tokens)}..{len(tokens) - 1})"
        )
    position = args.position % len(tokens)
    target = int(args.target) if args.target.isdigit() else args.target

    def attribute() -> Any:
        return direct_logit_attribution(
            insp, inputs, target, position, per_head=args.per_head, tokenizer=tokenizer
        )

    try:
        attribution = attribute()
    except MissingPartError as exc:
        if args.attn_implementation is not None or not _eager_needed(exc):
            raise
        model, tokenizer, insp = _reload_eager(args, exc)
        inputs = encode_prompt(tokenizer, args.prompt, model)
        attribution = attribute()
    labels = list(attribution.labels)
    values = [float(v) for v in attribution.values.tolist()]
    name = show_token(token_strings(tokenizer, [attribution.token])[0])
    here = f"position {position} ({show_token(tokens[position])})"
    if plot is not None:
        title = (
            f"direct logit attribution: {args.model}, the logit of {name} at {here}: "
            f"{attribution.logit:.3f}, the sum of the bars"
        )
        _plot_dla(labels, values, plot, title)
    if args.json:
        payload: dict[str, Any] = {
            "model": args.model,
            "prompt": args.prompt,
            "tokens": tokens,
            "target": {"text": args.target, "id": attribution.token},
            "per_head": args.per_head,
            **attribution.to_dict(),
        }
        if plot is not None:
            payload["plot"] = str(plot)
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    order = sorted(range(len(values)), key=lambda i: -abs(values[i]))
    shown = order[: args.top]
    print(
        f"{args.model}: direct logit attribution of {name} (id {attribution.token}) at {here}, "
        "the final norm's scale frozen"
    )
    which = "all of them" if len(shown) == len(values) else f"the {len(shown)} largest"
    print(
        f"its logit {attribution.logit:.4f} is the sum of {len(values)} components (max "
        f"|diff| {attribution.max_diff:.2g}); {which}, largest first:"
    )
    print_table(
        [[rank + 1, labels[i], f"{values[i]:+.4f}"] for rank, i in enumerate(shown)],
        ["rank", "component", "contribution"],
    )
    rest = order[args.top :]
    if rest:
        print(f"the other {len(rest)} components sum to {sum(values[i] for i in rest):+.4f}")
    if plot is not None:
        print(f"wrote {plot}")
    return 0


def _extract_options(parser: argparse.ArgumentParser) -> None:
    _model_argument(parser)
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH",
        help="the corpus, repeatable: a .txt file (one document per line), a .jsonl file (a "
        "'text' field per line) or a folder written by datasets' save_to_disk",
    )
    parser.add_argument(
        "--at",
        action="append",
        required=True,
        metavar="LOCATOR",
        help="what to record, repeatable: block[:], block[-1], block[0].input, embed, ...",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="the dataset folder (new, or to resume)"
    )
    parser.add_argument(
        "--positions",
        choices=["all", "last"],
        default="all",
        help="a row per token (all, the default) or per document, its last token (last)",
    )
    parser.add_argument(
        "--batch-size",
        type=_whole_number(1),
        default=8,
        metavar="N",
        help="documents per forward pass (default: 8)",
    )
    parser.add_argument(
        "--max-length",
        type=_whole_number(1),
        metavar="N",
        help="truncate longer documents to N tokens, listed in the manifest (default: the "
        "model's context length)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default="float16",
        help="the storage dtype: activations are written to DIR in it (default: float16); it "
        "does not touch the weights, --model-dtype casts those",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="F",
        help="the text field of .jsonl records and datasets rows (default: text)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="delete an extraction already in DIR and start over (never other files)",
    )
    parser.add_argument(
        "--nproc",
        type=_whole_number(1),
        default=1,
        metavar="N",
        help="run N processes on this machine through torchrun (default: 1); or launch "
        "'torchrun --nproc-per-node N -m introspect extract ...' yourself",
    )
    parser.add_argument(
        "--device",
        help="run on this device, e.g. cuda or cpu (default: cpu); under torchrun, cuda means "
        "each rank's own GPU (cuda:LOCAL_RANK)",
    )
    parser.add_argument("--adapter", metavar="NAME", help="force this adapter instead of detecting")
    _device_map_option(parser)
    parser.add_argument(
        "--model-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the weights' dtype: cast the model's weights to it once loaded (default: as "
        "loaded; what --dtype means in the other commands)",
    )
    parser.add_argument(
        "--shard-rows",
        type=_whole_number(1),
        metavar="N",
        help="at most N rows per shard file (default: about 64 MiB of values)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=_whole_number(1),
        metavar="N",
        help="at most N tokens through the model per shard (default: 32768); a shard is what "
        "an interruption can lose, every complete one is kept",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (also: INTROSPECT_PROGRESS=0)"
    )
    _json_flag(parser)


def _extract_argv(args: argparse.Namespace) -> list[str]:
    """The command line a rank runs: this one without --nproc."""
    argv = ["extract", args.model]
    for path in args.input:
        argv += ["--input", path]
    for loc in args.at:
        argv += ["--at", loc]
    argv += ["--out", args.out, "--positions", args.positions, "--dtype", args.dtype]
    argv += ["--batch-size", str(args.batch_size), "--text-field", args.text_field]
    for flag, value in (
        ("--max-length", args.max_length),
        ("--device", args.device),
        ("--device-map", getattr(args, "device_map", None)),
        ("--adapter", args.adapter),
        ("--model-dtype", args.model_dtype),
        ("--shard-rows", args.shard_rows),
        ("--shard-tokens", args.shard_tokens),
    ):
        if value is not None:
            argv += [flag, str(value)]
    for flag, value in (
        ("--force", args.force),
        ("--no-progress", args.no_progress),
        ("--json", args.json),
        ("--debug", getattr(args, "debug", False)),
    ):
        if value:
            argv.append(flag)
    return argv


def _extract_summary(out: str, manifest: dict[str, Any], note: str, *, ran: bool) -> None:
    rows = manifest["rows"]
    locators = manifest["locators"]
    shown = ", ".join(locators) if len(locators) <= 3 else f"{locators[0]}, ..., {locators[-1]}"
    shapes = {"x".join(map(str, shape)) or "1" for shape in manifest["shapes"].values()}
    width = f"{shapes.pop()} " if len(shapes) == 1 else ""
    files = [out_dir / s["file"] for out_dir in [Path(out)] for s in manifest["shards"]]
    size = sum(f.stat().st_size for f in files if f.exists())
    unit = "tokens" if manifest["positions"] == "all" else "documents, last token"
    print(
        f"{note}{out}: {rows:,} rows ({unit}) from {manifest['documents']['total']:,} documents; "
        f"{len(locators)} locator{'s' if len(locators) != 1 else ''} ({shown}) of {width}"
        f"{manifest['dtype']} values; {len(files)} shard{'s' if len(files) != 1 else ''}, "
        f"{size / 2**20:.1f} MiB"
    )
    cut = manifest["truncation"]
    if cut["documents"]:
        print(
            f"{cut['documents']:,} documents truncated to {cut['max_length']:,} tokens "
            f"({cut['tokens_removed']:,} tokens left out; listed in manifest.json)"
        )
    empty = manifest["documents"]["empty"]
    if empty:
        print(f"{len(empty):,} empty documents (no tokens, no rows; listed in manifest.json)")
    run = manifest.get("run") or {}
    if ran and run.get("tokens_per_second"):
        # This run's work, apart from the dataset's totals above: a resumed run did only part.
        documents = run.get("documents")
        of = f" of {_count(documents, 'document')}" if documents is not None else ""
        line = (
            f"this run: {_count(run['tokens'], 'token')}{of} through the model, "
            f"{_count(run['rows'], 'row')} written, in {run['seconds']:.1f} s "
            f"({run['tokens_per_second']:,.0f} tokens/s, {run['world_size']} "
            f"process{'es' if run['world_size'] != 1 else ''})"
        )
        resumed = run.get("resumed") or {}
        if resumed.get("shards"):
            line += (
                f"; the other {_count(resumed['documents'], 'document')} "
                f"({_count(resumed['rows'], 'row')}, {_count(resumed['shards'], 'shard')}) "
                "were on disk from an earlier run"
            )
        print(line)


def _count(n: int, noun: str) -> str:
    """``1 row``, ``2,048 rows``."""
    return f"{n:,} {noun}{'s' if n != 1 else ''}"


def _interrupted(out: str, settings: dict[str, Any] | None, total: int | None, force: bool) -> str:
    """What an interrupted extraction kept in ``out``, and how to go on from there."""
    from introspect._scale.records import kept

    if settings is None:
        return ""  # stopped before the inputs were read: nothing known yet
    found = kept(out, settings)
    again = "rerun the same command without --force" if force else "rerun the same command"
    if not found or not found["shards"]:
        return f"no shard was complete, nothing kept in {out}; {again} to start"
    of = f" of {total:,}" if total is not None else ""
    return (
        f"{_count(found['shards'], 'complete shard')} kept in {out} ({found['documents']:,}"
        f"{of} documents, {_count(found['rows'], 'row')}); {again} to resume from there"
    )


@command(
    "extract",
    "stream a corpus's activations to DIR (safetensors shards + manifest.json); resumable, "
    "runs under torchrun",
    _extract_options,
)
def _extract(args: argparse.Namespace) -> int:
    from introspect._errors import IntrospectError
    from introspect._locators import Locator
    from introspect._scale.corpus import read_inputs
    from introspect._scale.dataset import MANIFEST, read_json
    from introspect._scale.distributed import as_ranks
    from introspect._scale.records import check_output_dir
    from introspect._scale.run import extract
    from introspect._scale.settings import settings_of, weights_fingerprint

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    settings: dict[str, Any] | None = None
    docs: Any = None
    try:
        for text in args.at:
            Locator.parse(text)  # a malformed locator is an error before anything is read
        docs = read_inputs(args.input, args.text_field)
        settings = settings_of(
            model=args.model,
            locators=args.at,
            inputs=docs,
            positions=args.positions,
            dtype=args.dtype,
            text_field=args.text_field,
            max_length=args.max_length,
            adapter=args.adapter,
            model_dtype=args.model_dtype,
        )
        if check_output_dir(args.out, settings, force=args.force) == "complete":
            if rank == 0:
                manifest = read_json(Path(args.out).expanduser() / MANIFEST)
                if manifest.get("weights"):
                    # The same name may hold other weights now (a checkpoint overwritten in
                    # place): "complete" only for the weights the folder was made from.
                    load_args = argparse.Namespace(**{**vars(args), "dtype": args.model_dtype})
                    _, _, insp = _load(load_args)
                    check_output_dir(
                        args.out,
                        settings,
                        force=args.force,
                        weights=weights_fingerprint(insp.model),
                    )
                if args.json:
                    print(json.dumps(manifest, indent=2, ensure_ascii=False))
                else:
                    _extract_summary(
                        args.out, manifest, "already complete, nothing to do: ", ran=False
                    )
            return 0

        def run(device: str | None) -> dict[str, Any]:
            load_args = argparse.Namespace(
                **{**vars(args), "dtype": args.model_dtype, "device": device}
            )
            _, tokenizer, insp = _load(load_args)
            return extract(
                insp,
                tokenizer,
                docs,
                args.at,
                args.out,
                positions=args.positions,
                dtype=args.dtype,
                batch_size=args.batch_size,
                max_length=args.max_length,
                text_field=args.text_field,
                force=args.force,
                model_name=args.model,
                shard_rows=args.shard_rows,
                shard_tokens=args.shard_tokens,
                progress=not args.no_progress,
            )

        # One rank of torchrun, or the launcher of --nproc ranks (then nothing to print here).
        found = as_ranks(args.nproc, _extract_argv(args), args.device, run)
        if found is None:
            return 0
        manifest = found
    except IntrospectError as exc:
        if world > 1:
            # Every rank prints its own error: say whose it is.
            raise type(exc)(f"rank {rank} of {world}: {exc}") from exc
        raise
    except BaseException as exc:
        # Ctrl-C (torchrun's launcher turns it into a SignalException): say what is kept.
        if not isinstance(exc, KeyboardInterrupt) and type(exc).__name__ != "SignalException":
            raise
        if rank != 0:
            raise KeyboardInterrupt from None  # rank 0 speaks for the run
        total = docs.total if docs is not None else None
        raise KeyboardInterrupt(_interrupted(args.out, settings, total, args.force)) from None
    if rank == 0:
        if args.json:
            print(json.dumps(manifest, indent=2, ensure_ascii=False))
        else:
            _extract_summary(args.out, manifest, "wrote ", ran=True)
    return 0


# -- sparse autoencoders ---------------------------------------------------------------------


def _positive(text: str) -> float:
    """A finite number above zero (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, e.g. 1e-4") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above zero")
    return value


def _train_sae_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="the model the activations come from (as given to introspect extract)"
    )
    parser.add_argument(
        "--data", required=True, metavar="DIR", help="a folder written by introspect extract"
    )
    parser.add_argument(
        "--at",
        required=True,
        metavar="LOCATOR",
        help="the extracted site to train on: block[3], block[-1], block[2].mlp, ...",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="SAE_DIR",
        help="where the SAE goes (SAELens layout) and its checkpoints (SAE_DIR/checkpoint)",
    )
    width = parser.add_mutually_exclusive_group(required=True)
    width.add_argument(
        "--expansion",
        type=_whole_number(1),
        metavar="N",
        help="N times the site's width latents, e.g. 8",
    )
    width.add_argument("--d-sae", type=_whole_number(1), metavar="N", help="N latents")
    parser.add_argument(
        "--k", type=_whole_number(1), required=True, metavar="K", help="latents active per token"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=_whole_number(1), metavar="N", help="optimiser steps (default: --epochs)"
    )
    length.add_argument(
        "--epochs",
        type=_whole_number(1),
        metavar="N",
        help="passes over the data (default: 1)",
    )
    parser.add_argument(
        "--lr",
        type=_positive,
        metavar="LR",
        help="Adam's learning rate (default: 2e-4 / sqrt(d_sae / 2**14))",
    )
    parser.add_argument(
        "--batch-size",
        type=_whole_number(1),
        default=1024,
        metavar="N",
        help="tokens per step (default: 1024)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="initialisation and order (default: 0)"
    )
    parser.add_argument(
        "--k-aux",
        type=_whole_number(1),
        metavar="N",
        help="dead latents the AuxK loss uses (default: half the width, at most d_sae)",
    )
    parser.add_argument(
        "--dead-after",
        type=_whole_number(1),
        metavar="N",
        help="tokens without firing after which a latent counts as dead (default: 10M, at "
        "most the dataset's rows)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=_whole_number(1),
        default=500,
        metavar="N",
        help="steps between checkpoints (default: 500)",
    )
    parser.add_argument(
        "--skip-first",
        type=_whole_number(0),
        default=0,
        metavar="N",
        help="train on the tokens at position N and later of each document only: 1 leaves out the first token, an attention sink on many models (default: 0)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="start over instead of resuming the run (or keeping the SAE) in SAE_DIR",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress lines (also: INTROSPECT_PROGRESS=0)",
    )
    _json_flag(parser)


def _stamp(path: Path) -> tuple[int, int] | None:
    """The file's inode and modification time, ``None`` when it does not exist."""
    if not path.is_file():
        return None
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _same_model(given: str, recorded: str) -> bool:
    if given == recorded:
        return True
    a, b = Path(given).expanduser(), Path(recorded).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


@command(
    "train-sae",
    "train a TopK sparse autoencoder on activations from introspect extract; resumable",
    _train_sae_options,
)
def _train_sae(args: argparse.Namespace) -> int:
    from introspect._errors import SAEError
    from introspect._locators import Locator
    from introspect._sae import train_sae
    from introspect._sae._model import SAELENS_CONFIG
    from introspect._scale.dataset import ActivationDataset

    # Everything that can be checked without training is checked first.
    Locator.parse(args.at)
    ds = ActivationDataset(args.data)
    at = ds[args.at].key
    recorded = ds.manifest.get("model")
    if (
        isinstance(recorded, str)
        and recorded != ds.manifest.get("model_class")
        and not _same_model(args.model, recorded)
    ):
        raise SAEError(
            f"{args.data} holds activations of {recorded!r} (its manifest.json), not of "
            f"{args.model!r}: name the model it was extracted from"
        )
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise SAEError(f"--out {args.out} is a file: name a folder for the SAE")
    config = out / SAELENS_CONFIG
    before = _stamp(config)
    sae = train_sae(
        args.data,
        at=at,
        out=out,
        k=args.k,
        d_sae=args.d_sae,
        expansion=args.expansion,
        steps=args.steps,
        epochs=args.epochs or 1,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        k_aux=args.k_aux,
        dead_after=args.dead_after,
        checkpoint_every=args.checkpoint_every,
        resume=not args.force,
        progress=not args.no_progress,
        skip_first=args.skip_first,
    )
    kept = before is not None and _stamp(config) == before  # not written again
    training = dict(sae.metadata.get("training", {}))
    steps = int(training.get("steps", 0))
    ran = int(training.get("tokens_this_run") or 0) // args.batch_size
    if args.json:
        payload = {
            "model": args.model,
            "data": args.data,
            "out": str(out),
            "at": sae.locator,
            "d_in": sae.d_in,
            "d_sae": sae.d_sae,
            "k": sae.k,
            "already_complete": kept,
            "training": training,
        }
        print(json.dumps(payload, indent=2, default=str))
        return 0
    if not training.get("finished", True):
        total = training.get("settings", {}).get("steps", "?")
        print(
            f"stopped at step {steps:,} of {total:,}: the checkpoint is in {out / 'checkpoint'}; "
            "rerun the same command to resume"
        )
        return 0
    note = "already trained, nothing to do: " if kept else "wrote "
    print(
        f"{note}{out}: TopK SAE at {sae.locator} of {args.model}, {sae.d_in} -> {sae.d_sae} "
        f"latents, k {sae.k}; {steps:,} steps of {args.batch_size:,} tokens"
        + (f" (resumed at step {steps - ran:,})" if not kept and 0 < steps - ran < steps else "")
    )
    fvu = training.get("final_fvu")
    dead = training.get("dead")
    if fvu is not None and dead is not None:
        print(
            f"final fraction of variance unexplained {fvu:.4f}; {dead:,} of {sae.d_sae:,} "
            "latents dead"
        )
    speed = training.get("tokens_per_second")
    share = training.get("read_share")
    if not kept and speed and share is not None:
        print(f"{speed:,.0f} tokens/s from disk, {share:.0%} of the time reading")
    print(f"next: introspect sae eval {args.model} {out} --input FILE")
    return 0


def _sae_eval_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser)
    parser.add_argument(
        "--skip-first",
        type=_whole_number(0),
        default=0,
        metavar="N",
        help="leave the first N positions of each sequence alone: not spliced, not ablated, not counted (as an SAE trained with --skip-first N expects; default: 0)",
    )
    parser.add_argument(
        "sae",
        metavar="SAE_DIR",
        help="the SAE's folder: SAELens, Gemma Scope, Llama Scope, dictionary_learning or one "
        "sparsify hookpoint's folder (the format is detected from its files)",
    )
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a text to evaluate on, repeatable (each one a sequence)",
    )
    given.add_argument(
        "--input",
        "--data",
        dest="input",
        action="append",
        metavar="PATH",
        help="a corpus, repeatable: a .txt file (one document per line), a .jsonl file (a "
        "'text' field per line) or a folder written by datasets' save_to_disk",
    )
    parser.add_argument(
        "--at",
        metavar="LOCATOR",
        help="where the SAE reads (default: the site its files name)",
    )
    parser.add_argument(
        "--format",
        metavar="NAME",
        help="read the folder as this format (saelens, gemma_scope, llama_scope, "
        "dictionary_learning, sparsify) instead of detecting it",
    )
    parser.add_argument(
        "--center-writing-weights",
        choices=["yes", "no"],
        help="for a SAELens SAE on the residual stream whose cfg.json does not say: whether "
        "it was trained on TransformerLens's centred weights (gpt2-small-res-jb: yes)",
    )
    parser.add_argument(
        "--norm-scaling-factor",
        type=_positive,
        metavar="F",
        help="the input factor of an expected_average_only_in SAELens SAE (1.0 if folded)",
    )
    parser.add_argument(
        "--batch-size",
        type=_whole_number(1),
        default=8,
        metavar="N",
        help="sequences per forward pass (default: 8)",
    )
    parser.add_argument(
        "--max-length",
        type=_whole_number(2),
        metavar="N",
        help="cut longer documents to N tokens (default: the model's context length)",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="F",
        help="the text field of .jsonl records and datasets rows (default: text)",
    )


def _sae_batches(
    tokenizer: Any, texts: Sequence[str], model: Any, *, batch_size: int, max_length: int | None
) -> list[dict[str, Any]]:
    """The texts as padded batches of token ids (right-padded, as extract pads them)."""
    from introspect._batching import context_length, pad_batch
    from introspect._hooks.session import input_device
    from introspect._text import encode_prompt

    if tokenizer is None:
        encode_prompt(tokenizer, "x", model)  # its error: this model cannot read text
    limit = max_length or context_length(model)
    ids = [
        [int(t) for t in row][:limit] if limit else [int(t) for t in row]
        for row in tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    ]
    ids = [row for row in ids if row]
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    device = input_device(model)
    batches = []
    for start in range(0, len(ids), batch_size):
        batch = pad_batch(
            ids[start : start + batch_size], padding_side="right", pad_token_id=int(pad or 0)
        )
        batches.append({k: batch[k].to(device) for k in ("input_ids", "attention_mask")})
    return batches


def _site_device(insp: Any, loc: Any) -> Any:
    """Where the values at ``loc`` are computed: its module's device, else the model's."""
    from introspect._hooks.session import input_device

    path = insp.path(loc).split(":")[0]  # block[0].attn.z is a part of the attention module
    try:
        module = insp.model.get_submodule(path)
    except AttributeError:
        module = insp.model
    return next((p.device for p in module.parameters() if not p.is_meta), input_device(insp.model))


_SAE_METRICS = (
    ("ce_score", "(CE ablated - CE spliced) / (CE ablated - CE clean): 1 is the model's own loss"),
    ("ce_clean", "next-token cross-entropy of the model as it is"),
    ("ce_sae", "... with the site replaced by the SAE's reconstruction"),
    ("ce_ablate", "... with the site zero-ablated"),
    ("kl_score", "(KL ablated - KL spliced) / KL ablated"),
    ("kl_sae", "KL(clean || spliced) per token"),
    ("kl_ablate", "KL(clean || zero-ablated) per token"),
    ("l0", "mean number of active latents per token"),
    ("explained_variance", "1 - sum |x - x_hat|^2 / sum |x - mean|^2"),
    ("dead", "latents that never fired on these tokens"),
)


def _sae_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from introspect._errors import ModelLoadError
    from introspect._locators import Locator
    from introspect._sae import evaluate_sae, load_sae, site_locator
    from introspect._scale.corpus import read_inputs

    # The inputs, the locator and the SAE are checked before the model loads.
    if args.at is not None:
        Locator.parse(args.at)
    if args.prompt is not None:
        if not all(args.prompt):
            raise ModelLoadError("the prompt is empty: pass some text, e.g. --prompt 'Hello'")
        texts = list(args.prompt)
    else:
        docs = read_inputs(args.input, args.text_field)
        texts = docs.texts(0, len(docs))
    centre = None if args.center_writing_weights is None else args.center_writing_weights == "yes"
    sae = load_sae(
        args.sae,
        format=args.format,
        center_writing_weights=centre,
        norm_scaling_factor=args.norm_scaling_factor,
    )
    model, tokenizer, insp = _load(args)
    loc = site_locator(insp, sae, args.at, splicing=True)  # width and site, before any forward
    sae.to(_site_device(insp, loc))
    batches = _sae_batches(
        tokenizer, texts, model, batch_size=args.batch_size, max_length=args.max_length
    )
    result = evaluate_sae(insp, sae, batches, at=loc, skip_first=args.skip_first)
    fields = dataclasses.asdict(result)
    if args.json:
        payload = {
            "model": args.model,
            "sae": args.sae,
            "format": sae.format,
            "architecture": sae.architecture,
            "d_in": sae.d_in,
            "documents": len(texts),
            **{k: _finite(v) if isinstance(v, float) else v for k, v in fields.items()},
            "dead_fraction": result.dead_fraction,
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(
        f"{args.model}: SAE {args.sae} ({sae.format}, {sae.architecture}, {sae.d_in} -> "
        f"{sae.d_sae} latents) at {result.at}, on {result.tokens:,} tokens of {len(texts):,} "
        f"{'sequence' if len(texts) == 1 else 'sequences'}"
    )
    rows = [
        [
            name,
            f"{result.dead:,} of {result.d_sae:,}" if name == "dead" else f"{fields[name]:.4f}",
            meaning,
        ]
        for name, meaning in _SAE_METRICS
    ]
    print_table(rows, ["metric", "value", "what it is"])
    return 0


_SAE_COMMANDS: dict[str, tuple[str, Configure, Runner]] = {
    "eval": (
        "CE and KL scores, L0, explained variance and dead latents of an SAE spliced into "
        "a model, on prompts or a corpus",
        _sae_eval_options,
        _sae_eval,
    ),
}


def _sae_options(parser: argparse.ArgumentParser) -> None:
    subs = parser.add_subparsers(dest="sae_command", metavar="SAE_COMMAND", required=True)
    for name, (help, configure, _) in _SAE_COMMANDS.items():
        sub = subs.add_parser(name, help=help, description=help)
        configure(sub)
        sub.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show full tracebacks on errors",
        )


@command("sae", "sparse autoencoders: 'introspect sae eval MODEL SAE_DIR ...'", _sae_options)
def _sae(args: argparse.Namespace) -> int:
    return _SAE_COMMANDS[args.sae_command][2](args)


# -- the tuned lens ----------------------------------------------------------------------------


def _fraction(text: str) -> float:
    """A finite number in [0, 1) (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, e.g. 0.1") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 0 and below 1, e.g. 0.1")
    return value


def _tune_lens_options(parser: argparse.ArgumentParser) -> None:
    _model_argument(parser, _MODEL_HELP + "; the one the activations come from")
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="a folder written by introspect extract from this model, holding the last block",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="LENS",
        help="where the lens goes (AlignmentResearch/tuned-lens's layout) and its checkpoints "
        "(LENS/checkpoint)",
    )
    parser.add_argument(
        "--at",
        action="append",
        metavar="LOCATOR",
        help="repeatable: the blocks to translate, e.g. block[10:] (default: every block before "
        "the last that DIR holds)",
    )
    parser.add_argument(
        "--include-embed",
        action=argparse.BooleanOptionalAction,
        help="train the embedding entry's translator (block[0].input) too, or not (default: "
        "when DIR holds it and --at is not given)",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=_whole_number(1), metavar="N", help="optimiser steps (default: --epochs)"
    )
    length.add_argument(
        "--epochs", type=_whole_number(1), metavar="N", help="passes over the data (default: 1)"
    )
    parser.add_argument(
        "--batch-size",
        type=_whole_number(1),
        default=256,
        metavar="N",
        help="tokens per step (default: 256)",
    )
    parser.add_argument(
        "--lr",
        type=_positive,
        metavar="LR",
        help="SGD's learning rate, decayed linearly to 0 (default: 1 - momentum, 0.1)",
    )
    parser.add_argument(
        "--momentum",
        type=_fraction,
        default=0.9,
        metavar="M",
        help="Nesterov momentum (default: 0.9)",
    )
    parser.add_argument(
        "--weight-decay",
        type=_tolerance,
        default=1e-3,
        metavar="W",
        help="weight decay, towards the logit lens (default: 1e-3)",
    )
    parser.add_argument(
        "--clip",
        type=_tolerance,
        default=1.0,
        metavar="C",
        help="clip the gradient's norm to C, 0 for no clipping (default: 1.0)",
    )
    parser.add_argument(
        "--held-out",
        type=_fraction,
        default=0.1,
        metavar="F",
        help="the fraction of documents kept out of training, to measure the KL on (default: 0.1)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="the split and the order (default: 0)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=_whole_number(1),
        default=50,
        metavar="N",
        help="steps between checkpoints (default: 50)",
    )
    parser.add_argument("--adapter", metavar="NAME", help="force this adapter instead of detecting")
    parser.add_argument("--device", help="run on this device, e.g. cuda or cpu (default: cpu)")
    _device_map_option(parser)
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights first"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="start over instead of resuming the run (or keeping the lens) in LENS",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress lines (also: INTROSPECT_PROGRESS=0)",
    )
    _json_flag(parser)


def _check_lens_data(args: argparse.Namespace, ds: Any) -> None:
    """What the dataset's manifest can refuse before the model loads."""
    from introspect._errors import DatasetError

    recorded = ds.manifest.get("model")
    if (
        isinstance(recorded, str)
        and recorded != ds.manifest.get("model_class")
        and not _same_model(args.model, recorded)
    ):
        raise DatasetError(
            f"{args.data} holds activations of {recorded!r} (its manifest.json), not of "
            f"{args.model!r}: name the model it was extracted from"
        )
    counts = ds.manifest.get("num_blocks")
    blocks = counts.get("") if isinstance(counts, dict) else None
    if isinstance(blocks, int) and blocks > 0:
        last = f"block[{blocks - 1}]"
        if last not in ds.locators:
            raise DatasetError(
                f"{args.data} does not hold the last block ({last}), whose read-out is the "
                f"target: extract with --at {last} too (it holds {', '.join(ds.locators)})"
            )


@command(
    "tune-lens",
    "train a tuned lens (one affine translator per block) on activations from introspect "
    "extract; resumable",
    _tune_lens_options,
)
def _tune_lens(args: argparse.Namespace) -> int:
    from introspect._analysis.tuned import CHECKPOINT, CONFIG, train_tuned_lens
    from introspect._errors import DatasetError
    from introspect._locators import Locator
    from introspect._scale.dataset import ActivationDataset

    # Everything that can be checked without the model is checked before it loads.
    for text in args.at or ():
        Locator.parse(text)
    ds = ActivationDataset(args.data)
    _check_lens_data(args, ds)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {args.out} is a file: name a folder for the lens")
    state = out / CHECKPOINT / "state.json"
    start = 0
    if not args.force and state.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            start = int(json.loads(state.read_text("utf-8")).get("step", 0))
    before = _stamp(out / CONFIG)
    _, _, insp = _load(args)
    try:
        lens = train_tuned_lens(
            args.data,
            insp,
            out=out,
            blocks=args.at,
            include_embed=args.include_embed,
            steps=args.steps,
            epochs=args.epochs or 1,
            lr=args.lr if args.lr is not None else 1.0 * (1 - args.momentum),
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            clip=args.clip,
            batch_size=args.batch_size,
            seed=args.seed,
            held_out=args.held_out,
            checkpoint_every=args.checkpoint_every,
            resume=not args.force,
            progress=not args.no_progress,
        )
    except DatasetError as exc:
        text = str(exc)
        if "pass resume=False" not in text:
            raise
        raise DatasetError(text.replace("pass resume=False", "pass --force")) from None
    kept = before is not None and _stamp(out / CONFIG) == before  # not written again
    training = dict(lens.metadata.get("training", {}))
    held = training.pop("held_out", None)
    steps = int(training.get("steps", 0))
    size = training.get("settings", {}).get("batch_size", args.batch_size)
    rows = lens.rows(insp)
    if args.json:
        payload = {
            "model": args.model,
            "data": args.data,
            "out": str(out),
            "d_model": lens.d_model,
            "num_hidden_layers": lens.num_hidden_layers,
            "rows": rows,
            "already_complete": kept,
            "held_out": held,
            "training": training,
        }
        print(json.dumps(payload, indent=2, default=str))
        return 0
    if not training.get("finished", True):
        total = training.get("settings", {}).get("steps", "?")
        print(
            f"stopped at step {steps:,} of {total:,}: the checkpoint is in {out / CHECKPOINT}; "
            "rerun the same command to resume"
        )
        return 0
    note = "already trained, nothing to do: " if kept else "wrote "
    resumed = not kept and 0 < start < steps
    print(
        f"{note}{out}: tuned lens of {args.model}, {len(rows)} of {len(lens)} translators "
        f"trained ({', '.join(rows)}); {steps:,} steps of {size:,} tokens"
        + (f" (resumed at step {start:,})" if resumed else "")
    )
    if held:
        docs = len(held.get("documents", []))
        print(
            f"KL(final || lens) on {held['tokens']:,} held-out tokens ({docs:,} "
            f"document{'s' if docs != 1 else ''}), nats per token:"
        )
        headers, table = lens.held_out_table()
        print_table(table, headers)
    else:
        print("no documents held out (--held-out 0): no KL to show")
    print(f"next: introspect lens {args.model} --prompt TEXT --tuned {out}")
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
        # Also accepted after the command; SUPPRESS keeps a --debug given before it.
        sub.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show full tracebacks on errors",
        )
        sub.set_defaults(_run=cmd.run)
    return parser


@functools.lru_cache(maxsize=1)
def _parser_for(commands: tuple[_Command, ...]) -> argparse.ArgumentParser:
    del commands  # the cache key: build_parser reads the same registry
    return build_parser()


def _parser() -> argparse.ArgumentParser:
    """:func:`build_parser`, built once per set of registered commands: :func:`main` is called
    many times in one process (a notebook, a test suite), and building the parser of every
    sub-command costs tens of milliseconds. Parsing does not change a parser."""
    return _parser_for(tuple(_COMMANDS.values()))


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    text = str(message).strip().splitlines()
    print(f"introspect: warning: {text[0] if text else category.__name__}", file=sys.stderr)


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, (IntrospectError, OSError, ValueError)):
        return message
    # Not ours (a plugin, a library): the type tells where to look.
    return f"{type(exc).__name__}: {message}" if text else message


def _check_before_loading(args: argparse.Namespace) -> None:
    """What every command checks before its imports and its model: seconds before torch and
    transformers would have loaded (a typo in a model name answers at once)."""
    if getattr(args, "_loads_model", False):
        from introspect._names import check_model_name

        check_model_name(args.model)
    if getattr(args, "prompt", None) == "":
        raise ModelLoadError("the prompt is empty: pass some text, e.g. --prompt 'Hello'")
    if getattr(args, "plot", None):
        _plot_path(args.plot)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``introspect`` command; returns the exit status.

    Example:
        >>> main(["adapters"]) == 0  # doctest: +ELLIPSIS
        adapter...
        True
    """
    debug = False
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        # An option not given holds its default itself: a list a command appended to would be
        # the next call's default. Each call gets copies.
        for key, value in vars(args).items():
            if isinstance(value, list | dict | set):
                setattr(args, key, type(value)(value))
        debug = bool(args.debug)
        run = getattr(args, "_run", None)
        if run is None:
            parser.print_help()
            return 2
        _check_before_loading(args)
        with warnings.catch_warnings():
            # A warning is one line, like an error (Python's own format adds the source line).
            warnings.showwarning = _show_warning
            return int(run(args))
    except BrokenPipeError:
        # The reader went away (`introspect lens ... | head`): stop quietly, as Unix tools do,
        # and keep Python from failing again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            print(f"introspect: error: {_error_line(exc)}", file=sys.stderr)
            print("(run with --debug for the full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # A command may say what its work left behind (extract: the shards kept).
        detail = str(exc).strip()
        print(f"introspect: interrupted{': ' + detail if detail else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
