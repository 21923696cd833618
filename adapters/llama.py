"""Llama and the families with its layout (Mistral, Qwen2, Qwen3): ``model.layers``/``norm``."""

from __future__ import annotations

from collections.abc import Callable

from introspect.hookspecs import hookimpl
from introspect.spec import AdapterSpec

LLAMA = AdapterSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    description="Llama layout: RMSNorm pre-norm blocks, rotary positions, final RMSNorm",
    embed="embed_tokens",
    blocks="layers",
    attn="self_attn",
    mlp="mlp",
    final_norm="norm",
    parts={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    lm_head="lm_head",
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(LLAMA)
