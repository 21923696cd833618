"""OLMo, OLMo-2 and OLMoE: the Llama layout with OLMo's own norms.

OLMo (v1) uses a LayerNorm without learnable parameters; OLMo-2 moves the norms after each
sub-layer (no pre-norm: ``h = x + post_attn_norm(attn(x))``); OLMoE is the OLMo-2-era MoE model
with the Llama block layout and a sparse-MoE MLP in every block.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

from .llama import LLAMA

__all__ = ["OLMO", "OLMO2", "OLMOE"]

OLMO = LLAMA.derive(
    name="olmo",
    model_types=("olmo",),
    description="OLMo: the Llama layout with parameter-free LayerNorms",
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (q, k, v clamped to ±clip_qkv where it is set, then "
                "rotary q, k)"
            ),
        )
    },
    notes=(
        "attn_norm, mlp_norm and final_norm are LayerNorms without weights or biases "
        "(OlmoLayerNorm), so perturbing parameters cannot change them",
    ),
)

_NO_PRE_NORM = (
    "OLMo-2 normalises each sub-layer's output, not its input: the block feeds its input "
    "straight into attention and the MLP (see block[i].post_attn_norm / post_mlp_norm)"
)

OLMO2 = LLAMA.derive(
    name="olmo2",
    model_types=("olmo2",),
    description="OLMo-2: norms after each sub-layer instead of before, q/k norms in attention",
    parts={
        "post_attn_norm": "post_attention_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
    },
    missing={"attn_norm": _NO_PRE_NORM, "mlp_norm": _NO_PRE_NORM},
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (q and k RMS-normalised across all heads together, "
                "then rotary)"
            ),
        )
    },
    notes=(
        "block[i] output = h + post_mlp_norm(mlp(h)) with h = input + post_attn_norm(attn(input))",
        "HF's post_attention_layernorm is the norm after attention (post_attn_norm)",
    ),
)

OLMOE = LLAMA.derive(
    name="olmoe",
    model_types=("olmoe",),
    description="OLMoE: the Llama layout (with q/k norms) and a sparse-MoE MLP in every block",
    parts={
        "attn_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
        "router": "mlp.gate",
    },
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (q and k RMS-normalised across all heads together; "
                "q, k, v clamped to ±clip_qkv where it is set; then rotary q, k)"
            ),
        )
    },
    notes=("block[i].mlp is the sparse-MoE module (OlmoeSparseMoeBlock: gate + experts)",),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(OLMO)
    register(OLMO2)
    register(OLMOE)
