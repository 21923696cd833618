"""Phi (Phi-1, Phi-1.5, Phi-2): parallel attention and MLP on one LayerNorm.

Each block computes ``x + attn(ln(x)) + mlp(ln(x))`` with ``ln = input_layernorm``; there is
no separate MLP norm. The final norm is ``final_layernorm``.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

PHI = AdapterSpec(
    name="phi",
    model_types=("phi",),
    description="Phi (parallel attention + MLP on one LayerNorm, partial rotary positions)",
    embed="embed_tokens",
    blocks="layers",
    attn="self_attn",
    mlp="mlp",
    mlp_post="fc2",
    final_norm="final_layernorm",
    parts={"attn_norm": "input_layernorm"},
    missing={
        "mlp_norm": (
            "Phi runs attention and MLP in parallel on the output of input_layernorm "
            "(block[i].attn_norm), so there is no separate MLP norm"
        ),
    },
    heads={
        "attn": HeadSpec(
            o="dense",
            scores=(
                "q·kᵀ/√head_dim + mask (q, k LayerNorm-ed when qk_layernorm; rotary on the "
                "first partial_rotary_factor of each head)"
            ),
        )
    },
    lm_head="lm_head",
    notes=("block[i] output = input + attn(attn_norm(input)) + mlp(attn_norm(input))",),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(PHI)
