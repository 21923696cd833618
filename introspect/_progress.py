"""Progress bars for the slow steps (loading, converting, checking), on stderr.

A step that waits on a single long call (reading a GGUF file, a forward pass) gives tqdm
nothing to count, so :func:`steps` keeps its elapsed time ticking from a background thread.
Set ``INTROSPECT_PROGRESS=0`` to silence every bar (pipes and logs stay clean).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["Steps", "progress_enabled", "steps"]


def progress_enabled(requested: bool = True) -> bool:
    """Whether bars are shown: ``requested`` and not turned off by ``INTROSPECT_PROGRESS=0``.

    Example:
        >>> progress_enabled(False)
        False
    """
    return requested and os.environ.get("INTROSPECT_PROGRESS", "1").lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


class Steps:
    """The handle :func:`steps` yields: call :meth:`next` as each named step ends.

    Example:
        >>> with steps("demo", ["one", "two"], enabled=False) as bar:
        ...     bar.next()
        ...     bar.next()
        >>> bar.done
        2
    """

    def __init__(self, title: str, names: Sequence[str], bar: Any = None, lines: bool = False):
        self._title = title
        self._names = list(names)
        self._bar = bar
        self._lines = lines
        self.done = 0
        self._show()

    def _label(self) -> str:
        if self.done >= len(self._names):
            return self._title
        return f"{self._title}: {self._names[self.done]}"

    def _show(self) -> None:
        if self._bar is not None:
            self._bar.set_description_str(self._label(), refresh=True)
        elif self._lines and self.done < len(self._names):
            print(f"{self._label()} ({self.done + 1}/{len(self._names)})", file=sys.stderr)

    def next(self) -> None:
        """Mark the current step done and show the next one's name."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        self._show()


@contextmanager
def steps(title: str, names: Sequence[str], *, enabled: bool = True) -> Iterator[Steps]:
    """A bar over named steps whose elapsed time keeps ticking while a step runs.

    On a terminal the bar redraws in place; elsewhere (a pipe, a CI log) each step is one
    plain line, so logs stay readable.

    Example:
        >>> with steps("loading", ["weights"], enabled=False) as bar:
        ...     bar.next()
    """
    if not progress_enabled(enabled):
        yield Steps(title, names)
        return
    if not sys.stderr.isatty():
        yield Steps(title, names, lines=True)
        return
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    bar = tqdm(
        total=len(names),
        file=sys.stderr,
        bar_format="{desc} ({n_fmt}/{total_fmt}) [{elapsed}]",
        leave=False,
        dynamic_ncols=True,
    )
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.25):
            bar.refresh()

    ticker = threading.Thread(target=tick, name="introspect-progress", daemon=True)
    try:
        handle = Steps(title, names, bar)
        ticker.start()
        yield handle
    finally:
        stop.set()
        if ticker.is_alive():
            ticker.join()
        bar.close()
