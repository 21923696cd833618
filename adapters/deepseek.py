"""DeepSeek-V2 and DeepSeek-V3: the Llama layout with multi-head latent attention and MoE MLPs.

Attention is multi-head latent attention (low-rank q/kv projections, a decoupled rotary part);
from block ``config.first_k_dense_replace`` on, the MLP is a sparse-MoE module with a router
(``gate``), routed experts and always-on shared experts.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

from .llama import LLAMA

__all__ = ["DEEPSEEK"]

_DENSE = "the first config.first_k_dense_replace blocks have a dense MLP, which has no {what}"

DEEPSEEK = LLAMA.derive(
    name="deepseek",
    model_types=("deepseek_v2", "deepseek_v3"),
    description=(
        "DeepSeek-V2/V3: multi-head latent attention, dense MLPs in the first "
        "first_k_dense_replace blocks and sparse-MoE MLPs with shared experts after"
    ),
    parts={
        "attn_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
        "router": "mlp.gate",
        "shared_experts": "mlp.shared_experts",
    },
    missing={
        "router": _DENSE.format(what="router"),
        "shared_experts": _DENSE.format(what="shared experts"),
    },
    heads={
        "attn": HeadSpec(
            o="o_proj",
            # q and k heads are qk_nope_head_dim + qk_rope_head_dim wide; config.head_dim is
            # only the rotary part. v heads (and so z) are v_head_dim wide.
            head_dim="qk_head_dim",
            head_dim_attr="qk_head_dim",
            scores=(
                "q·kᵀ·qk_head_dim^-½ (times mscale² under YaRN rope scaling with "
                "mscale_all_dim) + mask; each q and k head is [a part without positions "
                "(qk_nope_head_dim), a rotary part (qk_rope_head_dim)], k's rotary part shared "
                "by all heads; v heads are v_head_dim wide"
            ),
        )
    },
    notes=(
        "block[i].mlp is the dense MLP for i < config.first_k_dense_replace and the sparse-MoE "
        "module (gate, experts, shared_experts) from there on",
        "block[i].shared_experts records the shared experts' output, which the sparse-MoE "
        "module adds to the routed experts' mix",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(DEEPSEEK)
