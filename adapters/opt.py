"""OPT: ``decoder.layers`` with the MLP inline (``fc1``/``fc2``), optional projections.

Facts that make OPT unlike GPT-2, all measured against Hugging Face:

- ``hidden_states[0]`` is block 0's input: ``project_in(embed(ids))`` (when the embedding is
  narrower than the blocks, ``word_embed_proj_dim != hidden_size``) plus learned positions.
- ``hidden_states[-1]`` is ``project_out(final_norm(block[-1].output))``: with a projection
  it is narrower than every other entry (``word_embed_proj_dim`` wide), and ``lm_head`` reads
  that width.
- Post-LN configs (``do_layer_norm_before=False``, e.g. opt-350m) have no final norm, so
  ``final_norm`` is a MissingPartError and ``hidden_states[-1]`` is the raw last block output
  (then ``project_out`` where present).
- There is no MLP module: ``block[i].fc1`` and ``block[i].fc2`` name its two linears.
- Heads: ``self_attn`` projects through ``out_proj``. OPT scales the query by
  ``1/√head_dim`` right after ``q_proj`` and calls the attention function with
  ``scaling=1.0``: ``block[i].attn.q`` is the already scaled query.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

OPT = AdapterSpec(
    name="opt",
    model_types=("opt",),
    description="OPT (pre-LN or post-LN, inline MLP, optional project_in/project_out)",
    embed="decoder.embed_tokens",
    blocks="decoder.layers",
    attn="self_attn",
    mlp=None,
    final_norm="decoder.final_layer_norm",
    modules={
        "pos_embed": "decoder.embed_positions",
        "project_in": "decoder.project_in",
        "project_out": "decoder.project_out",
    },
    parts={
        "attn_norm": "self_attn_layer_norm",
        "mlp_norm": "final_layer_norm",
        "fc1": "fc1",
        "fc2": "fc2",
    },
    heads={
        "attn": HeadSpec(
            o="out_proj",
            num_kv_heads=None,
            head_dim=None,
            scores="q·kᵀ + mask (q is q_proj's output already scaled by 1/√head_dim)",
        )
    },
    missing={
        "mlp": (
            "OPT computes its MLP inline in the block (fc1 -> activation -> fc2), there is no "
            "MLP module: capture block[i].fc1 / block[i].fc2 instead"
        ),
        "final_norm": (
            "this OPT config is post-LN (do_layer_norm_before=False, e.g. opt-350m): Hugging "
            "Face applies no norm after the last block, so hidden_states[-1] is the raw last "
            "block output (followed by project_out where the config has one)"
        ),
        "project_in": (
            "this OPT config has word_embed_proj_dim == hidden_size, so the embedding feeds "
            "block 0 without a projection"
        ),
        "project_out": (
            "this OPT config has word_embed_proj_dim == hidden_size, so nothing is projected "
            "after the last block"
        ),
    },
    after_blocks=("final_norm", "project_out"),
    lm_head="lm_head",
    notes=(
        "hidden_states[-1] = project_out(final_norm(block[-1].output)); with a projection it "
        "is word_embed_proj_dim wide, narrower than the other entries",
        "post-LN (do_layer_norm_before=False): block[i].attn_norm and block[i].mlp_norm are "
        "applied after their sub-layer's residual add, and there is no final norm",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(OPT)
