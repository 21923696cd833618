"""GPT-J and CodeGen: ``h`` blocks with one LayerNorm feeding attention and MLP in parallel.

Each block computes ``x + attn(ln_1(x)) + mlp(ln_1(x))``: there is no norm before the MLP
of its own, so ``block[i].mlp_norm`` does not exist (``block[i].attn_norm`` feeds both).
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

_PARALLEL = (
    "attention and MLP run in parallel on the output of ln_1 (block[i].attn_norm), so there "
    "is no separate MLP norm"
)

GPTJ = AdapterSpec(
    name="gptj",
    model_types=("gptj",),
    description="GPT-J (parallel attention + MLP on one LayerNorm, rotary positions)",
    embed="wte",
    blocks="h",
    attn="attn",
    mlp="mlp",
    mlp_post="fc_out",
    final_norm="ln_f",
    parts={"attn_norm": "ln_1"},
    missing={"mlp_norm": _PARALLEL},
    heads={
        "attn": HeadSpec(
            o="out_proj",
            num_kv_heads=None,
            head_dim=None,
            scores=(
                "q·kᵀ/√head_dim in float32 + mask (interleaved rotary on the first rotary_dim "
                "dims of each q and k head, all of it where rotary_dim is None)"
            ),
        )
    },
    lm_head="lm_head",
    notes=("block[i] output = input + attn(ln_1(input)) + mlp(ln_1(input))",),
)

CODEGEN = GPTJ.derive(
    **{
        "name": "codegen",
        "model_types": ("codegen",),
        "description": "CodeGen (GPT-J layout: parallel attention + MLP on one LayerNorm)",
    }
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(GPTJ)
    register(CODEGEN)
