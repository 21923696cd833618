"""AdapterSpec: an architecture described as data.

An adapter names module paths and the facts the core needs (where the hidden input arrives,
how Hugging Face's ``hidden_states`` relate to the modules, what happens after ``lm_head``).
Specs are frozen pydantic models with ``extra="forbid"``: a typo is an error, specs are
hashable (by their content), and ``spec.derive(**changes)`` derives a sibling family, validated
like a fresh spec (``model_copy(update=...)`` would skip validation: don't use it on specs).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from introspect._errors import LocatorError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "AdapterSpec",
    "HeadSpec",
    "LogitOp",
    "StackSpec",
    "StreamOp",
    "VersionFacts",
    "config_flag",
    "config_int",
]

_ONE_PATH = r"[A-Za-z_0-9]+(\.[A-Za-z_0-9]+)*"
_PATH = re.compile(rf"^{_ONE_PATH}(\|{_ONE_PATH})*$")
_RESERVED_MODULES = {"embed", "final_norm", "lm_head", "block", "input", "output"}


def _check_path(value: str | None) -> str | None:
    if value is not None and not _PATH.match(value):
        raise ValueError(
            f"{value!r} is not a dotted module path such as 'transformer.h' (alternatives, tried "
            "in order, are separated by '|': 'attn|self_attention')"
        )
    return value


def config_flag(config: Any, names: str) -> bool:
    """Config flag ``a``, or ``b`` where the config has no ``a`` (``names="a|b"``).

    Example:
        >>> from types import SimpleNamespace
        >>> config = SimpleNamespace(tie_word_embeddings=True)
        >>> config_flag(config, "scale_decoder_outputs|tie_word_embeddings")
        True
    """
    for name in names.split("|"):
        value = getattr(config, name, None)
        if value is not None:
            return bool(value)
    return False


def config_int(config: Any, names: str | None) -> int | None:
    """Integer config attribute ``a``, or ``b`` where the config has no ``a`` (``"a|b"``).

    Example:
        >>> from types import SimpleNamespace
        >>> config_int(SimpleNamespace(n_head=4), "num_key_value_heads|n_head")
        4
    """
    for name in (names or "").split("|"):
        value = getattr(config, name, None) if name else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def derive(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied, validated like a fresh spec.

        A misspelt field, a bad path or a bad name is an error here, as in the constructor
        (pydantic's ``model_copy(update=...)`` would accept them silently).

        Example:
            >>> base = StackSpec(blocks="h", final_norm="ln_f")
            >>> base.derive(final_norm="norm").final_norm
            'norm'
            >>> base.derive(final_nrom="norm")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            pydantic_core._pydantic_core.ValidationError: 1 validation error for StackSpec
            ...
        """
        return self.model_validate({**self.model_dump(), **changes})

    def __hash__(self) -> int:
        # pydantic hashes frozen models field by field, which fails on the dict fields
        # (parts, modules, missing): hash the content instead. Equal specs hash equal.
        return hash((type(self).__name__, self.model_dump_json()))


