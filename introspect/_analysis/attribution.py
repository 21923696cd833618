"""Direct logit attribution: how much each component writes into one token's logit.

The residual stream entering the final norm is a sum: the embedding stream (``hidden_states[0]``)
plus, for every block, what its attention and its MLP add. Each term is read through the final
norm *with its scale frozen* at this forward's value (the TransformerLens convention: the norm's
division by the stream's spread is fixed, so the norm is affine and each term's share is
defined), then through the unembedding column of the token. Whatever does not depend on the
input (the norm's and the head's bias, an output projection's bias with ``per_head=True``, a
constant logit offset) is the ``bias`` term. With that convention the values **sum to the
model's own logit**; every call checks it, and checks that the stream is the sum of its terms,
so a model where either fails is refused with the reason, never answered approximately.

Refused: blocks that do not add their sub-layers' outputs to the stream (post-norm BERT,
Mamba, RWKV), a final norm that is neither a LayerNorm nor an RMSNorm, soft-capped logits and
heads with non-linear layers (DistilBERT's ``vocab_transform``).

Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from introspect import Inspector
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64)).eval()
    >>> dla = Inspector(model).direct_logit_attribution(torch.tensor([[1, 2, 3]]), token=5)
    >>> dla.labels
    ['embed', 'block[0].attn', 'block[0].mlp', 'block[1].attn', 'block[1].mlp', 'bias']
    >>> abs(float(dla.values.sum()) - dla.logit) < 1e-4
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from introspect._errors import CaptureError
from introspect._hooks.session import onloaded
from introspect._html import attribution_view, forced, save_view
from introspect._spec import LogitOp
from introspect._text import as_token_id, model_inputs_of

if TYPE_CHECKING:
    from introspect._model.view import Analysable

__all__ = ["Attribution", "FrozenNorm", "direct_logit_attribution", "frozen_norm"]


@dataclass
class Attribution:
    """Each component's direct contribution to one token's logit at one position.

    ``values[..., j]`` belongs to ``labels[j]`` (``[len(labels)]`` for one input row,
    ``[batch, len(labels)]`` for a batch); they sum to ``logit``, the model's own logit (per
    row), up to float rounding (``max_diff``).

    Example:
        >>> a = Attribution(["embed", "bias"], torch.tensor([1.0, 0.5]), 1.5, 7, -1, 0.0)
        >>> a.top(1)
        [('embed', 1.0)]
    """

    labels: list[str]
    values: torch.Tensor
    logit: float | list[float]
    token: int
    position: int
    max_diff: float

    def top(self, k: int = 10, row: int = 0) -> list[tuple[str, float]]:
        """The ``k`` components with the largest absolute contribution, largest first."""
        values = self.values if self.values.dim() == 1 else self.values[row]
        order = values.abs().argsort(descending=True)[:k]
        return [(self.labels[int(i)], float(values[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON output.

        Example:
            >>> Attribution(["bias"], torch.tensor([2.0]), 2.0, 1, -1, 0.0).to_dict()["values"]
            [2.0]
        """
        return {
            "token": self.token,
            "position": self.position,
            "logit": self.logit,
            "labels": list(self.labels),
            "values": self.values.tolist(),
            "max_diff": self.max_diff,
        }

    def _repr_html_(self) -> str:
        return attribution_view(self).html()

    def to_html(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        token_text: str | None = None,
        force: bool = False,
        overwrite: bool | None = None,
    ) -> str:
        """The interactive bars as one self-contained page (``token_text`` names the token),
        written atomically to ``path`` when given (an existing file only with ``force``;
        ``overwrite=`` is its deprecated name); returns the page.

        Example:
            >>> a = Attribution(["embed", "bias"], torch.tensor([1.0, 0.5]), 1.5, 7, -1, 0.0)
            >>> a.to_html(token_text=" Paris").count('data-kind="dla"')
            1
        """
        replace = forced(force, overwrite)  # a contradiction is an error before any work
        return save_view(attribution_view(self, token_text=token_text), path, force=replace)


