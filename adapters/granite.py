"""Granite and GraniteMoE: the Llama layout with IBM's muP-style multipliers.

Granite multiplies the embedding lookup by ``config.embedding_multiplier`` in the model's
forward, outside the embedding module: ``embed`` records the raw lookup while
``hidden_states[0]`` (block 0's input) is ``embedding_multiplier`` times it. Each block scales
its sub-layer outputs by ``residual_multiplier`` before adding them to the residual stream, and
HF divides the logits by ``config.logits_scaling``.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, LogitOp, hookimpl

from .llama import LLAMA

__all__ = ["GRANITE", "GRANITEMOE"]

_NOTES = (
    "hidden_states[0] = embedding_multiplier * embed(ids): the embed record is the raw lookup",
    "block[i] output = h + residual_multiplier * mlp(mlp_norm(h)) with h = input + "
    "residual_multiplier * attn(attn_norm(input)): block[i].attn and block[i].mlp record the "
    "sub-layer outputs before that scaling",
    "logits = lm_head(final_norm(h)) / config.logits_scaling",
)

GRANITE = LLAMA.derive(
    name="granite",
    model_types=("granite",),
    description=(
        "Granite: the Llama layout with embedding and residual multipliers, logits / logits_scaling"
    ),
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ·attention_multiplier + mask (rotary q, k; the scale is the config's "
                "attention_multiplier, not 1/√head_dim)"
            ),
        )
    },
    logit_ops=(LogitOp(kind="divide", config_attr="logits_scaling"),),
    notes=_NOTES,
)

GRANITEMOE = GRANITE.derive(
    name="granitemoe",
    model_types=("granitemoe",),
    description="GraniteMoE: Granite with a sparse-MoE MLP (block_sparse_moe) in every block",
    mlp="block_sparse_moe",
    parts={
        "attn_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
        "router": "block_sparse_moe.router",
    },
    notes=(
        *_NOTES,
        "block[i].mlp is the sparse-MoE module block_sparse_moe (GraniteMoeMoE: router + experts)",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(GRANITE)
    register(GRANITEMOE)
