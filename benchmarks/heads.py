"""What head locators cost: patterns (eager) against sdpa, per-head edits against block edits.

Prints, for a random Llama-layout model loaded with sdpa attention (6 layers, hidden 256, 8
query and 4 key/value heads, batch 2 x 128) the median time of each case and its ratio to the
plain sdpa forward measured in the same run (cases interleaved call by call, as in
``capture_overhead.py``):

- capturing ``z``/``result`` (hooks on one output projection) or ``q``/``k``/``v`` (one
  module's attention function, through the registered dispatcher) should cost about nothing:
  the other blocks are untouched;
- capturing ``pattern`` switches the model to eager attention for the call: it costs what
  eager attention costs, shown beside a plain eager forward;
- a per-head edit (``ablate(z, heads=[1])``) should cost about what a block edit
  (``ablate(attn)``) costs.

Run: ``python benchmarks/heads.py [--rounds 25] [--seq 128]``
"""

from __future__ import annotations

import argparse

import torch
from capture_overhead import Case, measure
from transformers import LlamaConfig, LlamaForCausalLM

from introspect import Inspector


def build(seq: int) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    config = LlamaConfig(
        num_hidden_layers=6,
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8000,
        max_position_embeddings=max(seq, 64),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, seq))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def cases(model: LlamaForCausalLM, inputs: dict[str, torch.Tensor]) -> dict[str, Case]:
    insp = Inspector(model)

    def plain() -> object:
        return model(**inputs)

    def eager() -> object:
        model.config._attn_implementation = "eager"
        try:
            return model(**inputs)
        finally:
            model.config._attn_implementation = "sdpa"

    def capture(*names: str) -> Case:
        def run() -> object:
            with insp.capture(*names) as cap:
                model(**inputs)
            return cap

        return run

    def edit(make: Case) -> Case:
        def run() -> object:
            with make():  # type: ignore[attr-defined]
                return model(**inputs)

        return run

    return {
        "plain forward (sdpa)": plain,
        "plain forward (eager)": eager,
        "capture block[3]": capture("block[3]"),
        "capture block[3].attn.z": capture("block[3].attn.z"),
        "capture block[3].attn.result": capture("block[3].attn.result"),
        "capture block[3].attn.q/k/v": capture(
            "block[3].attn.q", "block[3].attn.k", "block[3].attn.v"
        ),
        "capture block[3].attn.pattern": capture("block[3].attn.pattern"),
        "capture block[:].attn.pattern": capture("block[:].attn.pattern"),
        "ablate block[3].attn": edit(lambda: insp.ablate("block[3].attn")),
        "ablate block[3].attn.z heads=[1]": edit(lambda: insp.ablate("block[3].attn.z", heads=[1])),
        "ablate block[3].attn.result heads=[1]": edit(
            lambda: insp.ablate("block[3].attn.result", heads=[1])
        ),
        "ablate block[3].attn.pattern heads=[1]": edit(
            lambda: insp.ablate("block[3].attn.pattern", heads=[1])
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    model, inputs = build(args.seq)
    medians = measure(cases(model, inputs), args.rounds, 1)
    base = medians["plain forward (sdpa)"]
    print(
        f"\nLlama layout 6 x 256 (8 heads, 4 kv), batch 2x{args.seq}, sdpa; median of "
        f"{args.rounds} interleaved calls"
    )
    for name, seconds in medians.items():
        print(f"  {name:<40} {seconds * 1e3:9.2f} ms   ratio {seconds / base:6.3f}")


if __name__ == "__main__":
    main()
