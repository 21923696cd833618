"""`introspect tune-lens` and `introspect lens --tuned`: extract, train, read, resume, and bad
input refused in one line before any work."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.cli import error_line

import introspect._analysis.lens
import introspect._analysis.tuned
import introspect.zoo
from introspect import Inspector, TunedLens, logit_lens
from introspect.cli import main
from introspect.zoo import load_model

CORPUS = "\n".join(
    f"Document {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs." for i in range(12)
)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tensors of width 64 gain nothing from a second thread (tests/test_tuned_lens.py).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")


def _printed(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@dataclass
class Work:
    """corpus.txt, its toy-llama block[:] activations (acts) and a lens (lens), made by the
    commands, with what tune-lens printed."""

    folder: Path
    train: tuple[int, str, str]

    @property
    def acts(self) -> Path:
        return self.folder / "acts"

    @property
    def lens(self) -> Path:
        return self.folder / "lens"

    def tune(self, out: Path, *extra: str) -> list[str]:
        argv = ["tune-lens", "toy-llama", "--data", str(self.acts), "--out", str(out)]
        return [*argv, "--steps", "6", "--batch-size", "32", "--held-out", "0.25", *extra]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Work:
    folder = tmp_path_factory.mktemp("cli-tuned-lens")
    (folder / "corpus.txt").write_text(CORPUS + "\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTROSPECT_PROGRESS", "0")
        code, _, err = _printed(
            "extract", "toy-llama", "--input", str(folder / "corpus.txt"), "--at", "block[:]",
            "--out", str(folder / "acts"), "--dtype", "float32",
        )  # fmt: skip
        assert code == 0, err
        patch.setenv("INTROSPECT_PROGRESS", "1")  # the progress lines on stderr
        work = Work(folder, (0, "", ""))
        work.train = _printed(*work.tune(work.lens))
    return work


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training or running the lens fails the test: the error must come before either."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing must run")

    monkeypatch.setattr(introspect._analysis.tuned, "train_tuned_lens", refuse)
    monkeypatch.setattr(introspect._analysis.lens, "logit_lens", refuse)


def _params(folder: Path) -> dict[str, torch.Tensor]:
    return dict(TunedLens.load(folder).translators.state_dict())


# -- end to end --------------------------------------------------------------------------------


def test_tune_lens_trains_and_prints_the_held_out_table(work: Work) -> None:
    code, out, err = work.train
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        f"wrote {work.lens}: tuned lens of toy-llama, 3 of 4 translators trained (block[0], "
        "block[1], block[2]); 6 steps of 32 tokens"
    )
    assert (
        lines[1].startswith("KL(final || lens) on ")
        and "held-out tokens (3 documents)" in (lines[1])
    )
    assert lines[2].split() == ["block", "logit", "lens", "KL", "tuned", "lens", "KL", "ratio"]
    lens = TunedLens.load(work.lens)
    assert [line.split() for line in lines[4:7]] == lens.held_out_table()[1]
    assert lines[-1] == f"next: introspect lens toy-llama --prompt TEXT --tuned {work.lens}"
    assert err.splitlines()[-1].startswith("tune-lens: step 6/6 KL ")
    held = lens.metadata["training"]["held_out"]
    assert all(t < p for p, t in zip(held["logit_lens"], held["tuned_lens"], strict=True))
    assert lens.metadata["training"]["settings"]["lr"] == 1.0 * (1 - 0.9)  # the library's


def test_lens_tuned_reads_through_the_lens(work: Work) -> None:
    code, out, err = _printed("lens", "toy-llama", "--prompt", PROMPT, "--tuned", str(work.lens))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(
        f"toy-llama: next-token predictions after each block through the tuned lens {work.lens} "
        "at position 4"
    )
    assert [line.split()[0] for line in lines[3:7]] == [f"block[{i}]" for i in range(4)]
    assert lines[-1].startswith("block[3] reproduces the model's own logits")
    code, out, err = _printed(
        "lens", "toy-llama", "--prompt", PROMPT, "--tuned", str(work.lens), "--json", "-k", "3"
    )
    assert code == 0, err
    data = json.loads(out)
    assert (data["lens"], data["tuned"]) == ("tuned", str(work.lens))
    model, tok = load_model("toy-llama", progress=False)
    insp = Inspector(model)
    tuned = logit_lens(insp, PROMPT, tokenizer=tok, k=3, tuned=TunedLens.load(work.lens))
    plain = logit_lens(insp, PROMPT, tokenizer=tok, k=3)
    expected = tuned.to_dict([-1])["positions"][0]["rows"]
    shown = data["positions"][0]["rows"]
    assert [r["row"] for r in shown] == [f"block[{i}]" for i in range(4)]
    assert [[t["id"] for t in r["top"]] for r in shown] == [
        [t["id"] for t in r["top"]] for r in expected
    ]
    assert tuned.top_ids[0].tolist() != plain.top_ids[0].tolist()  # block[0] reads otherwise


def test_tune_lens_json_and_a_finished_lens_is_kept(work: Work) -> None:
    before = (work.lens / "params.pt").stat().st_mtime_ns
    code, out, err = _printed(*work.tune(work.lens), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["already_complete"] is True
    assert (data["d_model"], data["num_hidden_layers"]) == (64, 4)
    assert data["rows"] == ["block[0]", "block[1]", "block[2]"]
    assert set(data["held_out"]) == {"tokens", "rows", "logit_lens", "tuned_lens", "documents"}
    assert len(data["held_out"]["documents"]) == 3
    assert data["training"]["steps"] == 6 and data["training"]["finished"] is True
    assert (work.lens / "params.pt").stat().st_mtime_ns == before
    code, out, _ = _printed(*work.tune(work.lens))
    assert code == 0 and out.startswith(f"already trained, nothing to do: {work.lens}: ")


def test_an_interrupted_run_resumes_and_force_starts_over(
    work: Work, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "lens"
    train = introspect._analysis.tuned.train_tuned_lens

    def interrupted(*args: Any, **kwargs: Any) -> TunedLens:
        return train(*args, **kwargs, stop_after=2)

    with monkeypatch.context() as patch:
        patch.setattr(introspect._analysis.tuned, "train_tuned_lens", interrupted)
        code, out, err = _printed(*work.tune(out_dir))
    assert code == 0, err
    assert out.splitlines() == [
        f"stopped at step 2 of 6: the checkpoint is in {out_dir / 'checkpoint'}; rerun the "
        "same command to resume"
    ]
    code, out, err = _printed(*work.tune(out_dir))
    assert code == 0, err
    assert out.splitlines()[0].endswith("6 steps of 32 tokens (resumed at step 2)")
    resumed = _params(out_dir)
    whole = _params(work.lens)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # as a run never stopped

    code, _, err = _printed(*work.tune(out_dir)[:-4], "--steps", "3")
    assert code == 1
    assert error_line(err).endswith(
        "holds a run with other settings: rerun with the same arguments to resume it, or pass "
        "--force to start over"
    )
    code, out, err = _printed(*work.tune(out_dir), "--force")
    assert code == 0, err
    assert out.startswith(f"wrote {out_dir}: ") and "resumed" not in out
    again = _params(out_dir)
    assert all(torch.equal(again[k], whole[k]) for k in whole)


def test_a_lens_named_for_another_model_of_the_same_shape_warns(work: Work) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, out, err = _printed("lens", "toy-gpt2", "--prompt", PROMPT, "--tuned", str(work.lens))
    assert code == 0, err
    assert err.splitlines() == [
        f"introspect: warning: {work.lens} was tuned for 'toy-llama', not 'toy-gpt2': its "
        "width and block count match, its translators may not"
    ]
    assert "through the tuned lens" in out


# -- bad input: one line, before the work ----------------------------------------------------


@pytest.mark.usefixtures("no_model")
def test_tune_lens_refuses_a_missing_or_foreign_dataset(work: Work, tmp_path: Path) -> None:
    code, _, err = _printed(*work.tune(tmp_path / "out"))  # the dataset is fine ...
    assert code == 1 and "the model must not load" in err  # ... so it gets to the model
    argv = ["tune-lens", "toy-llama", "--data", str(tmp_path / "nope"), "--out", "x"]
    code, _, err = _printed(*argv)
    assert code == 1
    assert error_line(err) == (
        f"introspect: error: {tmp_path / 'nope'} is not an extraction folder (no manifest.json): "
        "write one with introspect extract MODEL --input ... --at ... --out DIR"
    )
    code, _, err = _printed("tune-lens", "toy-gpt2", *work.tune(tmp_path / "o")[2:])
    assert code == 1
    assert error_line(err) == (
        f"introspect: error: {work.acts} holds activations of 'toy-llama' (its manifest.json), "
        "not of 'toy-gpt2': name the model it was extracted from"
    )
    (tmp_path / "file").write_text("x", encoding="utf-8")
    code, _, err = _printed(*work.tune(tmp_path / "file"))
    assert code == 1
    assert "is a file: name a folder for the lens" in error_line(err)
    code, _, err = _printed(*work.tune(tmp_path / "o"), "--at", "block[")
    assert code == 1 and "block[" in error_line(err)


@pytest.mark.usefixtures("no_work")
def test_tune_lens_refuses_a_dataset_without_the_last_block(work: Work, tmp_path: Path) -> None:
    first = tmp_path / "first"
    code, _, err = _printed(
        "extract", "toy-llama", "--input", str(work.folder / "corpus.txt"), "--at", "block[0]",
        "--positions", "last", "--out", str(first),
    )  # fmt: skip
    assert code == 0, err
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(introspect.zoo, "load_model", lambda *a, **k: pytest.fail("loaded"))
        code, _, err = _printed("tune-lens", "toy-llama", "--data", str(first), "--out", "o")
    assert code == 1
    assert error_line(err) == (
        f"introspect: error: {first} does not hold the last block (block[3]), whose read-out is "
        "the target: extract with --at block[3] too (it holds block[0])"
    )


@pytest.mark.usefixtures("no_work")
def test_lens_refuses_a_missing_lens_and_one_for_another_model(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(introspect.zoo, "load_model", lambda *a, **k: pytest.fail("loaded"))
        code, _, err = _printed("lens", "toy-llama", "--prompt", "hi", "--tuned", str(tmp_path))
    assert code == 1
    assert error_line(err) == (
        f"introspect: error: {tmp_path} is not a tuned lens folder: it has no config.json (a "
        "lens folder holds config.json and params.pt)"
    )
    small = TunedLens(32, 2, base_model_name_or_path="other").save(tmp_path / "small")
    code, _, err = _printed("lens", "toy-llama", "--prompt", "hi", "--tuned", str(small))
    assert code == 1  # the library's error, before logit_lens runs (no_work)
    assert error_line(err) == (
        "introspect: error: this tuned lens is for d_model 32 and 2 hidden layers; Inspector "
        "holds LlamaForCausalLM with d_model 64 and 4 blocks: load the lens trained for this "
        "model (this one was tuned for 'other')"
    )


@pytest.mark.parametrize(
    "extra",
    [["--held-out", "1"], ["--steps", "0"], ["--steps", "2", "--epochs", "1"], ["--lr", "0"]],
)
def test_tune_lens_usage_errors_exit_2(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["tune-lens", "toy-llama", "--data", "d", "--out", "o", *extra])
    assert exc.value.code == 2
    assert "introspect tune-lens: error: argument" in capsys.readouterr().err
