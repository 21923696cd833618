"""Gemma-3n: refused, because its residual stream is four parallel AltUp copies.

Measured against Hugging Face (transformers 4.57 and 5.x): Gemma-3n's text model stacks
``altup_num_inputs`` (4) predicted copies of the stream, and every decoder layer takes and
returns a 4-D tensor ``[altup_num_inputs, batch, seq, hidden]``. Hugging Face's
``hidden_states`` entries are those 4-D stacks, the last one included; only after the last
layer does the model project copies 1..n back (``altup_unembed_projections``), rescale their
magnitudes, average the copies and apply ``norm``. No entry is the ``[batch, seq, hidden]``
stream that ``block[i]``, the index semantics and ``logits`` promise, so introspect refuses the
model with that reason instead of answering wrongly.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, hookimpl

GEMMA3N = AdapterSpec(
    name="gemma3n",
    model_types=("gemma3n", "gemma3n_text"),
    description="Gemma-3n (refused: 4-D AltUp residual stream)",
    embed="embed_tokens|language_model.embed_tokens",
    blocks="layers|language_model.layers",
    final_norm="norm|language_model.norm",
    lm_head="lm_head",
    unsupported=(
        "Gemma-3n keeps altup_num_inputs parallel copies of its residual stream (AltUp): every "
        "decoder layer takes and returns a 4-D tensor [altup_num_inputs, batch, seq, hidden] "
        "and Hugging Face's hidden_states are those 4-D stacks; the copies are projected back, "
        "averaged and normed only after the last layer. No block output is the [batch, seq, "
        "hidden] stream that locators, hidden-state indices and logits() are defined on, so "
        "introspect refuses rather than answer wrongly. Hook the modules yourself with "
        "torch's register_forward_hook if you need their raw outputs"
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    """Register the Gemma-3n refusal.

    Example:
        >>> specs = []
        >>> register_adapters(specs.append)
        >>> specs[0].unsupported is not None
        True
    """
    register(GEMMA3N)
