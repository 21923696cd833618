"""The tuned lens: one learned affine translator per block, before the model's own head.

The logit lens reads a block's output ``h`` through what follows the last block
(:meth:`Inspector.logits <introspect.Inspector.logits>`). The tuned lens (Belrose et al. 2023,
arXiv 2303.08112) reads ``h + A h + b`` instead, with ``A`` and ``b`` learned per block so
that the read-out matches the model's final distribution at the same position: the loss is
``KL(final ‖ lens)``. ``A = 0, b = 0`` is the logit lens exactly, which is where training
starts, and weight decay pulls towards it.

Training reads an ``introspect extract`` folder (:class:`~introspect.ActivationDataset`) and
runs no model forward: the targets are :meth:`logits` of the stored last block, so the final
norm, the head and the architecture's soft-caps and logit scales are the model's own.

The folder layout is AlignmentResearch/tuned-lens's, so lenses move between the two:

- ``config.json``: ``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``, ``bias``,
  ``base_model_revision``, ``unembed_hash``, ``lens_type`` (``"linear_tuned_lens"``);
- ``params.pt``: the translators' state dict (``0.weight``, ``0.bias``, ``1.weight``, ...),
  read back with ``torch.load(..., weights_only=True)``;
- ``training.json`` (ours; the reference ignores it): which translators were trained, the
  settings, the losses and the held-out KL.

The translator count is the reference's: ``num_hidden_layers`` translators, translator ``i``
reading ``hidden_states[i]``. Where ``hidden_states`` starts with the embedding (most models),
translator 0 reads the embedding entry (the input of ``block[0]``), translator ``j + 1`` the
output of ``block[j]``, and the last block has none: its read-out is the model's own output.
Where ``hidden_states`` starts with block outputs (Mamba before 5.25), translator ``j`` reads
``block[j]``. As the logit lens, translators read each block's output as its module returns
it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from introspect._analysis.lens import main_blocks
from introspect._errors import CaptureError, DatasetError, LocatorError, ModelLoadError
from introspect._export import write_atomically
from introspect._locators import Locator
from introspect._progress import progress_enabled
from introspect._scale.dataset import ActivationDataset

if TYPE_CHECKING:
    from introspect._model.view import Analysable

__all__ = ["CONFIG", "LENS_TYPE", "PARAMS", "TRAINING", "TunedLens", "train_tuned_lens"]

LENS_TYPE = "linear_tuned_lens"
CONFIG = "config.json"
PARAMS = "params.pt"
TRAINING = "training.json"
"""Ours, beside the reference's two files: what was trained, how, and the held-out KL."""
CHECKPOINT = "checkpoint"
_STATE = "state.json"
_TENSORS = "state.safetensors"
_CONFIG_KEYS = (
    "base_model_name_or_path",
    "d_model",
    "num_hidden_layers",
    "bias",
    "base_model_revision",
    "unembed_hash",
    "lens_type",
)


