"""T5: an encoder and a decoder stack, each with its own final RMSNorm; a scaled tied head.

Facts measured against Hugging Face (transformers 4.57 and 5.x):

- Locators name the stack first: ``encoder.block[i]``, ``decoder.block[i]``,
  ``encoder.final_norm``; a bare ``block[i]`` is the decoder's. HF's ``encoder_hidden_states``
  and ``decoder_hidden_states`` each follow the usual layout (block 0's input, block
  outputs, then the stack's final norm applied to the last block).
- Before the head, the decoder output is multiplied by ``d_model ** -0.5`` when the config
  asks for it: on 5.x that is ``config.scale_decoder_outputs`` (5.x always ties the head and
  keeps the old ``tie_word_embeddings=False`` of T5 v1.1 as ``scale_decoder_outputs=False``),
  on 4.x ``config.tie_word_embeddings``.
- On 4.x both stacks call one embedding module (``shared``); each stack's records keep only
  its own calls (``root``), so ``decoder.embed`` is the decoder's lookup.
- Blocks return tuples (hidden state first). ``block[i].attn``/``mlp`` are the attention and
  the feed-forward alone (``SelfAttention``, ``DenseReluDense``); the sub-layers around them
  (``attn_layer``, ``cross_attn_layer``, ``mlp_layer``: norm, sub-module, residual add) hold
  the stream after the residual add.
- ``T5EncoderModel`` has only the encoder: adapter ``t5-encoder`` names it as its one stack.
- Heads: ``SelfAttention`` and the decoder's ``EncDecAttention`` (``cross_attn``) each have
  ``num_heads`` heads of ``d_kv`` (not ``d_model // num_heads``), projected through ``o``.
  The scores are not scaled: ``q·kᵀ + position bias + mask``, where the relative position
  bias is computed by the first block's self-attention and reused by every later block (zero
  in cross-attention). On 5.x the attention function receives it as ``position_bias``; on
  4.x T5 computes attention inline, so only ``z``, ``result`` and ``o`` can be read there.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, LogitOp, StackSpec, hookimpl

_ENCODER_PARTS = {
    "attn_layer": "layer.0",
    "attn_norm": "layer.0.layer_norm",
    "mlp_layer": "layer.1",
    "mlp_norm": "layer.1.layer_norm",
}


def _heads(scores: str) -> HeadSpec:
    """T5's head layout: ``num_heads`` heads of ``d_kv``, unscaled scores."""
    return HeadSpec(o="o", num_heads="num_heads", num_kv_heads=None, head_dim="d_kv", scores=scores)


_SELF_HEADS = _heads("q·kᵀ (no scaling) + relative position bias + mask")

ENCODER = StackSpec(
    embed="encoder.embed_tokens",
    blocks="encoder.block",
    attn="layer.0.SelfAttention",
    mlp="layer.1.DenseReluDense",
    mlp_post="wo",
    final_norm="encoder.final_layer_norm",
    parts=_ENCODER_PARTS,
    heads={"attn": _SELF_HEADS},
    residual_in=("attn_layer", "mlp_layer"),
    root="encoder",
)

T5 = AdapterSpec(
    name="t5",
    model_types=("t5",),
    description="T5 (encoder and decoder, pre-RMSNorm, relative attention bias, scaled head)",
    stack_name="decoder",
    encoder=ENCODER,
    embed="decoder.embed_tokens",
    blocks="decoder.block",
    attn="layer.0.SelfAttention",
    mlp="layer.2.DenseReluDense",
    mlp_post="wo",
    final_norm="decoder.final_layer_norm",
    parts={
        "attn_layer": "layer.0",
        "attn_norm": "layer.0.layer_norm",
        "cross_attn": "layer.1.EncDecAttention",
        "cross_attn_layer": "layer.1",
        "cross_attn_norm": "layer.1.layer_norm",
        "mlp_layer": "layer.2",
        "mlp_norm": "layer.2.layer_norm",
    },
    heads={
        "attn": _SELF_HEADS,
        "cross_attn": _heads(
            "q·kᵀ (no scaling) + the encoder's padding mask (no position bias: queries from "
            "the decoder, keys from the encoder output)"
        ),
    },
    residual_in=("attn_layer", "cross_attn_layer", "mlp_layer"),
    root="decoder",
    pre_head=(
        LogitOp(
            kind="scale",
            config_attr="d_model",
            power=-0.5,
            only_if="scale_decoder_outputs|tie_word_embeddings",
        ),
    ),
    lm_head="lm_head",
    notes=(
        "logits = lm_head(decoder.final_norm(h) * d_model**-0.5) where the config scales "
        "(scale_decoder_outputs on 5.x, tie_word_embeddings on 4.x)",
        "attn_layer/cross_attn_layer/mlp_layer add the residual themselves",
    ),
)

T5_ENCODER = AdapterSpec.from_stack(
    ENCODER.derive(root=None),
    name="t5-encoder",
    architectures=("T5EncoderModel",),
    description="T5's encoder alone (T5EncoderModel): one stack, named encoder",
    stack_name="encoder",
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    """Register the T5 adapters.

    Example:
        >>> specs = []
        >>> register_adapters(specs.append)
        >>> [s.name for s in specs]
        ['t5', 't5-encoder']
    """
    register(T5)
    register(T5_ENCODER)
