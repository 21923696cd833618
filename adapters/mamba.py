"""Mamba, FalconMamba and Mamba2: state-space blocks, no embedding entry in hidden_states.

Facts measured against Hugging Face (transformers 4.57 and 5.x):

- ``hidden_states`` has ``num_blocks + 1`` entries but no embedding entry:
  ``hidden_states[i]`` is block ``i``'s output for ``i < L`` and the last entry is
  ``norm_f`` applied to the last block's output (``hidden_states_start="block_output"``).
  Block 0's input is the raw ``embed`` lookup.
- Mamba2 from transformers 5.25 on records the usual layout instead: ``hidden_states[0]`` is
  the embedding output (block 0's input), ``hidden_states[i]`` block ``i-1``'s output and the
  last entry ``norm_f`` of the last block (4.57 to 5.24: the layout above). Stated per version
  in ``by_version``; Mamba and FalconMamba keep the layout above on 5.25.
- A block is ``input + mixer(norm(input))``: there is no attention and no MLP; the selective
  state-space ``mixer`` and its ``norm`` are ``block[i].mixer`` and ``block[i].norm``.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, VersionFacts, hookimpl

_MISSING = {
    "attn": (
        "a Mamba block has no attention: its sequence mixing is the selective state-space "
        "mixer, block[i].mixer"
    ),
    "mlp": ("a Mamba block has no MLP: it is input + mixer(norm(input)); capture block[i].mixer"),
    "heads": (
        "a Mamba block has no attention: its sequence mixing is the selective state-space "
        "mixer, block[i].mixer (Mamba-2's num_heads are state-space heads inside it, with no "
        "queries, keys or attention pattern)"
    ),
}

MAMBA = AdapterSpec(
    name="mamba",
    model_types=("mamba", "falcon_mamba"),
    description="Mamba / FalconMamba (selective SSM blocks, final RMSNorm, no embedding entry)",
    embed="embeddings",
    blocks="layers",
    final_norm="norm_f",
    parts={"mixer": "mixer", "norm": "norm"},
    missing=_MISSING,
    hidden_states_start="block_output",
    lm_head="lm_head",
    notes=("hidden_states[i] = block[i].output for i < L; hidden_states[L] = norm_f(block[L-1])",),
)

MAMBA2 = MAMBA.derive(
    name="mamba2",
    model_types=("mamba2",),
    description="Mamba2 (multi-head SSD blocks, final RMSNorm; embedding entry from 5.25)",
    by_version=(
        VersionFacts(
            transformers=">=5.25.0.dev0",
            facts={
                "hidden_states_start": "block_input",
                "notes": (
                    "hidden_states[0] = embed output (block[0].input); hidden_states[i] = "
                    "block[i-1].output; hidden_states[L] = norm_f(block[L-1])",
                ),
            },
            why="transformers 5.25 added the embedding output as Mamba2's hidden_states[0]",
        ),
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    """Register the Mamba-family adapters.

    Example:
        >>> specs = []
        >>> register_adapters(specs.append)
        >>> [s.name for s in specs]
        ['mamba', 'mamba2']
    """
    register(MAMBA)
    register(MAMBA2)