@dataclass
class FrozenNorm:
    """A final norm as an affine map with its scale frozen: ``x -> P(x) * scale + bias``.

    ``P`` removes the mean where ``center`` (LayerNorm) and is the identity otherwise (RMSNorm);
    ``scale`` is ``weight / sigma(x)`` for the stream ``x`` it was frozen at.
    """

    center: bool
    scale: torch.Tensor
    bias: torch.Tensor | None

    def part(self, component: torch.Tensor) -> torch.Tensor:
        """One component's image under the frozen map, without the bias."""
        if self.center:
            component = component - component.mean(dim=-1, keepdim=True)
        return component * self.scale


def _eps(norm: nn.Module) -> list[float]:
    found = [
        float(v)
        for name in ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")
        if isinstance(v := getattr(norm, name, None), (int, float))
    ]
    return found or [1e-5, 1e-6, 1e-12, 1e-8]


def frozen_norm(norm: nn.Module | None, x: torch.Tensor, atol: float = 1e-4) -> FrozenNorm:
    """The final norm ``norm`` as an affine map frozen at the stream ``x`` (``[..., hidden]``).

    The form is not assumed: each candidate (LayerNorm or RMSNorm; weight ``w``, ``1 + w`` or
    none; the module's bias) is computed from the module's parameters and must reproduce the
    module's own output on ``x``, or the norm is refused.

    Example:
        >>> norm = nn.LayerNorm(4).eval()
        >>> x = torch.randn(2, 4)
        >>> f = frozen_norm(norm, x)
        >>> f.center, torch.allclose((f.part(x) + f.bias).float(), norm(x), atol=1e-6)
        (True, True)
    """
    hidden = x.shape[-1]
    if norm is None:
        return FrozenNorm(False, torch.ones(hidden, dtype=torch.float64, device=x.device), None)
    with torch.no_grad():
        expected = norm(x).double().to(x.device)
    xd = x.double()
    weights: list[torch.Tensor] = [torch.ones(hidden, dtype=torch.float64, device=x.device)]
    biases: list[torch.Tensor | None] = [None]
    with onloaded(norm, "freezing the final norm"):  # accelerate may have offloaded them
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        if isinstance(weight, torch.Tensor) and weight.shape == (hidden,):
            w = weight.detach().double().to(x.device)
            weights = [w, 1.0 + w, *weights]
        if isinstance(bias, torch.Tensor) and bias.shape == (hidden,):
            biases.insert(0, bias.detach().double().to(x.device))
    best = float("inf")
    for center in (True, False):
        centered = xd - xd.mean(-1, keepdim=True) if center else xd
        for eps in _eps(norm):
            sigma = torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
            for w in weights:
                for b in biases:
                    scale = w / sigma
                    guess = centered * scale + (b if b is not None else 0)
                    diff = float((guess - expected).abs().max())
                    best = min(best, diff)
                    if diff <= atol * max(1.0, float(expected.abs().max())):
                        return FrozenNorm(center, scale, b)
    raise CaptureError(
        f"the final norm {type(norm).__name__} is neither a LayerNorm nor an RMSNorm that its "
        f"parameters describe (closest form differs by {best:.3g}), so its scale cannot be "
        "frozen: direct logit attribution needs one of those"
    )


