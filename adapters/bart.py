"""BART: an encoder and a decoder stack, post-LN, no final norm, a bias after the head.

Facts measured against Hugging Face (transformers 4.57 and 5.x):

- Locators name the stack first (``encoder.block[i]``, ``decoder.block[i]``); a bare
  ``block[i]`` is the decoder's. In each stack ``hidden_states[0]`` is block 0's input:
  ``layernorm_embedding(embed + pos_embed)``, where ``embed`` already includes
  ``sqrt(d_model)`` when ``scale_embedding`` is set (the scale is inside the module).
- There is no final norm (post-LN blocks): ``final_norm`` is a MissingPartError and each
  stack's ``hidden_states[-1]`` is its raw last block output.
- ``logits = lm_head(h) + final_logits_bias``: the bias is a buffer of the top-level model.
- There is no MLP module: ``block[i].fc1`` and ``block[i].fc2`` name its two linears.
- ``BartForCausalLM`` has only the decoder: adapter ``bart-causal`` serves it.
- Heads: every attention module (``self_attn``, the decoder's ``encoder_attn`` named
  ``cross_attn``) calls transformers' attention function itself and projects through
  ``out_proj``. The encoder counts ``encoder_attention_heads``, the decoder (self- and
  cross-attention) ``decoder_attention_heads``; ``head_dim = d_model // heads``.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, LogitOp, StackSpec, hookimpl

_MISSING = {
    "final_norm": (
        "BART is post-LN: every block ends in its own LayerNorm and Hugging Face applies no "
        "norm after the last block, so hidden_states[-1] is the raw last block output"
    ),
    "mlp": (
        "BART computes its MLP inline in the block (fc1 -> activation -> fc2), there is no MLP "
        "module: capture block[i].fc1 / block[i].fc2 instead"
    ),
}

_PARTS = {
    "attn_norm": "self_attn_layer_norm",
    "mlp_norm": "final_layer_norm",
    "fc1": "fc1",
    "fc2": "fc2",
}

_DECODER_PARTS = {
    **_PARTS,
    "cross_attn": "encoder_attn",
    "cross_attn_norm": "encoder_attn_layer_norm",
}


def _heads(count: str, scores: str) -> HeadSpec:
    """BART's head layout with the head count read from config attribute ``count``."""
    return HeadSpec(
        o="out_proj",
        num_heads=count,
        num_kv_heads=None,
        head_dim=None,
        hidden_size="d_model",
        scores=scores,
    )


_ENCODER_HEADS = {"attn": _heads("encoder_attention_heads", "q·kᵀ/√head_dim + padding mask")}
_DECODER_HEADS = {
    "attn": _heads("decoder_attention_heads", "q·kᵀ/√head_dim + causal and padding mask"),
    "cross_attn": _heads(
        "decoder_attention_heads",
        "q·kᵀ/√head_dim + the encoder's padding mask (queries: decoder, keys: encoder output)",
    ),
}

ENCODER = StackSpec(
    embed="encoder.embed_tokens",
    blocks="encoder.layers",
    attn="self_attn",
    modules={
        "pos_embed": "encoder.embed_positions",
        "embed_norm": "encoder.layernorm_embedding",
    },
    parts=_PARTS,
    heads=_ENCODER_HEADS,
    missing=_MISSING,
    root="encoder",
)

BART = AdapterSpec(
    name="bart",
    model_types=("bart",),
    description="BART (encoder and decoder, post-LN, embedding LayerNorm, final_logits_bias)",
    stack_name="decoder",
    encoder=ENCODER,
    embed="decoder.embed_tokens",
    blocks="decoder.layers",
    attn="self_attn",
    modules={
        "pos_embed": "decoder.embed_positions",
        "embed_norm": "decoder.layernorm_embedding",
    },
    parts=_DECODER_PARTS,
    heads=_DECODER_HEADS,
    missing=_MISSING,
    root="decoder",
    lm_head="lm_head",
    logit_ops=(LogitOp(kind="add", tensor="final_logits_bias"),),
    notes=(
        "logits = lm_head(h) + final_logits_bias",
        "attn_norm/mlp_norm/cross_attn_norm are applied after each residual add (post-LN)",
    ),
)

BART_CAUSAL = BART.derive(
    name="bart-causal",
    model_types=(),
    architectures=("BartForCausalLM",),
    description="BART's decoder alone (BartForCausalLM): no encoder, no logits bias",
    encoder=None,
    root=None,
    # Without an encoder the decoder's cross-attention never runs.
    parts=_PARTS,
    heads={"attn": _DECODER_HEADS["attn"]},
    logit_ops=(),
    notes=("attn_norm/mlp_norm are applied after each residual add (post-LN)",),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    """Register the BART adapters.

    Example:
        >>> specs = []
        >>> register_adapters(specs.append)
        >>> [s.name for s in specs]
        ['bart', 'bart-causal']
    """
    register(BART)
    register(BART_CAUSAL)
