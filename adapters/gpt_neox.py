"""GPT-NeoX / Pythia: ``layers`` with ``attention`` and ``mlp``, ``final_layer_norm``.

With ``use_parallel_residual=True`` (the default, Pythia) a block computes
``x + attn(ln1(x)) + mlp(ln2(x))``: ``block[i].mlp_norm`` reads the block input. With
``False`` it is sequential: ``h = x + attn(ln1(x))``, then ``h + mlp(ln2(h))``.
The head is ``embed_out`` on transformers 4.x and ``lm_head`` on 5.x.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

GPT_NEOX = AdapterSpec(
    name="gpt_neox",
    model_types=("gpt_neox",),
    description="GPT-NeoX / Pythia (parallel or sequential residual, rotary positions)",
    embed="embed_in",
    blocks="layers",
    attn="attention",
    mlp="mlp",
    mlp_post="dense_4h_to_h",
    final_norm="final_layer_norm",
    parts={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    heads={
        "attn": HeadSpec(
            o="dense",
            num_kv_heads=None,
            head_dim=None,
            scores=(
                "q·kᵀ/√head_dim + mask (rotary on the first rotary_pct / partial_rotary_factor "
                "of each q and k head)"
            ),
        )
    },
    lm_head="lm_head|embed_out",
    notes=(
        "use_parallel_residual=True: block[i].mlp_norm normalises the block input, not the "
        "attention output",
        "the unembedding is embed_out on transformers 4.x and lm_head on 5.x; the lm_head "
        "locator names either",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(GPT_NEOX)