def _components(
    insp: Analysable, per_head: bool
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """The locators to capture, the per-block sub-layer names and their labels."""
    spec = insp.adapter.stack(insp.adapter.stack_name)
    refused = None
    if spec.hidden_states_start != "block_input" or spec.between_blocks:
        refused = "its stream is not one embedding plus what each block adds"
    elif spec.attn is None or spec.mlp is None:
        refused = "its blocks have no separate attention and MLP sub-layers"
    elif spec.residual_in:
        refused = f"{', '.join(spec.residual_in)} already include(s) the residual stream"
    elif [m for m in spec.after_blocks if m != "final_norm" and insp.view.after_module(spec, m)]:
        refused = "Hugging Face applies more than the final norm after the last block"
    elif insp.adapter.head_modules:
        refused = f"its head runs {', '.join(insp.adapter.head_modules)} before the unembedding"
    elif any(
        op.kind == "softcap" and op.value_for(insp.model) is not None
        for op in insp.adapter.logit_ops
    ):
        refused = "it soft-caps its logits, a non-linear step after the unembedding"
    if refused is not None:
        raise CaptureError(
            f"direct logit attribution does not decompose adapter {insp.adapter.name!r}: {refused}"
        )
    post = {"post_attn_norm", "post_mlp_norm"} <= spec.parts.keys()
    writers = ["post_attn_norm", "post_mlp_norm"] if post else ["attn", "mlp"]
    names: list[str] = []
    pairs: list[tuple[str, str]] = []
    for i in range(insp.num_blocks):
        names.append(f"block[{i}]")
        for label, writer in zip(("attn", "mlp"), writers, strict=True):
            names.append(f"block[{i}].{writer}")
            pairs.append((f"block[{i}].{writer}", f"block[{i}].{label}"))
        if per_head:
            if post:
                raise CaptureError(
                    f"per_head=True reads each head's write through the output projection, but "
                    f"adapter {insp.adapter.name!r} normalises the attention output before "
                    "adding it (post_attn_norm): heads are not additive terms of its stream"
                )
            names.append(f"block[{i}].attn.result")
    return names, writers, pairs


def direct_logit_attribution(
    insp: Analysable,
    inputs: str | torch.Tensor | Mapping[str, Any],
    token: int | str,
    position: int = -1,
    *,
    per_head: bool = False,
    tokenizer: Any = None,
    atol: float = 1e-3,
) -> Attribution:
    """Each component's contribution to ``token``'s logit at ``position`` (final norm frozen).

    See the module docstring for the convention and what is refused; the values sum to the
    model's own logit (checked: a model where they do not is an error, not an answer).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from introspect import Inspector
        >>> cfg = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> insp = Inspector(LlamaForCausalLM(cfg).eval())
        >>> dla = insp.direct_logit_attribution(torch.tensor([[1, 2, 3]]), 7, per_head=True)
        >>> dla.labels[1:3], len(dla.labels)
        (['block[0].attn.head[0]', 'block[0].attn.head[1]'], 7)
    """
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise CaptureError(f"token must be a token id or its text, got {type(token).__name__}")
    if isinstance(position, bool) or not isinstance(position, int):
        raise CaptureError(f"position must be an int (e.g. -1), got {type(position).__name__}")
    names, _, pairs = _components(insp, per_head)
    head = insp.module("lm_head")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise CaptureError(
            f"direct logit attribution reads the unembedding's weight, which "
            f"{type(head).__name__} does not have as a [vocab, hidden] matrix"
        )
    vocab = weight.shape[0]
    token_id = as_token_id(token, tokenizer, vocab)
    model_inputs = model_inputs_of(
        insp.model, inputs, tokenizer, "direct_logit_attribution", CaptureError
    )
    ids = model_inputs.get("input_ids")
    seq = int(ids.shape[1]) if isinstance(ids, torch.Tensor) else None
    if seq is not None and not -seq <= position < seq:
        raise CaptureError(f"position {position} is out of range for {seq} tokens")
    with torch.no_grad(), insp.capture(*names) as cap:
        output = insp.model(**model_inputs)
    logits = output["logits"] if isinstance(output, Mapping) else output[0]
    at = position
    stream = cap[f"block[{insp.num_blocks - 1}]"].output[:, at]
    # Everything is summed where the stream is: blocks dispatched across devices record theirs.
    device = stream.device
    terms: list[tuple[str, torch.Tensor]] = [("embed", cap["block[0]"].input[:, at].to(device))]
    constant = torch.zeros_like(stream, dtype=torch.float64)
    for key, label in pairs:
        value = cap[key].output[:, at].to(device)
        if per_head and label.endswith(".attn"):
            result = cap[f"{key}.result"].output[:, at].to(device)  # [batch, heads, hidden]
            total = result.sum(dim=1).double()
            leftover = value.double() - total  # the projection's bias (and nothing else)
            o_proj = insp.module(f"{key}.o")
            with onloaded(o_proj, "direct logit attribution"):
                bias = getattr(o_proj, "bias", None)
                expected = (
                    bias.detach().double().to(device) if isinstance(bias, torch.Tensor) else 0.0
                )
            gap = float((leftover - expected).abs().max())
            if gap > atol * max(1.0, float(value.abs().max())):
                raise CaptureError(
                    f"{key}'s output is not the sum of its heads' results plus the output "
                    f"projection's bias (differs by {gap:.3g}): per-head attribution refused"
                )
            for h in range(result.shape[1]):
                terms.append((f"{label}.head[{h}]", result[:, h]))
            constant = constant + leftover
        else:
            terms.append((label, value))
    summed = sum((t.double() for _, t in terms), constant)
    gap = float((summed - stream.double()).abs().max())
    if gap > atol * max(1.0, float(stream.abs().max())):
        raise CaptureError(
            f"direct logit attribution does not decompose adapter {insp.adapter.name!r}: the "
            f"stream entering the final norm differs from the sum of the embedding and every "
            f"block's attn and mlp outputs by {gap:.3g} (its blocks scale or normalise what "
            "they add)"
        )
    norm = insp.view.after_module(insp.adapter, "final_norm")
    frozen = frozen_norm(norm, stream)
    with onloaded(head, "direct logit attribution"):  # accelerate may have offloaded them
        loaded = getattr(head, "weight", weight)
        column = loaded[token_id].detach().double().to(device)
        head_bias = getattr(head, "bias", None)
        offset = (
            head_bias.detach().double()[token_id].to(device)
            if isinstance(head_bias, torch.Tensor)
            else torch.zeros((), dtype=torch.float64, device=device)
        )

    def through(x: torch.Tensor) -> torch.Tensor:
        return _head_steps(frozen.part(x.double()) @ column, insp)

    values = [through(t) for _, t in terms]
    bias_value = through(constant)
    if frozen.bias is not None:
        bias_value = bias_value + _head_steps(frozen.bias.double() @ column, insp)
    for op in insp.adapter.logit_ops:  # in order: a constant added, then scaled, is scaled
        if op.additive:
            offset = offset + op.added(insp.model, token_id)
        else:
            offset = _linear(op, offset, insp)
    bias_value = bias_value + offset
    labels = [label for label, _ in terms] + ["bias"]
    table = torch.stack([*values, bias_value.expand_as(values[0])], dim=-1)
    model_logit = logits[:, at, token_id].double().to(device)
    diff = float((table.sum(-1) - model_logit).abs().max())
    if diff > atol * max(1.0, float(model_logit.abs().max())):
        raise CaptureError(
            f"direct logit attribution of adapter {insp.adapter.name!r} does not sum to the "
            f"model's logit (differs by {diff:.3g}): its head applies something the "
            "attribution does not model"
        )
    batch = table.shape[0]
    out = table[0] if batch == 1 else table
    logit = float(model_logit[0]) if batch == 1 else [float(v) for v in model_logit]
    return Attribution(labels, out.float(), logit, token_id, position, diff)


def _head_steps(value: torch.Tensor, insp: Analysable) -> torch.Tensor:
    """A value on the unembedding column through the head's linear steps (its scales)."""
    for op in insp.adapter.pre_head:
        value = _linear(op, value, insp)
    for op in insp.adapter.logit_ops:
        if not op.additive:
            value = _linear(op, value, insp)
    return value


def _linear(op: LogitOp, value: torch.Tensor, insp: Analysable) -> torch.Tensor:
    try:
        return value * op.factor(insp.model)
    except ValueError as exc:
        raise CaptureError(f"direct logit attribution does not model it: {exc}") from None
