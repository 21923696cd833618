"""Inspector: a model plus its resolved adapter.

It turns locators into modules, builds captures, reproduces Hugging Face's ``hidden_states``
with hooks, and applies what the model applies after its last block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from introspect._analysis.atp import attribution_patching
from introspect._analysis.attribution import Attribution, direct_logit_attribution
from introspect._analysis.circuits import FactoredMatrix, composition_scores, head_ov, head_qk
from introspect._analysis.lens import logit_lens
from introspect._analysis.patching import patching_sweep
from introspect._batching import PaddingSide, Positions, check_positions, encode_batch
from introspect._errors import CaptureError, InterventionError
from introspect._headproof import FirstUse
from introspect._hooks.capture import Capture, Record, Target, Transform
from introspect._hooks.edits import (
    EditOp,
    Intervention,
    as_factor,
    as_value,
    edit_fn_name,
    edits_at,
    mean_activation,
)
from introspect._hooks.heads import HEAD_AXIS, Heads, head_site
from introspect._hooks.session import input_device
from introspect._locators import Locator
from introspect._model.resolve import Resolver
from introspect._model.view import ModelView
from introspect._plugins import AUTHORING_HINT, IntrospectPluginManager, resolve_adapter
from introspect._proof import Proof
from introspect._sae import SAEEvaluation, SparseAutoencoder, Splice, evaluate_sae, splice
from introspect._spec import AdapterSpec

if TYPE_CHECKING:
    from introspect._analysis.lens import LensResult, Translators

__all__ = ["Inspector", "get_hidden_state", "resolve_adapter"]


class Inspector:
    """A model and its adapter: modules by locator, captures, hidden states and logits.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> insp = Inspector(model)
        >>> insp.adapter.name, insp.num_blocks, insp.path("final_norm")
        ('gpt2', 2, 'transformer.ln_f')
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: str | AdapterSpec | None = None,
        *,
        plugin_manager: IntrospectPluginManager | None = None,
        detect: bool = True,
        prove: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Inspector needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.adapter = resolve_adapter(model, adapter, plugin_manager, detect=detect)
        self._resolver = Resolver(model, self.adapter, AUTHORING_HINT)
        self.view = ModelView(model, self.adapter, self._resolver)
        """What the analyses read about this model (:class:`~introspect._model.view.ModelView`)."""
        spec = self.adapter
        self._first_use = FirstUse(
            model, spec, lambda clone: type(self)(clone, spec, prove=False), prove=prove
        )

    @property
    def proof(self) -> Proof:
        """The verdict on this adapter's facts for this model class on this install.

        ``proven``, ``deferred`` (no clone could be built: proven on this model when
        ``hidden_states`` first runs), ``off`` (``INTROSPECT_PROVE=0``), ``detected`` (proven by
        detection on this very model) or ``skipped`` (``prove=False``). See
        :mod:`introspect._proof`.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> Inspector(m).proof.status, Inspector(m, prove=False).proof.status
            ('proven', 'skipped')
        """
        return self._first_use.proof

    # -- resolution (introspect._model.resolve owns it; the model may change between two calls) -----

    @property
    def num_blocks(self) -> int:
        """Number of blocks in the main stack (``len`` of the block list, as the model is now)."""
        return self._resolver.num_blocks()

    def num_blocks_in(self, stack: str | None = None) -> int:
        """Number of blocks in ``stack`` (``encoder``/``decoder`` on encoder-decoder models).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64))
            >>> Inspector(m).num_blocks_in()
            3
        """
        return self._resolver.num_blocks(stack)

    # -- attention heads ------------------------------------------------------------------------

    @property
    def num_heads(self) -> int:
        """Query heads of each attention module of the main stack (from the model's config).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
            >>> insp = Inspector(m)
            >>> insp.num_heads, insp.num_kv_heads, insp.head_dim
            (4, 4, 8)
        """
        return self.view.head_counts(None, "attn")[0]

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads (fewer than ``num_heads`` with grouped- or multi-query attention)."""
        return self.view.head_counts(None, "attn")[1]

    @property
    def head_dim(self) -> int:
        """The width of each query/key head."""
        return self.view.head_counts(None, "attn")[2]

    def head_count(self, locator: str | Locator) -> int:
        """How many heads a head locator's value has (``num_kv_heads`` for ``k``/``v``).

        Example:
            >>> from transformers import LlamaConfig, LlamaForCausalLM
            >>> cfg = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
            ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
            >>> insp = Inspector(LlamaForCausalLM(cfg))
            >>> insp.head_count("block[0].attn.z"), insp.head_count("block[0].attn.k")
            (4, 2)
        """
        return self.view.head_count(self.locator(locator))

    def num_heads_in(self, stack: str | None = None, part: str = "attn") -> int:
        """Query heads of ``part`` (``attn``, or e.g. ``cross_attn``) in ``stack``.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
            >>> Inspector(m).num_heads_in()
            4
        """
        return self.view.head_counts(stack, part)[0]

    def num_kv_heads_in(self, stack: str | None = None, part: str = "attn") -> int:
        """Key/value heads of ``part`` in ``stack``.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
            >>> Inspector(m).num_kv_heads_in()
            4
        """
        return self.view.head_counts(stack, part)[1]

    def head_dim_in(self, stack: str | None = None, part: str = "attn") -> int:
        """The query/key head width of ``part`` in ``stack``.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
            >>> Inspector(m).head_dim_in()
            8
        """
        return self.view.head_counts(stack, part)[2]

    def locator(self, text: str | Locator) -> Locator:
        """Parse ``text`` and resolve its block index (errors name the valid range).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64))
            >>> str(Inspector(m).locator("block[-1]"))
            'block[2]'
        """
        return self._resolver.locator(text)

    def expand(self, locators: Iterable[str | Locator]) -> list[Locator]:
        """Every single locator the given ones name (slices expanded, indices resolved).

        A slice that selects no block is an error, as an out-of-range index is.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64))
            >>> [str(x) for x in Inspector(m).expand(["block[1:]", "final_norm"])]
            ['block[1]', 'block[2]', 'final_norm']
        """
        return self._resolver.expand(locators)

    def module(self, locator: str | Locator) -> nn.Module:
        """The torch module a single locator names (as the model holds it now).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> Inspector(m).module("block[-1].attn") is m.transformer.h[1].attn
            True
        """
        return self._resolver.module(self.locator(locator))

    def modules(self, locator: str | Locator) -> list[nn.Module]:
        """Every module a locator names (a slice names several).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64))
            >>> len(Inspector(m).modules("block[:]"))
            3
        """
        return [self._resolver.module(loc) for loc in self.expand([locator])]

    def path(self, locator: str | Locator) -> str:
        """The dotted path of the module a locator names, from the top-level model.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> Inspector(m).path("block[-1].mlp")
            'transformer.h.1.mlp'
        """
        return self._resolver.path(self.locator(locator))

    def locators(self, stack: str | None = None, *, include_head: bool = True) -> list[Locator]:
        """Every single locator this model has, in forward order (for listings and checks).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
            >>> [str(x) for x in Inspector(m).locators()]  # doctest: +NORMALIZE_WHITESPACE
            ['embed', 'block[0]', 'block[0].attn', 'block[0].mlp', 'block[0].attn_norm',
             'block[0].mlp_norm', 'final_norm', 'pos_embed', 'lm_head']
        """
        return self.view.locators(stack, include_head=include_head)

    # -- capture ----------------------------------------------------------------------------

    def _target(self, loc: Locator, needs_output: bool) -> Target:
        if head_site(loc) is not None:
            self._first_use.heads(
                self.view.stack_key(loc.stack), (loc.sub or "attn").partition(".")[0]
            )
        return self._resolver.target(loc, needs_output)

    def _key(self, text: str) -> str:
        loc = self.locator(text)
        if loc.is_slice:
            raise CaptureError(
                f"{loc} names several records: cap.stack({str(loc)!r}) gives them as one "
                "[blocks, batch, seq, hidden] tensor, or index one block at a time"
            )
        return loc.module_key

    def _expand_text(self, text: str) -> list[str]:
        return [str(loc) for loc in self.expand([text])]

    def capture(
        self,
        *locators: str | Locator,
        stop: bool = False,
        detach: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        positions: Positions = None,
        keep_raw: bool | None = None,
    ) -> Capture:
        """Record what the named modules receive and return while the model runs.

        ``stop=True`` ends the forward as soon as every named module has been recorded (the
        rest of the model and its head do not run). ``detach``, ``device``, ``dtype`` and
        ``positions`` (e.g. ``"last"``: each example's last real token) are applied to
        ``input``/``output`` as they are recorded; with any of them the records drop their
        raw ``args``/``kwargs``/``raw_output`` so no full tensor stays alive, unless
        ``keep_raw=True``. Records carry the ``attention_mask`` the model was called with.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> insp = Inspector(m)
            >>> with insp.capture("block[0]", "block[-1]") as cap:
            ...     _ = m(torch.tensor([[1, 2, 3]]))
            >>> cap["block[1]"] is cap["block[-1]"], cap["block[-1]"].output.shape
            (True, torch.Size([1, 3, 32]))
        """
        if not locators:
            raise CaptureError("capture() needs at least one locator, e.g. capture('block[-1]')")
        positions = check_positions(positions)
        plan = self._resolver.capture_targets(locators, stop, positions, self._target)
        transform = None
        if detach or device is not None or dtype is not None or positions is not None:
            transform = Transform(detach=detach, device=device, dtype=dtype, positions=positions)
            transform = transform if transform.active else None
        return Capture(
            plan.targets,
            links=plan.links,
            stop=stop,
            transform=transform,
            key_fn=self._key,
            expand_fn=self._expand_text,
            root=self.view.base,
            model=self.model,
            keep_raw=transform is None if keep_raw is None else keep_raw,
        )

    # -- interventions --------------------------------------------------------------------------

    def _edits(
        self, locator: str | Locator, op: Any, positions: Any, label: str, *selected: Heads
    ) -> Intervention:
        edits = edits_at(
            self.expand([locator]),
            op,
            positions,
            label,
            *selected,
            target=lambda loc: self._target(loc, True),
            head_count=self.view.head_count,
        )
        return Intervention(edits, root=self.view.base, model=self.model)

    def steer(
        self,
        locator: str | Locator,
        vector: Any,
        scale: float = 1.0,
        positions: Positions = None,
        *,
        heads: Heads = None,
        features: Heads = None,
    ) -> Intervention:
        """Add ``scale * vector`` to what ``locator`` names while the model runs.

        ``locator`` may name an input (``block[3].input``) or several blocks
        (``block[2:5]``). ``positions`` limits the edit to some tokens: ints, a slice,
        ``"last"`` (each example's last real token) or a per-example tensor. Positions count in
        the whole sequence so far: during ``generate`` a prompt position is edited in the prompt
        step only, a later position when its token is processed, and ``-1`` / ``"last"`` the
        newest token at every step. The vector must broadcast to the value without changing its
        shape; it is scaled at each call, so a trainable vector can be optimised in a loop.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> insp, ids = Inspector(m.eval()), torch.tensor([[1, 2, 3]])
            >>> before = m(ids, output_hidden_states=True).hidden_states[1]
            >>> with insp.steer("block[0]", torch.ones(32), scale=4.0):
            ...     after = m(ids, output_hidden_states=True).hidden_states[1]
            >>> torch.allclose(after - before, torch.full_like(before, 4.0), atol=1e-5)
            True
        """
        factor = as_factor(scale, "scale")
        tensor = as_value(vector, "vector")
        # The vector is scaled at each call, not here: a trainable vector stays in every
        # forward's graph and its updates count when the same intervention is entered again.
        return self._edits(
            locator,
            EditOp("add", tensor=tensor, factor=factor),
            positions,
            f"steer(scale={factor:g})",
            heads,
            features,
        )

    def ablate(
        self,
        locator: str | Locator,
        mean_over: Any = None,
        positions: Positions = None,
        *,
        heads: Heads = None,
        features: Heads = None,
    ) -> Intervention:
        """Zero what ``locator`` names, or replace it by the mean of ``mean_over``.

        ``mean_over`` is a set of activations (a tensor ``[..., hidden]``, a Record, or a list
        of them) whose mean vector replaces the value (mean ablation).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> insp = Inspector(m.eval())
            >>> with insp.ablate("block[0].mlp"), insp.capture("block[0].mlp") as cap:
            ...     _ = m(torch.tensor([[1, 2, 3]]))
            >>> cap["block[0].mlp"].output.abs().max().item(), cap["block[0].mlp"].edits
            (0.0, ('block[0].mlp: ablate(zero)',))
        """
        if mean_over is None:
            return self._edits(locator, EditOp("zero"), positions, "ablate(zero)", heads, features)
        loc = self.locator(locator)
        site = head_site(loc)
        if site == "pattern":
            raise InterventionError(
                f"mean ablation of {loc} is not defined (its key axis differs between inputs): "
                "ablate it to zero, patch a pattern of this shape, or edit it with a function"
            )
        trailing = 2 if site in HEAD_AXIS else 1
        mean = mean_activation(mean_over, loc.side, trailing)
        return self._edits(
            locator, EditOp("set", tensor=mean), positions, "ablate(mean)", heads, features
        )

    def patch(
        self,
        locator: str | Locator,
        value: Any,
        positions: Positions = None,
        *,
        heads: Heads = None,
        features: Heads = None,
    ) -> Intervention:
        """Replace what ``locator`` names by ``value`` (at ``positions``, or everywhere).

        ``value`` is a full ``[batch, seq, hidden]`` tensor or a Record of the same module from
        another run (patched at the same positions), one row per position (``[len(positions),
        hidden]`` or ``[batch, len(positions), hidden]``), or a vector broadcast to the
        positions.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> insp = Inspector(m.eval())
            >>> clean, corrupted = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 2, 3]])
            >>> with insp.capture("block[0]") as cap:
            ...     clean_logits = m(clean).logits
            >>> with insp.patch("block[0]", cap["block[0]"]):
            ...     patched = m(corrupted).logits
            >>> torch.allclose(patched, clean_logits, atol=1e-5)
            True
        """
        loc = self.locator(locator)
        if isinstance(value, Record):
            value = value.input if loc.side == "input" else value.output
        op = EditOp("set", tensor=as_value(value, "value"))
        return self._edits(locator, op, positions, "patch", heads, features)

    def scale(
        self,
        locator: str | Locator,
        factor: float,
        positions: Positions = None,
        *,
        heads: Heads = None,
        features: Heads = None,
    ) -> Intervention:
        """Multiply what ``locator`` names by ``factor`` while the model runs.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> insp = Inspector(m.eval())
            >>> with insp.scale("block[0].attn", 0.0), insp.capture("block[0].attn") as cap:
            ...     _ = m(torch.tensor([[1, 2, 3]]))
            >>> cap["block[0].attn"].output.abs().max().item()
            0.0
        """
        number = as_factor(factor, "factor")
        return self._edits(
            locator,
            EditOp("scale", factor=number),
            positions,
            f"scale({number:g})",
            heads,
            features,
        )

    def edit(
        self,
        locator: str | Locator,
        fn: Callable[[torch.Tensor, Record], torch.Tensor],
        positions: Positions = None,
        *,
        heads: Heads = None,
        features: Heads = None,
    ) -> Intervention:
        """Replace what ``locator`` names by ``fn(value, record)`` while the model runs.

        ``value`` is the hidden tensor (after earlier edits), ``record`` the call as a Record
        (``args``, ``kwargs``, ``raw_output``, ``attention_mask``); ``fn`` returns a tensor of
        the same shape. With ``positions``, only those positions of the result are used.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> insp = Inspector(m.eval())
            >>> with insp.edit("block[0]", lambda h, rec: -h), insp.capture("block[0]") as cap:
            ...     _ = m(torch.tensor([[1, 2, 3]]))
            >>> rec = cap["block[0]"]
            >>> torch.equal(rec.output, -rec.output_before_edit)
            True
        """
        name = edit_fn_name(fn)
        return self._edits(
            locator, EditOp("fn", fn=fn), positions, f"edit({name})", heads, features
        )

    def patching_sweep(
        self,
        clean: Mapping[str, Any],
        corrupted: Mapping[str, Any],
        metric: Callable[[Any], Any],
        *,
        locators: str | Sequence[str] = "block[:]",
        positions: Sequence[int] | None = None,
        relative: bool = False,
        heads: str | None = None,
    ) -> torch.Tensor:
        """Activation patching over locators x positions: ``[len(locators), len(positions)]``.

        ``heads="each"`` sweeps the heads of head locators instead: ``[len(locators), heads]``
        (every position patched), or ``[len(locators), heads, len(positions)]``.

        ``effect[i, j]`` is ``metric(corrupted run with locator i at position j patched from the
        clean run) - metric(corrupted run)``; ``metric`` maps the model's output to a number
        (e.g. :func:`introspect.logit_difference`). ``relative=True`` divides by
        ``metric(clean) - metric(corrupted)``.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> from introspect import logit_difference
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> insp = Inspector(m.eval())
            >>> clean = {"input_ids": torch.tensor([[1, 2, 3]])}
            >>> corrupted = {"input_ids": torch.tensor([[4, 2, 3]])}
            >>> insp.patching_sweep(clean, corrupted, logit_difference(5, 6)).shape
            torch.Size([2, 3])
        """
        return patching_sweep(
            self,
            clean,
            corrupted,
            metric,
            locators=locators,
            positions=positions,
            relative=relative,
            heads=heads,
        )

    # -- batches ----------------------------------------------------------------------------------

    def encode_batch(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        tokenizer: Any = None,
        *,
        padding_side: PaddingSide = "left",
    ) -> dict[str, torch.Tensor]:
        """Pad prompts into one batch on the model's device, position ids derived from the mask.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
            >>> batch = Inspector(m).encode_batch([[1, 2, 3], [4]])
            >>> batch["attention_mask"].tolist(), batch["position_ids"].tolist()
            ([[1, 1, 1], [0, 0, 1]], [[0, 1, 2], [1, 1, 0]])
        """
        pad_id = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        if tokenizer is not None:
            pad_id = None  # the tokenizer's pad (or end-of-sequence) token wins
        batch = encode_batch(prompts, tokenizer, padding_side=padding_side, pad_token_id=pad_id)
        device = input_device(self.model)  # not meta: accelerate may have offloaded weights
        return {k: v.to(device) for k, v in batch.items()}

    def run_batch(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        tokenizer: Any = None,
        *,
        padding_side: PaddingSide = "left",
        **kwargs: Any,
    ) -> Any:
        """Run prompts of different lengths as one padded batch, each as if it ran alone.

        Passes the attention mask and position ids derived from it (as ``generate`` does):
        without them a left-padded batch shifts rotary and learned positions. Captures around
        it carry the mask: use ``cap.last_token(...)`` / ``cap.real_tokens(...)``.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
            >>> insp = Inspector(m.eval())
            >>> with insp.capture("block[0]") as cap:
            ...     _ = insp.run_batch([[1, 2, 3], [4]])
            >>> cap.last_token("block[0]").shape
            torch.Size([2, 32])
        """
        batch = self.encode_batch(prompts, tokenizer, padding_side=padding_side)
        return self.model(**batch, **kwargs)

    # -- hidden states ------------------------------------------------------------------------

    def num_hidden_states(self, stack: str | None = None) -> int:
        """How many entries Hugging Face's ``hidden_states`` has (usually ``num_blocks + 1``).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> Inspector(m).num_hidden_states()
            3
        """
        return self.view.num_hidden_states(stack)

    def hidden_state_locator(self, i: int, stack: str | None = None) -> Locator:
        """Which locator yields Hugging Face's ``hidden_states[i]`` (negative ``i`` allowed).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> insp = Inspector(m)
            >>> [str(insp.hidden_state_locator(i)) for i in range(3)]
            ['block[0].input', 'block[0]', 'final_norm']
        """
        return self.view.hidden_state_locator(i, stack)

    def hidden_states(
        self,
        *args: Any,
        indices: Sequence[int] | None = None,
        stack: str | None = None,
        **inputs: Any,
    ) -> tuple[torch.Tensor, ...]:
        """Run the model and return what HF ``output_hidden_states`` returns, built by hooks.

        ``indices`` keeps only those entries (in that order); the forward stops as soon as
        they are recorded. ``stack`` picks ``encoder``/``decoder`` on encoder-decoder models.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
            >>> m, ids = GPT2LMHeadModel(cfg).eval(), torch.tensor([[1, 2, 3]])
            >>> ours = Inspector(m).hidden_states(input_ids=ids)
            >>> theirs = m(ids, output_hidden_states=True).hidden_states
            >>> all(torch.allclose(a, b) for a, b in zip(ours, theirs))
            True
        """
        if not args and not inputs:
            raise CaptureError(
                "hidden_states() runs the model: pass its inputs, e.g. "
                "insp.hidden_states(input_ids=ids) or insp.hidden_states(**batch)"
            )
        self._first_use.refuse_failed()
        layout = self.view.hidden_layout(stack)
        wanted = list(range(len(layout))) if indices is None else list(indices)
        locs = [self.hidden_state_locator(i, stack) for i in wanted]
        # No clone could prove the layout: prove it on this forward, against HF's own entries.
        lazy = self._first_use.deferred
        with self.capture(*locs, stop=not lazy) as cap:
            output = self.model(*args, **inputs, **({"output_hidden_states": True} if lazy else {}))
        values = [
            self.view.hidden_state_of(loc, cap[str(loc.with_side("output"))], stack) for loc in locs
        ]
        if lazy:
            count = len(layout)
            self._first_use.forward(output, values, wanted, locs, self.view.stack_key(stack), count)
        return tuple(values)

    # -- after the last block ------------------------------------------------------------------

    def apply_final_norm(self, hidden: torch.Tensor, stack: str | None = None) -> torch.Tensor:
        """The final norm as Hugging Face applies it (identity where there is none).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> h = torch.randn(1, 3, 32)
            >>> torch.equal(Inspector(m).apply_final_norm(h), m.transformer.ln_f(h))
            True
        """
        return self.view.apply_final_norm(hidden, stack)

    def finish(self, hidden: torch.Tensor, stack: str | None = None) -> torch.Tensor:
        """Everything HF applies after the last block before ``hidden_states[-1]``.

        The final norm and, on e.g. OPT with ``word_embed_proj_dim``, ``project_out``.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> h = torch.randn(1, 3, 32)
            >>> torch.equal(Inspector(m).finish(h), m.transformer.ln_f(h))
            True
        """
        return self.view.finish(hidden, stack)

    def logits(self, hidden: torch.Tensor, *, finished: bool = False) -> torch.Tensor:
        """What the model would predict from ``hidden`` (a main-stack residual stream).

        Applies the final norm (and anything else HF applies after the last block), the
        unembedding and the architecture's extras (soft-capping, logit scales). Pass
        ``finished=True`` when ``hidden`` already went through the final norm (e.g. HF's
        ``hidden_states[-1]``).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> insp, ids = Inspector(m), torch.tensor([[1, 2, 3]])
            >>> with insp.capture("block[-1]") as cap:
            ...     out = m(ids)
            >>> torch.allclose(insp.logits(cap["block[-1]"].output), out.logits, atol=1e-5)
            True
        """
        return self.view.logits(hidden, finished=finished)

    def logit_lens(
        self,
        inputs: str | torch.Tensor | Mapping[str, Any],
        *,
        tokenizer: Any = None,
        positions: Sequence[int] | None = None,
        k: int = 5,
        blocks: Sequence[int | str] | None = None,
        include_embed: bool = False,
        keep_logits: bool = True,
        batch_index: int = 0,
        targets: Sequence[int | str] | None = None,
        tuned: Translators | None = None,
    ) -> LensResult:
        """The logit lens: every block's output read through what follows the last block.

        Uses :meth:`logits` (final norm, unembedding and the architecture's extras), so the
        last block reproduces the model's own logits. ``targets`` are tokens to follow through
        the blocks (ids, or their exact text with a tokenizer). ``tuned`` (a
        :class:`~introspect.TunedLens`) reads each row through its trained translator first:
        the tuned lens. See :func:`introspect._analysis.lens.logit_lens`.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> lens = Inspector(m.eval()).logit_lens(torch.tensor([[1, 2, 3]]), k=3)
            >>> lens.rows, lens.top_ids.shape, lens.max_diff < 1e-4
            (['block[0]', 'block[1]'], torch.Size([2, 3, 3]), True)
        """

        return logit_lens(
            self,
            inputs,
            tokenizer=tokenizer,
            positions=positions,
            k=k,
            blocks=blocks,
            include_embed=include_embed,
            keep_logits=keep_logits,
            batch_index=batch_index,
            targets=targets,
            tuned=tuned,
        )

    def direct_logit_attribution(
        self,
        inputs: str | torch.Tensor | Mapping[str, Any],
        token: int | str,
        position: int = -1,
        *,
        per_head: bool = False,
        tokenizer: Any = None,
    ) -> Attribution:
        """Each component's direct contribution to ``token``'s logit at ``position``.

        Labels are ``"embed"``, ``"block[i].attn"``, ``"block[i].mlp"`` (or, with
        ``per_head=True``, ``"block[i].attn.head[h]"``) and ``"bias"`` (everything that does not
        depend on the input). Each term goes through the final norm with its scale frozen at
        this forward's value and through the unembedding; the values sum to the model's own
        logit (checked at every call). Architectures whose stream is not such a sum (post-norm
        BERT, Mamba, RWKV) or whose head is not linear after the norm (soft-capping) are refused
        with the reason. See :mod:`introspect._analysis.attribution`.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
            >>> dla = Inspector(m.eval()).direct_logit_attribution(torch.tensor([[1, 2, 3]]), 9)
            >>> abs(float(dla.values.sum()) - dla.logit) < 1e-4
            True
        """
        return direct_logit_attribution(
            self, inputs, token, position, per_head=per_head, tokenizer=tokenizer
        )

    def attribution_patching(
        self,
        clean: Mapping[str, Any],
        corrupted: Mapping[str, Any],
        metric: Callable[[Any], Any],
        **options: Any,
    ) -> torch.Tensor:
        """:meth:`patching_sweep`'s table estimated to first order from two forwards and one
        backward (AtP; with ``qk_fix=True`` the query and key cells through the exact softmax,
        AtP*): same arguments, shape and order, so the two compare cell by cell.
        ``grad_drop=True`` adds AtP*'s GradDrop (one backward pass per block; magnitudes, to
        compare with ``|exact|``). See :func:`introspect._analysis.atp.attribution_patching`.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> from introspect import logit_difference
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> insp = Inspector(m.eval())
            >>> clean = {"input_ids": torch.tensor([[1, 2, 3]])}
            >>> corrupted = {"input_ids": torch.tensor([[4, 2, 3]])}
            >>> insp.attribution_patching(clean, corrupted, logit_difference(5, 6)).shape
            torch.Size([2, 3])
        """
        return attribution_patching(self, clean, corrupted, metric, **options)

    # -- weight-based head circuits (introspect._analysis.circuits owns them) ------------------------------

    def ov(self, block: int, head: int, *, fold_norm: bool = True) -> FactoredMatrix:
        """Head ``head`` of ``block``: ``W_OV = W_V @ W_O`` ``[d_model, d_model]``, factored.

        ``x @ ov.AB`` is what the head writes to the stream for value input ``x`` (row
        vectors, biases ignored); ``fold_norm`` folds the gain of the norm the attention reads
        into ``W_V``. Read from the model's own q/k/v and ``o`` (any projection layout, grouped
        key/value heads included). See :mod:`introspect._analysis.circuits`.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
            >>> ov = Inspector(m.eval()).ov(1, 3)
            >>> ov.shape, ov.inner_dim, len(ov.singular_values())
            (torch.Size([32, 32]), 8, 8)
        """
        return head_ov(self, block, head, fold_norm=fold_norm)

    def qk(self, block: int, head: int, *, fold_norm: bool = True) -> FactoredMatrix:
        """Head ``head`` of ``block``: ``W_QK = W_Q @ W_K.T`` ``[d_model, d_model]``, factored.

        ``x_q @ qk.AB @ x_k`` is ``q · k`` before the attention's scaling, mask and position
        bias. On rotary models it is the form before the rotation (relative position 0), and a
        :class:`~introspect._analysis.circuits.RotaryWarning` says so. See :mod:`introspect._analysis.circuits`.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
            >>> Inspector(m.eval()).qk(0, -1, fold_norm=False).rank
            8
        """
        return head_qk(self, block, head, fold_norm=fold_norm, stacklevel=3)

    def composition_scores(self, kind: str, *, fold_norm: bool = True) -> torch.Tensor:
        """Q-, K- or V-composition (``kind``) of every earlier head with every later one,
        ``[blocks, heads, blocks, heads]`` (0 unless the second block is later), as
        TransformerLens's ``all_composition_scores``. See :mod:`introspect._analysis.circuits`.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64))
            >>> Inspector(m.eval()).composition_scores("K").shape
            torch.Size([3, 4, 3, 4])
        """
        return composition_scores(self, kind, fold_norm=fold_norm, stacklevel=3)

    # -- sparse autoencoders ----------------------------------------------------------------------

    def splice(
        self,
        sae: SparseAutoencoder,
        at: str | Locator | None = None,
        *,
        error_term: bool = False,
        **feature_edits: Any,
    ) -> Splice:
        """Replace the value at ``at`` (default: the SAE's own site) by the SAE's reconstruction.

        An intervention like every edit (same positions, threads and generation rules). With
        ``error_term=True`` the forward is unchanged while gradients reach the features. The
        returned :class:`~introspect._sae.Splice` holds the last call's ``features``
        (``[batch, seq, d_sae]``); ``features_fn=``, ``features=``, ``ablate_features=``,
        ``steer_features=`` and ``positions=`` edit them (see :func:`introspect._sae.splice`).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> from introspect import SparseAutoencoder
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> insp, ids = Inspector(m.eval()), torch.tensor([[1, 2, 3]])
            >>> sae = SparseAutoencoder(32, 64, architecture="topk", k=8)
            >>> with torch.no_grad(), insp.splice(sae, "block[0]", ablate_features=[3]) as sp:
            ...     _ = m(ids)
            >>> sp.features.shape, bool((sp.features[..., 3] == 0).all())
            (torch.Size([1, 3, 64]), True)
        """
        sites = self._resolver.sae_sites
        return splice(self, sae, at, error_term=error_term, sites=sites, **feature_edits)

    def evaluate_sae(
        self,
        sae: SparseAutoencoder,
        inputs: Any,
        *,
        at: str | Locator | None = None,
        skip_first: int = 0,
    ) -> SAEEvaluation:
        """CE and KL loss scores, L0, explained variance and dead latents of ``sae`` on
        ``inputs``, leaving the first ``skip_first`` positions of each sequence alone (see
        :func:`introspect._sae.evaluate_sae`).

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> from introspect import SparseAutoencoder
            >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
            >>> sae = SparseAutoencoder(32, 64, architecture="topk", k=8)
            >>> Inspector(m.eval()).evaluate_sae(sae, torch.tensor([[1, 2, 3, 4]]), at="block[0]").tokens
            4
        """
        return evaluate_sae(self, sae, inputs, at=at, skip_first=skip_first)

    def __repr__(self) -> str:
        return (
            f"Inspector({type(self.model).__name__}, adapter={self.adapter.name!r}, "
            f"num_blocks={self.num_blocks})"
        )


def get_hidden_state(
    model: nn.Module, tokenizer: Any, prompt: str, layer_index: int
) -> dict[str, Any]:
    """The original notebook's function: what block ``layer_index`` saw and returned.

    Returns ``{"args": ..., "kwargs": ..., "output": ...}`` exactly as a forward hook with
    ``with_kwargs=True`` sees them (``output`` is a tuple on transformers 4.x GPT-2, a tensor
    on 5.x). Negative ``layer_index`` counts from the end.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> tok = lambda text, return_tensors: {"input_ids": torch.tensor([[1, 2, 3]])}
        >>> sorted(get_hidden_state(m, tok, "hi", -1))
        ['args', 'kwargs', 'output']
    """
    insp = Inspector(model)
    locator = insp.locator(f"block[{int(layer_index)}]")
    inputs = tokenizer(prompt, return_tensors="pt")
    device = input_device(model)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with insp.capture(locator) as cap, torch.no_grad():
        model(**inputs)
    rec = cap[str(locator)]
    return {"args": rec.args, "kwargs": rec.kwargs, "output": rec.raw_output}
