"""Conformance checks: what "supported" means, for our adapters and for plugin authors.

``check_conformance(model, inputs)`` proves an adapter against Hugging Face's own outputs:

- ``Inspector(model).hidden_states(...)`` equals HF ``output_hidden_states`` entry by entry;
- ``hidden_state_locator(i)`` names the entry for every ``i``, negative included;
- ``hidden_states[-1]`` equals what the adapter says HF applies after the last block;
- ``logits(last block output)`` equals the model's logits (when there is a head);
- every locator the adapter declares resolves and is recorded during the forward.

``assert_conformant`` raises :class:`~introspect._errors.ConformanceError` saying which entry
differs and by how much.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from introspect._errors import ConformanceError
from introspect._inspector import Inspector
from introspect._spec import AdapterSpec
from introspect._tiny import tiny_config

__all__ = [
    "Check",
    "ConformanceReport",
    "assert_classes_conformant",
    "assert_conformant",
    "build_tiny",
    "check_conformance",
    "close",
    "example_inputs",
    "perturb",
    "tiny_config",
]


@dataclass(frozen=True)
class Check:
    """One conformance check: what it compared, whether it held, and the largest difference."""

    name: str
    passed: bool
    max_diff: float = 0.0
    detail: str = ""


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
        for c in sorted(self.checks, key=lambda c: c.passed):
            mark = "ok  " if c.passed else "FAIL"
            lines.append(
                f"  {mark} {c.name}: max |diff| {c.max_diff:.3g}"
                + (f" ({c.detail})" if c.detail else "")
            )
        return "\n".join(lines)


def perturb(model: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Add small noise to every parameter so unit norms and zero biases hide nothing.

    Example:
        >>> lin = nn.LayerNorm(4)
        >>> bool(perturb(lin).weight.ne(1).all())
        True
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_(noise.to(param.dtype).to(param.device) * scale)
    return model


def _diff(a: Any, b: Any) -> float:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return float("inf")
    if a.shape != b.shape:
        return float("inf")
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def close(a: Any, b: Any, atol: float, rtol: float) -> bool:
    """Whether ``a`` and ``b`` are tensors of one shape that ``torch.allclose`` (as float).

    Example:
        >>> close(torch.ones(2), torch.ones(2) + 1e-7, 1e-6, 0.0)
        True
    """
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and torch.allclose(a.detach().float(), b.detach().float(), atol=atol, rtol=rtol)
    )


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _hf_hidden_states(output: Any, stack: str | None, spec: AdapterSpec) -> Any:
    # An encoder-only model (T5EncoderModel) names its one stack "encoder" but HF reports
    # plain hidden_states.
    if stack == "encoder" and "encoder_hidden_states" in output:
        return output["encoder_hidden_states"]
    if "decoder_hidden_states" in output and spec.encoder is not None:
        return output["decoder_hidden_states"]
    return output["hidden_states"]


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
    insp = Inspector(model, adapter)
    report = ConformanceReport(insp.adapter.name, type(model).__name__)
    add = report.checks.append
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True)
        for stack in insp.adapter.stack_names:
            label = f"{stack}." if stack else ""
            theirs = _hf_hidden_states(reference, stack, insp.adapter)
            ours = insp.hidden_states(**inputs, stack=stack)
            n = len(theirs)
            if len(ours) != n:
                add(
                    Check(
                        f"{label}hidden_states length",
                        False,
                        float("inf"),
                        f"ours {len(ours)}, Hugging Face {n}",
                    )
                )
                continue
            for i in range(n):
                loc = insp.hidden_state_locator(i, stack)
                negative = insp.hidden_state_locator(i - n, stack)
                ok = close(ours[i], theirs[i], atol, rtol) and loc == negative
                add(
                    Check(
                        f"{label}hidden_states[{i}]",
                        ok,
                        _diff(ours[i], theirs[i]),
                        f"locator {loc}; ours {_shape(ours[i])}, HF {_shape(theirs[i])}",
                    )
                )
            # The documented relation between the last block and the last entry.
            spec = insp.adapter.stack(stack)
            last_block = f"{label}block[-1]"
            with insp.capture(last_block) as cap:
                model(**inputs)
            raw = cap[last_block].output
            if spec.hidden_states_start == "block_input" or spec.after_blocks:
                finished = insp.finish(raw, stack)
                add(
                    Check(
                        f"{label}hidden_states[-1] == finish(block[-1].output)",
                        close(finished, theirs[-1], atol, rtol),
                        _diff(finished, theirs[-1]),
                        " -> ".join(["block[-1]", *spec.after_blocks]),
                    )
                )
            if stack == insp.adapter.stack_name and "logits" in reference:
                try:
                    insp.module("lm_head")
                except Exception as exc:  # a head the adapter cannot find is a failure
                    add(Check("logits(block[-1].output)", False, float("inf"), str(exc)))
                else:
                    logits = insp.logits(raw)
                    add(
                        Check(
                            "logits(block[-1].output) == model logits",
                            close(logits, reference["logits"], atol * 10, rtol * 10),
                            _diff(logits, reference["logits"]),
                        )
                    )
            locs = insp.locators(stack)
            with insp.capture(*locs) as cap:
                model(**inputs)
            missing = [str(loc) for loc in locs if str(loc) not in cap]
            add(
                Check(
                    f"{label}every locator resolves and records",
                    not missing,
                    0.0,
                    f"not recorded: {', '.join(missing)}" if missing else f"{len(locs)} locators",
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


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return True
    return name in parameters


def example_inputs(
    config: Any, batch: int = 2, seq: int = 7, seed: int = 0, model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Random token inputs for a model built from ``config`` (decoder ids on seq2seq).

    Given ``model``, decoder ids are added only where its forward takes them (a
    ``T5EncoderModel`` has a seq2seq config but no decoder).

    Example:
        >>> from transformers import GPT2Config
        >>> sorted(example_inputs(GPT2Config(vocab_size=64)))
        ['attention_mask', 'input_ids']
    """
    generator = torch.Generator().manual_seed(seed)
    text_config = getattr(config, "get_text_config", lambda: config)()
    vocab = int(getattr(text_config, "vocab_size", 0) or getattr(config, "vocab_size", 64))
    ids = torch.randint(3, max(vocab, 4), (batch, seq), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    wants_decoder = model is None or _accepts(model, "decoder_input_ids")
    if getattr(config, "is_encoder_decoder", False) and wants_decoder:
        inputs["decoder_input_ids"] = torch.randint(
            3, max(vocab, 4), (batch, max(seq - 2, 2)), generator=generator
        )
    return inputs


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