class LogitOp(_Frozen):
    """One step Hugging Face applies around the unembedding, read from the model's config.

    ``kind`` is ``scale`` (x * v), ``divide`` (x / v), ``softcap`` (v * tanh(x / v)) or ``add``
    (x + v), where ``v = value``, ``config.<config_attr> ** power``, or the parameter or buffer
    of the top-level model at the dotted path ``tensor`` (BART's ``final_logits_bias``). The op
    is skipped when the config attribute or tensor is missing or None, or when ``only_if``
    names a config flag that is false; ``only_if="a|b"`` reads flag ``a``, or ``b`` where the
    config has no ``a`` (a flag renamed between transformers versions).

    Example:
        >>> LogitOp(kind="softcap", config_attr="final_logit_softcapping").kind
        'softcap'
        >>> LogitOp(kind="add", tensor="final_logits_bias").tensor
        'final_logits_bias'
    """

    kind: Literal["scale", "divide", "softcap", "add"]
    config_attr: str | None = None
    value: float | None = None
    tensor: str | None = None
    power: float = 1.0
    only_if: str | None = None

    _v_tensor = field_validator("tensor")(_check_path)

    @model_validator(mode="after")
    def _one_source(self) -> LogitOp:
        if sum(x is not None for x in (self.config_attr, self.value, self.tensor)) != 1:
            raise ValueError("a LogitOp needs exactly one of config_attr, value or tensor")
        return self

    def value_for(self, model: Any) -> float | torch.Tensor | None:
        """The op's ``v`` for ``model`` (``None``: the op does not apply to this model).

        Example:
            >>> from types import SimpleNamespace
            >>> model = SimpleNamespace(config=SimpleNamespace(d_model=64, tie_word_embeddings=True))
            >>> LogitOp(kind="scale", config_attr="d_model", power=-0.5).value_for(model)
            0.125
        """
        if self.value is not None:
            return self.value
        config = getattr(model, "config", None)
        if self.only_if is not None and not config_flag(config, self.only_if):
            return None
        if self.tensor is not None:
            found: Any = model
            for part in self.tensor.split("."):
                found = getattr(found, part, None)
            return found if isinstance(found, torch.Tensor) else None
        assert self.config_attr is not None
        value = getattr(config, self.config_attr, None)
        if value is None:
            return None
        result: float = float(value) ** self.power
        return result

    def apply(self, x: torch.Tensor, model: Any) -> torch.Tensor:
        """``x`` with this op applied as ``model``'s forward applies it (unchanged if it does not).

        Example:
            >>> from types import SimpleNamespace
            >>> model = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=2.0))
            >>> op = LogitOp(kind="softcap", config_attr="final_logit_softcapping")
            >>> op.apply(torch.tensor([100.0]), model).item()
            2.0
        """
        value = self.value_for(model)
        if value is None:
            return x
        if isinstance(value, torch.Tensor):
            value = value.to(x.device)
        if self.kind == "scale":
            return x * value
        if self.kind == "divide":
            return x / value
        if self.kind == "add":
            return x + value
        return torch.tanh(x / value) * value

    @property
    def additive(self) -> bool:
        """Whether this op adds a value (``add``) rather than transforming the logits.

        Example:
            >>> LogitOp(kind="add", value=1.0).additive, LogitOp(kind="scale", value=2.0).additive
            (True, False)
        """
        return self.kind == "add"

    def factor(self, model: Any) -> float:
        """The number a linear op multiplies by (``scale``: v, ``divide``: 1/v; 1 where the
        model leaves it off). ``softcap`` and ``add`` are not a multiplication, and a tensor
        value is not one number: both are a ``ValueError`` naming the op.

        Example:
            >>> LogitOp(kind="divide", value=4.0).factor(None)
            0.25
        """
        value = self.value_for(model)
        if value is None:
            return 1.0
        if isinstance(value, torch.Tensor) or self.kind not in ("scale", "divide"):
            what = "a tensor" if isinstance(value, torch.Tensor) else "not linear"
            raise ValueError(f"a {self.kind} step of the head is {what}")
        return float(value) if self.kind == "scale" else 1.0 / float(value)

    def added(self, model: Any, index: int) -> float:
        """What an ``add`` op adds to logit ``index`` (0 for any other op, or where the model
        leaves it off).

        Example:
            >>> LogitOp(kind="add", value=1.5).added(None, 3)
            1.5
        """
        value = self.value_for(model) if self.additive else None
        if value is None:
            return 0.0
        if isinstance(value, torch.Tensor):
            return float(value.detach().reshape(-1)[index])
        return float(value)

    @staticmethod
    def apply_all(ops: Sequence[LogitOp], x: torch.Tensor, model: Any) -> torch.Tensor:
        """``x`` with every op of ``ops`` applied in order.

        Example:
            >>> ops = (LogitOp(kind="scale", value=2.0), LogitOp(kind="add", value=1.0))
            >>> LogitOp.apply_all(ops, torch.tensor([1.0]), None).item()
            3.0
        """
        for op in ops:
            x = op.apply(x, model)
        return x


