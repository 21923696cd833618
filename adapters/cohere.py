"""Cohere (Command-R) and Cohere2: parallel attention and MLP, logits scaled by ``logit_scale``.

Each block computes ``x + attn(ln(x)) + mlp(ln(x))`` with ``ln = input_layernorm`` (a LayerNorm
without bias); the final norm is ``norm``. After ``lm_head`` HF multiplies the logits by
``config.logit_scale``. Cohere2 adds sliding-window layers; the layout is the same.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, LogitOp, hookimpl

from .llama import LLAMA

__all__ = ["COHERE"]

COHERE = LLAMA.derive(
    name="cohere",
    model_types=("cohere", "cohere2"),
    description=(
        "Cohere / Cohere2: parallel attention + MLP on one LayerNorm, logits x logit_scale"
    ),
    parts={"attn_norm": "input_layernorm"},
    missing={
        "mlp_norm": (
            "Cohere runs attention and MLP in parallel on the output of input_layernorm "
            "(block[i].attn_norm), so there is no separate MLP norm"
        ),
    },
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (Cohere: q, k LayerNorm-ed per head when use_qk_norm, "
                "then rotary (interleaved); Cohere2: rotary q, k and a sliding window on the "
                "sliding_attention layers only, no positions at all on the full ones)"
            ),
        )
    },
    logit_ops=(LogitOp(kind="scale", config_attr="logit_scale"),),
    notes=(
        "block[i] output = input + attn(attn_norm(input)) + mlp(attn_norm(input))",
        "logits = lm_head(final_norm(h)) * config.logit_scale",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(COHERE)
