"""Writing captures to disk: safetensors tensors plus a JSON sidecar, never half-written.

``capture_to_file`` runs the model once, records the hidden states the locators name and
writes ``FILE.safetensors`` (one tensor per locator, keyed by the resolved locator, e.g.
``block[29]``) and ``FILE.json`` (model, adapter, locators with module paths and shapes, the
prompt's tokens). The safetensors file is the truth: the sidecar is also stored in its header
under the ``introspect`` key, so the tensor file describes itself and :func:`load_capture`
reads only it; the ``.json`` is a readable copy. Both are written under temporary names and
renamed into place as one unit: if the second rename fails (or is interrupted) the first is
rolled back, so the old pair stays whole. Existing files are replaced only when asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from introspect._errors import CaptureError
from introspect._text import token_strings
from introspect._version import __version__

if TYPE_CHECKING:
    from introspect._locators import Locator
    from introspect._model.view import Analysable

__all__ = [
    "capture_to_file",
    "check_output_path",
    "load_capture",
    "save_tensors",
    "sidecar_path",
    "write_atomically",
]


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar next to a safetensors file.

    Example:
        >>> str(sidecar_path("out/run.safetensors"))
        'out/run.json'
    """
    return Path(path).with_suffix(".json")


def check_output_path(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Validate where a capture will be written, before any work is done.

    The pair ``FILE.safetensors`` + ``FILE.json`` must not exist unless ``force`` (then both
    are replaced); a folder in the way is an error either way.

    Example:
        >>> check_output_path("run.safetensors").name
        'run.safetensors'
    """
    out = Path(path).expanduser()
    if out.suffix != ".safetensors":
        raise CaptureError(
            f"{str(path)!r} must end in .safetensors: captures are written as safetensors "
            "(never pickle), with a .json sidecar beside them"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CaptureError(f"the folder {str(parent)!r} does not exist: create it first")
    pair = (out, sidecar_path(out))
    for target in pair:
        if target.is_dir():
            raise CaptureError(
                f"{str(target)!r} is a folder, so the capture cannot be written there: "
                "choose another output name"
            )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CaptureError(
            f"cannot write in the folder {str(parent)!r} (permission denied): choose a "
            "folder you can write to"
        )
    existing = [str(target) for target in pair if target.exists() or target.is_symlink()]
    if existing and not force:
        raise CaptureError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
            "choose another output name, or replace the pair with --force (force=True in "
            "Python)"
        )
    return out


def _umask() -> int:
    # /proc gives the umask without changing it; the os.umask round trip briefly does, which
    # another thread creating a file at that moment would see.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C back while the block runs, then deliver it: a rename sequence is not cut."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


def _set_aside(path: Path) -> Path | None:
    """Keep the current ``path`` under a hidden name so a failed commit can put it back."""
    if not (path.exists() or path.is_symlink()):
        return None
    backup = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:
        # No hard links here (some network and FUSE folders): move it aside instead.
        os.replace(path, backup)
    return backup


def write_atomically(targets: Sequence[tuple[Path, Callable[[str], None]]]) -> None:
    """Write each ``(path, writer)`` to a temporary sibling, then rename them all into place.

    The files are one unit: a failure (or an interrupt) while writing leaves the old files
    untouched and no temporary ones; a rename that fails rolls back the ones already done,
    and Ctrl-C is held back until the renames are over. New files get the permissions the
    umask gives (writers that create private temporary files are corrected).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "note.txt"
        >>> write_atomically([(target, lambda tmp: Path(tmp).write_text("hi"))])
        >>> target.read_text()
        'hi'
    """
    temps: list[tuple[Path, Path]] = []
    try:
        mode = 0o666 & ~_umask()
        for path, write in targets:
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
            temps.append((tmp, path))
            write(str(tmp))
            os.chmod(tmp, mode)
        with _interrupts_deferred():
            _commit(temps)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def _commit(temps: Sequence[tuple[Path, Path]]) -> None:
    aside: dict[Path, Path | None] = {}
    replaced: list[Path] = []
    try:
        for tmp, path in temps:
            aside[path] = _set_aside(path)
            os.replace(tmp, path)
            replaced.append(path)
    except BaseException:
        for path, backup in reversed(aside.items()):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, path)
                    # Renaming a hard link onto its own file does nothing: drop the name.
                    backup.unlink(missing_ok=True)
                elif path in replaced:
                    path.unlink()
        raise
    for backup in aside.values():
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink()


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage).

    Two locators can name one tensor (``block[2]`` and ``block[3].input``); the second gets
    its own copy so each key reads back on its own.
    """
    plain: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in tensors.items():
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            tensor = tensor.clone()
            storage = tensor.untyped_storage().data_ptr()
        storages.add(storage)
        plain[key] = tensor
    return plain


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    sidecar: Mapping[str, Any],
    *,
    force: bool = False,
) -> tuple[Path, Path]:
    """Write ``tensors`` to ``path`` (safetensors) and ``sidecar`` to its ``.json``, as one unit.

    ``sidecar`` is also stored in the safetensors header, which :func:`load_capture` reads.
    An existing pair is replaced only with ``force``; a failure leaves the old pair as it was.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> out, side = save_tensors(os.path.join(folder, "x.safetensors"),
        ...                          {"block[0]": torch.zeros(1, 2, 4)}, {"model": "demo"})
        >>> side.name, out.stat().st_size > 0
        ('x.json', True)
    """
    from safetensors.torch import save_file

    out = check_output_path(path, force=force)
    side = sidecar_path(out)
    text = json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n"
    plain = _unshared(tensors)
    header = {"format": "pt", "introspect": json.dumps(sidecar, ensure_ascii=False)}

    def write_tensors(tmp: str) -> None:
        try:
            save_file(plain, tmp, metadata=header)
        except Exception as exc:
            # safetensors reports a full disk or a refused write as SafetensorError, which is
            # no OSError.
            if not isinstance(exc, OSError) and type(exc).__name__ != "SafetensorError":
                raise
            raise CaptureError(f"could not write {out}: {_reason(exc)}") from exc

    def write_sidecar(tmp: str) -> None:
        try:
            Path(tmp).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CaptureError(f"could not write {side}: {_reason(exc)}") from exc

    write_atomically([(out, write_tensors), (side, write_sidecar)])
    return out, side


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"{first}; nothing was replaced"


