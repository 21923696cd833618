"""The tuned lens and an SAE on SmolLM2-135M from one extraction: the figures of docs/lens.md and docs/sae.md.

Extracts every block of ``smollm2`` on the first 150 paragraphs of Python's own documentation
(``pydoc_data.topics``), trains a tuned lens on them (96 steps of 32 tokens; the held-out KL of
both lenses by block is printed and drawn to ``docs/images/tuned-lens-smollm2-kl.png``), then
trains two TopK SAEs at ``block[15]`` with the same budget, one on every token and one with
``skip_first=1`` (the first token, an attention sink, left out), and evaluates each on the next
40 paragraphs, which neither saw. Install SmolLM2 with ``make install``. Run from the
repository root (about half an hour on 2 CPU cores)::

    python tools/lens_sae_smollm2.py --work /tmp/smollm2-runs
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from pydoc_data.topics import topics

from introspect import Inspector, extract, load_model, train_sae, train_tuned_lens

ROOT = Path(__file__).resolve().parent.parent


def paragraphs() -> list[str]:
    """Python's documentation, one paragraph of at least eight words per line."""
    return [
        " ".join(part.split())
        for name in sorted(topics)
        for part in re.split(r"\n\s*\n", topics[name])
        if len(part.split()) >= 8
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a folder for the runs")
    parser.add_argument("--images", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--sae-epochs", type=int, default=3)
    parser.add_argument("--skip-lens", action="store_true", help="only the SAEs")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    texts = paragraphs()
    (work / "pydoc.txt").write_text("\n".join(texts[:150]) + "\n", "utf-8")
    held = texts[150:190]

    model, tokenizer = load_model("smollm2")
    insp = Inspector(model)
    t0 = time.perf_counter()
    extract(insp, tokenizer, [work / "pydoc.txt"], ["block[:]"], work / "acts")
    print(f"extract: {time.perf_counter() - t0:.0f} s")

    if not args.skip_lens:
        t0 = time.perf_counter()
        lens = train_tuned_lens(
            work / "acts", insp, out=work / "lens", steps=96, batch_size=32, progress=True
        )
        print(f"tuned lens: {time.perf_counter() - t0:.0f} s")
        headers, rows = lens.held_out_table()
        print("| " + " | ".join(headers) + " |")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        lens.plot_held_out(
            args.images / "tuned-lens-smollm2-kl.png",
            title="SmolLM2-135M-Instruct: held-out KL(final ‖ lens) by block, 15 paragraphs",
        )

    batches = [
        tokenizer(text, return_tensors="pt", truncation=True, max_length=256) for text in held
    ]
    print("| trained on | evaluated on | CE score | KL score | explained variance | L0 | dead |")
    for skip in (0, 1):
        t0 = time.perf_counter()
        sae = train_sae(
            work / "acts",
            at="block[15]",
            out=work / f"sae-skip{skip}",
            expansion=8,
            k=32,
            batch_size=256,
            epochs=args.sae_epochs,
            skip_first=skip,
            progress=True,
        )
        seconds = time.perf_counter() - t0
        for eval_skip in sorted({0, skip, 1}):
            ev = insp.evaluate_sae(sae, [dict(b) for b in batches], skip_first=eval_skip)
            trained = "every token" if skip == 0 else "positions 1 and later"
            evaluated = "every token" if eval_skip == 0 else "positions 1 and later"
            print(
                f"| {trained} | {evaluated} | {ev.ce_score:.3f} | {ev.kl_score:.3f} | "
                f"{ev.explained_variance:.3f} | {ev.l0:.1f} | {ev.dead}/{ev.d_sae} |"
            )
        print(f"  (training: {seconds:.0f} s, {sae.metadata['training']['steps']} steps)")


if __name__ == "__main__":
    main()
