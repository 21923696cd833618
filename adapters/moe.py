"""Sparse mixture-of-experts models with the Llama layout: Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS.

Each block is a Llama block whose MLP is a sparse-MoE module (a router picks the top-k experts
per token and mixes their outputs). ``block[i].mlp`` names that whole sparse-MoE module, so its
record holds the mixed expert output the block adds to the residual stream; ``block[i].router``
names the router (its record's output is the router's first output, the per-token expert
logits or scores).
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

from .llama import LLAMA

__all__ = ["GPT_OSS", "MIXTRAL", "QWEN2_MOE", "QWEN3_MOE"]

_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}

# transformers 4.x names Mixtral's sparse-MoE module block_sparse_moe, 5.x names it mlp.
MIXTRAL = LLAMA.derive(
    name="mixtral",
    model_types=("mixtral",),
    description="Mixtral: the Llama layout with a sparse-MoE MLP in every block",
    mlp="mlp|block_sparse_moe",
    parts={**_NORMS, "router": "mlp.gate|block_sparse_moe.gate"},
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (rotary q, k; sliding window where "
                "config.sliding_window is set)"
            ),
        )
    },
    notes=(
        "block[i].mlp is the sparse-MoE module (MixtralSparseMoeBlock: gate + experts), named "
        "block_sparse_moe on transformers 4.x and mlp on 5.x",
    ),
)

_QWEN_SPARSITY = (
    "only some blocks are sparse: block i uses the sparse-MoE module when i is not in "
    "config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0; the other blocks "
    "have a dense MLP (block[i].mlp is then that dense MLP and block[i].router does not exist)"
)
_DENSE_NO_ROUTER = (
    "this block's MLP is dense (config.mlp_only_layers / decoder_sparse_step), so it has no router"
)

QWEN2_MOE = LLAMA.derive(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    description="Qwen2-MoE: the Llama layout with sparse-MoE MLPs and a gated shared expert",
    parts={**_NORMS, "router": "mlp.gate", "shared_experts": "mlp.shared_expert"},
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (rotary q, k; a sliding window on the "
                "sliding_attention layers, which use_sliding_window and max_window_layers select)"
            ),
        )
    },
    missing={
        "router": _DENSE_NO_ROUTER,
        "shared_experts": "this block's MLP is dense, so it has no shared expert",
    },
    notes=(
        "block[i].mlp is the sparse-MoE module (Qwen2MoeSparseMoeBlock: gate, experts, "
        "shared_expert, shared_expert_gate) on sparse blocks",
        "block[i].shared_experts records the shared expert before its sigmoid gate "
        "(shared_expert_gate) scales it",
        _QWEN_SPARSITY,
    ),
)

QWEN3_MOE = LLAMA.derive(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    description="Qwen3-MoE: the Llama layout (with q/k norms) and sparse-MoE MLPs",
    parts={**_NORMS, "router": "mlp.gate"},
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (q, k RMS-normalised per head, then rotary; sliding "
                "window where config.sliding_window is set)"
            ),
        )
    },
    missing={
        "router": _DENSE_NO_ROUTER,
        "shared_experts": "Qwen3-MoE has no shared expert (Qwen2-MoE and DeepSeek do)",
    },
    notes=(
        "block[i].mlp is the sparse-MoE module (Qwen3MoeSparseMoeBlock: gate + experts) on "
        "sparse blocks",
        _QWEN_SPARSITY,
    ),
)

GPT_OSS = LLAMA.derive(
    name="gpt_oss",
    model_types=("gpt_oss",),
    description=(
        "GPT-OSS: the Llama layout with attention sinks, alternating sliding/full attention "
        "and a sparse-MoE MLP in every block"
    ),
    parts={**_NORMS, "router": "mlp.router"},
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ/√head_dim + mask (rotary q, k; sliding window on the sliding_attention "
                "layers), softmaxed together with one learned sink logit per head (the core's "
                "sinks), which is then dropped: a row of the pattern sums to less than 1"
            ),
        )
    },
    notes=("block[i].mlp is the sparse-MoE module (GptOssMLP: router + experts)",),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(MIXTRAL)
    register(QWEN2_MOE)
    register(QWEN3_MOE)
    register(GPT_OSS)
