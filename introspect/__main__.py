"""``python -m introspect``: the ``introspect`` command, as ``torchrun -m introspect`` runs it."""

from __future__ import annotations

from introspect.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
