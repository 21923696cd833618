"""BLOOM: ``h`` blocks whose attention and MLP add the residual themselves; embedding LayerNorm.

- ``hidden_states[0]`` is ``word_embeddings_layernorm(word_embeddings(ids))`` (locator
  ``embed_norm``); ``embed`` is the raw lookup before that norm.
- ``block[i].attn`` (``self_attention``) and ``block[i].mlp`` take the residual as their second
  argument and return ``residual + dropout(sub_layer(x))``: their record's ``output`` is the
  residual stream after that sub-layer, not the sub-layer's own contribution.
- ALiBi positions: nothing is added to the embedding.
- Heads: ``n_head`` heads projected through ``self_attention.dense``. BLOOM computes
  attention inline (``alibi.baddbmm``), not through transformers' attention function, so
  ``z``, ``result`` and ``o`` can be read and ``q``/``k``/``v``/``pattern`` are refused.
  ``result`` needs the projection to run as one module: with ``pretraining_tp > 1`` and
  ``slow_but_exact`` BLOOM applies ``dense``'s weight in slices without calling it.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

BLOOM = AdapterSpec(
    name="bloom",
    model_types=("bloom",),
    description="BLOOM (embedding LayerNorm, ALiBi, sub-layers that add the residual)",
    embed="word_embeddings",
    blocks="h",
    attn="self_attention",
    mlp="mlp",
    mlp_post="dense_4h_to_h",
    final_norm="ln_f",
    modules={"embed_norm": "word_embeddings_layernorm"},
    parts={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    heads={
        "attn": HeadSpec(
            o="dense",
            num_heads="n_head",
            num_kv_heads=None,
            head_dim=None,
            scores="q·kᵀ/√head_dim + ALiBi + mask",
        )
    },
    residual_in=("attn", "mlp"),
    lm_head="lm_head",
    notes=(
        "hidden_states[0] = embed_norm(embed(ids)) = block[0].input",
        "block[i].attn.output and block[i].mlp.output already include the residual: "
        "attn(x_norm, residual) returns residual + attention(x_norm); the residual is "
        "block[i].input, or block[i].attn_norm's output when the config sets "
        "apply_residual_connection_post_layernorm",
        "block[i].mlp.output equals block[i].output",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(BLOOM)