class StreamOp(_Frozen):
    """A change Hugging Face makes to the stream between two blocks, outside any module.

    After block ``i`` (counting from 0) the stream is multiplied (``scale``) or divided
    (``divide``) by ``value`` when ``config.<every>`` is positive and divides ``i + 1`` and,
    where ``only_if_attr`` is set, the base model's attribute of that name is true (RWKV halves
    its stream after every ``rescale_every``-th block while its weights are rescaled for
    inference, i.e. in eval mode).

    Example:
        >>> StreamOp(kind="divide", value=2, every="rescale_every").every
        'rescale_every'
    """

    kind: Literal["scale", "divide"]
    value: float
    every: str
    only_if_attr: str | None = None

    def applies_after(self, block: int, model: Any, base: Any) -> bool:
        """Whether HF applies this op right after block ``block`` of ``model``.

        Example:
            >>> from types import SimpleNamespace
            >>> op = StreamOp(kind="divide", value=2, every="rescale_every")
            >>> model = SimpleNamespace(config=SimpleNamespace(rescale_every=2))
            >>> [op.applies_after(i, model, model) for i in range(4)]
            [False, True, False, True]
        """
        every = getattr(getattr(model, "config", None), self.every, None)
        if not isinstance(every, int) or every <= 0 or (block + 1) % every:
            return False
        return self.only_if_attr is None or bool(getattr(base, self.only_if_attr, False))

    def apply(self, hidden: torch.Tensor, block: int, model: Any, base: Any) -> torch.Tensor:
        """The stream after block ``block`` as HF passes it on (unchanged where it does not).

        Example:
            >>> from types import SimpleNamespace
            >>> op = StreamOp(kind="divide", value=2, every="rescale_every")
            >>> model = SimpleNamespace(config=SimpleNamespace(rescale_every=1))
            >>> op.apply(torch.tensor([4.0]), 0, model, model).item()
            2.0
        """
        if not self.applies_after(block, model, base):
            return hidden
        return hidden * self.value if self.kind == "scale" else hidden / self.value


