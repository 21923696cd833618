"""Gemma, Gemma-2 and Gemma-3 (text): the Llama layout with scaled embeddings and sandwich norms.

Every Gemma multiplies the token embeddings by ``sqrt(hidden_size)`` before block 0, so
``hidden_states[0]`` (block 0's input) is the scaled lookup. Where that happens differs by
version: Gemma-3, and Gemma/Gemma-2 on transformers 5.x, scale inside the embedding module
(``embed`` records the scaled lookup); Gemma and Gemma-2 on transformers 4.x scale in the model's
forward (``embed`` records the raw lookup). Either way the block input is what HF records.

Gemma-2 and Gemma-3 add a norm after each sub-layer ("sandwich" norms) and soft-cap the logits:
``logits = cap * tanh(logits / cap)`` with ``cap = config.final_logit_softcapping``.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, LogitOp, hookimpl

from .llama import LLAMA

__all__ = ["GEMMA", "GEMMA2", "GEMMA3_TEXT"]

_SCALED_EMBEDDINGS = (
    "hidden_states[0] = embed_tokens(ids) * sqrt(hidden_size); the embed record holds the "
    "scaled lookup where the embedding module scales (transformers 5.x), the raw lookup where "
    "the model's forward scales (Gemma/Gemma-2 on transformers 4.x)"
)

GEMMA = LLAMA.derive(
    name="gemma",
    model_types=("gemma",),
    description="Gemma: the Llama layout, embeddings scaled by sqrt(hidden_size), (1 + w) RMSNorm",
    heads={"attn": HeadSpec(o="o_proj", scores="q·kᵀ/√head_dim + mask (rotary q, k)")},
    notes=(_SCALED_EMBEDDINGS,),
)

GEMMA2 = GEMMA.derive(
    name="gemma2",
    model_types=("gemma2",),
    description=(
        "Gemma-2: scaled embeddings, a norm before and after each sub-layer, soft-capped logits"
    ),
    parts={
        "attn_norm": "input_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
    },
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ·query_pre_attn_scalar^-½, soft-capped (attn_logit_softcapping · "
                "tanh(s / attn_logit_softcapping)), + mask (rotary q, k; sliding window on the "
                "sliding_attention layers)"
            ),
        )
    },
    logit_ops=(LogitOp(kind="softcap", config_attr="final_logit_softcapping"),),
    notes=(
        _SCALED_EMBEDDINGS,
        "block[i] output = h + post_mlp_norm(mlp(mlp_norm(h))) with "
        "h = input + post_attn_norm(attn(attn_norm(input))): block[i].attn and block[i].mlp "
        "record the sub-layer outputs before their post norms",
        "HF's post_attention_layernorm is the norm after attention (post_attn_norm), not the "
        "norm before the MLP (mlp_norm = pre_feedforward_layernorm)",
        "logits are soft-capped: final_logit_softcapping * tanh(logits / final_logit_softcapping)",
    ),
)

# transformers 4.x names the inner model ``model`` but gives Gemma3ForCausalLM the base-model
# prefix ``language_model``, so ``base_model`` is the causal-LM class itself there.
GEMMA3_TEXT = GEMMA2.derive(
    name="gemma3_text",
    model_types=("gemma3_text",),
    description=(
        "Gemma-3 text: the Gemma-2 layout with q/k norms and local/global attention layers"
    ),
    embed="embed_tokens|model.embed_tokens",
    blocks="layers|model.layers",
    final_norm="norm|model.norm",
    heads={
        "attn": HeadSpec(
            o="o_proj",
            scores=(
                "q·kᵀ·query_pre_attn_scalar^-½ (soft-capped where attn_logit_softcapping is "
                "set) + mask (q, k RMS-normalised per head, then rotary, with the local rotary "
                "base on sliding_attention layers, which also mask a sliding window)"
            ),
        )
    },
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(GEMMA)
    register(GEMMA2)
    register(GEMMA3_TEXT)
