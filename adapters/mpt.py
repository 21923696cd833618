"""MPT: ``blocks`` with ``attn`` and ``ffn``; the ``ffn`` adds the residual itself.

``block[i].mlp`` (``ffn``) is called as ``ffn(norm_2(h), h)`` and returns
``h + down_proj(act(up_proj(norm_2(h))))``: its record's output equals the block's output,
not the MLP's own contribution. Attention does not add the residual. ALiBi positions:
nothing is added to the embedding.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, hookimpl

MPT = AdapterSpec(
    name="mpt",
    model_types=("mpt",),
    description="MPT (ALiBi, pre-LN, an MLP that adds the residual)",
    embed="wte",
    blocks="blocks",
    attn="attn",
    mlp="ffn",
    final_norm="norm_f",
    parts={"attn_norm": "norm_1", "mlp_norm": "norm_2"},
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