class HeadSpec(_Frozen):
    """How one attention module splits into heads: the facts head locators need, as data.

    Head locators (``block[i].attn.q``, ``.k``, ``.v``, ``.pattern``, ``.z``, ``.result``,
    ``.o``) are read at two places of the attention module. ``z`` (each head's mix of values)
    is the input of the output projection ``o`` split per head, and ``result`` each head's
    write through ``o``: these need only ``o``. ``q``, ``k``, ``v`` and ``pattern`` are the
    arguments and weights of the attention function transformers calls from ``core`` (its
    ``AttentionInterface``); where the architecture computes attention inline instead,
    ``qkv_missing`` says so and those locators are refused with that reason.

    Counts are read from the model's config: ``"a|b"`` reads ``a``, or ``b`` where the config
    has no ``a``. ``num_kv_heads`` defaults to ``num_heads`` where the config has none;
    ``kv_heads_attr`` and ``head_dim_attr`` (attributes of ``core``) win where set (Falcon's
    layouts; DeepSeek's q/k width, a sum no config attribute holds on every version);
    ``multi_query`` names a config flag meaning one key/value head (GPT-BigCode).
    ``head_dim`` defaults to ``hidden_size // num_heads``. ``scores`` states what the
    attention scores are before the softmax, for the docs and the proofs.

    ``o_norm`` names a norm the heads' concatenated output passes through before ``o``
    (BitNet's ``attn_sub_norm``): ``z`` is then read at the norm's input, still each head's
    mix of values, and ``result`` is each head's write through ``o`` of its slice of the
    normed concatenation (the norm's per-position scale as the forward computed it), so the
    results still sum to ``o``'s output.

    In a hybrid stack (attention blocks among state-space, recurrent or convolution blocks)
    a head layout holds in the blocks whose module holds ``o``; where the stack's
    ``missing["heads"]`` is set, the other blocks refuse head locators with that reason.

    Example:
        >>> HeadSpec(o="o_proj").scores
        'q·kᵀ·scaling + mask'
    """

    o: str
    core: str | None = None
    o_norm: str | None = None
    num_heads: str = "num_attention_heads"
    num_kv_heads: str | None = "num_key_value_heads"
    kv_heads_attr: str | None = None
    head_dim_attr: str | None = None
    multi_query: str | None = None
    head_dim: str | None = "head_dim"
    hidden_size: str = "hidden_size"
    scores: str = "q·kᵀ·scaling + mask"
    qkv_missing: str | None = None
    """Why ``q``/``k``/``v``/``pattern`` are not available (``None``: they are)."""

    _v_paths = field_validator("o", "core", "o_norm")(_check_path)

    def counts(self, config: Any, core: Any = None) -> tuple[int, int, int]:
        """``(num_heads, num_kv_heads, head_dim)`` for a model's config.

        Example:
            >>> from types import SimpleNamespace
            >>> cfg = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
            >>> HeadSpec(o="o_proj").counts(cfg)
            (8, 2, 8)
        """
        heads = config_int(config, self.num_heads)
        if heads is None or heads <= 0:
            raise ValueError(f"the config has no head count {self.num_heads!r}")
        kv = config_int(config, self.num_kv_heads) or heads
        if self.multi_query is not None and config_flag(config, self.multi_query):
            kv = 1
        if self.kv_heads_attr is not None and core is not None:
            found = getattr(core, self.kv_heads_attr, None)
            if isinstance(found, int):
                kv = found
        dim = config_int(config, self.head_dim)
        if self.head_dim_attr is not None and core is not None:
            found = getattr(core, self.head_dim_attr, None)
            if isinstance(found, int):
                dim = found
        if dim is None:
            hidden = config_int(config, self.hidden_size)
            if hidden is None:
                raise ValueError(
                    f"the config has neither {self.head_dim!r} nor {self.hidden_size!r}"
                )
            dim = hidden // heads
        return heads, kv, dim


HiddenStart = Literal["block_input", "block_output"]

_NOT_VERSIONED = frozenset({"name", "by_version", "model_types", "architectures"})


def installed_transformers() -> str:
    """The installed transformers version (``"0"`` where it is not installed): the version of
    the transformers this process imported, once it did (the code that runs, even where
    another version was installed since), else the one installed.

    Example:
        >>> installed_transformers()[0].isdigit()
        True
    """
    imported = getattr(sys.modules.get("transformers"), "__version__", None)
    if isinstance(imported, str):
        return imported
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:
        return "0"


class VersionFacts(_Frozen):
    """Facts of an adapter that hold only on some transformers versions, as data.

    ``transformers`` is a PEP 440 specifier set (``">=5.25"``, ``">=4.51,<5"``; pre-releases
    of a matching version match too); ``facts`` are fields of the spec as they are on those
    versions, applied over the spec's own (later entries win). ``why`` says what changed, for
    the docs and the error when a fact fails its proof.

    Example:
        >>> facts = VersionFacts(transformers=">=5.25", facts={"hidden_states_start": "block_input"})
        >>> facts.matches("5.25.0"), facts.matches("5.24.1"), facts.matches("5.26.0.dev0")
        (True, False, True)
    """

    transformers: str
    facts: dict[str, Any]
    why: str = ""

    @field_validator("transformers")
    @classmethod
    def _check_specifier(cls, value: str) -> str:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        try:
            SpecifierSet(value)
        except InvalidSpecifier:
            raise ValueError(
                f"{value!r} is not a version specifier such as '>=5.25' or '>=4.51,<5'"
            ) from None
        return value

    @field_validator("facts")
    @classmethod
    def _check_facts(cls, value: dict[str, Any]) -> dict[str, Any]:
        fixed = sorted(_NOT_VERSIONED & set(value))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot change with the transformers version")
        if not value:
            raise ValueError("facts is empty: name the fields that differ on these versions")
        return value

    def matches(self, version: str) -> bool:
        """Whether ``version`` (of transformers) is in this entry's range.

        Example:
            >>> VersionFacts(transformers="<5", facts={"output_index": 1}).matches("4.57.6")
            True
        """
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version

        try:
            parsed = Version(version)
        except InvalidVersion:
            return False
        return SpecifierSet(self.transformers).contains(parsed, prereleases=True)


