"""The ``introspect`` command: thin, it parses, calls the library and prints.

Each sub-command is a function registered with :func:`command`; adding one is one decorated
function (its ``configure`` callback adds the options).
"""

from __future__ import annotations

import argparse
import json
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
