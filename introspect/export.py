"""Writing captures to disk: safetensors tensors plus a JSON sidecar, never half-written.

``capture_to_file`` runs the model once, records the hidden states the locators name and
writes ``FILE.safetensors`` (one tensor per locator, keyed by the resolved locator, e.g.
``block[29]``) and ``FILE.json`` (model, adapter, locators with module paths and shapes, the
prompt's tokens). Both files are written under temporary names and renamed into place only
when both are complete. The sidecar is also stored in the safetensors header under the
``introspect`` key, so the tensor file describes itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from introspect.errors import CaptureError
from introspect.models import token_strings

if TYPE_CHECKING:
    from introspect.inspector import Inspector
    from introspect.locators import Locator

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


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Validate where a capture will be written, before any work is done.

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
    return out


def write_atomically(targets: Sequence[tuple[Path, Callable[[str], None]]]) -> None:
    """Write each ``(path, writer)`` to a temporary sibling, then rename them all into place.

    A failure (or an interrupt) on any of them leaves none of the files and no temporary ones.
    The temporary names are created by the writers themselves, so files get the usual
    permissions.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "note.txt"
        >>> write_atomically([(target, lambda tmp: Path(tmp).write_text("hi"))])
        >>> target.read_text()
        'hi'
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, write in targets:
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
            temps.append((tmp, path))
            write(str(tmp))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], sidecar: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write ``tensors`` to ``path`` (safetensors) and ``sidecar`` to its ``.json``, atomically.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> out, side = save_tensors(os.path.join(folder, "x.safetensors"),
        ...                          {"block[0]": torch.zeros(1, 2, 4)}, {"model": "demo"})
        >>> side.name, out.stat().st_size > 0
        ('x.json', True)
    """
    from safetensors.torch import save_file

    out = check_output_path(path)
    side = sidecar_path(out)
    text = json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n"
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {"format": "pt", "introspect": json.dumps(sidecar, ensure_ascii=False)}

    def write_tensors(tmp: str) -> None:
        save_file(plain, tmp, metadata=header)

    def write_sidecar(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    write_atomically([(out, write_tensors), (side, write_sidecar)])
    return out, side


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

    from introspect import __version__

    return {
        "introspect": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _value(loc: Locator, cap: Any) -> Any:
    rec = cap[str(loc.with_side("output"))]
    return rec.input if loc.side == "input" else rec.output


def capture_to_file(
    inspector: Inspector,
    inputs: Mapping[str, Any],
    locators: Sequence[str],
    path: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the model once, record what ``locators`` name, write the safetensors + JSON pair.

    Locators are checked before the model runs. Returns the sidecar dict; ``meta`` entries
    (e.g. ``{"model": "smollm2", "prompt": ...}``) are added to it.

    Example:
        >>> import tempfile, os
        >>> from introspect import Inspector
        >>> from introspect.models import encode_prompt, load_model
        >>> model, tok = load_model("toy-gpt2", progress=False)
        >>> out = os.path.join(tempfile.mkdtemp(), "run.safetensors")
        >>> side = capture_to_file(Inspector(model), encode_prompt(tok, "Hi there", model),
        ...                        ["embed", "block[-1]"], out, tokenizer=tok)
        >>> side["tensors"]["block[3]"]["shape"]
        [1, 2, 64]
    """
    if not locators:
        raise CaptureError("name at least one locator to capture, e.g. block[-1]")
    out = check_output_path(path)
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
    save_tensors(out, tensors, sidecar)
    return sidecar
