"""Conformance checks: what "supported" means, for our adapters and for plugin authors.

``check_conformance(model, inputs)`` proves an adapter against Hugging Face's own outputs:

- ``Inspector(model).hidden_states(...)`` equals HF ``output_hidden_states`` entry by entry;
- ``hidden_state_locator(i)`` names the entry for every ``i``, negative included;
- ``hidden_states[-1]`` equals what the adapter says HF applies after the last block;
- ``logits(last block output)`` equals the model's logits (when there is a head);
- every locator the adapter declares resolves and is recorded during the forward;
- where the spec's own data states how a block combines its sub-layers
  (:func:`block_relation`), that ``attn``/``mlp`` are the modules whose outputs the block adds
  (:func:`check_block_sums`).

``assert_conformant`` raises :class:`~introspect._errors.ConformanceError` saying which entry
differs and by how much. :func:`check_block_sums` (with a relation the caller states) and
:func:`check_logit_ops` prove the sub-modules and the logit extras of one configuration; they
return :class:`Check` lists that :func:`assert_checks` turns into an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

from introspect._errors import ConformanceError, LocatorError, MissingPartError
from introspect._headproof import head_checks, recompute_pattern
from introspect._inspector import Inspector
from introspect._proof import (
    Check,
    block_checks,
    check_lines,
    close,
    diff,
    example_inputs,
    perturb,
)
from introspect._spec import AdapterSpec, LogitOp, StackSpec
from introspect._tiny import EXTRA_OVERRIDES, tiny_config

__all__ = [
    "EXTRA_OVERRIDES",
    "BlockRelation",
    "Check",
    "ConformanceReport",
    "assert_checks",
    "assert_classes_conformant",
    "assert_conformant",
    "block_relation",
    "build_tiny",
    "check_block_sums",
    "check_conformance",
    "check_heads",
    "check_logit_ops",
    "close",
    "example_inputs",
    "perturb",
    "recompute_pattern",
    "tiny_config",
]


@dataclass
class ConformanceReport:
    """Every check run on one model; ``passed`` is true when all held."""

    adapter: str
    model: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def describe(self) -> str:
        """A multi-line summary of every check, failures first."""
        lines = [
            f"{self.model} with adapter {self.adapter!r}: "
            f"{'conformant' if self.passed else f'{len(self.failures)} check(s) failed'}"
        ]
        return "\n".join([*lines, *check_lines(self.checks)])


def assert_checks(checks: Iterable[Check], what: str = "checks") -> list[Check]:
    """Raise ConformanceError listing the failures among ``checks``; return them all if none.

    An empty list is an error too: a check that ran nothing proved nothing.

    Example:
        >>> [c.name for c in assert_checks([Check("sum", True)])]
        ['sum']
        >>> assert_checks([Check("sum", False, 0.5, "block[1]")], "block sums")
        Traceback (most recent call last):
        ...
        introspect._errors.ConformanceError: block sums: 1 of 1 check(s) failed
          FAIL sum: max |diff| 0.5 (block[1])
    """
    checks = list(checks)
    failures = [c for c in checks if not c.passed]
    if not checks:
        raise ConformanceError(f"{what}: nothing was checked")
    if failures:
        head = f"{what}: {len(failures)} of {len(checks)} check(s) failed"
        raise ConformanceError("\n".join([head, *check_lines(checks)]))
    return checks


BlockRelation = Literal["sequential", "parallel", "post_norms", "residual_in"]
"""How a block combines its input with its sub-layers (see :func:`check_block_sums`)."""

_RELATIONS: tuple[str, ...] = get_args(BlockRelation)


def block_relation(spec: StackSpec) -> BlockRelation | None:
    """The block relation ``spec``'s own data states, or ``None`` where it states none.

    - ``"residual_in"``: the spec says ``mlp``'s output already includes the residual stream
      (``residual_in``), so it is the block's output (BLOOM, MPT, BERT);
    - ``"post_norms"``: the spec names ``post_attn_norm`` and ``post_mlp_norm`` parts, the
      norms whose outputs the block adds (Gemma-2, OLMo-2, GLM-4).

    A pre-norm block gets ``None``: sequential and parallel blocks have the same spec data,
    and so do blocks that scale their sub-layers (Granite's ``residual_multiplier``) or
    normalise after them (DistilBERT). Their tests state the relation to
    :func:`check_block_sums`.

    Example:
        >>> block_relation(StackSpec(blocks="h", attn="attn", mlp="mlp", residual_in=("mlp",)))
        'residual_in'
        >>> print(block_relation(StackSpec(blocks="h", attn="attn", mlp="mlp")))
        None
    """
    if spec.attn is None or spec.mlp is None:
        return None
    if "mlp" in spec.residual_in:
        return "residual_in"
    if {"post_attn_norm", "post_mlp_norm"} <= spec.parts.keys():
        return "post_norms"
    return None


def _resolves(insp: Inspector, locator: str) -> bool:
    try:
        insp.module(locator)
    except (MissingPartError, LocatorError):
        return False
    return True


def check_block_sums(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    relation: BlockRelation,
    adapter: str | AdapterSpec | None = None,
    stack: str | None = None,
    blocks: Iterable[int] | None = None,
    scale: float = 1.0,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> list[Check]:
    """Prove that ``attn`` and ``mlp`` are the modules whose outputs each block adds.

    ``relation`` says how the block combines them (``x`` its input, ``s`` = ``scale``):

    - ``"sequential"``: output == x + s * (attn + mlp), and ``mlp_norm`` (where the adapter
      names one) reads x + s * attn: the MLP runs on the stream after attention;
    - ``"parallel"``: the same sum, but the MLP reads the block's input: ``mlp_norm`` reads x,
      or, with one shared norm, ``mlp`` reads what ``attn_norm`` returned;
    - ``"post_norms"``: ``post_attn_norm`` reads attn and ``post_mlp_norm`` reads mlp, output
      == x + s * (post_attn_norm + post_mlp_norm), and the MLP side (``mlp_norm``, else
      ``mlp``) reads x + s * post_attn_norm;
    - ``"residual_in"``: ``mlp``'s output includes the residual stream and is the block's
      output; where ``attn``'s does not, ``mlp_norm`` reads x + s * attn.

    ``blocks`` (default: all) are indices into ``stack`` (default: the main stack); ``scale``
    is a multiplier the block applies to each sub-layer (Granite's ``residual_multiplier``).
    Runs the model once; returns one :class:`Check` per relation and block.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = build_tiny(GPT2LMHeadModel, GPT2Config(n_layer=2, n_embd=32, n_head=2,
        ...                                            vocab_size=64))
        >>> checks = check_block_sums(m, {"input_ids": torch.tensor([[1, 2, 3]])},
        ...                           relation="sequential")
        >>> [(c.name, c.passed) for c in checks[:2]]
        [('block[0] == input + attn + mlp', True), ('block[0].mlp_norm reads input + attn', True)]
        >>> [c.passed for c in check_block_sums(m, {"input_ids": torch.tensor([[1, 2, 3]])},
        ...                                     relation="parallel", blocks=[-1])]
        [True, False]
    """
    if relation not in _RELATIONS:
        raise ValueError(f"relation must be one of {', '.join(_RELATIONS)}, got {relation!r}")
    insp = Inspector(model, adapter, prove=False)
    label = f"{stack}." if stack else ""
    n = insp.num_blocks_in(stack)
    indices = sorted({i % n for i in (range(n) if blocks is None else blocks)})
    parts = {
        "sequential": ("attn", "mlp"),
        "parallel": ("attn", "mlp"),
        "post_norms": ("attn", "mlp", "post_attn_norm", "post_mlp_norm"),
        "residual_in": ("attn", "mlp"),
    }[relation]
    optional = ("attn_norm", "mlp_norm")
    first = f"{label}block[{indices[0]}]"
    present = [p for p in optional if _resolves(insp, f"{first}.{p}")]
    names = [f"{label}block[{i}]{'.' + p if p else ''}" for i in indices for p in ("", *parts)]
    names += [f"{label}block[{i}].{p}" for i in indices for p in present]
    with torch.no_grad(), insp.capture(*names) as cap:
        model(**inputs)
    s = "" if scale == 1.0 else f"{scale:g} * "
    checks: list[Check] = []

    def scaled(terms: str) -> str:
        return terms if not s else f"{s}({terms})"

    def add(name: str, ours: Any, expected: Any) -> None:
        checks.append(Check(name, close(ours, expected, atol, rtol), diff(ours, expected)))

    for i in indices:
        block = f"{label}block[{i}]"
        x, out = cap[block].input, cap[block].output
        attn, mlp = cap[f"{block}.attn"].output, cap[f"{block}.mlp"].output
        if relation in ("sequential", "parallel"):
            add(f"{block} == input + {scaled('attn + mlp')}", out, x + scale * (attn + mlp))
        if relation == "sequential" and "mlp_norm" in present:
            add(
                f"{block}.mlp_norm reads input + {s}attn",
                cap[f"{block}.mlp_norm"].input,
                x + scale * attn,
            )
        if relation == "parallel":
            if "mlp_norm" in present:
                add(f"{block}.mlp_norm reads input", cap[f"{block}.mlp_norm"].input, x)
            elif "attn_norm" in present:
                add(
                    f"{block}.mlp reads attn_norm",
                    cap[f"{block}.mlp"].input,
                    cap[f"{block}.attn_norm"].output,
                )
        if relation == "post_norms":
            post_attn = cap[f"{block}.post_attn_norm"]
            post_mlp = cap[f"{block}.post_mlp_norm"]
            add(f"{block}.post_attn_norm reads attn", post_attn.input, attn)
            add(f"{block}.post_mlp_norm reads mlp", post_mlp.input, mlp)
            add(
                f"{block} == input + {scaled('post_attn_norm + post_mlp_norm')}",
                out,
                x + scale * (post_attn.output + post_mlp.output),
            )
            reader = f"{block}.mlp_norm" if "mlp_norm" in present else f"{block}.mlp"
            add(
                f"{reader} reads input + {s}post_attn_norm",
                cap[reader].input,
                x + scale * post_attn.output,
            )
        if relation == "residual_in":
            add(f"{block} == mlp", out, mlp)
            spec = insp.adapter.stack(stack)
            if "attn" not in spec.residual_in and "mlp_norm" in present:
                add(
                    f"{block}.mlp_norm reads input + {s}attn",
                    cap[f"{block}.mlp_norm"].input,
                    x + scale * attn,
                )
    return checks


def _describe_step(step: LogitOp | str) -> str:
    if isinstance(step, str):
        return f"module {step}"
    source = step.config_attr or step.tensor or step.value
    return f"{step.kind} by {source}" + (f" ** {step.power:g}" if step.power != 1.0 else "")


def check_logit_ops(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    adapter: str | AdapterSpec | None = None,
    min_effect: float = 1e-2,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> list[Check]:
    """Prove that each step the adapter adds around the head is needed for the model's logits.

    The steps are ``pre_head`` ops, ``head_modules`` and ``logit_ops``. The logits from the last
    block must equal the model's, and leaving out any one step must move them by more than
    ``min_effect`` (a thousand times the default ``atol``). A step that does not apply to this
    model (its config value is ``None``) fails, as does an adapter with no steps: use a config
    where every step matters (``logits_scaling=4.0``, not Granite's default 1.0). Not part of
    :func:`check_conformance`, because defaults often make a step a no-op.

    Example:
        >>> from transformers import CohereConfig, CohereForCausalLM
        >>> cfg = CohereConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
        ...                    num_attention_heads=4, vocab_size=64, logit_scale=0.5,
        ...                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
        >>> checks = check_logit_ops(build_tiny(CohereForCausalLM, cfg),
        ...                          {"input_ids": torch.tensor([[3, 4, 5]])})
        >>> [(c.name, c.passed) for c in checks]  # doctest: +NORMALIZE_WHITESPACE
        [('logits(block[-1].output) == model logits', True),
         ('logits without logit_ops[0] (scale by logit_scale) differ', True)]
    """
    insp = Inspector(model, adapter, prove=False)
    spec = insp.adapter
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        reference = model(**inputs)
    if "logits" not in reference:
        return [Check("model logits", False, float("inf"), "the model returns no logits")]
    theirs, last = reference["logits"], cap["block[-1]"].output
    with torch.no_grad():
        ours = insp.logits(last)
    checks = [
        Check(
            "logits(block[-1].output) == model logits",
            close(ours, theirs, atol * 10, rtol * 10),
            diff(ours, theirs),
        )
    ]
    steps: list[tuple[str, int, LogitOp | str]] = [
        (name, i, step)
        for name in ("pre_head", "head_modules", "logit_ops")
        for i, step in enumerate(getattr(spec, name))
    ]
    if not steps:
        detail = f"adapter {spec.name!r} declares no pre_head, head_modules or logit_ops"
        return [*checks, Check("logit steps declared", False, float("inf"), detail)]
    for name, i, step in steps:
        title = f"logits without {name}[{i}] ({_describe_step(step)}) differ"
        if isinstance(step, LogitOp) and step.value_for(model) is None:
            detail = "it does not apply to this model (its config value or tensor is missing)"
            checks.append(Check(title, False, 0.0, detail))
            continue
        kept = tuple(other for j, other in enumerate(getattr(spec, name)) if j != i)
        with torch.no_grad():
            without = Inspector(model, spec.derive(**{name: kept}), prove=False).logits(last)
        effect = diff(without, theirs)
        checks.append(Check(title, effect > min_effect, effect, f"needs more than {min_effect:g}"))
    return checks


def check_conformance(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    adapter: str | AdapterSpec | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> ConformanceReport:
    """Run every conformance check on ``model`` with ``inputs``; never raises on a mismatch.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> report = check_conformance(m.eval(), {"input_ids": torch.tensor([[1, 2, 3]])})
        >>> report.passed
        True
    """
    insp = Inspector(model, adapter, prove=False)
    report = ConformanceReport(insp.adapter.name, type(model).__name__)
    report.checks.extend(block_checks(insp, model, inputs, atol=atol, rtol=rtol))
    for stack in insp.adapter.stack_names:
        relation = block_relation(insp.adapter.stack(stack))
        if relation is not None:
            report.checks.extend(
                check_block_sums(
                    model,
                    inputs,
                    relation=relation,
                    adapter=insp.adapter,
                    stack=stack,
                    atol=atol,
                    rtol=rtol,
                )
            )
    return report


def assert_conformant(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    adapter: str | AdapterSpec | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> ConformanceReport:
    """Like :func:`check_conformance`, but raise ConformanceError naming what differs.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> _ = assert_conformant(LlamaForCausalLM(cfg).eval(),
        ...                       {"input_ids": torch.tensor([[1, 2, 3]])})
    """
    report = check_conformance(model, inputs, adapter=adapter, atol=atol, rtol=rtol)
    if not report.passed:
        raise ConformanceError(report.describe())
    return report


def check_heads(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    adapter: str | AdapterSpec | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    head: int = 1,
) -> list[Check]:
    """Prove every head locator of every attention part with a head layout, block by block.

    - ``pattern`` equals Hugging Face's own ``output_attentions`` (run under eager attention);
    - ``softmax(q·kᵀ·scaling + mask)`` recomputed from the captured ``q``/``k`` and the
      arguments the attention function received reproduces ``pattern``;
    - ``result.sum(heads) + bias`` equals the output projection ``o``'s output, and ``o``
      applied to ``z`` reproduces it;
    - ``ablate(z, heads=[head])`` equals ``o`` run on ``z`` with that head zeroed.

    Where the architecture computes attention inline (``q``/``k``/``v``/``pattern``
    unavailable), the checks of ``z``, ``result`` and the ablation still run.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64)).eval()
        >>> checks = check_heads(m, {"input_ids": torch.tensor([[1, 2, 3]])})
        >>> all(c.passed for c in checks), len(checks) > 8
        (True, True)
    """
    insp = Inspector(model, adapter, prove=False)
    return head_checks(insp, model, inputs, atol=atol, rtol=rtol, head=head)


def build_tiny(model_cls: Any, config: Any, seed: int = 0) -> nn.Module:
    """Build ``model_cls(config)`` with a fixed seed, perturb its weights, put it in eval mode.

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> build_tiny(GPT2Model, GPT2Config(n_layer=1, n_embd=32, n_head=2)).training
        False
    """
    torch.manual_seed(seed)
    model: nn.Module = model_cls(config)
    perturb(model, seed=seed)
    return model.eval()


def assert_classes_conformant(
    config: Any,
    classes: list[Any],
    *,
    inputs: Mapping[str, Any] | None = None,
    adapter: str | AdapterSpec | None = None,
    expect_adapter: str | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> list[ConformanceReport]:
    """Build each class from ``config`` (tiny, perturbed) and assert it conforms.

    ``expect_adapter`` also checks which adapter the plugins picked.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model
        >>> cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
        >>> [r.adapter for r in assert_classes_conformant(cfg, [GPT2Model, GPT2LMHeadModel])]
        ['gpt2', 'gpt2']
    """
    reports = []
    for cls in classes:
        model = build_tiny(cls, config)
        report = assert_conformant(
            model,
            inputs or example_inputs(config, model=model),
            adapter=adapter,
            atol=atol,
            rtol=rtol,
        )
        if expect_adapter is not None and report.adapter != expect_adapter:
            raise ConformanceError(
                f"{cls.__name__} got adapter {report.adapter!r}, expected {expect_adapter!r}"
            )
        reports.append(report)
    return reports
