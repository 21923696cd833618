"""Llama and the families with its layout: ``model.layers`` of pre-norm blocks, ``model.norm``.

Llama, Mistral, Qwen2, Qwen3 and Phi-3 share one layout: each block is
``h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))`` and the
model applies ``norm`` after the last block. Sibling families elsewhere in this package derive
their specs from :data:`LLAMA` with ``LLAMA.derive(...)``.

BitNet keeps the layout and RMS-normalises the heads' concatenated output
(``self_attn.attn_sub_norm``) before ``o_proj`` (measured on transformers 4.57 and 5.25): its
head layout reads ``z`` before that norm, where it is still each head's mix of values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from introspect import AdapterSpec, HeadSpec, hookimpl

__all__ = ["BITNET", "LLAMA", "PHI3", "derive"]


def derive(base: AdapterSpec, **changes: Any) -> AdapterSpec:
    """``base.derive(**changes)``: kept for plugins written against earlier releases.

    Example:
        >>> LLAMA.derive( name="llama-sibling", model_types=("sibling",)).final_norm
        'norm'
    """
    return base.derive(**changes)


LLAMA = AdapterSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    description="Llama layout: RMSNorm pre-norm blocks, rotary positions, final RMSNorm",
    embed="embed_tokens",
    blocks="layers",
    attn="self_attn",
    mlp="mlp",
    mlp_post="down_proj",
    final_norm="norm",
    parts={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (rotary q, k; Qwen3 RMS-normalises each q and k head "
                "first; sliding window where the config enables one)"
            ),
        )
    },
    lm_head="lm_head",
)

PHI3 = LLAMA.derive(
    name="phi3",
    model_types=("phi3",),
    description="Phi-3: the Llama layout with fused qkv_proj and gate_up_proj projections",
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (rotary q, k on the first partial_rotary_factor of each "
                "head; sliding window where config.sliding_window is set)"
            ),
        )
    },
    notes=(
        "resid_attn_dropout / resid_mlp_dropout sit between each sub-layer and the residual "
        "add; they are identities in eval mode",
    ),
)

BITNET = LLAMA.derive(
    name="bitnet",
    model_types=("bitnet",),
    description="BitNet: the Llama layout with RMSNorms inside attention and MLP before the "
    "output projections",
    heads={
        "attn": HeadSpec(
            o="o_proj",
            o_norm="attn_sub_norm",
            scores="q·kᵀ/√head_dim + mask (rotary q, k)",
        )
    },
    notes=(
        "z is the heads' output before self_attn.attn_sub_norm; result is each head's slice "
        "of the normed concatenation through o_proj (the norm's per-position scale as the "
        "forward computed it), summing to o_proj's output",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(LLAMA)
    register(PHI3)
    register(BITNET)
