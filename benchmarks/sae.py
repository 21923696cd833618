"""What does splicing an SAE cost next to a plain forward? And how fast does training read?

Forward: a random 4-block Llama (hidden 256, vocab 1000) at batch 8 x 128 with a TopK SAE
(8x expansion, k = 32) at ``block[2]``. Cases, interleaved call by call in a shuffled order
each round after warm-up (drift in machine load hits them all alike), medians of the per-call
times: the plain forward, the SAE alone on that site's value (its own matmuls), and the
spliced forward with and without the error term. The claim checked: a spliced forward costs
at most the plain forward plus the SAE's own work.

Training (``--train``): tokens per second of ``train_sae`` from an extraction on disk, and the
share of that time spent reading the shards.

Run: ``python benchmarks/sae.py [--rounds 25] [--train]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from introspect import Inspector, SparseAutoencoder, train_sae
from introspect._sae import splice


def forward_ratio(rounds: int) -> None:
    config = LlamaConfig(
        num_hidden_layers=4,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    insp = Inspector(model)
    ids = torch.randint(0, 1000, (8, 128))
    sae = SparseAutoencoder(256, 2048, architecture="topk", k=32)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.05)
        with insp.capture("block[2]") as cap:
            model(ids)
    h = cap["block[2]"].output.detach()

    def plain() -> object:
        return model(ids)

    def sae_alone() -> object:
        return sae(h)

    def spliced() -> object:
        with splice(insp, sae, "block[2]"):
            return model(ids)

    def error_term() -> object:
        with splice(insp, sae, "block[2]", error_term=True):
            return model(ids)

    cases: dict[str, Callable[[], object]] = {
        "plain forward": plain,
        "SAE alone": sae_alone,
        "spliced": spliced,
        "spliced, error term": error_term,
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    rng = random.Random(0)
    with torch.no_grad():
        for name in cases:
            cases[name]()  # warm-up
        for _ in range(rounds):
            order = list(cases)
            rng.shuffle(order)
            for name in order:
                start = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    base = median["plain forward"]
    budget = base + median["SAE alone"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")
    print(f"{'case':24s} {'median ms':>10s} {'/ plain':>8s} {'/ (plain + SAE)':>16s}")
    for name, value in median.items():
        print(f"{name:24s} {value * 1e3:10.2f} {value / base:8.3f} {value / budget:16.3f}")


def training_throughput() -> None:
    from introspect import extract
    from introspect.zoo import load_model

    model, tokenizer = load_model("toy-llama", progress=False)
    folder = Path(tempfile.mkdtemp())
    corpus = folder / "corpus.txt"
    from pydoc_data.topics import topics

    corpus.write_text("\n".join(" ".join(t.split()[:200]) for t in list(topics.values())[:300]))
    extract(Inspector(model), tokenizer, [corpus], ["block[2]"], folder / "acts")
    sae = train_sae(
        folder / "acts",
        at="block[2]",
        out=folder / "sae",
        k=32,
        expansion=8,
        batch_size=1024,
        epochs=2,
    )
    stats = sae.metadata["training"]
    print(
        f"train_sae: {stats['tokens_this_run']} tokens in {stats['steps']} steps, "
        f"{stats['tokens_per_second']:.0f} tokens/s from disk, "
        f"{100 * stats['read_share']:.1f} % of the time reading, final FVU {stats['final_fvu']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--train", action="store_true")
    args = parser.parse_args()
    forward_ratio(args.rounds)
    if args.train:
        training_throughput()


if __name__ == "__main__":
    main()
