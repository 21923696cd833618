"""GPT-2: ``transformer.h`` blocks, learned position embeddings, ``ln_f`` before the head."""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

GPT2 = AdapterSpec(
    name="gpt2",
    model_types=("gpt2",),
    description="GPT-2 (pre-LN, learned positions added to the lookup before block 0)",
    embed="wte",
    blocks="h",
    attn="attn",
    mlp="mlp",
    mlp_post="c_proj",
    final_norm="ln_f",
    modules={"pos_embed": "wpe"},
    parts={"attn_norm": "ln_1", "mlp_norm": "ln_2"},
    heads={"attn": HeadSpec(o="c_proj", scores="q·kᵀ/√head_dim + mask")},
    lm_head="lm_head",
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(GPT2)
