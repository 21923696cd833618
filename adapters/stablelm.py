"""StableLM and StarCoder2: the Llama layout (``layers``, ``self_attn``, ``mlp``, ``norm``)
with LayerNorm instead of RMSNorm.

StableLM with ``use_parallel_residual=True`` computes ``x + attn(ln(x)) + mlp(ln(x))`` and has
no ``post_attention_layernorm``, so ``block[i].mlp_norm`` does not exist on such configs.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

STABLELM = AdapterSpec(
    name="stablelm",
    model_types=("stablelm",),
    description="StableLM (Llama layout with LayerNorm; optional parallel residual)",
    embed="embed_tokens",
    blocks="layers",
    attn="self_attn",
    mlp="mlp",
    mlp_post="down_proj",
    final_norm="norm",
    parts={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    missing={
        "mlp_norm": (
            "this StableLM config sets use_parallel_residual=True: attention and MLP both read "
            "input_layernorm's output (block[i].attn_norm), so there is no separate MLP norm"
        ),
    },
    heads={
        "attn": HeadSpec(
            o="o_proj",
            # StableLM's attention always splits hidden_size evenly over the heads.
            head_dim=None,
            scores=(
                "q·kᵀ/√head_dim + mask (q, k LayerNorm-ed per head when qk_layernorm; rotary "
                "on the first partial_rotary_factor of each head)"
            ),
        )
    },
    lm_head="lm_head",
)

STARCODER2 = STABLELM.derive(
    name="starcoder2",
    model_types=("starcoder2",),
    description="StarCoder2 (Llama layout with LayerNorm and biases)",
    mlp_post="c_proj",
    missing={},
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (rotary q, k; sliding window where "
                "config.sliding_window is set)"
            ),
        )
    },
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(STABLELM)
    register(STARCODER2)
