"""How much does a capture cost next to a plain forward?

Prints, for a GPT-2-small-sized random model (12 layers, hidden 768, vocab 50257) at batch
4 x 128 and a tiny GPT-2 (12 layers, hidden 64) at batch 1 x 16, the median time of each case
and its ratio to the plain forward measured in the same run, next to two plain forward hooks
registered and removed by hand (the floor any hook-based tool pays). For the tiny model it also
breaks the fixed cost of a capture down in microseconds (building it, entering and leaving it,
its hooks during a forward) and gives the cost per step of capturing during ``generate``. After warm-up, cases are
interleaved call by call in a shuffled order each round, so drift in machine load hits them
all alike; the median of the per-call times discards the rare pauses (garbage collection,
other processes).

Run: ``python benchmarks/capture_overhead.py [--rounds 25] [--only tiny|small]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from introspect import Inspector

Case = Callable[[], object]


def build(size: str) -> tuple[GPT2LMHeadModel, dict[str, torch.Tensor], int]:
    """The model, its inputs and how many timed calls of each case one round makes."""
    if size == "small":
        config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
        batch, seq, repeat = 4, 128, 1
    else:
        config = GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
        batch, seq, repeat = 1, 16, 100
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, repeat


def cases(model: GPT2LMHeadModel, inputs: dict[str, torch.Tensor]) -> dict[str, Case]:
    insp = Inspector(model)

    def plain() -> object:
        return model(**inputs)

    def hf_hidden_states() -> object:
        return model(**inputs, output_hidden_states=True)

    def capture() -> object:
        with insp.capture("block[0]", "block[-1]") as cap:
            model(**inputs)
        return cap

    first, last = model.transformer.h[0], model.transformer.h[-1]

    def raw_hooks() -> object:
        kept: list[object] = []

        def keep(module: object, args: object, output: object) -> None:
            kept.append(output)

        handles = [first.register_forward_hook(keep), last.register_forward_hook(keep)]
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        return kept

    found: dict[str, Case] = {
        "plain forward": plain,
        "output_hidden_states=True": hf_hidden_states,
        "raw hooks block[0]+block[-1]": raw_hooks,
        "capture block[0]+block[-1]": capture,
    }
    # Early stop ends the forward after the first half of the blocks, without the head:
    # block[5] of 12 (on a smaller model, the last block of its first half).
    stop_at = max(insp.num_blocks // 2 - 1, 0)

    def early_stop() -> object:
        with insp.capture(f"block[{stop_at}]", stop=True) as cap:
            model(**inputs)
        return cap

    found[f"early stop block[{stop_at}] of {insp.num_blocks}"] = early_stop
    return found


def measure(run: dict[str, Case], rounds: int, repeat: int) -> dict[str, float]:
    """Median seconds per call of each case, interleaved call by call."""
    times: dict[str, list[float]] = {name: [] for name in run}
    shuffle = random.Random(0).shuffle
    clock = time.perf_counter
    with torch.no_grad():
        for case in run.values():  # warm-up (lazy inits, allocator, HF's own hooks)
            for _ in range(max(3, repeat // 10)):
                case()
        order = list(run.items())
        for _ in range(rounds * repeat):
            shuffle(order)  # no case always runs right after another
            for name, case in order:
                start = clock()
                case()
                times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def breakdown(model: GPT2LMHeadModel, inputs: dict[str, torch.Tensor], rounds: int) -> None:
    """Microseconds of a capture's fixed cost, and of capturing one generation step."""
    insp = Inspector(model)
    names = ("block[0]", "block[-1]")

    def build_only() -> object:
        return insp.capture(*names)

    built = insp.capture(*names)

    def enter_exit() -> object:
        with built:
            pass
        return built

    prompt = inputs["input_ids"][:, :8]
    steps = 8

    def generate() -> object:
        return model.generate(
            prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
        )

    def generate_captured() -> object:
        with insp.capture(*names) as cap:
            generate()
        return cap

    medians = measure(
        {
            "build": build_only,
            "enter+exit": enter_exit,
            "generate": generate,
            "generate captured": generate_captured,
        },
        rounds,
        4,
    )
    print("  fixed cost of one capture (median, microseconds):")
    print(f"    build the capture (resolve 2 locators)  {medians['build'] * 1e6:8.1f}")
    print(f"    enter and exit it (no forward)          {medians['enter+exit'] * 1e6:8.1f}")
    per_step = (medians["generate captured"] - medians["generate"]) / steps
    print(f"  capturing during generate, per step       {per_step * 1e6:8.1f}  ({steps} steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--only", choices=["tiny", "small"])
    args = parser.parse_args()
    sizes = [args.only] if args.only else ["small", "tiny"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for size in sizes:
        model, inputs, repeat = build(size)
        shape = "x".join(str(d) for d in inputs["input_ids"].shape)
        medians = measure(cases(model, inputs), args.rounds, repeat)
        base = medians["plain forward"]
        label = "GPT-2-small size (12 x 768)" if size == "small" else "tiny GPT-2 (12 x 64)"
        print(f"\n{label}, batch {shape}, median of {args.rounds * repeat} interleaved calls")
        for name, seconds in medians.items():
            print(f"  {name:<34} {seconds * 1e3:9.3f} ms   ratio {seconds / base:6.3f}")
        hooks = medians["capture block[0]+block[-1]"] - medians["raw hooks block[0]+block[-1]"]
        print(f"  capture minus raw hooks, per forward     {hooks * 1e6:9.1f} us")
        if size == "tiny":
            breakdown(model, inputs, args.rounds)


if __name__ == "__main__":
    main()
