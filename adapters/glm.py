"""GLM-4: the Llama layout with an extra norm after each sub-layer.

Each block computes ``h = x + post_attn_norm(attn(attn_norm(x)))`` and
``out = h + post_mlp_norm(mlp(mlp_norm(h)))``. HF's ``post_attention_layernorm`` is the norm
*before* the MLP here (as in Llama); the norms after the sub-layers are
``post_self_attn_layernorm`` and ``post_mlp_layernorm``.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

from .llama import LLAMA

__all__ = ["GLM4"]

GLM4 = LLAMA.derive(
    name="glm4",
    model_types=("glm4",),
    description="GLM-4: the Llama layout with a norm after attention and after the MLP",
    parts={
        "attn_norm": "input_layernorm",
        "post_attn_norm": "post_self_attn_layernorm",
        "mlp_norm": "post_attention_layernorm",
        "post_mlp_norm": "post_mlp_layernorm",
    },
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (interleaved rotary on the first partial_rotary_factor "
                "of each q and k head)"
            ),
        )
    },
    notes=(
        "block[i] output = h + post_mlp_norm(mlp(mlp_norm(h))) with "
        "h = input + post_attn_norm(attn(attn_norm(input)))",
        "HF's post_attention_layernorm is the norm before the MLP (mlp_norm), as in Llama",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(GLM4)