def _model_width(insp: Analysable) -> int | None:
    """The width of the model's residual stream, as its config states it."""
    config = getattr(insp.model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    width = getattr(config, "hidden_size", None)
    if isinstance(width, int):
        return width
    embeddings = getattr(insp.model, "get_input_embeddings", None)
    weight = getattr(embeddings(), "weight", None) if callable(embeddings) else None
    return int(weight.shape[-1]) if isinstance(weight, torch.Tensor) else None


def _sites(insp: Analysable, count: int) -> dict[str, int]:
    """Row label (``block[j]``, or the embedding entry's locator) -> translator index."""
    first = insp.hidden_state_locator(0)
    offset = 1 if first.side == "input" else 0
    sites = {str(first): 0} if offset else {}
    for j in range(insp.num_blocks):
        if j + offset < count:
            sites[f"block[{j}]"] = j + offset
    return sites


def _last_block(insp: Analysable) -> str:
    return f"block[{insp.num_blocks - 1}]"


class TunedLens(nn.Module):
    """Affine translators ``h + A h + b``, one per ``hidden_states`` entry but the last.

    Built at identity (``A = 0``, ``b = 0``: the logit lens), trained by
    :func:`train_tuned_lens`, saved and loaded in AlignmentResearch/tuned-lens's folder
    layout (:meth:`save`, :meth:`load`). Pass it as ``logit_lens(..., tuned=lens)`` for the
    tuned read-out. ``trained`` holds the indices of the translators that were trained
    (``None``: all, as for a lens the reference wrote); ``metadata["training"]`` what
    :func:`train_tuned_lens` reports, the held-out KL included.

    Example:
        >>> from introspect import Inspector, logit_lens
        >>> from introspect.zoo import load_model
        >>> model, tok = load_model("toy-llama", progress=False)
        >>> insp = Inspector(model)
        >>> lens = TunedLens.for_model(insp)
        >>> len(lens), sorted(lens.translators.state_dict())[:2]
        (4, ['0.bias', '0.weight'])
        >>> plain = logit_lens(insp, "Hello there", tokenizer=tok)
        >>> tuned = logit_lens(insp, "Hello there", tokenizer=tok, tuned=lens)
        >>> torch.equal(plain.logits, tuned.logits), tuned.lens
        (True, 'tuned')
    """

    def __init__(
        self,
        d_model: int,
        num_hidden_layers: int,
        *,
        bias: bool = True,
        base_model_name_or_path: str = "",
        base_model_revision: str | None = None,
        unembed_hash: str | None = None,
        trained: Sequence[int] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if d_model < 1 or num_hidden_layers < 1:
            raise ModelLoadError(
                f"a tuned lens needs d_model and num_hidden_layers of at least 1, got "
                f"{d_model} and {num_hidden_layers}"
            )
        self.d_model = int(d_model)
        self.num_hidden_layers = int(num_hidden_layers)
        self.bias = bool(bias)
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_revision = base_model_revision
        self.unembed_hash = unembed_hash
        self.trained: list[int] | None = None if trained is None else sorted(set(trained))
        self.metadata: dict[str, Any] = dict(metadata or {})
        translators = []
        for _ in range(self.num_hidden_layers):
            translator = nn.Linear(self.d_model, self.d_model, bias=self.bias)
            with torch.no_grad():
                translator.weight.zero_()
                if translator.bias is not None:
                    translator.bias.zero_()
            translators.append(translator)
        self.translators = nn.ModuleList(translators)

    @classmethod
    def for_model(cls, inspector: Analysable, *, bias: bool = True) -> TunedLens:
        """An identity lens (the logit lens) sized for ``inspector``'s model.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, _ = load_model("toy-gpt2", progress=False)
            >>> lens = TunedLens.for_model(Inspector(model))
            >>> lens.d_model, lens.num_hidden_layers, int(lens.translators[0].weight.count_nonzero())
            (64, 4, 0)
        """
        width = _model_width(inspector)
        if width is None:
            raise CaptureError(
                f"{type(inspector.model).__name__} states no hidden size (config.hidden_size): "
                "build TunedLens(d_model, num_hidden_layers) yourself"
            )
        config = getattr(inspector.model, "config", None)
        name = getattr(config, "name_or_path", "") or ""
        return cls(width, inspector.num_blocks, bias=bias, base_model_name_or_path=str(name))

    def __len__(self) -> int:
        return len(self.translators)

    def forward(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """``h + A h + b`` with translator ``index`` (the reference's ``transform_hidden``).

        Example:
            >>> lens = TunedLens(4, 2)
            >>> h = torch.randn(3, 4)
            >>> torch.equal(lens(h, 1), h)
            True
        """
        translator = self.translators[index]
        assert isinstance(translator, nn.Linear)
        weight = translator.weight
        x = hidden.to(device=weight.device, dtype=weight.dtype)
        moved: torch.Tensor = x + translator(x)
        return moved.to(device=hidden.device, dtype=hidden.dtype)

    # -- the model it reads --------------------------------------------------------------------

    def check(self, inspector: Analysable, rows: Sequence[Locator] = ()) -> None:
        """Refuse a model this lens was not built for, and rows it has no translator for.

        Raises a one-line :class:`~introspect.CaptureError`; runs nothing.

        Example:
            >>> from introspect import CaptureError, Inspector
            >>> from introspect.zoo import load_model
            >>> model, _ = load_model("toy-gpt2", progress=False)
            >>> try:
            ...     TunedLens(32, 4).check(Inspector(model))
            ... except CaptureError as exc:
            ...     print(str(exc)[:60])
            this tuned lens is for d_model 32 and 4 hidden layers; Inspe
        """
        insp = inspector
        width = _model_width(insp)
        if (width is not None and width != self.d_model) or insp.num_blocks != (
            self.num_hidden_layers
        ):
            raise CaptureError(
                f"this tuned lens is for d_model {self.d_model} and {self.num_hidden_layers} "
                f"hidden layers; {type(insp).__name__} holds {type(insp.model).__name__} with "
                f"d_model {width} and {insp.num_blocks} blocks: load the lens trained for "
                f"this model{self._named()}"
            )
        if not rows:
            return
        sites = _sites(insp, len(self))
        last = _last_block(insp)
        for loc in rows:
            label = str(loc)
            if label == last and (label not in sites or not self._is_trained(sites[label])):
                continue  # the model's own output: no translator needed
            if label not in sites or not self._is_trained(sites[label]):
                raise LocatorError(
                    f"this tuned lens has no trained translator for {label}; it has "
                    f"{', '.join(self.rows(insp)) or 'none'} (pass blocks= among them, or "
                    "blocks=None)"
                )

    def _named(self) -> str:
        name = self.base_model_name_or_path
        return f" (this one was tuned for {name!r})" if name else ""

    def _is_trained(self, index: int) -> bool:
        return self.trained is None or index in self.trained

    def rows(self, inspector: Analysable) -> list[str]:
        """The rows this lens has a trained translator for (the embedding entry included).

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, _ = load_model("toy-gpt2", progress=False)
            >>> TunedLens.for_model(Inspector(model)).rows(Inspector(model))
            ['block[0].input', 'block[0]', 'block[1]', 'block[2]']
        """
        return [label for label, i in _sites(inspector, len(self)).items() if self._is_trained(i)]

    def default_blocks(self, inspector: Analysable) -> list[int]:
        """The block rows ``logit_lens(..., tuned=self)`` shows by default: every block with a
        trained translator, and the last block (the model's output).

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, _ = load_model("toy-gpt2", progress=False)
            >>> TunedLens(64, 4, trained=[3]).default_blocks(Inspector(model))
            [2, 3]
        """
        self.check(inspector)
        blocks = [
            Locator.parse(label).index
            for label in self.rows(inspector)
            if Locator.parse(label).side == "output"
        ]
        found = sorted({b for b in blocks if b is not None} | {inspector.num_blocks - 1})
        return found

    def translate(
        self, inspector: Analysable, hidden: torch.Tensor, row: Locator | str
    ) -> torch.Tensor:
        """``hidden`` (a row's value: a block's output, or the embedding entry) through its
        translator; the last block without one is returned as it is.

        Example:
            >>> from introspect import Inspector
            >>> from introspect.zoo import load_model
            >>> model, _ = load_model("toy-gpt2", progress=False)
            >>> insp = Inspector(model)
            >>> h = torch.randn(1, 2, 64)
            >>> torch.equal(TunedLens.for_model(insp).translate(insp, h, "block[1]"), h)
            True
        """
        label = str(row)
        self.check(inspector, [Locator.parse(label)])
        index = _sites(inspector, len(self)).get(label)
        if index is None or not self._is_trained(index):
            return hidden  # the last block: the model's own output
        return self.forward(hidden, index)

    # -- files --------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The reference's ``config.json`` as a dict.

        Example:
            >>> TunedLens(8, 2, base_model_name_or_path="m").config()["lens_type"]
            'linear_tuned_lens'
        """
        return {
            "base_model_name_or_path": self.base_model_name_or_path,
            "d_model": self.d_model,
            "num_hidden_layers": self.num_hidden_layers,
            "bias": self.bias,
            "base_model_revision": self.base_model_revision,
            "unembed_hash": self.unembed_hash,
            "lens_type": LENS_TYPE,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``config.json``, ``params.pt`` and ``training.json`` to the folder ``path``
        (created if missing; the three files are replaced together, atomically).

        Example:
            >>> import tempfile
            >>> folder = TunedLens(8, 2).save(tempfile.mkdtemp())
            >>> sorted(p.name for p in folder.iterdir())
            ['config.json', 'params.pt', 'training.json']
        """
        folder = Path(path).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.translators.state_dict().items()}
        config = json.dumps(self.config(), indent=2) + "\n"
        extra = {"format": "introspect-tuned-lens", "trained": self.trained, **self.metadata}
        training = json.dumps(extra, indent=2) + "\n"
        write_atomically(
            [
                (folder / PARAMS, lambda tmp: torch.save(state, tmp)),
                (folder / CONFIG, _text_writer(config)),
                (folder / TRAINING, _text_writer(training)),
            ]
        )
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TunedLens:
        """A lens folder in the tuned-lens layout (ours, or one the reference wrote).

        ``params.pt`` is read with ``weights_only=True``: a file that needs pickle to load
        arbitrary objects is refused. Translators are kept in float32.

        Example:
            >>> import tempfile
            >>> lens = TunedLens.load(TunedLens(8, 2).save(tempfile.mkdtemp()))
            >>> lens.d_model, len(lens)
            (8, 2)
        """
        folder = Path(path).expanduser()
        config_path, params_path = folder / CONFIG, folder / PARAMS
        for needed in (config_path, params_path):
            if not needed.is_file():
                raise ModelLoadError(
                    f"{folder} is not a tuned lens folder: it has no {needed.name} (a lens "
                    f"folder holds {CONFIG} and {PARAMS})"
                )
        try:
            config = json.loads(config_path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {config_path}: {exc}") from None
        if not isinstance(config, dict):
            raise ModelLoadError(f"{config_path} is not a JSON object")
        lens_type = config.get("lens_type", LENS_TYPE)
        if lens_type != LENS_TYPE:
            raise ModelLoadError(
                f"{config_path} is a {lens_type!r} lens; introspect reads {LENS_TYPE!r} lenses"
            )
        for key in ("d_model", "num_hidden_layers"):
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelLoadError(f"{config_path} has no valid {key!r} (got {value!r})")
        bias = config.get("bias", True)
        try:
            state = torch.load(params_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"{params_path} cannot be read with torch.load(weights_only=True): {first} "
                "(a lens file holds only tensors; one that needs pickle is refused)"
            ) from None
        trained, metadata = _read_training(folder / TRAINING)
        lens = cls(
            config["d_model"],
            config["num_hidden_layers"],
            bias=bool(bias),
            base_model_name_or_path=str(config.get("base_model_name_or_path") or ""),
            base_model_revision=config.get("base_model_revision"),
            unembed_hash=config.get("unembed_hash"),
            trained=trained,
            metadata=metadata,
        )
        lens._load_state(state, params_path)
        return lens

    def _load_state(self, state: Any, where: Path) -> None:
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise ModelLoadError(f"{where} is not a state dict of tensors")
        wanted = self.translators.state_dict()
        missing = [k for k in wanted if k not in state]
        extra = [k for k in state if k not in wanted]
        if missing or extra:
            parts = []
            if missing:
                parts.append(
                    f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
                )
            if extra:
                parts.append(f"unexpected {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
            raise ModelLoadError(
                f"{where} does not hold {self.num_hidden_layers} translators of width "
                f"{self.d_model} (bias {self.bias}) as its config says: {'; '.join(parts)}"
            )
        for key, value in wanted.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise ModelLoadError(
                    f"{where}: {key} has shape {list(state[key].shape)}, the config says "
                    f"{list(value.shape)}"
                )
        self.translators.load_state_dict({k: v.float() for k, v in state.items()})

    # -- reports ------------------------------------------------------------------------------

    def held_out_table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and rows of the held-out KL (nats per token) by block, both lenses.

        Example:
            >>> lens = TunedLens(8, 2, metadata={"training": {"held_out": {
            ...     "rows": ["block[0]"], "logit_lens": [4.0], "tuned_lens": [1.0]}}})
            >>> lens.held_out_table()
            (['block', 'logit lens KL', 'tuned lens KL', 'ratio'], [['block[0]', '4.000', '1.000', '4.0x']])
        """
        held = self.metadata.get("training", {}).get("held_out")
        headers = ["block", "logit lens KL", "tuned lens KL", "ratio"]
        if not held:
            return headers, []
        rows = []
        for label, plain, tuned in zip(
            held["rows"], held["logit_lens"], held["tuned_lens"], strict=True
        ):
            ratio = f"{plain / tuned:.1f}x" if tuned > 0 else "-"
            rows.append([label, f"{plain:.3f}", f"{tuned:.3f}", ratio])
        return headers, rows

    def plot_held_out(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        title: str | None = None,
        dpi: int = 150,
    ) -> Any:
        """The held-out KL(final ‖ lens) by block, logit lens against tuned lens, as a figure.

        Both lenses share one axis, logarithmic (the two differ by a factor, and the last
        blocks' KL is small); a point of 0 (the last block reads the model's own output) is
        left out, as a log axis cannot draw it. Writes a PNG (or .svg, .pdf; atomically) when
        ``path`` is given; returns the matplotlib Figure. A lens with no held-out evaluation
        (trained with ``held_out=0``, or not trained here) is an error.

        Example:
            >>> lens = TunedLens(8, 2, metadata={"training": {"held_out": {
            ...     "rows": ["block[0]", "block[1]"], "logit_lens": [4.0, 0.0],
            ...     "tuned_lens": [1.0, 0.0]}}})
            >>> [line.get_label() for line in lens.plot_held_out().axes[0].get_lines()]
            ['logit lens', 'tuned lens']
        """
        held = self.metadata.get("training", {}).get("held_out")
        if not held or not held.get("rows"):
            raise ValueError(
                "this lens holds no held-out evaluation (train it with held_out > 0, as "
                "train_tuned_lens does by default)"
            )
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        rows = list(held["rows"])
        fig = Figure(figsize=(max(5.0, 0.22 * len(rows) + 2), 3.6))
        ax = fig.subplots()
        x = list(range(len(rows)))
        for name, key, marker in (
            ("logit lens", "logit_lens", "o"),
            ("tuned lens", "tuned_lens", "s"),
        ):
            kept = [(i, v) for i, v in zip(x, held[key], strict=True) if v > 0]
            ax.plot([i for i, _ in kept], [v for _, v in kept], marker=marker, ms=3, label=name)
        ax.set_yscale("log")
        ax.set_xticks(x)
        # "block[12]" is drawn as 12; anything else (the embedding's row, block[0].input) as is.
        labels = [
            label[6:-1] if label.startswith("block[") and label[6:-1].isdigit() else label
            for label in rows
        ]
        ax.set_xticklabels(
            labels,
            fontsize=7 if len(rows) > 16 else 9,
            rotation=90 if any(not label.isdigit() for label in labels) else 0,
        )
        ax.set_xlabel("block (the read-out of its output)")
        ax.set_ylabel("KL(final ‖ lens), nats per token")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        model = self.base_model_name_or_path or "the model"
        ax.set_title(title or f"held-out KL by block, {model}", fontsize=10)
        if path is not None:
            out = Path(path)
            suffix = out.suffix.lstrip(".") or "png"
            write_atomically(
                [(out, lambda tmp: fig.savefig(tmp, dpi=dpi, format=suffix, bbox_inches="tight"))]
            )
        return fig

    def __repr__(self) -> str:
        trained = "all" if self.trained is None else len(self.trained)
        name = f", for {self.base_model_name_or_path!r}" if self.base_model_name_or_path else ""
        return (
            f"TunedLens(d_model={self.d_model}, translators={len(self)}, trained={trained}, "
            f"bias={self.bias}{name})"
        )


def _text_writer(text: str) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text, "utf-8")

    return write


def _read_training(path: Path) -> tuple[list[int] | None, dict[str, Any]]:
    if not path.is_file():
        return None, {}
    try:
        found = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(found, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    trained = found.pop("trained", None)
    found.pop("format", None)
    if trained is not None and (
        not isinstance(trained, list) or not all(isinstance(i, int) for i in trained)
    ):
        raise ModelLoadError(f"{path}: 'trained' is not a list of translator indices")
    return trained, found


# -- training ----------------------------------------------------------------------------------


def _plan(
    insp: Analysable,
    ds: ActivationDataset,
    blocks: Sequence[int | str] | None,
    include_embed: bool | None,
) -> list[tuple[str, int]]:
    """(dataset key, translator index) of every row to train, checked against the dataset."""
    folder = ds.path
    counts = ds.manifest.get("num_blocks", {})
    stored = counts.get("") if isinstance(counts, dict) else None
    if stored is not None and stored != insp.num_blocks:
        raise DatasetError(
            f"{folder} was extracted from a model with {stored} blocks; this one has "
            f"{insp.num_blocks}: extract from this model"
        )
    adapter = ds.manifest.get("adapter")
    if adapter is not None and adapter != insp.adapter.name:
        raise DatasetError(
            f"{folder} was extracted with the {adapter!r} adapter; this model uses "
            f"{insp.adapter.name!r}: extract from this model"
        )
    last = _last_block(insp)
    held = set(ds.locators)
    if last not in held:
        raise DatasetError(
            f"{folder} does not hold the last block ({last}), whose read-out is the target: "
            f"extract with --at {last} too (it holds {', '.join(ds.locators)})"
        )
    width = _model_width(insp)
    shape = list(ds.manifest.get("shapes", {}).get(last, []))
    if width is not None and shape != [width]:
        raise DatasetError(
            f"{folder} holds {last} of shape {shape}; this model's stream is [{width}]: "
            "extract from this model"
        )
    sites = _sites(insp, insp.num_blocks)
    if blocks is None:
        labels = [f"block[{j}]" for j in range(insp.num_blocks - 1) if f"block[{j}]" in held]
    else:
        chosen = main_blocks(insp, blocks, "the tuned lens reads block outputs")
        labels = [str(loc) for loc in chosen if str(loc) != last]
        absent = [label for label in labels if label not in held]
        if absent:
            raise DatasetError(
                f"{folder} does not hold {', '.join(absent)}: extract them (it holds "
                f"{', '.join(ds.locators)})"
            )
    first = insp.hidden_state_locator(0)
    embed = str(first) if first.side == "input" else None
    if include_embed and (embed is None or embed not in held):
        raise DatasetError(
            f"include_embed: {folder} does not hold the embedding entry "
            f"({embed or 'this model has none in hidden_states'})"
        )
    if include_embed is None:
        include_embed = blocks is None  # with the blocks the dataset holds, unless blocks named
    if include_embed and embed is not None and embed in held:
        labels.insert(0, embed)
    if not labels:
        raise DatasetError(
            f"{folder} holds no block before the last to lens (it holds "
            f"{', '.join(ds.locators)}): extract e.g. --at 'block[:]'"
        )
    return [(label, sites[label]) for label in labels]


class _Final:
    """The model's final distribution on a batch of rows, and the mean KL from it."""

    def __init__(self, logp: torch.Tensor) -> None:
        self.p = logp.exp()
        self.neg_entropy = (self.p * logp).sum(-1)  # once per batch, not once per block

    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean ``KL(final ‖ softmax(logits))`` over the rows, in nats."""
        cross = (self.p * logits.float().log_softmax(-1)).sum(-1)
        return (self.neg_entropy - cross).mean()


def _read(insp: Analysable, hidden: torch.Tensor) -> torch.Tensor:
    # [rows, d] as a one-sequence batch, so every op after the last block sees its usual shape.
    return insp.logits(hidden.unsqueeze(0))[0]


def _final(insp: Analysable, hidden: torch.Tensor) -> _Final:
    with torch.no_grad():
        return _Final(_read(insp, hidden).float().log_softmax(-1))


def _model_device(insp: Analysable) -> torch.device:
    param = next(insp.model.parameters(), None)
    return param.device if param is not None and not param.is_meta else torch.device("cpu")


def _split(
    ds: ActivationDataset, held_out: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Training rows, held-out rows and held-out documents, split by whole documents."""
    docs = ds.tokens.doc[:]
    present = torch.unique(docs)
    if held_out <= 0:
        return torch.arange(len(ds)), torch.empty(0, dtype=torch.long), []
    n_held = max(1, round(held_out * len(present)))
    if n_held >= len(present):
        raise DatasetError(
            f"{ds.path} has {len(present)} documents with tokens: too few to hold "
            f"{held_out:.0%} out and train on the rest (pass held_out=0, or extract more)"
        )
    order = torch.randperm(len(present), generator=torch.Generator().manual_seed(seed))
    held_docs = present[order[:n_held]]
    mask = torch.isin(docs, held_docs)
    return (~mask).nonzero().flatten(), mask.nonzero().flatten(), sorted(held_docs.tolist())


def _save_checkpoint(
    folder: Path, lens: TunedLens, opt: torch.optim.SGD, state: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in lens.translators.named_parameters():
        tensors[f"params.{name}"] = param.detach().cpu().contiguous()
        buffer = opt.state.get(param, {}).get("momentum_buffer")
        if buffer is not None:
            tensors[f"momentum.{name}"] = buffer.detach().cpu().contiguous()
    text = json.dumps(state, indent=2) + "\n"
    write_atomically(
        [
            (folder / _TENSORS, lambda tmp: save_file(tensors, tmp)),
            (folder / _STATE, _text_writer(text)),
        ]
    )


def _load_checkpoint(folder: Path, lens: TunedLens, opt: torch.optim.SGD) -> dict[str, Any]:
    from safetensors.torch import load_file

    state: dict[str, Any] = json.loads((folder / _STATE).read_text("utf-8"))
    tensors = load_file(str(folder / _TENSORS))
    with torch.no_grad():
        for name, param in lens.translators.named_parameters():
            param.copy_(tensors[f"params.{name}"])
            if f"momentum.{name}" in tensors:
                buffer = tensors[f"momentum.{name}"].to(param.device).clone()
                opt.state[param] = {"momentum_buffer": buffer}
    return state


def _evaluate(
    insp: Analysable,
    ds: ActivationDataset,
    lens: TunedLens,
    plan: Sequence[tuple[str, int]],
    rows: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Mean KL(final ‖ lens) per planned row on ``rows``, for the logit and the tuned lens."""
    last = _last_block(insp)
    plain = [0.0] * len(plan)
    tuned = [0.0] * len(plan)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            final = _final(insp, ds[last][chunk].to(device).float())
            share = len(chunk) / len(rows)
            for n, (key, index) in enumerate(plan):
                hidden = ds[key][chunk].to(device).float()
                plain[n] += share * float(final.kl(_read(insp, hidden)))
                tuned[n] += share * float(final.kl(_read(insp, lens(hidden, index))))
    return {
        "tokens": len(rows),
        "rows": [key for key, _ in plan],
        "logit_lens": [round(x, 6) for x in plain],
        "tuned_lens": [round(x, 6) for x in tuned],
    }


def train_tuned_lens(
    dataset_dir: str | os.PathLike[str],
    inspector: Analysable,
    *,
    out: str | os.PathLike[str] | None = None,
    blocks: Sequence[int | str] | None = None,
    include_embed: bool | None = None,
    steps: int | None = None,
    epochs: int = 1,
    lr: float = 1.0 * (1 - 0.9),
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    clip: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
    held_out: float = 0.1,
    bias: bool = True,
    checkpoint_every: int = 50,
    resume: bool = True,
    progress: bool = False,
    stop_after: int | None = None,
) -> TunedLens:
    """Train a tuned lens from the activations in ``dataset_dir`` (an ``introspect extract``
    folder of ``inspector``'s model), with no model forward.

    The dataset must hold the last block (the targets are :meth:`Inspector.logits` of it) and
    the blocks to lens: ``blocks`` (ints or locators such as ``"block[10:]"``; default: every
    block before the last that the dataset holds, and the embedding entry ``block[0].input``
    where held; ``include_embed`` says yes or no to the latter either way). The loss is the sum over
    blocks of the mean ``KL(final ‖ lens)`` at the same position; the recipe is the
    reference's: SGD with Nesterov momentum ``momentum``, ``lr`` (``1.0 * (1 - 0.9)``: the
    optimal rate is 1 once momentum's ``1/(1-momentum)`` scaling is undone) decayed linearly to 0,
    ``weight_decay`` (towards identity: translators are residual), the gradient's norm clipped
    to ``clip``. ``steps`` optimiser steps of ``batch_size`` tokens (default: ``epochs``
    passes over the training rows).

    A fraction ``held_out`` of the documents (seeded) is kept out of training; the mean KL on
    them, per block, for the logit lens and the tuned lens, is in
    ``lens.metadata["training"]["held_out"]`` (:meth:`TunedLens.held_out_table`). With
    ``out``, the lens is saved there in the tuned-lens layout, checkpoints go to
    ``out/checkpoint`` every ``checkpoint_every`` steps (safetensors and JSON), and a rerun
    with the same settings resumes, to the same translators bit for bit as an uninterrupted
    run (``resume=False`` starts over). ``stop_after`` ends the run after that many steps of
    this call, as an interruption would.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from introspect import Inspector, extract
        >>> from introspect.zoo import load_model
        >>> model, tok = load_model("toy-llama", progress=False)
        >>> insp = Inspector(model)
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "c.txt").write_text("Hello world, again\\nA second one\\nThird\\n")
        >>> _ = extract(insp, tok, [folder / "c.txt"], ["block[:]"], folder / "acts")
        >>> lens = train_tuned_lens(folder / "acts", insp, steps=2, batch_size=4, held_out=0.34)
        >>> lens.rows(insp), lens.metadata["training"]["steps"]
        (['block[0]', 'block[1]', 'block[2]'], 2)
    """
    insp = inspector
    for name, value in (("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DatasetError(f"{name} must be a whole number of at least 1, got {value!r}")
    if checkpoint_every < 1 or (steps is not None and steps < 1):
        raise DatasetError("steps and checkpoint_every must be at least 1")
    if not 0 <= held_out < 1:
        raise DatasetError(f"held_out is a fraction of the documents in [0, 1), got {held_out!r}")
    for name, number in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if not math.isfinite(number) or number < 0:
            raise DatasetError(f"{name} must be a finite number of at least 0, got {number!r}")
    ds = ActivationDataset(dataset_dir)
    plan = _plan(insp, ds, blocks, include_embed)
    last = _last_block(insp)
    train_rows, held_rows, held_docs = _split(ds, held_out, seed)
    size = min(batch_size, len(train_rows))
    if size < 1:
        raise DatasetError(f"{ds.path} has no rows to train on")
    per_epoch = len(train_rows) // size
    total = steps if steps is not None else epochs * per_epoch
    settings = {
        "dataset": str(ds.path.resolve()),
        "fingerprint": ds.manifest.get("fingerprint"),
        "rows": [key for key, _ in plan],
        "steps": total,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "clip": clip,
        "batch_size": size,
        "seed": seed,
        "held_out": held_out,
        "bias": bias,
    }
    folder = Path(out).expanduser() if out is not None else None
    if folder is not None and resume and (folder / TRAINING).is_file():
        done = TunedLens.load(folder)
        if done.metadata.get("training", {}).get("settings") == settings:
            return done
    device = _model_device(insp)
    lens = TunedLens.for_model(insp, bias=bias)
    if lens.base_model_name_or_path == "" and isinstance(ds.manifest.get("model"), str):
        lens.base_model_name_or_path = ds.manifest["model"]
    lens.to(device)
    params = [p for p in lens.translators.parameters()]
    opt = torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
    )
    state: dict[str, Any] = {"settings": settings, "step": 0, "losses": []}
    checkpoints = folder / CHECKPOINT if folder is not None else None
    if checkpoints is not None and resume and (checkpoints / _STATE).is_file():
        stored = json.loads((checkpoints / _STATE).read_text("utf-8"))
        if stored.get("settings") != settings:
            raise DatasetError(
                f"{checkpoints} holds a run with other settings: rerun with the same "
                "arguments to resume it, or pass resume=False to start over"
            )
        state = _load_checkpoint(checkpoints, lens, opt)
    show = progress_enabled(progress)
    step = int(state["step"])
    ran = 0
    started = time.perf_counter()
    with torch.enable_grad():
        while step < total and (stop_after is None or ran < stop_after):
            epoch, skip = divmod(step, per_epoch)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = train_rows[torch.randperm(len(train_rows), generator=generator)]
            for at in range(skip * size, per_epoch * size, size):
                chunk = order[at : at + size].sort().values  # sorted: neighbouring rows read once
                final = _final(insp, ds[last][chunk].to(device).float())
                for group in opt.param_groups:
                    group["lr"] = lr * (total - step) / total  # linear decay to 0
                loss_sum = 0.0
                for key, index in plan:
                    hidden = ds[key][chunk].to(device).float()
                    loss = final.kl(_read(insp, lens(hidden, index)))
                    torch.autograd.backward(loss, inputs=list(lens.translators[index].parameters()))
                    loss_sum += float(loss.detach())
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                ran += 1
                mean = loss_sum / len(plan)
                state["losses"].append([step, round(mean, 6)])
                state["step"] = step
                if checkpoints is not None and (step % checkpoint_every == 0 or step == total):
                    _save_checkpoint(checkpoints, lens, opt, state)
                if show and (step % 10 == 0 or step == total or step == 1):
                    print(
                        f"tune-lens: step {step}/{total} KL {mean:.4f} nats (mean of "
                        f"{len(plan)} rows)",
                        file=sys.stderr,
                    )
                if step >= total or (stop_after is not None and ran >= stop_after):
                    break
    lens.trained = sorted(index for _, index in plan)
    training: dict[str, Any] = {
        "settings": settings,
        "steps": step,
        "finished": step >= total,
        "seconds_this_run": round(time.perf_counter() - started, 3),
        "train_rows": len(train_rows),
        "losses": state["losses"],
    }
    lens.metadata["training"] = training
    if step < total:
        if checkpoints is not None:
            _save_checkpoint(checkpoints, lens, opt, state)
        return lens
    if len(held_rows):
        training["held_out"] = {
            **_evaluate(insp, ds, lens, plan, held_rows, size, device),
            "documents": held_docs,
        }
    if folder is not None:
        lens.save(folder)
    return lens
