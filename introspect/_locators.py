"""Locators: the one vocabulary that names a place in any model.

Grammar (see ``docs/concepts.md``)::

    locator  := [stack "."] target ["." side] | "module:" path ["." side]
    target   := "block[" selector "]" ["." sub] | name [".scale"]
    selector := int | [int] ":" [int] [":" [int]]
    side     := "input" | "output"

``name`` is ``embed``, ``final_norm``, ``lm_head`` or any extra module an adapter declares;
``sub`` is ``attn``, ``mlp`` or any extra block part the adapter declares, optionally followed
by a head value (``attn.z``), the MLP's hidden activations (``mlp.post``) or the attribute path
of a sub-module of that part (``mlp.down_proj``); ``stack`` is ``encoder`` or ``decoder`` on
encoder-decoder models. A norm's ``.scale`` (``final_norm.scale``, ``block[0].attn_norm.scale``)
names the per-position divisor it normalises by. ``module:`` names any module of the model by its dotted path from the
top-level model (``module:model.layers.0.mlp.down_proj``, as ``named_modules()`` spells it).
A trailing ``.sae.features`` names the features of the sparse autoencoder spliced at that
site (``block[3].sae.features``), while the splice is active.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from introspect._errors import LocatorError

__all__ = ["KV_SITES", "QUERY_KEY_SITES", "RAW", "Locator", "parse"]

Side = Literal["input", "output"]

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_PATTERN = re.compile(
    rf"^(?:(?P<stack>{_NAME})\.)?"
    rf"(?:block\[(?P<selector>[^\]]*)\](?:\.(?P<sub>{_NAME}(?:\.{_NAME})*))?"
    rf"|(?P<name>{_NAME})(?:\.(?P<value>scale))?)$"
)
_PATH = re.compile(rf"^{_NAME}(?:\.(?:{_NAME}|\d+))*$|^\d+(?:\.(?:{_NAME}|\d+))*$")
RAW = "module:"
"""The prefix of a raw module path."""
SAE_FEATURES = ".sae.features"

KV_SITES = frozenset({"k_pre", "k", "v"})
"""Head values counted in key/value heads (``num_kv_heads``), the others in query heads."""
QUERY_KEY_SITES = frozenset({"scores", "pattern"})
"""Head values laid out ``[batch, heads, query, key]``: no sequence axis first, so positions=
cannot be placed on them, no row per token can be stored, and they have no mean over inputs."""
"""The suffix naming the features of an SAE spliced at a site."""
_INT = re.compile(r"^\s*-?\d+\s*$")


_MAX_DIGITS = 18


def _int(text: str, locator: str) -> int:
    # Python refuses int() of more than 4300 digits with a builtin ValueError; no model has
    # more than 10**18 blocks, so a longer index is out of range whatever the model.
    digits = text.strip().lstrip("-")
    if len(digits) > _MAX_DIGITS:
        raise LocatorError(
            f"block index {digits[:12]}... ({len(digits)} digits) in {locator[:40]!r}... is out "
            "of range for any model: use an index such as 0, 3 or -1"
        )
    return int(text)


class Locator(BaseModel):
    """A parsed locator such as ``block[-1].attn`` or ``decoder.final_norm``.

    Example:
        >>> loc = Locator.parse("block[-1].mlp")
        >>> loc.part, loc.index, loc.sub
        ('block', -1, 'mlp')
        >>> str(loc.resolve_index(12))
        'block[11].mlp'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    part: str
    """``"block"`` for blocks, else the module name (``embed``, ``final_norm``, ``lm_head`` ...)."""
    stack: str | None = None
    index: int | None = None
    start: int | None = None
    stop: int | None = None
    step: int | None = None
    is_slice: bool = False
    sub: str | None = None
    """Inside a block: the part and what follows it (``attn.z``); elsewhere ``"scale"`` (a
    norm's scale, ``final_norm.scale``) or ``None``."""
    side: Side = "output"
    path: str | None = None
    """The dotted module path of a raw locator (``part == "module"``)."""
    sae: Side | None = None
    """Names the features of the SAE spliced at the rest of the locator (``.sae.features``):
    the side of that site (``block[0].input.sae.features``: spliced at the block's input)."""

    @classmethod
    def parse(cls, text: str | Locator) -> Locator:
        """Parse ``text`` (a locator is returned unchanged).

        Example:
            >>> Locator.parse("encoder.block[0:2]").is_slice
            True
        """
        if isinstance(text, Locator):
            return text
        if not isinstance(text, str):
            raise LocatorError(
                f"a locator must be a string such as 'block[0]', got {type(text).__name__}"
            )
        raw = text.strip()
        side: Side = "output"
        for candidate in ("input", "output"):
            if raw.endswith("." + candidate):
                raw = raw[: -len(candidate) - 1]
                side = candidate
                break
        if raw.endswith(SAE_FEATURES):
            inner = cls.parse(raw[: -len(SAE_FEATURES)])
            if inner.sae or inner.is_slice:
                raise LocatorError(
                    f"cannot parse locator {text!r}: '.sae.features' follows one site, e.g. "
                    "'block[3].sae.features' or 'block[3].mlp.sae.features'"
                )
            return inner.model_copy(update={"sae": inner.side, "side": side})
        if raw.startswith(RAW):
            path = raw[len(RAW) :].strip()
            if not _PATH.match(path):
                raise LocatorError(
                    f"cannot parse locator {text!r}: after 'module:' comes a module's dotted "
                    "path from the top-level model, as named_modules() spells it (e.g. "
                    "'module:model.layers.0.mlp.down_proj')"
                )
            return cls(part="module", path=path, side=side)
        match = _PATTERN.match(raw)
        if match is None:
            raise LocatorError(
                f"cannot parse locator {text!r}: expected e.g. 'embed', 'block[3]', "
                "'block[-1].attn', 'block[2:5]', 'final_norm', 'lm_head', 'decoder.block[0]' or "
                "a raw module path 'module:model.layers.0.mlp'"
            )
        stack = match.group("stack")
        name = match.group("name")
        if name is not None:
            value = match.group("value")
            if name == "scale" and value is None and stack is not None:
                # "final_norm.scale": the norm's scale, not a module "scale" of a stack.
                name, stack, value = stack, None, "scale"
            if name == "block":
                raise LocatorError(
                    f"locator {text!r} needs an index: 'block[i]' or a slice 'block[a:b]'"
                )
            return cls(part=name, stack=stack, sub=value, side=side)
        selector = match.group("selector")
        sub = match.group("sub")
        if sub is not None and {"input", "output"} & set(sub.split(".")):
            # "block[1].mlp.input.output" would otherwise read as part "mlp.input" and print
            # as "block[1].mlp.input": two locators with one text.
            raise LocatorError(
                f"cannot parse locator {text!r}: 'input' or 'output' may appear once, at the "
                "end (e.g. 'block[1].mlp.input')"
            )
        if _INT.match(selector):
            return cls(part="block", stack=stack, index=_int(selector, text), sub=sub, side=side)
        pieces = selector.split(":")
        if len(pieces) not in (2, 3):
            raise LocatorError(
                f"cannot parse block selector [{selector}] in {text!r}: use an integer such as "
                "[3] or [-1], or a slice such as [2:5], [:], [::2]"
            )
        values: list[int | None] = []
        for piece in pieces:
            if piece.strip() == "":
                values.append(None)
            elif _INT.match(piece):
                values.append(_int(piece, text))
            else:
                raise LocatorError(
                    f"cannot parse block selector [{selector}] in {text!r}: {piece!r} is not an "
                    "integer"
                )
        while len(values) < 3:
            values.append(None)
        if values[2] == 0:
            raise LocatorError(f"slice step cannot be zero in {text!r}")
        return cls(
            part="block",
            stack=stack,
            start=values[0],
            stop=values[1],
            step=values[2],
            is_slice=True,
            sub=sub,
            side=side,
        )

    @property
    def spliced_at(self) -> Locator:
        """The site whose SAE's features this names (``block[0]`` for ``block[0].sae.features``).

        Example:
            >>> str(Locator.parse("block[2].input.sae.features").spliced_at)
            'block[2].input'
        """
        return self.model_copy(update={"sae": None, "side": self.sae or "output"})

    @property
    def is_raw(self) -> bool:
        """Whether this names a module by its raw path (``module:...``)."""
        return self.path is not None

    @property
    def is_block(self) -> bool:
        """Whether this names a block (or a part of one)."""
        return self.part == "block"

    def with_side(self, side: Side) -> Locator:
        """The same place, reading its input or its output.

        Example:
            >>> str(Locator.parse("block[0]").with_side("input"))
            'block[0].input'
        """
        return self.model_copy(update={"side": side})

    @property
    def module_key(self) -> str:
        """The text of the module this names, without the side (records are keyed by it)."""
        text = str(self)
        return text[: -len(".input")] if self.side == "input" else text

    def expand(self, num_blocks: int) -> list[Locator]:
        """Every single-block locator a slice selects (a single locator: itself, resolved).

        Example:
            >>> [str(x) for x in Locator.parse("block[1:]").expand(3)]
            ['block[1]', 'block[2]']
        """
        if not self.is_block:
            return [self]
        if not self.is_slice:
            return [self.resolve_index(num_blocks)]
        indices = range(num_blocks)[slice(self.start, self.stop, self.step)]
        return [
            self.model_copy(
                update={"index": i, "is_slice": False, "start": None, "stop": None, "step": None}
            )
            for i in indices
        ]

    def resolve_index(self, num_blocks: int, adapter_name: str = "this model") -> Locator:
        """This locator with a non-negative block index, or a LocatorError naming the range.

        Example:
            >>> str(Locator.parse("block[-1]").resolve_index(12))
            'block[11]'
        """
        if not self.is_block or self.is_slice or self.index is None:
            return self
        i = self.index
        if not -num_blocks <= i < num_blocks:
            stack = f"{self.stack} " if self.stack else ""
            raise LocatorError(
                f"{self} is out of range for {adapter_name} ({num_blocks} {stack}blocks: use "
                f"{-num_blocks}..{num_blocks - 1})"
            )
        return self.model_copy(update={"index": i % num_blocks})

    def __str__(self) -> str:
        text = f"{self.stack}." if self.stack else ""
        if self.is_block:
            if self.is_slice:

                def show(value: int | None) -> str:
                    return "" if value is None else str(value)

                selector = f"{show(self.start)}:{show(self.stop)}"
                if self.step is not None:
                    selector += f":{self.step}"
            else:
                selector = str(self.index)
            text += f"block[{selector}]"
            if self.sub:
                text += f".{self.sub}"
        elif self.path is not None:
            text = RAW + self.path
        else:
            text += self.part + (f".{self.sub}" if self.sub else "")
        if self.sae is not None:
            text += (".input" if self.sae == "input" else "") + SAE_FEATURES
        if self.side == "input":
            text += ".input"
        return text

    def __repr__(self) -> str:
        return f"Locator({str(self)!r})"


def parse(text: str | Locator) -> Locator:
    """Parse a locator string; the module-level spelling of :meth:`Locator.parse`.

    Example:
        >>> str(parse("decoder.block[-2].attn"))
        'decoder.block[-2].attn'
    """
    return Locator.parse(text)


def query_key_site(loc: Locator) -> bool:
    """Whether ``loc`` names a ``[batch, heads, query, key]`` head value (``scores``, ``pattern``).

    Example:
        >>> query_key_site(Locator.parse("block[0].attn.scores")), query_key_site(Locator.parse("block[0]"))
        (True, False)
    """
    return loc.sub is not None and loc.sae is None and loc.sub.rsplit(".", 1)[-1] in QUERY_KEY_SITES
