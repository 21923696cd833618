"""GPT-Neo and GPT-BigCode: the GPT-2 layout (``h`` blocks, learned positions, ``ln_f``).

Both add learned position embeddings (``wpe``) to the token lookup before block 0, so
``hidden_states[0]`` is block 0's input, not the ``embed`` record's output.

Heads:

- GPT-Neo's ``block[i].attn`` (``GPTNeoAttention``) wraps the self-attention
  (``attn.attention``, global or local by layer), which projects through ``out_proj``. Its
  scores are not scaled (``q·kᵀ + mask``, local layers masking beyond ``window_size``). It
  computes attention inline, not through transformers' attention function, so ``z``,
  ``result`` and ``o`` can be read and ``q``/``k``/``v``/``pattern`` are refused.
- GPT-BigCode's ``attn`` calls the attention function itself and projects through
  ``c_proj``; ``multi_query`` configs have one key/value head.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

GPT_NEO = AdapterSpec(
    name="gpt_neo",
    model_types=("gpt_neo",),
    description="GPT-Neo (pre-LN, learned positions added before block 0, local/global attention)",
    embed="wte",
    blocks="h",
    attn="attn",
    mlp="mlp",
    mlp_post="c_proj",
    final_norm="ln_f",
    modules={"pos_embed": "wpe"},
    parts={"attn_norm": "ln_1", "mlp_norm": "ln_2"},
    heads={
        "attn": HeadSpec(
            o="attention.out_proj",
            core="attention",
            num_heads="num_heads",
            num_kv_heads=None,
            head_dim=None,
            scores="q·kᵀ (no scaling) + causal mask (local layers: within window_size) + "
            "padding mask",
        )
    },
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
    heads={
        "attn": HeadSpec(
            o="c_proj",
            num_kv_heads=None,
            multi_query="multi_query",
            head_dim=None,
            scores="q·kᵀ/√head_dim (1 when scale_attn_weights=False) + mask",
        )
    },
    notes=("hidden_states[0] = wte(ids) + wpe(positions): use block[0].input, not embed, for it",),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(GPT_NEO)
    register(GPT_BIGCODE)