class StackSpec(_Frozen):
    """One stack of blocks: its embedding, its blocks and what follows them.

    Paths are dotted attribute paths; ``a|b`` tries ``a`` then ``b`` (for a module renamed
    between transformers versions). They are relative to the base model
    (``model.base_model``: ``GPT2Model`` inside ``GPT2LMHeadModel``), so one spec serves
    ``AutoModel`` and ``AutoModelForCausalLM``.
    ``attn``, ``mlp`` and ``parts`` are relative to one block.

    Example:
        >>> StackSpec(embed="wte", blocks="h", final_norm="ln_f").blocks
        'h'
    """

    embed: str | None = None
    """The token-embedding lookup (its record's output is the raw lookup)."""
    blocks: str
    """The ``nn.ModuleList`` of blocks."""
    attn: str | None = None
    mlp: str | None = None
    mlp_post: str | None = None
    """The MLP's down-projection, as a path inside ``mlp``: ``block[i].mlp.post`` is what it
    receives, the MLP's hidden activations (the neurons; after the gate in a gated MLP).
    ``None``: the architecture has no single down-projection (a mixture of experts)."""
    final_norm: str | None = None
    modules: dict[str, str] = Field(default_factory=dict)
    """Extra named modules of the stack (e.g. ``project_out``), addressable as locators."""
    parts: dict[str, str] = Field(default_factory=dict)
    """Extra named parts of a block (e.g. ``attn_norm``), addressable as ``block[i].<name>``."""
    missing: dict[str, str] = Field(default_factory=dict)
    """Why a part is absent, e.g. ``{"mlp": "OPT computes its MLP inline (fc1/fc2)"}``."""
    block_input_kwarg: str = "hidden_states"
    """Keyword under which the hidden input arrives when it is not positional."""
    output_index: int = 0
    """Which element of a tuple output is the hidden state."""
    hidden_states_start: HiddenStart = "block_input"
    """``block_input``: HF ``hidden_states[0]`` is block 0's input (L+1 entries, the usual case);
    ``block_output``: ``hidden_states[i]`` is block i's output (Mamba, RWKV: no embedding entry)."""
    after_blocks: tuple[str, ...] = ("final_norm",)
    """Modules Hugging Face applies, in order, to the last block's output before it records
    ``hidden_states[-1]`` (absent ones are skipped: with no final norm HF records the raw
    output; OPT adds ``project_out``)."""
    residual_in: tuple[str, ...] = ()
    """Parts whose output already includes the residual stream (documented on records)."""
    outputs_changed_in_place: tuple[str, ...] = ()
    """Locator names (``block``, ``attn``, ``mlp``, a ``parts`` or ``modules`` name) whose output
    tensor the model changes in place after the module returns (e.g. a parallel block that adds
    the attention output into the MLP's output with ``+=``). Captures record a copy of their
    output, so the record holds what the module returned, not the later sum."""
    between_blocks: tuple[StreamOp, ...] = ()
    """What HF does to the stream after some blocks outside any module (RWKV's rescaling).
    Then ``hidden_states`` entries are read as the input of the next module (``block[i+1]``
    or the first of ``after_blocks``), which already includes the change."""
    heads: dict[str, HeadSpec] = Field(default_factory=dict)
    """The head layout of each attention part (``attn``, or a ``parts`` name such as
    ``cross_attn``), for ``block[i].attn.q`` and the other head locators. A part without one
    refuses head locators, with the reason ``missing["heads"]`` where set. In a hybrid stack
    the layout holds per block: a block without the part (``missing[part]`` says why) or
    whose module lacks the layout's ``o`` (``missing["heads"]`` says why) has no heads."""
    root: str | None = None
    """The module that runs this whole stack (``encoder``, ``decoder``): a module several
    stacks share (T5's embedding on transformers 4.x is one module) is recorded for this
    stack only while this module runs."""

    _v_paths = field_validator("embed", "blocks", "attn", "mlp", "mlp_post", "final_norm", "root")(
        _check_path
    )

    @field_validator("modules", "parts")
    @classmethod
    def _check_named(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if name in _RESERVED_MODULES:
                raise ValueError(f"{name!r} is a reserved locator name")
            _check_path(path)
        return value

    @model_validator(mode="after")
    def _check_changed_in_place(self) -> StackSpec:
        known = {"block", "attn", "mlp", "embed", "final_norm", *self.parts, *self.modules}
        for name in self.outputs_changed_in_place:
            if name not in known:
                raise ValueError(
                    f"outputs_changed_in_place names {name!r}, which is not a locator of this "
                    f"stack (valid: {', '.join(sorted(known))})"
                )
        return self

    @model_validator(mode="after")
    def _check_heads(self) -> StackSpec:
        for name in self.heads:
            if name != "attn" and name not in self.parts:
                raise ValueError(
                    f"heads names {name!r}, which is not 'attn' or a part of this stack "
                    f"(parts: {', '.join(sorted(self.parts)) or 'none'})"
                )
        if "attn" in self.heads and self.attn is None:
            raise ValueError("heads names 'attn', but this stack has no attn module")
        if self.mlp_post is not None and self.mlp is None:
            raise ValueError("mlp_post names the MLP's down-projection, but this stack has no mlp")
        return self

    @model_validator(mode="after")
    def _check_after_blocks(self) -> StackSpec:
        for name in self.after_blocks:
            # A final_norm of None is allowed here: the chain skips absent modules.
            if name != "final_norm" and name not in self.modules:
                raise ValueError(f"after_blocks names {name!r}, which is not in modules")
        return self


class AdapterSpec(StackSpec):
    """An architecture as data: the main stack's layout plus what serves which models.

    Example:
        >>> spec = AdapterSpec(
        ...     name="gpt2", model_types=("gpt2",), embed="wte", blocks="h",
        ...     attn="attn", mlp="mlp", final_norm="ln_f", lm_head="lm_head",
        ... )
        >>> spec.derive(name="gpt2-sibling").final_norm
        'ln_f'
    """

    name: str
    model_types: tuple[str, ...] = ()
    """Hugging Face ``config.model_type`` values this adapter serves."""
    architectures: tuple[str, ...] = ()
    """Model class names this adapter serves whatever their model_type."""
    description: str = ""
    lm_head: str | None = None
    """The unembedding, relative to the top-level model (absent on base models)."""
    pre_head: tuple[LogitOp, ...] = ()
    """Ops applied between the final norm and ``lm_head`` (T5 scales by d_model^-0.5)."""
    head_modules: tuple[str, ...] = ()
    """Modules of a head split across several modules, applied in order after ``pre_head``
    and before ``lm_head`` (DistilBERT: ``vocab_transform``, ``activation``,
    ``vocab_layer_norm``, then ``lm_head="vocab_projector"``); paths as for ``lm_head``."""
    logit_ops: tuple[LogitOp, ...] = ()
    """Ops applied after ``lm_head`` (Gemma-2 soft-capping, Cohere logit scale, ...)."""
    stack_name: str | None = None
    """Name of the main stack in locators (``decoder`` on encoder-decoder models)."""
    encoder: StackSpec | None = None
    """The encoder stack of an encoder-decoder model (``encoder.block[i]``)."""
    unsupported: str | None = None
    """When set, the architecture is refused with this reason instead of answered wrongly."""
    notes: tuple[str, ...] = ()
    by_version: tuple[VersionFacts, ...] = ()
    """Facts that differ between transformers versions (see :class:`VersionFacts`); the spec's
    own fields hold where none matches. :meth:`on_transformers` gives the spec for a version."""

    @model_validator(mode="after")
    def _check_by_version(self) -> AdapterSpec:
        for entry in self.by_version:
            # Each version's spec must be a valid spec too: a typo is an error here, not on
            # the one install that has that version.
            self.model_validate({**self.model_dump(), **entry.facts, "by_version": ()})
        return self

    def on_transformers(self, version: str | None = None) -> AdapterSpec:
        """This spec as it holds on transformers ``version`` (default: the installed one).

        Example:
            >>> spec = AdapterSpec(name="x", blocks="layers", by_version=(
            ...     VersionFacts(transformers=">=5.25", facts={"hidden_states_start": "block_input"}),
            ... ), hidden_states_start="block_output")
            >>> spec.on_transformers("5.24.0").hidden_states_start
            'block_output'
            >>> spec.on_transformers("5.25.0").hidden_states_start
            'block_input'
        """
        found = version if version is not None else installed_transformers()
        changes: dict[str, Any] = {}
        for entry in self.by_version:
            if entry.matches(found):
                changes.update(entry.facts)
        if not changes:
            return self
        return self.model_validate({**self.model_dump(), **changes})

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9_.\-]*$", value):
            raise ValueError(
                f"adapter name {value!r} must be lower-case letters, digits, '_', '-' or '.'"
            )
        return value

    _v_head = field_validator("lm_head")(_check_path)

    @field_validator("head_modules")
    @classmethod
    def _check_head_modules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            _check_path(path)
        return value

    @classmethod
    def from_stack(cls, stack: StackSpec, **fields: Any) -> AdapterSpec:
        """An adapter whose main stack is ``stack`` (e.g. an encoder-decoder's encoder alone).

        Example:
            >>> enc = StackSpec(embed="embed_tokens", blocks="block", final_norm="final_layer_norm")
            >>> AdapterSpec.from_stack(enc, name="encoder-only", stack_name="encoder").blocks
            'block'
        """
        return cls.model_validate({**stack.model_dump(), **fields})

    def stack(self, name: str | None) -> StackSpec:
        """The stack a locator prefix names (``None``: the main stack).

        Example:
            >>> AdapterSpec(name="x", blocks="h").stack(None).blocks
            'h'
        """
        if name is None or name == self.stack_name:
            return self
        if name == "encoder" and self.encoder is not None:
            return self.encoder
        valid = [n for n in (self.stack_name, "encoder" if self.encoder else None) if n]
        raise LocatorError(
            f"adapter {self.name!r} has no stack named {name!r}"
            + (f" (valid: {', '.join(valid)})" if valid else " (it has a single stack)")
        )

    @property
    def stack_names(self) -> list[str | None]:
        """The stacks this spec describes: the main one (``stack_name``) and the encoder."""
        names: list[str | None] = [self.stack_name]
        if self.encoder is not None:
            names.append("encoder")
        return names

    def summary(self) -> dict[str, Any]:
        """A plain dict for tables and JSON output.

        Example:
            >>> AdapterSpec(name="x", blocks="h").summary()["blocks"]
            'h'
        """
        return self.model_dump(mode="json", exclude_defaults=False)
