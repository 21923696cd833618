"""`introspect extract` across processes: a rank that dies, and a seeded schedule of SIGKILLs
resumed at last by two gloo ranks, each compared with an uninterrupted one-process run.

These start real processes (each imports torch and transformers, a few seconds), so they use
one small corpus and a tiny Llama saved as a folder, kill at points read from the folder (the n-th
shard on disk, plus a random delay) rather than at wall-clock times that depend on the load, and
launch torchrun twice in all: once to lose a rank, once to finish a killed run bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from introspect import ActivationDataset
from introspect._scale.dataset import MANIFEST, PROGRESS, shard_range
from introspect.cli import main

pytestmark = [
    pytest.mark.slow,  # torchrun ranks, killed and resumed
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and sends SIGKILL (Linux)"),
]

WORDS = "the of and to in is that for it as with was on be by this are at from or".split()  # noqa: SIM905
ARGS = ["--at", "block[:]", "--dtype", "float32", "--batch-size", "8", "--shard-rows", "64"]


@pytest.fixture(autouse=True)
def _no_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small corpus beside a tiny Llama saved as a model folder (the toy tokenizer, weights at
    the usual 0.02 scale, so values are O(1) and 1e-5 is a meaningful tolerance)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from introspect.zoo import load_model

    folder = tmp_path_factory.mktemp("corpus")
    _, tokenizer = load_model("toy-llama", progress=False)
    config = LlamaConfig(
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 80))) for _ in range(120)]
    path = folder / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _argv(corpus: Path, out: Path) -> list[str]:
    model = str(corpus.parent / "model")
    return ["extract", model, "--input", str(corpus), "--out", str(out), *ARGS]


@pytest.fixture(scope="module")
def reference(corpus: Path) -> ActivationDataset:
    """The uninterrupted one-process run every other run is compared with, on one thread as
    every process of the killed runs and each rank of the two-rank run: the same float32 sums."""
    out = corpus.parent / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_argv(corpus, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return ActivationDataset(out)


def _command(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "introspect", *_argv(corpus, out), *extra]


def _env(*, ranks: bool = False) -> dict[str, str]:
    env = {**os.environ, "INTROSPECT_PROGRESS": "0"}
    if ranks:
        env.pop("OMP_NUM_THREADS", None)  # the launcher shares the cores among the ranks
    else:
        env["OMP_NUM_THREADS"] = "1"  # as the reference: the same float32 sums
    return env


def _shards(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out) if shard_range(n)) if out.is_dir() else []


def _wait_for(condition: object, process: subprocess.Popen[str], timeout: float = 90) -> bool:
    """Poll ``condition`` until it holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("the extraction did not get going in time")


def _assert_consistent(out: Path) -> None:
    """What a kill may leave: whole shards only (any temporary file hidden), no manifest unless
    the run had finished, and a progress record to resume from."""
    from safetensors import safe_open

    for name in _shards(out):
        with safe_open(str(out / name), framework="pt") as handle:
            rows = json.loads(handle.metadata()["introspect"])["rows"]
            assert handle.get_slice("doc").get_shape() == [rows]
            assert handle.get_slice("block[3]").get_shape() == [rows, 64]
    visible = [n for n in os.listdir(out) if not n.startswith(".")]
    assert set(visible) - set(_shards(out)) <= {PROGRESS, MANIFEST}
    if not (out / MANIFEST).exists():
        assert (out / PROGRESS).exists()


def _assert_same(ours: ActivationDataset, theirs: ActivationDataset, *, exact: bool) -> None:
    """Every document exactly once, in order, with the same values."""
    assert len(ours) == len(theirs) and ours.locators == theirs.locators
    for name in ("doc", "pos", "token_id"):
        assert torch.equal(ours.tokens[name][:], theirs.tokens[name][:]), name
    for loc in ours.locators:
        if exact:
            assert torch.equal(ours[loc][:], theirs[loc][:]), loc
        else:
            # Other batches and thread counts: float32 sums in another order.
            torch.testing.assert_close(ours[loc][:], theirs[loc][:], rtol=1e-5, atol=1e-5)


