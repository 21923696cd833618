"""GPT-Neo and GPT-BigCode: the GPT-2 layout (``h`` blocks, learned positions, ``ln_f``).

Both add learned position embeddings (``wpe``) to the token lookup before block 0, so
``hidden_states[0]`` is block 0's input, not the ``embed`` record's output.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, hookimpl

GPT_NEO = AdapterSpec(
    name="gpt_neo",
    model_types=("gpt_neo",),
    description="GPT-Neo (pre-LN, learned positions added before block 0, local/global attention)",
    embed="wte",
    blocks="h",
    attn="attn",
    mlp="mlp",
    final_norm="ln_f",
    modules={"pos_embed": "wpe"},
    parts={"attn_norm": "ln_1", "mlp_norm": "ln_2"},
    lm_head="lm_head",
    notes=(
        "hidden_states[0] = wte(ids) + wpe(positions): use block[0].input, not embed, for it",
        "block[i].attn is the GPTNeoAttention wrapper (local or global attention inside)",
    ),
)

GPT_BIGCODE = GPT_NEO.derive(
    name="gpt_bigcode",
    model_types=("gpt_bigcode",),
    description="GPT-BigCode / StarCoder (GPT-2 layout with multi-query attention)",
    notes=("hidden_states[0] = wte(ids) + wpe(positions): use block[0].input, not embed, for it",),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(GPT_NEO)
    register(GPT_BIGCODE)
