"""Locator resolution: from ``block[-1].attn`` to the module, and to a capture ``Target``.

Resolving is cached, because a capture per forward must stay cheap next to a small forward,
but the model may change between two uses (``model.transformer.h[0] = new_block``,
``del h[3]``, a new ``ModuleList``). Every cached answer keeps the chain of module links it
followed (:func:`introspect._model.paths.walk`) and is used only while that chain still holds;
otherwise it is resolved again. So a locator always names what the model holds *now*, and
caches are keyed on the parsed locator itself, never on a string two locators could share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from torch import nn

from introspect._errors import LocatorError, MissingPartError
from introspect._hooks.capture import Target, capture_targets
from introspect._hooks.heads import SITES, HeadSite, HeadTap, head_tap
from introspect._hooks.norms import ScaleSite, scale_tap
from introspect._locators import Locator
from introspect._model.paths import Chain, base_model, chain_holds, links_hold, links_of, walk
from introspect._spec import AdapterSpec, HeadSpec, StackSpec

__all__ = ["Resolver"]

_CACHE_LIMIT = 4096


HEAD_SITES = (*SITES, "o")
"""What follows an attention part as a head value (``o``: its output projection)."""


class CapturePlan(NamedTuple):
    """The targets of one capture, the links that say the model still holds them, and, for a
    kept plan, what else must hold for it to stand (see :meth:`Resolver.capture_targets`)."""

    targets: list[Target]
    links: Chain
    kept_links: Chain = ()
    counts: tuple[tuple[nn.ModuleList, int], ...] = ()

    def holds(self) -> bool:
        """Whether the model still holds every link and block count of this plan."""
        return links_hold(self.kept_links) and all(len(b) == n for b, n in self.counts)


class Resolver:
    """Turns locators into modules and targets for one model and its adapter.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect._plugins import get_registry
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> r = Resolver(m, get_registry().specs["gpt2"], "the docs")
        >>> r.module(r.locator("block[-1].mlp")) is m.transformer.h[1].mlp
        True
    """

    def __init__(self, model: nn.Module, adapter: AdapterSpec, hint: str) -> None:
        self.model = model
        self.adapter = adapter
        self._hint = hint
        self._blocks: dict[str | None, tuple[nn.ModuleList, Chain]] = {}
        self._resolved: dict[str | Locator, tuple[Locator, int]] = {}
        self._targets: dict[tuple[Locator, bool], tuple[Target, Chain]] = {}
        self._plans: dict[Any, CapturePlan] = {}
        self._base: tuple[nn.Module, Chain] | None = None
        self._paths: dict[int, str] | None = None
        self.sae_sites: dict[str, nn.Module] = {}
        """The feature sites of the SAEs spliced now, by the site they are spliced at
        (``insp.splice`` adds and removes them): ``<site>.sae.features`` resolves here."""
        for stack_name in adapter.stack_names:
            self.blocks(stack_name)  # a wrong adapter fails here, at construction

    # -- the model's parts ----------------------------------------------------------------------

    def base(self) -> tuple[nn.Module, Chain]:
        """The base model and the link to it from the top-level model (none if it is itself).

        Kept while that link holds (a capture asks at every build); a base that is neither the
        model nor one of its children is looked up each time.
        """
        cached = self._base
        if cached is not None and chain_holds(cached[1]):
            return cached
        found: tuple[nn.Module, Chain] = (self.model, ())
        base = base_model(self.model)
        if base is not self.model:
            found = (base, ())
            for key, child in self.model._modules.items():
                if child is base:
                    found = (base, ((self.model, key, base),))
                    break
        self._base = found if base is self.model or found[1] else None
        return found

    def blocks(self, stack_key: str | None) -> nn.ModuleList:
        """The block list of a stack as the model holds it now."""
        cached = self._blocks.get(stack_key)
        if cached is not None and chain_holds(cached[1]):
            return cached[0]
        stack = self.adapter.stack(stack_key)
        base, base_chain = self.base()
        blocks, chain = walk(base, stack.blocks)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            where = f"{type(base).__name__}.{stack.blocks}"
            found = "no such module" if blocks is None else type(blocks).__name__
            changed = " (the model changed since it was inspected)" if cached else ""
            raise MissingPartError(
                f"adapter {self.adapter.name!r} expects the blocks at {where}, but "
                f"{type(self.model).__name__} has {found}{changed}: is this the right adapter? "
                f"({self._hint})"
            )
        self._blocks[stack_key] = (blocks, base_chain + chain)  # type: ignore[assignment]
        return blocks  # type: ignore[return-value]

    def stack_key(self, name: str | None) -> str | None:
        """The adapter's key for a stack name (``None`` and the main stack's name agree)."""
        if name is None or name == self.adapter.stack_name:
            return self.adapter.stack_name
        self.adapter.stack(name)  # raises a LocatorError naming the valid stacks
        return name

    def num_blocks(self, stack: str | None = None) -> int:
        """How many blocks the stack holds now."""
        return len(self.blocks(self.stack_key(stack)))

    # -- locators -------------------------------------------------------------------------------

    def locator(self, text: str | Locator) -> Locator:
        """Parse ``text`` and resolve its block index against the current block count."""
        if not isinstance(text, (str, Locator)):
            raise LocatorError(
                f"a locator must be a string such as 'block[0]' (or a Locator), got "
                f"{type(text).__name__}: {text!r:.80}"
            )
        cached = self._resolved.get(text)
        if cached is not None:
            loc, n = cached
            if n < 0 or self.num_blocks(loc.stack) == n:
                return loc
        loc = Locator.parse(text)
        stack_key = self.stack_key(loc.stack)
        if loc.stack is not None and stack_key == self.adapter.stack_name:
            loc = loc.model_copy(update={"stack": self.adapter.stack_name})
        n = -1
        if loc.is_block and not loc.is_slice:
            n = len(self.blocks(stack_key))
            loc = loc.resolve_index(n, self.adapter.name)
        if len(self._resolved) >= _CACHE_LIMIT:
            self._resolved.clear()
        self._resolved[text] = (loc, n)
        return loc

    def expand(self, locators: Iterable[str | Locator]) -> list[Locator]:
        """Every single locator the given ones name; a slice that selects nothing is an error."""
        out: list[Locator] = []
        for text in locators:
            loc = self.locator(text)
            if loc.is_slice:
                n = len(self.blocks(self.stack_key(loc.stack)))
                selected = loc.expand(n)
                if not selected:
                    stack = f"{loc.stack} " if loc.stack else ""
                    raise LocatorError(
                        f"{loc} selects no block of {self.adapter.name} ({n} {stack}blocks: "
                        f"indices {-n}..{n - 1})"
                    )
                out.extend(selected)
            else:
                out.append(loc)
        return out

    # -- modules --------------------------------------------------------------------------------

    def missing(
        self, loc: Locator, stack: StackSpec, what: str, block: nn.Module | None = None
    ) -> MissingPartError:
        """The error for a part this architecture lacks, with its reason and the valid names.

        ``block``: the block that lacks the part; where other blocks of the stack have it (a
        hybrid's attention among state-space or convolution blocks), the error says which
        kind of block this one is.
        """
        reason = stack.missing.get(what)
        if what == "final_norm" and reason is None:
            reason = (
                "its Hugging Face implementation applies no norm after the last block, so "
                "hidden_states[-1] is the raw last block output (e.g. BERT, post-LN OPT)"
            )
        if block is not None and loc.is_block and self._elsewhere(loc, stack, what):
            kind = f"{self._block_label(loc)} is a {type(block).__name__}"
            reason = f"{kind}: {reason}" if reason else f"{kind}, which has no {what}"
        valid = self.valid_names(stack, loc.is_block)
        text = f"{loc} does not exist on adapter {self.adapter.name!r}"
        if reason:
            text += f": {reason}"
        return MissingPartError(f"{text}. Valid here: {', '.join(valid)}")

    def _block_label(self, loc: Locator) -> str:
        """``block[1] of this jamba model`` (the model type, else the model's class)."""
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        what = model_type if isinstance(model_type, str) and model_type else None
        what = what or type(self.model).__name__
        prefix = f"{loc.stack}." if loc.stack else ""
        return f"{prefix}block[{loc.index}] of this {what} model"

    def _elsewhere(self, loc: Locator, stack: StackSpec, part: str) -> bool:
        """Whether another block of ``loc``'s stack has ``part`` (the stack is a hybrid)."""
        path = getattr(stack, part) if part in ("attn", "mlp") else stack.parts.get(part)
        if not path:
            return False
        blocks = self.blocks(self.stack_key(loc.stack))
        return any(walk(block, path)[0] is not None for block in blocks)

    def valid_names(self, stack: StackSpec, in_block: bool) -> list[str]:
        """The locator names a stack offers (inside a block, or at the stack's top level)."""
        if in_block:
            names = [n for n in ("attn", "mlp") if getattr(stack, n)]
            return [f"block[i].{n}" for n in [*names, *stack.parts]] + ["block[i]"]
        names = ["block[i]"]
        if stack.embed:
            names.insert(0, "embed")
        if stack.final_norm:
            names.append("final_norm")
        names.extend(stack.modules)
        if self.adapter.lm_head and walk(self.model, self.adapter.lm_head)[0] is not None:
            names.append("lm_head")
        return names

    def module(self, loc: Locator) -> nn.Module:
        """The module a single resolved locator names now."""
        return self._module_and_chain(loc)[0]

    def _module_and_chain(self, loc: Locator) -> tuple[nn.Module, Chain]:
        if loc.sae is not None:
            return self._sae_site(loc), ()
        if loc.is_slice:
            raise LocatorError(f"{loc} names several modules: use modules({str(loc)!r})")
        stack_key = self.stack_key(loc.stack)
        stack = self.adapter.stack(stack_key)
        if loc.is_block:
            assert loc.index is not None
            blocks = self.blocks(stack_key)
            blocks_chain = self._blocks[stack_key][1]
            block, block_chain = walk(blocks, str(loc.index))
            if block is None:
                raise LocatorError(
                    f"{loc} is out of range for {self.adapter.name} ({len(blocks)} blocks now: "
                    "the model changed since this locator was resolved)"
                )
            chain = blocks_chain + block_chain
            if loc.sub is None:
                return block, chain
            part, _, site = loc.sub.partition(".")
            if part in ("attn", "mlp"):
                path = getattr(stack, part)
            else:
                path = stack.parts.get(part)
                if path is None and part not in stack.missing:
                    valid = self.valid_names(stack, True)
                    raise LocatorError(
                        f"unknown block part {part!r} in {loc} for adapter "
                        f"{self.adapter.name!r}; valid: {', '.join(valid)}"
                    )
            found, sub_chain = walk(block, path) if path else (None, ())
            if found is None:
                raise self.missing(loc, stack, part, block)
            if site == "scale" and walk(found, "scale")[0] is None:
                return self._scale_site(loc, found), chain + sub_chain
            if site in HEAD_SITES:
                return self._head_site(loc, stack, part, site, found, chain + sub_chain)
            if site:
                return self._inside(loc, stack, part, site, found, chain + sub_chain)
            return found, chain + sub_chain
        if loc.is_raw:
            assert loc.path is not None
            found, raw_chain = walk(self.model, loc.path)
            if found is None:
                raise LocatorError(self._no_module(loc, self.model, loc.path, "the model"))
            return found, raw_chain
        if loc.part == "lm_head":
            if loc.stack is not None and stack_key != self.adapter.stack_name:
                raise LocatorError(f"{loc}: lm_head belongs to the model, not to a stack")
            head, head_chain = (
                walk(self.model, self.adapter.lm_head) if self.adapter.lm_head else (None, ())
            )
            if head is None:
                raise MissingPartError(
                    f"{type(self.model).__name__} has no lm_head: it is a base model without a "
                    "language-modelling head (load it with AutoModelForCausalLM / "
                    "AutoModelForMaskedLM / AutoModelForSeq2SeqLM to get one)"
                )
            if loc.sub == "scale":
                return self._scale_site(loc, head), head_chain
            return head, head_chain
        if loc.part in ("embed", "final_norm"):
            path = getattr(stack, loc.part)
        elif loc.part in stack.modules:
            path = stack.modules[loc.part]
        else:
            valid = self.valid_names(stack, False)
            raise LocatorError(
                f"unknown locator {str(loc)!r} for adapter {self.adapter.name!r}; valid: "
                f"{', '.join(valid)}"
            )
        base, base_chain = self.base()
        found, found_chain = walk(base, path) if path else (None, ())
        if found is None:
            raise self.missing(loc, stack, loc.part)
        if loc.sub == "scale":
            return self._scale_site(loc, found), base_chain + found_chain
        return found, base_chain + found_chain

    # -- a norm's scale -------------------------------------------------------------------------

    @staticmethod
    def scale_owner(loc: Locator) -> Locator:
        """The norm a ``.scale`` locator reads (``block[0].attn_norm`` for its scale)."""
        sub = (loc.sub or "").rpartition(".")[0] if loc.is_block else ""
        return loc.model_copy(update={"sub": sub or None, "side": "output"})

    def _scale_site(self, loc: Locator, norm: nn.Module) -> ScaleSite:
        return scale_tap(norm, str(self.scale_owner(loc))).site

    # -- attention heads ------------------------------------------------------------------------

    def head_spec(self, loc: Locator, stack: StackSpec, part: str) -> HeadSpec:
        """The head layout of an attention part, or the error saying why there is none."""
        spec = stack.heads.get(part)
        if spec is not None:
            return spec
        reason = stack.missing.get("heads")
        if reason is None:
            attention = sorted(stack.heads) or ["none"]
            reason = (
                f"adapter {self.adapter.name!r} states no head layout for {part!r} (parts "
                f"with heads: {', '.join(attention)})"
            )
            if self.adapter.name.startswith("detected"):
                reason += (
                    "; a detected adapter does not guess head layouts: write an adapter with "
                    "a HeadSpec (introspect scaffold)"
                )
        raise MissingPartError(f"{loc} has no attention heads: {reason}")

    def no_heads_here(
        self, loc: Locator, stack: StackSpec, part: str, spec: HeadSpec, attn: nn.Module
    ) -> MissingPartError | None:
        """The refusal for a hybrid's block whose ``part`` is not the attention ``spec``
        describes (its module lacks ``spec.o``), where the stack says why such blocks have no
        heads (``missing["heads"]``); ``None`` where the block has the layout's heads."""
        reason = stack.missing.get("heads")
        if reason is None or walk(attn, spec.o)[0] is not None:
            return None
        return MissingPartError(
            f"{loc} has no attention heads: {self._block_label(loc)} holds a "
            f"{type(attn).__name__} at {part}, not the attention its head layout describes "
            f"(no {spec.o}): {reason}"
        )

    def head_tap(self, loc: Locator, part: str | None = None) -> HeadTap:
        """The tap of the attention part a block locator names (``block[i].attn``)."""
        stack = self.adapter.stack(self.stack_key(loc.stack))
        part = part if part is not None else (loc.sub or "attn").partition(".")[0]
        spec = self.head_spec(loc, stack, part)
        attn_loc = loc.model_copy(update={"sub": part, "side": "output"})
        attn = self._module_and_chain(attn_loc)[0]
        refusal = self.no_heads_here(loc, stack, part, spec, attn)
        if refusal is not None:
            raise refusal
        config = getattr(self.model, "config", None)
        try:
            return head_tap(attn, spec, config, str(attn_loc))
        except ValueError as exc:
            raise MissingPartError(f"{attn_loc} has no head counts: {exc}") from None

    def _inside(
        self, loc: Locator, stack: StackSpec, part: str, site: str, found: nn.Module, chain: Chain
    ) -> tuple[nn.Module, Chain]:
        """A sub-module of a block part by its attribute path, or the MLP's ``post``."""
        if part == "mlp" and site == "post":
            if stack.mlp_post is None:
                raise MissingPartError(
                    f"{loc} does not exist on adapter {self.adapter.name!r}: it states no "
                    "down-projection for this MLP (mlp_post), so the MLP's hidden activations "
                    f"have no site; read a sub-module of it instead ({self._children(found)})"
                )
            down, down_chain = walk(found, stack.mlp_post)
            if down is None:
                raise MissingPartError(
                    f"{loc}: adapter {self.adapter.name!r} says the MLP's down-projection is "
                    f"{stack.mlp_post!r}, which this block's {type(found).__name__} lacks (a "
                    "mixture of experts has one per expert: read a sub-module, e.g. "
                    f"{part}.experts...; {self._children(found)})"
                )
            return down, chain + down_chain
        inner, inner_chain = walk(found, site)
        if inner is None:
            what = f"{loc.model_copy(update={'sub': part})}"
            text = self._no_module(loc, found, site, f"{what} ({type(found).__name__})")
            extra = []
            if part in stack.heads:
                extra.append(f"head values: {', '.join(f'{part}.{s}' for s in HEAD_SITES)}")
            if part == "mlp" and stack.mlp_post is not None:
                extra.append("the MLP's hidden activations: mlp.post")
            raise LocatorError(text + (f"; {'; '.join(extra)}" if extra else ""))
        return inner, chain + inner_chain

    def _sae_site(self, loc: Locator) -> nn.Module:
        at = str(self.locator(loc.spliced_at))
        site = self.sae_sites.get(at)
        if site is None:
            spliced = ", ".join(self.sae_sites) or "none"
            raise MissingPartError(
                f"{loc}: no SAE is spliced at {at} now (spliced: {spliced}); read its features "
                f"inside the splice: with insp.splice(sae, {at!r}): ..."
            )
        return site

    @staticmethod
    def _children(module: nn.Module) -> str:
        names = [name for name, _ in module.named_modules() if name]
        shown = ", ".join(names[:24]) + (", ..." if len(names) > 24 else "")
        return f"its sub-modules: {shown}" if names else "it has no sub-modules"

    def _no_module(self, loc: Locator, root: nn.Module, path: str, where: str) -> str:
        # Name what the deepest module on the way holds, not the whole model.
        names = path.split(".")
        for depth in range(len(names) - 1, 0, -1):
            prefix = ".".join(names[:depth])
            found = walk(root, prefix)[0]
            if found is not None:
                children = ", ".join(found._modules) or "none"
                return (
                    f"{loc}: {where} has no module at {path!r}: {prefix!r} "
                    f"({type(found).__name__}) holds {children}"
                )
        children = ", ".join(root._modules) or "none"
        return f"{loc}: {where} has no module at {path!r}: it holds {children}"

    def _head_site(
        self, loc: Locator, stack: StackSpec, part: str, site: str, attn: nn.Module, chain: Chain
    ) -> tuple[nn.Module, Chain]:
        spec = self.head_spec(loc, stack, part)
        refusal = self.no_heads_here(loc, stack, part, spec, attn)
        if refusal is not None:
            raise refusal
        if site == "o":
            found, o_chain = walk(attn, spec.o)
            if found is None:
                raise MissingPartError(
                    f"{loc}: the head layout says the output projection is {spec.o!r}, which "
                    f"{type(attn).__name__} lacks"
                )
            return found, chain + o_chain
        if site not in SITES:
            valid = ", ".join(f"{part}.{s}" for s in (*SITES, "o"))
            raise LocatorError(f"unknown head locator {loc}: valid after block[i]: {valid}")
        tap = self.head_tap(loc, part)
        reason = tap.why_not(site)
        if reason is not None:
            raise MissingPartError(
                f"{loc} cannot be read on adapter {self.adapter.name!r}: {reason}"
            )
        return tap.sites[site], chain

    def path(self, loc: Locator) -> str:
        """The dotted path of the module a locator names, from the top-level model.

        A head value (``block[0].attn.q``) is not a module: its path is the attention
        module's, then ``:`` and the value's name (``transformer.h.0.attn:q``).
        """
        if loc.sae is not None:
            return f"{self.path(loc.spliced_at)}:sae.features"
        module = self.module(loc)
        if isinstance(module, ScaleSite):
            return f"{self.path(self.scale_owner(loc))}:scale"
        if isinstance(module, HeadSite):
            part = (loc.sub or "attn").partition(".")[0]
            attn = loc.model_copy(update={"sub": part, "side": "output"})
            return f"{self.path(attn)}:{module.name}"
        name = self._paths.get(id(module)) if self._paths is not None else None
        if name is None or walk(self.model, name)[0] is not module:
            self._paths = {}
            for found, mod in self.model.named_modules(remove_duplicate=False):
                self._paths.setdefault(id(mod), found)
            name = self._paths.get(id(module))
        return "?" if name is None else name

    def stack_root(self, path: str) -> tuple[nn.Module, Chain]:
        """The module a stack runs in (records of a shared module are scoped to it)."""
        base, base_chain = self.base()
        root, chain = walk(base, path)
        if root is None:
            raise MissingPartError(
                f"adapter {self.adapter.name!r} says a stack runs in {path!r}, but "
                f"{type(self.model).__name__} has no such module: is this the right adapter?"
            )
        return root, base_chain + chain

    # -- capture targets ------------------------------------------------------------------------

    def capture_targets(
        self,
        locators: Sequence[str | Locator],
        stop: bool,
        positions: Any,
        target: Callable[[Locator, bool], Target],
    ) -> CapturePlan:
        """The targets of a capture of ``locators`` (see :func:`capture_targets`) and the links
        that say the model still holds them.

        Locators given as text (the usual case) resolve once: the plan is kept under the call's
        arguments and stands while every link holds and every stack it counted blocks in has as
        many blocks as then (``block[-1]`` names another block once one is added).
        """
        key = (tuple(locators), stop, positions is None)
        as_text = all(type(x) is str for x in locators)
        if as_text:
            found = self._plans.get(key)
            if found is not None and found.holds():
                return found
        targets = capture_targets(self.expand(locators), target, stop, positions)
        plan = CapturePlan(targets, links_of(t.chain for t in targets if t.chain is not None))
        if as_text and all(t.chain is not None for t in targets):
            stacks = {self.stack_key(Locator.parse(str(text)).stack) for text in locators}
            counts = []
            for stack in stacks:
                blocks = self.blocks(stack)
                counts.append((blocks, len(blocks)))
            chains = [self._blocks[stack][1] for stack in stacks]
            links = links_of([plan.links, *chains])
            if len(self._plans) >= _CACHE_LIMIT:
                self._plans.clear()
            self._plans[key] = CapturePlan(targets, plan.links, links, tuple(counts))
        return plan

    def target(self, loc: Locator, needs_output: bool) -> Target:
        """The capture target of a single resolved locator, built once while the model holds."""
        if loc.sae is not None:
            # A splice's site lives while the splice does: never kept for another one.
            return self._build_target(loc, needs_output)[0]
        key = (loc, needs_output)
        cached = self._targets.get(key)
        if cached is not None and chain_holds(cached[1]):
            return cached[0]
        target, chain = self._build_target(loc, needs_output)
        if len(self._targets) >= _CACHE_LIMIT:
            self._targets.clear()
        self._targets[key] = (target, chain)
        return target

    def _build_target(self, loc: Locator, needs_output: bool) -> tuple[Target, Chain]:
        stack = self.adapter.stack(self.stack_key(loc.stack))
        whole_block = loc.is_block and loc.sub is None and loc.sae is None
        input_kwarg = stack.block_input_kwarg if whole_block else "hidden_states"
        output_index = stack.output_index if whole_block else 0
        # lm_head runs after the decoder stack returns, outside its root; a raw module path
        # belongs to no stack.
        root_path = stack.root if loc.part != "lm_head" and not loc.is_raw else None
        if loc.sae is not None:
            root_path = None  # the features' site runs inside the spliced site's own call
        name = ("block" if loc.sub is None else loc.sub) if loc.is_block else loc.part
        module, chain = self._module_and_chain(loc)
        within: Any = None
        if root_path:
            within, root_chain = self.stack_root(root_path)
            chain = chain + root_chain
        uses = None
        unjoinable = None
        if isinstance(module, ScaleSite):
            owner = self.scale_owner(loc)
            scale = scale_tap(self._module_and_chain(owner)[0], str(owner))

            def uses() -> contextlib.AbstractContextManager[None]:
                return scale.use()

        elif isinstance(module, HeadSite):
            tap = self.head_tap(loc)
            site = module.name

            def uses() -> contextlib.AbstractContextManager[None]:
                return tap.use(site)

            if site in ("k", "v", "scores", "pattern"):
                unjoinable = (
                    f"under a KV cache the key axis of {site} holds every cached position, so "
                    "its steps overlap"
                )
            elif site == "k_pre":
                unjoinable = (
                    "under a KV cache k_pre holds this call's keys where a rotary embedding "
                    "runs but every cached key where none does (there it is k), so its steps "
                    "are not one sequence"
                )
        target = Target(
            key=loc.module_key,
            module=module,
            input_kwarg=input_kwarg,
            output_index=output_index,
            needs_output=needs_output,
            within=within,
            copy_output=name in stack.outputs_changed_in_place,
            chain=chain if loc.sae is None else None,
            holds=(
                (lambda: chain_holds(chain))
                if loc.sae is None
                else (lambda: self.sae_sites.get(str(self.locator(loc.spliced_at))) is module)
            ),
            uses=uses,
            unjoinable=unjoinable,
            reads_input=loc.is_block and loc.sub == "mlp.post" and loc.sae is None,
        )
        return target, chain
