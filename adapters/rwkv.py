"""RWKV (v4): time-mixing and channel-mixing blocks, no embedding entry, rescaled stream.

Facts measured against Hugging Face (transformers 4.57 and 5.x):

- ``hidden_states`` has ``num_blocks + 1`` entries but no embedding entry: entry ``i`` is
  the stream after block ``i`` and the last entry is ``ln_out`` applied to the stream after
  the last block. Block 0 applies its own ``pre_ln`` to the raw ``embed`` lookup.
- In eval mode RWKV divides the weights of each block's ``attention.output`` and
  ``feed_forward.value`` by ``2 ** (i // rescale_every)`` (once, in place, on the first
  forward) and halves the stream after every ``rescale_every``-th block, outside any module.
  So after those blocks HF's entry is half of ``block[i].output``: it is exactly the input of
  the next module (``block[i+1]``, or ``final_norm`` after the last block), and that is where
  ``hidden_state_locator(i)`` reads it. ``finish``/``logits`` apply the halving after the last
  block too. In train mode nothing is rescaled and the entries are the block outputs.
- ``block[i].attn`` is the time-mixing (``attention``) and ``block[i].mlp`` the channel-mixing
  (``feed_forward``) sub-layer; each returns its output and its recurrent state.
- There are no attention heads: the time-mixing is a linear recurrence (the WKV kernel: per
  channel, an exponentially decaying sum over past keys and values, gated by the
  receptance), with no queries, no split into heads and no attention pattern, so head
  locators (``block[i].attn.q``, ``.z``, ``.pattern``, ...) are refused.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, StreamOp, hookimpl

RWKV = AdapterSpec(
    name="rwkv",
    model_types=("rwkv",),
    description="RWKV v4 (time/channel mixing, halved stream every rescale_every blocks)",
    embed="embeddings",
    blocks="blocks",
    attn="attention",
    mlp="feed_forward",
    mlp_post="value",
    final_norm="ln_out",
    parts={"attn_norm": "ln1", "mlp_norm": "ln2", "pre_ln": "pre_ln"},
    missing={
        "pre_ln": "only block 0 has pre_ln (the LayerNorm RWKV applies to the embedding lookup)",
        "heads": (
            "RWKV has no attention heads: block[i].attn is its time-mixing, a linear "
            "recurrence (WKV: a per-channel decaying sum of past keys and values, gated by "
            "the receptance) with no queries, no split into heads and no attention pattern; "
            "capture block[i].attn instead (its output is the time-mixing's contribution)"
        ),
    },
    hidden_states_start="block_output",
    between_blocks=(
        StreamOp(
            kind="divide", value=2.0, every="rescale_every", only_if_attr="layers_are_rescaled"
        ),
    ),
    lm_head="head",
    notes=(
        "in eval mode the stream is halved after every rescale_every-th block: "
        "hidden_states[i] = block[i+1].input (the last ones: final_norm.input, final_norm)",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    """Register the RWKV adapter.

    Example:
        >>> specs = []
        >>> register_adapters(specs.append)
        >>> [s.name for s in specs]
        ['rwkv']
    """
    register(RWKV)