def _rank_pids(launcher: int) -> dict[int, int]:
    """The ranks torchrun started under ``launcher``, by rank, read from /proc."""
    found = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        children = (task / "children").read_text().split()
        for pid in map(int, children):
            with open(f"/proc/{pid}/environ", "rb") as handle:
                env = dict(
                    item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item
                )
            if b"RANK" in env:
                found[int(env[b"RANK"])] = pid
    return found


def test_a_rank_that_dies_is_named_and_the_run_resumes(
    corpus: Path, reference: ActivationDataset, tmp_path: Path
) -> None:
    out = tmp_path / "dies"
    process = subprocess.Popen(
        _command(corpus, out, "--nproc", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(ranks=True),
    )
    try:
        assert _wait_for(lambda: len(_shards(out)) >= 3, process)
        pids = _rank_pids(process.pid)
        os.kill(pids[1], signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr
    assert stderr.strip().splitlines()[-2:] == [
        "introspect: error: rank 1 of 2 failed (killed by SIGKILL): torchrun stopped the other "
        "ranks and no manifest was written; rerun the same command to resume",
        "(run with --debug for the full traceback)",
    ]
    assert stdout == ""
    assert not (out / MANIFEST).exists()
    _assert_consistent(out)
    # The same command in one process finishes the job: what rank 1 left undone, and nothing
    # twice.
    assert main(_argv(corpus, out)) == 0
    _assert_same(ActivationDataset(out), reference, exact=False)


def test_sigkill_at_random_points_then_two_ranks_resume_bit_for_bit(
    corpus: Path,
    reference: ActivationDataset,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "killed"
    total = len(reference.manifest["shards"])
    rng = random.Random(11)
    for attempt in (1, 2):
        before = len(_shards(out))
        # Where to kill: after a random number of this attempt's shards, plus a random delay
        # (often in the middle of the next shard's write). At most a third of what is left, so
        # the two ranks below have shards of their own to write.
        wait_shards = rng.randint(0, (total - before) // 3)
        delay = rng.uniform(0, 0.01)
        process = subprocess.Popen(
            _command(corpus, out),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        try:

            def started(
                attempt: int = attempt, before: int = before, wait: int = wait_shards
            ) -> bool:
                try:
                    record = json.loads((out / PROGRESS).read_text())
                except (OSError, ValueError):
                    return False
                return record["attempt"] == attempt and len(_shards(out)) >= before + wait

            assert _wait_for(started, process), "the run ended before it was killed"
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            _, stderr = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == -signal.SIGKILL, stderr
        _assert_consistent(out)
        assert not (out / MANIFEST).exists()
    # Two gloo ranks finish it. Each rank cuts its documents into the shards, and each shard
    # into the batches, of the one-process run: the same matrix shapes, so the same float
    # sums. With one thread per process on both sides (the launcher keeps an OMP_NUM_THREADS
    # it is given), every value is equal, not merely close.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # --nproc launches torchrun from this process (the ranks are processes of their own), and
    # leaves this process as it was: signal handlers, environment.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    capfd.readouterr()
    assert main([*_argv(corpus, out), "--nproc", "2"]) == 0
    stdout, stderr = capfd.readouterr()
    assert stdout.startswith(f"wrote {out}: ") and "2 processes" in stdout
    assert stderr == ""
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert os.environ["OMP_NUM_THREADS"] == "1"
    ours = ActivationDataset(out)
    assert ours.manifest["run"]["world_size"] == 2
    assert ours.manifest["shards"] == reference.manifest["shards"]
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    from safetensors import safe_open

    ranks = set()
    for shard in ours.manifest["shards"]:
        with safe_open(str(out / shard["file"]), framework="pt") as handle:
            ranks.add(json.loads(handle.metadata()["introspect"])["rank"])
    assert ranks == {0, 1}  # rank 1 wrote shards of its own
    _assert_same(ours, reference, exact=True)
