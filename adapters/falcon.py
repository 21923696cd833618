"""Falcon: ``h`` blocks with ``self_attention``/``mlp``; three block layouts by config.

- ``new_decoder_architecture=True`` (Falcon-40B/180B): parallel attention and MLP, each with
  its own norm (``ln_attn``, ``ln_mlp``) when ``num_ln_in_parallel_attn == 2``.
- ``parallel_attn=True`` (Falcon-7B): parallel attention and MLP sharing ``input_layernorm``.
- ``parallel_attn=False``: sequential, ``input_layernorm`` then ``post_attention_layernorm``
  (optionally with ALiBi instead of rotary positions).

``block[i].attn_norm`` and ``block[i].mlp_norm`` name whichever norm feeds each sub-layer.
On parallel configs the block adds the attention output into the MLP's output tensor in place
(``mlp_output += attention_output``); captures of ``block[i].mlp`` record a copy taken when the
MLP returns, so the record is the MLP's own output.

Heads: ``num_attention_heads`` query heads projected through ``self_attention.dense``. The
key/value head count depends on the layout, and the attention module states it itself
(``self_attention.num_kv_heads``, read through ``kv_heads_attr``): 1 on multi-query configs
(Falcon-7B), the config's ``num_kv_heads`` on the new decoder architecture (grouped:
Falcon-40B has 8; the forward broadcasts each to its group of query heads) and on
``multi_query=False`` configs (where it equals ``num_attention_heads``). Falcon computes
attention inline, not through transformers' attention function, so ``z``, ``result`` and
``o`` can be read and ``q``/``k``/``v``/``pattern`` are refused.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

FALCON = AdapterSpec(
    name="falcon",
    model_types=("falcon",),
    description="Falcon (new decoder architecture, parallel attention, or sequential/ALiBi)",
    embed="word_embeddings",
    blocks="h",
    attn="self_attention",
    mlp="mlp",
    mlp_post="dense_4h_to_h",
    final_norm="ln_f",
    parts={
        "attn_norm": "ln_attn|input_layernorm",
        "mlp_norm": "ln_mlp|post_attention_layernorm",
    },
    heads={
        "attn": HeadSpec(
            o="dense",
            num_kv_heads="num_kv_heads",
            kv_heads_attr="num_kv_heads",
            scores="rotary configs: q·kᵀ/√head_dim + mask (rotary q, k); ALiBi configs: "
            "(q·kᵀ + ALiBi)/√head_dim + mask",
        )
    },
    missing={
        "mlp_norm": (
            "this Falcon config runs attention and MLP in parallel on one norm "
            "(block[i].attn_norm feeds both), so there is no separate MLP norm"
        ),
    },
    # Parallel blocks run `mlp_output += attention_output` on the tensor the MLP returned:
    # without a copy, the MLP's record would silently hold MLP + attention.
    outputs_changed_in_place=("mlp",),
    lm_head="lm_head",
    notes=(
        "parallel configs: block[i] output = input + attn(attn_norm(input)) + "
        "mlp(mlp_norm(input)); with one norm, attn_norm feeds both",
        "parallel configs add the attention output into the MLP's output tensor in place; "
        "block[i].mlp records a copy taken when the MLP returns, so it holds the MLP's own "
        "output (hooks of your own on the MLP see the tensor that is changed afterwards)",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(FALCON)