def load_capture(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a capture back: its tensors and its sidecar (from the safetensors header).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.safetensors")
        >>> _ = save_tensors(p, {"embed": torch.ones(1, 1, 2)}, {"model": "demo"})
        >>> tensors, meta = load_capture(p)
        >>> tensors["embed"].sum().item(), meta["model"]
        (2.0, 'demo')
    """
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
            tensors[key] = handle.get_tensor(key)
    sidecar = json.loads(meta["introspect"]) if "introspect" in meta else {}
    return tensors, sidecar


def _versions() -> dict[str, str]:
    import transformers

    return {
        "introspect": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _value(loc: Locator, cap: Any) -> Any:
    rec = cap[str(loc.with_side("output"))]
    return rec.input if loc.side == "input" else rec.output


def capture_to_file(
    inspector: Analysable,
    inputs: Mapping[str, Any],
    locators: Sequence[str],
    path: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    meta: Mapping[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run the model once, record what ``locators`` name, write the safetensors + JSON pair.

    Locators and the output path are checked before the model runs; an existing pair is
    replaced only with ``force``. Returns the sidecar dict; ``meta`` entries (e.g.
    ``{"model": "smollm2", "prompt": ...}``) are added to it.

    Example:
        >>> import tempfile, os
        >>> from introspect import Inspector
        >>> from introspect.zoo import load_model
        >>> model, tok = load_model("toy-gpt2", progress=False)
        >>> out = os.path.join(tempfile.mkdtemp(), "run.safetensors")
        >>> inputs = {"input_ids": torch.tensor([[17, 42]])}  # token ids: any tokenizer
        >>> side = capture_to_file(Inspector(model), inputs, ["embed", "block[-1]"], out)
        >>> side["tensors"]["block[3]"]["shape"]
        [1, 2, 64]
    """
    if not locators:
        raise CaptureError("name at least one locator to capture, e.g. block[-1]")
    out = check_output_path(path, force=force)
    insp = inspector
    locs: list[Locator] = []
    for loc in insp.expand(locators):
        if str(loc) not in {str(seen) for seen in locs}:
            locs.append(loc)
    with torch.no_grad(), insp.capture(*locs, detach=True, device="cpu") as cap:
        insp.model(**inputs)
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, Any] = {}
    for loc in locs:
        value = _value(loc, cap)
        if not isinstance(value, torch.Tensor):
            raise CaptureError(
                f"{loc} recorded {type(value).__name__}, not a tensor: capture a block or a "
                "module whose output is a hidden state"
            )
        key = str(loc)
        tensors[key] = value
        described[key] = {
            "module": insp.path(loc),
            "side": loc.side,
            "shape": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
        }
    ids = inputs.get("input_ids")
    first = ids[0] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else ids
    sidecar: dict[str, Any] = {
        **dict(meta or {}),
        "model_class": type(insp.model).__name__,
        "adapter": insp.adapter.name,
        "num_blocks": insp.num_blocks,
        "locators": [str(loc) for loc in locs],
        "requested": list(locators),
        "token_ids": [int(i) for i in first.tolist()] if isinstance(first, torch.Tensor) else [],
        "tokens": token_strings(tokenizer, first) if isinstance(first, torch.Tensor) else [],
        "tensors": described,
        "versions": _versions(),
    }
    save_tensors(out, tensors, sidecar, force=force)
    return sidecar
