"""introspect-toylm: the introspect adapter for ToyLM, a plain PyTorch language model.

Installed (``pip install -e examples/introspect-toylm``), this module is loaded through the
``introspect`` entry point and ``Inspector(ToyLM())`` picks the ``toylm`` adapter by the
model's class name.

Example:
    >>> from introspect import Inspector
    >>> Inspector(ToyLM(), adapter=TOYLM).path("block[-1].attn")
    'blocks.2.attn'
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, LogitOp, hookimpl
from introspect_toylm.model import ToyAttention, ToyBlock, ToyLM, ToyLMConfig

__all__ = ["TOYLM", "ToyAttention", "ToyBlock", "ToyLM", "ToyLMConfig", "register_adapters"]

TOYLM = AdapterSpec(
    name="toylm",
    architectures=("ToyLM",),
    description="ToyLM, the plugin tutorial's plain PyTorch model",
    embed="embed",
    blocks="blocks",
    attn="attn",
    mlp="mlp",
    final_norm="norm",
    modules={"pos_embed": "pos"},
    parts={"attn_norm": "attn_norm", "mlp_norm": "mlp_norm"},
    # ToyAttention projects its heads through ``out``: z, result and o can be read. It
    # computes attention inline in plain PyTorch, so q, k, v and pattern cannot.
    heads={
        "attn": HeadSpec(
            o="out",
            num_heads="num_heads",
            num_kv_heads=None,
            head_dim=None,
            scores="q·kᵀ/√head_dim + causal mask",
            qkv_missing=(
                "ToyAttention computes attention inline in plain PyTorch (not through "
                "transformers' attention interface), so q, k, v and pattern cannot be read "
                "(z, result and o can)"
            ),
        )
    },
    lm_head="head",
    logit_ops=(LogitOp(kind="scale", config_attr="logit_scale"),),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    """Register ToyLM's adapter."""
    register(TOYLM)
