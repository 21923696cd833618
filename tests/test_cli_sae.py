"""`introspect train-sae` and `introspect sae eval`: extract, train, evaluate, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _support.cli import error_line, run_command

import introspect._sae
import introspect.zoo
from introspect import Inspector, SparseAutoencoder, evaluate_sae, load_sae
from introspect._batching import pad_batch
from introspect.cli import main
from introspect.zoo import load_model

CORPUS = "\n".join(
    f"Document {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs." for i in range(16)
)
METRICS = [
    "ce_score",
    "ce_clean",
    "ce_sae",
    "ce_ablate",
    "kl_score",
    "kl_sae",
    "kl_ablate",
    "l0",
    "explained_variance",
    "dead",
]


@pytest.fixture(autouse=True)
def _no_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")


@pytest.fixture
def no_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluating fails the test: the error must come before any forward."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the SAE must not be evaluated")

    monkeypatch.setattr(introspect._sae, "evaluate_sae", refuse)


def _printed(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@dataclass
class Work:
    """A folder with corpus.txt, its toy-gpt2 block[-1] activations (acts) and an SAE (sae),
    made by the commands, with what they printed."""

    folder: Path
    extract: tuple[int, str, str]
    train: tuple[int, str, str]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Work:
    folder = tmp_path_factory.mktemp("cli-sae")
    (folder / "corpus.txt").write_text(CORPUS + "\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTROSPECT_PROGRESS", "0")
        extract = _printed(
            "extract", "toy-gpt2", "--input", str(folder / "corpus.txt"), "--at", "block[-1]",
            "--out", str(folder / "acts"), "--dtype", "float32",
        )  # fmt: skip
        patch.setenv("INTROSPECT_PROGRESS", "1")  # the progress lines on stderr
        train = _printed(
            "train-sae", "toy-gpt2", "--data", str(folder / "acts"), "--at", "block[-1]",
            "--out", str(folder / "sae"), "--expansion", "2", "--k", "4", "--steps", "6",
            "--batch-size", "32", "--lr", "1e-3", "--seed", "1",
        )  # fmt: skip
    return Work(folder, extract, train)


def _train(work: Work, out: Path, *extra: str) -> list[str]:
    argv = ["train-sae", "toy-gpt2", "--data", str(work.folder / "acts"), "--at", "block[3]"]
    return [*argv, "--out", str(out), "--d-sae", "96", "--k", "4", "--batch-size", "32", *extra]


# -- end to end --------------------------------------------------------------------------------


def test_extract_train_and_evaluate(capsys: pytest.CaptureFixture[str], work: Work) -> None:
    acts, sae_dir = work.folder / "acts", work.folder / "sae"
    code, out, err = work.extract
    assert code == 0 and out.startswith(f"wrote {acts}"), err
    code, out, err = work.train
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        f"wrote {sae_dir}: TopK SAE at block[3] of toy-gpt2, 64 -> 128 latents, k 4; "
        "6 steps of 32 tokens"
    )
    assert lines[1].startswith("final fraction of variance unexplained ")
    assert "tokens/s from disk" in lines[2]
    assert lines[-1] == f"next: introspect sae eval toy-gpt2 {sae_dir} --input FILE"
    assert err.splitlines()[-1].startswith("train-sae: step 6/6 fvu ")
    sae = load_sae(sae_dir)
    assert (sae.format, sae.architecture, sae.locator) == ("saelens", "topk", "block[3]")
    assert (sae.d_in, sae.d_sae, sae.k) == (64, 128, 4)
    settings = sae.metadata["training"]["settings"]
    assert (settings["lr"], settings["seed"], settings["steps"]) == (1e-3, 1, 6)

    held_out = work.folder / "held-out.jsonl"
    held_out.write_text(
        '{"text": "A lazy dog sleeps."}\n{"text": "The fox number 99 runs."}\n', encoding="utf-8"
    )
    code, out, err = run_command(
        capsys, "sae", "eval", "toy-gpt2", str(sae_dir), "--input", str(held_out)
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(
        f"toy-gpt2: SAE {sae_dir} (saelens, topk, 64 -> 128 latents) at block[3], on "
    )
    assert lines[0].endswith("tokens of 2 sequences")
    assert lines[1].split() == ["metric", "value", "what", "it", "is"]
    assert [line.split()[0] for line in lines[3:]] == METRICS


def test_eval_json_is_the_librarys_evaluation(
    capsys: pytest.CaptureFixture[str], work: Work
) -> None:
    prompts = ["The quick brown fox jumps.", "A second, longer prompt about lazy dogs."]
    argv = ["sae", "eval", "toy-gpt2", str(work.folder / "sae"), "--json", "--batch-size", "1"]
    code, out, err = run_command(capsys, *argv, "--prompt", prompts[0], "--prompt", prompts[1])
    assert code == 0, err
    shown = json.loads(out)
    model, tokenizer = load_model("toy-gpt2", progress=False)
    sae = load_sae(work.folder / "sae")
    batches = [
        {k: v for k, v in pad_batch([tokenizer(p)["input_ids"]]).items() if k != "position_ids"}
        for p in prompts
    ]
    expected = evaluate_sae(Inspector(model), sae, batches)
    assert shown["tokens"] == expected.tokens and shown["documents"] == 2
    assert shown["at"] == "block[3]" and shown["format"] == "saelens"
    assert shown["dead"] == expected.dead and shown["d_sae"] == 128
    for name in METRICS:
        assert shown[name] == pytest.approx(getattr(expected, name), rel=1e-5, abs=1e-6), name


def test_skip_first_reaches_training_and_evaluation(
    capsys: pytest.CaptureFixture[str], work: Work, tmp_path: Path
) -> None:
    code, _, err = run_command(
        capsys, *_train(work, tmp_path / "s", "--steps", "2", "--skip-first", "1")
    )
    assert code == 0, err
    sae = load_sae(tmp_path / "s")
    assert sae.metadata["training"]["settings"]["skip_first"] == 1
    prompt = "The quick brown fox jumps."
    argv = ["sae", "eval", "toy-gpt2", str(tmp_path / "s"), "--json", "--prompt", prompt]
    code, out, err = run_command(capsys, *argv, "--skip-first", "2")
    assert code == 0, err
    shown = json.loads(out)
    model, tokenizer = load_model("toy-gpt2", progress=False)
    ids = {"input_ids": torch.tensor([tokenizer(prompt)["input_ids"]])}
    expected = evaluate_sae(Inspector(model), sae, ids, skip_first=2)
    assert shown["tokens"] == expected.tokens == ids["input_ids"].shape[1] - 2
    for name in METRICS:
        assert shown[name] == pytest.approx(getattr(expected, name), rel=1e-5, abs=1e-6), name


def test_eval_at_another_site(capsys: pytest.CaptureFixture[str], work: Work) -> None:
    argv = ["sae", "eval", "toy-gpt2", str(work.folder / "sae"), "--prompt", "Hello there, fox."]
    code, out, err = run_command(capsys, *argv, "--at", "block[1]", "--json")
    assert code == 0, err
    assert json.loads(out)["at"] == "block[1]"


# -- resume, keep, start over -------------------------------------------------------------------


@pytest.mark.usefixtures("no_model")
def test_a_finished_sae_is_kept_and_force_starts_over(
    capsys: pytest.CaptureFixture[str], work: Work, tmp_path: Path
) -> None:
    out_dir = tmp_path / "sae"
    code, out, _ = run_command(capsys, *_train(work, out_dir, "--steps", "3"))
    assert code == 0 and out.startswith(f"wrote {out_dir}: ")
    weights = load_sae(out_dir).W_enc.clone()
    code, out, _ = run_command(capsys, *_train(work, out_dir, "--steps", "3", "--json"))
    assert code == 0
    again = json.loads(out)
    assert again["already_complete"] is True and again["training"]["steps"] == 3
    assert (again["at"], again["d_in"], again["d_sae"], again["k"]) == ("block[3]", 64, 96, 4)
    code, out, _ = run_command(capsys, *_train(work, out_dir, "--steps", "3"))
    assert out.startswith(f"already trained, nothing to do: {out_dir}: ")
    code, out, _ = run_command(capsys, *_train(work, out_dir, "--steps", "3", "--force"))
    assert code == 0 and out.startswith(f"wrote {out_dir}: ")
    assert torch.equal(load_sae(out_dir).W_enc, weights)  # the same seed, the same SAE
    code, out, err = run_command(capsys, *_train(work, out_dir, "--steps", "5"))
    assert code == 1 and out == ""
    assert "holds a run with other settings" in error_line(err)


@pytest.mark.usefixtures("no_model")
def test_an_interrupted_run_resumes(
    capsys: pytest.CaptureFixture[str],
    work: Work,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = introspect._sae.train_sae
    monkeypatch.setattr(introspect._sae, "train_sae", lambda *a, **kw: real(*a, **kw, stop_after=2))
    out_dir = tmp_path / "sae"
    argv = _train(work, out_dir, "--steps", "5", "--checkpoint-every", "1")
    assert run_command(capsys, *argv)[0] == 0  # stopped after 2 steps, as Ctrl-C would
    assert not (out_dir / "cfg.json").exists() and (out_dir / "checkpoint").is_dir()
    monkeypatch.setattr(introspect._sae, "train_sae", real)
    code, out, _ = run_command(capsys, *argv)
    assert code == 0
    assert "5 steps of 32 tokens (resumed at step 2)" in out.splitlines()[0]
    straight = tmp_path / "straight"
    assert (
        run_command(capsys, *_train(work, straight, "--steps", "5", "--checkpoint-every", "1"))[0]
        == 0
    )
    assert torch.equal(load_sae(out_dir).W_dec, load_sae(straight).W_dec)


# -- bad input: one line, before any work --------------------------------------------------------


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--data": "no-such-folder"}, "no-such-folder is not an extraction folder"),
        ({"--at": "block[1]"}, "block[1] was not extracted into"),
        ({"--at": "blok[3]"}, "cannot parse locator 'blok[3]'"),
        ({"model": "toy-llama"}, "holds activations of 'toy-gpt2' (its manifest.json), not of"),
        ({"--out": "corpus.txt"}, "is a file: name a folder for the SAE"),
        ({"--k": "500"}, "k must be in 1..d_sae (96), got 500"),
        ({"--batch-size": "100000"}, "rows, fewer than one batch of 100000"),
    ],
)
def test_train_sae_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str],
    work: Work,
    tmp_path: Path,
    change: dict[str, str],
    message: str,
) -> None:
    argv = _train(work, tmp_path / "sae")
    if "model" in change:
        argv[1] = change["model"]
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
    argv = [str(work.folder / a) if a in ("no-such-folder", "corpus.txt") else a for a in argv]
    code, out, err = run_command(capsys, *argv)
    assert code == 1 and out == ""
    assert message in error_line(err)
    assert not (tmp_path / "sae").exists()


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    "extra",
    [
        [],  # neither --expansion nor --d-sae
        ["--expansion", "2", "--d-sae", "8"],
        ["--expansion", "2", "--steps", "2", "--epochs", "1"],
        ["--expansion", "2", "--lr", "-1"],
        ["--expansion", "0"],
    ],
)
def test_train_sae_malformed_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str], work: Work, tmp_path: Path, extra: list[str]
) -> None:
    argv = ["train-sae", "toy-gpt2", "--data", str(work.folder / "acts"), "--at", "block[3]"]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path / "sae"), "--k", "2", *extra])
    assert info.value.code == 2
    assert "usage: introspect train-sae" in capsys.readouterr().err


@pytest.mark.usefixtures("no_model")
def test_eval_refuses_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], work: Work, tmp_path: Path
) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an SAE\n")
    cases = [
        ([str(tmp_path / "missing"), "--prompt", "hi"], "missing does not exist"),
        ([str(junk), "--prompt", "hi"], "junk is in no known SAE format (it holds notes.txt)"),
        (
            [str(work.folder / "sae"), "--prompt", "hi", "--format", "onnx"],
            "unknown SAE format 'onnx'",
        ),
        ([str(work.folder / "sae"), "--prompt", ""], "the prompt is empty"),
        (
            [str(work.folder / "sae"), "--input", str(tmp_path / "none.txt")],
            "none.txt does not exist",
        ),
        ([str(work.folder / "sae"), "--prompt", "hi", "--at", "blok[1]"], "cannot parse locator"),
    ]
    for argv, message in cases:
        code, out, err = run_command(capsys, "sae", "eval", "toy-gpt2", *argv)
        assert code == 1 and out == "", argv
        assert message in error_line(err), argv


@pytest.mark.usefixtures("no_evaluation")
def test_eval_refuses_a_width_mismatch_before_any_forward(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    narrow = SparseAutoencoder(32, 64, architecture="topk", k=4, locator="block[0]")
    folder = narrow.save(tmp_path / "narrow")
    code, out, err = run_command(
        capsys, "sae", "eval", "toy-gpt2", str(folder), "--prompt", "Hi there"
    )
    assert code == 1 and out == ""
    assert "the SAE reads d_in=32 values, but block[0] is 64 wide" in error_line(err)


def test_sae_needs_a_sub_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["sae"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["sae", "eval", "toy-gpt2", "x", "--prompt", "a", "--input", "b"])  # one or other
    assert "not allowed with argument" in capsys.readouterr().err


def test_debug_after_the_sub_command_shows_the_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["sae", "eval", "toy-gpt2", str(tmp_path / "x"), "--prompt", "a", "--debug"]
    code, _, err = run_command(capsys, *argv)
    assert code == 1 and "Traceback" in err and "does not exist" in err
