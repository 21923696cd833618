"""MPT: ``blocks`` with ``attn`` and ``ffn``; the ``ffn`` adds the residual itself.

``block[i].mlp`` (``ffn``) is called as ``ffn(norm_2(h), h)`` and returns
``h + down_proj(act(up_proj(norm_2(h))))``: its record's output equals the block's output,
not the MLP's own contribution. Attention does not add the residual. ALiBi positions:
nothing is added to the embedding.

Heads: ``n_heads`` heads of ``d_model // n_heads``, projected through ``attn.out_proj``.
MPT computes attention inline, not through transformers' attention function, so ``z``,
``result`` and ``o`` can be read and ``q``/``k``/``v``/``pattern`` are refused.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

MPT = AdapterSpec(
    name="mpt",
    model_types=("mpt",),
    description="MPT (ALiBi, pre-LN, an MLP that adds the residual)",
    embed="wte",
    blocks="blocks",
    attn="attn",
    mlp="ffn",
    mlp_post="down_proj",
    final_norm="norm_f",
    parts={"attn_norm": "norm_1", "mlp_norm": "norm_2"},
    heads={
        "attn": HeadSpec(
            o="out_proj",
            num_heads="n_heads",
            num_kv_heads=None,
            head_dim=None,
            hidden_size="d_model",
            scores="q·kᵀ·softmax_scale (default 1/√head_dim) + ALiBi + mask (q, k clipped "
            "to ±clip_qkv where set)",
        )
    },
    residual_in=("mlp",),
    lm_head="lm_head",
    notes=(
        "block[i].mlp.output already includes the residual (it equals block[i].output); "
        "block[i].attn.output is the attention's own contribution",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(MPT)
