"""`introspect extract` and `ActivationDataset`, in one process: values, the dataset API, the
inputs, the folder rules, and a full disk (the multi-process and SIGKILL tests are in
test_extract_processes.py)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.cli import error_line
from _support.models import llama_config
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from introspect import ActivationDataset, Inspector, extract
from introspect._errors import (
    CorpusError,
    DatasetError,
    ExtractionError,
    LocatorError,
    MissingDependencyError,
)
from introspect._scale import engine, threads
from introspect._scale.corpus import read_inputs
from introspect._scale.dataset import MANIFEST, PROGRESS
from introspect._scale.settings import weights_fingerprint
from introspect._scale.shards import _Done, _remaining, _share
from introspect._scale.windows import _anchors, _runs, _tokenizer_fn, _windows
from introspect.cli import main
from introspect.testing import build_tiny


@pytest.fixture(autouse=True)
def _no_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")


class CharTokenizer:
    """One token per character (ids 4..123), called on a batch as Hugging Face tokenizers are."""

    pad_token_id = 0

    def __call__(self, texts: list[str], **kwargs: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) % 120 + 4 for c in text] for text in texts]}


def _lines(count: int, seed: int = 0, longest: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [
        "".join(rng.choice("abcdefgh ,.") for _ in range(rng.randint(1, longest)))
        for _ in range(count)
    ]


def _corpus(folder: Path, lines: list[str], name: str = "corpus.txt") -> Path:
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _alone(insp: Inspector, ids: list[int], locators: list[str]) -> dict[str, torch.Tensor]:
    with torch.no_grad(), insp.capture(*locators) as cap:
        insp.model(torch.tensor([ids]))
    found = {}
    for loc in locators:
        record = cap[loc.removesuffix(".input")]
        found[loc] = (record.input if loc.endswith(".input") else record.output)[0]
    return found


# -- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["all", "last", "all-gathered"])
def test_values_equal_a_capture_of_each_document_alone(
    lm: nn.Module, tmp_path: Path, positions: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Documents of every length up to past the limit, and an empty one: padding, batching,
    # sorting by length and shard cuts must all be invisible.
    if positions == "all-gathered":  # the accelerator's way of placing rows, run on the CPU
        monkeypatch.setattr(engine, "_copies_rows", lambda device: False)
        positions = "all"
    lines = [*_lines(23), "", "x" * 70]
    insp = Inspector(lm)
    wanted = ["block[:]", "block[0].input", "final_norm"]
    manifest = extract(
        insp,
        CharTokenizer(),
        [_corpus(tmp_path, lines)],
        wanted,
        tmp_path / "acts",
        positions=positions,  # type: ignore[arg-type]
        dtype="float32",
        batch_size=4,
        max_length=50,
        shard_rows=60 if positions == "all" else 6,
    )
    ds = ActivationDataset(tmp_path / "acts")
    assert len(manifest["shards"]) > 2
    assert ds.locators == ["block[0]", "block[1]", "block[2]", "block[0].input", "final_norm"]
    tokenize = CharTokenizer()
    checked = 0
    for doc in ds.documents():
        ids = tokenize([lines[doc]])["input_ids"][0][:50]
        rows = ds.rows_of(doc)
        if not ids:
            assert len(rows) == 0
            continue
        alone = _alone(insp, ids, ds.locators)
        where = slice(None) if positions == "all" else slice(-1, None)
        assert ds.tokens.doc[rows].tolist() == [doc] * len(rows)
        assert ds.tokens.token_id[rows].tolist() == ids[where]
        assert ds.tokens.pos[rows].tolist() == list(range(len(ids)))[where]
        for loc in ds.locators:
            torch.testing.assert_close(ds[loc][rows], alone[loc][where], rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == len(lines) - 1
    # Every row once, in document order; the truncation and the empty document are recorded.
    assert ds.tokens.doc[:].tolist() == sorted(ds.tokens.doc[:].tolist())
    assert manifest["truncation"]["lengths"] == [[len(lines) - 1, 70]]
    assert manifest["truncation"]["tokens_removed"] == 20
    assert manifest["documents"]["empty"] == [len(lines) - 2]


def test_float16_overflow_is_an_error_not_infinities(tmp_path: Path) -> None:
    config = LlamaConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    model = build_tiny(LlamaForCausalLM, config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)
    with pytest.raises(
        ExtractionError, match=r"float16 cannot hold \(beyond its range.*--dtype bfloat16"
    ):
        extract(
            Inspector(model), CharTokenizer(), [_corpus(tmp_path, ["abc"])], ["embed"],
            tmp_path / "acts",
        )  # fmt: skip
    assert not (tmp_path / "acts" / MANIFEST).exists()


# -- the dataset -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ActivationDataset:
    folder = tmp_path_factory.mktemp("dataset")
    model = build_tiny(LlamaForCausalLM, llama_config())
    extract(
        Inspector(model),
        CharTokenizer(),
        [_corpus(folder, _lines(30, seed=1))],
        ["block[:]"],
        folder / "acts",
        batch_size=3,
        shard_rows=50,
    )
    return ActivationDataset(folder / "acts")


def test_dataset_columns_are_lazy_views(
    dataset: ActivationDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = dataset
    column = ds["block[-1]"]
    assert column is ds["block[2]"] and column.dtype == torch.float16
    assert column.shape == (len(ds), 64) and len(ds.tokens) == len(ds)
    whole = column[:]
    assert whole.shape == (len(ds), 64)
    # Any index reads the rows asked for, and only from the shards that hold them.
    torch.testing.assert_close(column[7], whole[7])
    torch.testing.assert_close(column[-1], whole[-1])
    torch.testing.assert_close(column[10:130:3], whole[10:130:3])
    picked = [120, 3, 3, 64, 0]
    torch.testing.assert_close(column[picked], whole[picked])
    torch.testing.assert_close(column[torch.tensor(picked)], whole[picked])
    mask = torch.zeros(len(ds), dtype=torch.bool)
    mask[::5] = True
    torch.testing.assert_close(column[mask], whole[mask])
    shards = ds.manifest["shards"]
    assert len(shards) > 3
    fresh = ActivationDataset(ds.path)
    opened: list[str] = []
    real = fresh._shards.handle

    def watch(i: int) -> Any:
        opened.append(fresh._shards.files[i])
        return real(i)

    monkeypatch.setattr(fresh._shards, "handle", watch)
    second = shards[1]
    a, b = second["rows"]
    torch.testing.assert_close(fresh["block[0]"][a:b], ds["block[0]"][a:b])
    assert set(opened) == {second["file"]}
    with pytest.raises(LocatorError, match=r"block\[3\] is out of range"):
        ds["block[3]"]
    with pytest.raises(LocatorError, match=r"embed was not extracted.*block\[0\], block\[1\]"):
        ds["embed"]
    with pytest.raises(LocatorError, match="several locators"):
        ds["block[:]"]
    with pytest.raises(IndexError):
        column[len(ds)]


def test_dataset_documents_and_rows(dataset: ActivationDataset) -> None:
    ds = dataset
    docs = ds.tokens.doc[:]
    assert list(ds.documents()) == list(range(30))
    for doc in ds.documents():
        rows = ds.rows_of(doc)
        assert docs[rows.start : rows.stop].tolist() == [doc] * len(rows)
        assert ds.tokens.pos[rows].tolist() == list(range(len(rows)))
    assert sum(len(ds.rows_of(d)) for d in ds.documents()) == len(ds)
    with pytest.raises(IndexError):
        ds.rows_of(30)


def test_dataset_batches_and_dataloader(dataset: ActivationDataset) -> None:
    ds = dataset
    whole = ds["block[1]"][:]
    batches = list(ds.batches(32, locators=["block[1]"]))
    assert [len(b["doc"]) for b in batches][:-1] == [32] * (len(batches) - 1)
    torch.testing.assert_close(torch.cat([b["block[1]"] for b in batches]), whole)
    shuffled = list(ds.batches(32, shuffle=True, seed=3))
    rows = torch.cat([b["doc"] * 1000 + b["pos"] for b in shuffled])
    ordered = ds.tokens.doc[:] * 1000 + ds.tokens.pos[:]
    assert sorted(rows.tolist()) == ordered.tolist() and rows.tolist() != ordered.tolist()
    first = shuffled[0]
    index = {key: n for n, key in enumerate(ordered.tolist())}
    at = [index[key] for key in (first["doc"] * 1000 + first["pos"]).tolist()]
    torch.testing.assert_close(first["block[1]"], whole[at])
    # A torch Dataset: the DataLoader reads batches through __getitems__, and workers get a
    # pickled copy that reopens its own shards.
    loader = torch.utils.data.DataLoader(ActivationDataset(ds.path, ["block[-1]"]), batch_size=16)
    got = next(iter(loader))
    assert sorted(got) == ["block[2]", "doc", "pos", "token_id"]
    torch.testing.assert_close(got["block[2]"], ds["block[2]"][:16])
    item = ds[5]
    assert item["token_id"].item() == ds.tokens.token_id[5].item()
    copy = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(copy["block[0]"][:4], ds["block[0]"][:4])


def test_unfinished_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / PROGRESS).write_text("{}")
    with pytest.raises(DatasetError, match=r"unfinished extraction.*rerun the same"):
        ActivationDataset(tmp_path)
    with pytest.raises(DatasetError, match="not an extraction folder"):
        ActivationDataset(tmp_path / "nothing")


@contextlib.contextmanager
def _disk_full_after_one_shard(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """While inside, the second shard write fails as a full disk does."""
    real = threads._save_file
    calls = []

    def dies(tensors: Any, path: str, metadata: Any) -> None:
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata)

    with monkeypatch.context() as patch:
        patch.setattr(threads, "_save_file", dies)
        yield


def _interrupted(insp: Inspector, corpus: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An extraction that stops after its first shard, as a killed one does."""
    full = pytest.raises(ExtractionError, match="No space left")
    with _disk_full_after_one_shard(monkeypatch), full:
        extract(insp, CharTokenizer(), [corpus], ["block[-1]"], out, shard_rows=40)
    assert (out / PROGRESS).exists() and not (out / MANIFEST).exists()


def test_other_weights_under_the_same_name_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two models of one class: the same name (LlamaForCausalLM) and settings, other weights.
    a = Inspector(build_tiny(LlamaForCausalLM, llama_config(), seed=0))
    b = Inspector(build_tiny(LlamaForCausalLM, llama_config(), seed=1))
    fa, fb = (
        weights_fingerprint(a.model),
        weights_fingerprint(b.model),
    )
    assert fa != fb and fa == weights_fingerprint(a.model)
    corpus = _corpus(tmp_path, _lines(12, seed=4))

    def refused(folder: Path) -> str:
        return (
            f"--out {folder} holds an extraction of other weights than this model's (weights "
            f"fingerprint {fa} there, {fb} now, for model 'LlamaForCausalLM'): its activations "
            "are another model's; use another --out for this one, or add --force to replace them"
        )

    # A run of A stopped halfway is not resumed with B: its rows would mix with A's.
    unfinished = tmp_path / "unfinished"
    _interrupted(a, corpus, unfinished, monkeypatch)
    shards = sorted(os.listdir(unfinished))
    with pytest.raises(ExtractionError) as caught:
        extract(b, CharTokenizer(), [corpus], ["block[-1]"], unfinished, shard_rows=40)
    assert str(caught.value) == refused(unfinished)
    assert sorted(os.listdir(unfinished)) == shards  # left as it was
    # A finished run of A is not handed back as B's.
    done = tmp_path / "done"
    manifest = extract(a, CharTokenizer(), [corpus], ["block[-1]"], done, shard_rows=40)
    assert manifest["weights"] == fa
    with pytest.raises(ExtractionError) as caught:
        extract(b, CharTokenizer(), [corpus], ["block[-1]"], done, shard_rows=40)
    assert str(caught.value) == refused(done)
    # A resumes its own run; --force starts over with B.
    again = extract(a, CharTokenizer(), [corpus], ["block[-1]"], unfinished, shard_rows=40)
    assert again["weights"] == fa and again["shards"] == manifest["shards"]
    forced = extract(b, CharTokenizer(), [corpus], ["block[-1]"], done, shard_rows=40, force=True)
    assert forced["weights"] == fb
    first = ActivationDataset(done).rows_of(0)
    ids = CharTokenizer()([_lines(12, seed=4)[0]])["input_ids"][0]
    torch.testing.assert_close(
        ActivationDataset(done)["block[-1]"][first].float(),
        _alone(b, ids, ["block[-1]"])["block[-1]"].half().float(),
    )


def test_a_checkpoint_changed_in_place_is_not_resumed_on_the_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from introspect.zoo import load_model

    _, tokenizer = load_model("toy-llama", progress=False)
    config = llama_config()
    config.vocab_size = len(tokenizer)
    folder = tmp_path / "checkpoint"
    build_tiny(LlamaForCausalLM, config, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    corpus = _corpus(tmp_path, _lines(12, seed=5))
    argv = ["extract", str(folder), "--input", str(corpus), "--at", "block[-1]",
            "--out", str(tmp_path / "acts"), "--shard-rows", "40", "--no-progress"]  # fmt: skip
    capsys.readouterr()
    with _disk_full_after_one_shard(monkeypatch):
        assert main(argv) == 1
    assert "No space left on device" in error_line(capsys.readouterr().err)
    # The folder is trained further (here: other weights) and the command rerun as it was.
    build_tiny(LlamaForCausalLM, config, seed=1).save_pretrained(folder)
    capsys.readouterr()
    assert main(argv) == 1
    line = error_line(capsys.readouterr().err)
    assert "holds an extraction of other weights than this model's (weights fingerprint" in line
    assert line.endswith("use another --out for this one, or add --force to replace them")
    assert main([*argv, "--force"]) == 0
    # Finished, then the checkpoint changes again: the rerun is not "already complete".
    capsys.readouterr()
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    build_tiny(LlamaForCausalLM, config, seed=2).save_pretrained(folder)
    capsys.readouterr()
    assert main(argv) == 1
    line = error_line(capsys.readouterr().err)
    assert "holds an extraction of other weights than this model's (weights fingerprint" in line


def test_the_weights_fingerprint_is_the_same_wherever_the_weights_are() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = build_tiny(LlamaForCausalLM, llama_config(), seed=0)
    plain = weights_fingerprint(model)
    copy = build_tiny(LlamaForCausalLM, llama_config(), seed=0)
    assert weights_fingerprint(copy) == plain
    # Offloaded by accelerate: the weights are on the meta device, their values in its hooks.
    accelerate.cpu_offload(copy, execution_device=torch.device("cpu"))
    assert any(p.is_meta for p in copy.parameters())
    assert weights_fingerprint(copy) == plain
    as_bf16 = build_tiny(LlamaForCausalLM, llama_config(), seed=0).to(torch.bfloat16)
    assert weights_fingerprint(as_bf16) != plain


def test_shares_cover_the_remaining_documents_once() -> None:
    weights = torch.tensor([5, 1, 1, 1, 30, 2, 2, 2, 2, 2, 9, 1], dtype=torch.long)
    done = [
        _Done("a", 2, 4, 0, [], [], {}),
        _Done("b", 7, 9, 0, [], [], {}),
    ]
    remaining = _remaining(done, 12)
    assert remaining == [(0, 2), (4, 7), (9, 12)]
    for world in (1, 2, 3, 5):
        shares = [_share(remaining, weights, rank, world) for rank in range(world)]
        flat = [d for share in shares for a, b in share for d in range(a, b)]
        assert flat == [0, 1, 4, 5, 6, 9, 10, 11]  # each once, in order, rank by rank
        assert shares == [_share(remaining, weights, rank, world) for rank in range(world)]


def test_every_rank_cuts_its_shards_where_one_process_does(tmp_path: Path) -> None:
    # The batches are made within a shard, so equal shards make equal batches and equal values.
    lines = _lines(90, seed=7, longest=60)
    docs = read_inputs([_corpus(tmp_path, lines)])
    sizes = docs.weights()
    tokenize = _tokenizer_fn(CharTokenizer())

    def cuts(share: list[tuple[int, int]], remaining: list[tuple[int, int]], every: int) -> Any:
        anchors = _anchors(sizes, every)
        runs = _runs(share, remaining, anchors)
        windows = _windows(runs, docs, tokenize, 30, False, 50, anchors)
        return [(w.first, w.end, w.ids, w.truncated) for w in windows]

    for every in (10**9, 400, 97):  # no anchor; anchors every few documents
        alone = cuts([(0, 90)], [(0, 90)], every)
        assert [w[0] for w in alone[1:]] == [w[1] for w in alone[:-1]]  # contiguous
        assert _anchors(sizes, every) <= {w[0] for w in alone}  # cut there
        # A resumed run: some shards done, the gaps between them remain.
        done = [alone[i] for i in (1, 2, 7)]
        remaining = _remaining([_Done("x", w[0], w[1], 0, [], [], {}) for w in done], 90)
        left = [w for w in alone if w not in done]
        for world in (2, 3, 5, 8):
            for gaps, expected in (([(0, 90)], alone), (remaining, left)):
                parts = [
                    cuts(_share(gaps, sizes, rank, world), gaps, every) for rank in range(world)
                ]
                assert [w for part in parts for w in part] == expected, (every, world, gaps)
                assert sum(1 for part in parts if part) > 1  # the work is shared
    assert _anchors(sizes, 400)  # the cases above did place anchors


def test_the_token_cap_cuts_shards_where_one_process_does(tmp_path: Path) -> None:
    # --positions last: a shard of 64 MiB of rows would hold every document; the token cap
    # closes it after so much work instead, at the same documents in every run and rank.
    lines = _lines(90, seed=11, longest=60)
    docs = read_inputs([_corpus(tmp_path, lines)])
    sizes = docs.weights()
    tokenize = _tokenizer_fn(CharTokenizer())

    def cuts(share: list[tuple[int, int]], remaining: list[tuple[int, int]]) -> Any:
        anchors = _anchors(sizes, 10**9)
        runs = _runs(share, remaining, anchors)
        windows = _windows(runs, docs, tokenize, 30, True, 10**9, anchors, shard_tokens=200)
        return [(w.first, w.end, w.ids, w.tokens) for w in windows]

    alone = cuts([(0, 90)], [(0, 90)])
    assert len(alone) > 5
    for _, _, ids, tokens in alone[:-1]:
        assert tokens == sum(len(i) for i in ids) >= 200  # closed at the cap...
        assert tokens - len(ids[-1]) < 200  # ...by its last document, not later
    assert [w[0] for w in alone[1:]] == [w[1] for w in alone[:-1]]
    done = [alone[i] for i in (0, 3)]
    remaining = _remaining([_Done("x", w[0], w[1], 0, [], [], {}) for w in done], 90)
    left = [w for w in alone if w not in done]
    for world in (1, 2, 3):
        parts = [cuts(_share(remaining, sizes, rank, world), remaining) for rank in range(world)]
        assert [w for part in parts for w in part] == left


def test_ctrl_c_says_what_is_kept_and_the_rerun_counts_its_own_work(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    corpus: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = ["--input", str(corpus), "--text-field", "body", *ARGS, "--dtype", "float32"]
    reference = tmp_path / "reference"
    assert _extract_cli(capsys, *argv, "--out", str(reference))[0] == 0
    shards = ActivationDataset(reference).manifest["shards"]
    out = tmp_path / "acts"
    real = threads._save_file
    calls: list[str] = []

    def interrupt_at(number: int) -> Any:
        def save(tensors: Any, path: str, metadata: Any) -> None:
            calls.append(path)
            if len(calls) == number:
                raise KeyboardInterrupt  # Ctrl-C while this shard is being written
            real(tensors, path, metadata)

        return save

    monkeypatch.setattr(threads, "_save_file", interrupt_at(3))
    code, stdout, err = _extract_cli(capsys, *argv, "--out", str(out))
    docs, rows = shards[1]["docs"][1], shards[1]["rows"][1]
    assert (code, stdout) == (130, "")
    assert err == (
        f"introspect: interrupted: 2 complete shards kept in {out} ({docs} of 16 documents, "
        f"{rows} rows); rerun the same command to resume from there\n"
    )
    # With --force the same command would start over: the message says how to resume instead.
    calls.clear()
    monkeypatch.setattr(threads, "_save_file", interrupt_at(4))
    code, _, err = _extract_cli(capsys, *argv, "--out", str(out), "--force")
    assert code == 130
    assert err.endswith("rerun the same command without --force to resume from there\n")
    assert f"3 complete shards kept in {out} ({shards[2]['docs'][1]} of 16 documents" in err
    # The rerun resumes, and says what it did apart from what the dataset holds.
    monkeypatch.setattr(threads, "_save_file", real)
    code, stdout, err = _extract_cli(capsys, *argv, "--out", str(out))
    assert code == 0, err
    _assert_same(ActivationDataset(out), ActivationDataset(reference), exact=True)
    manifest = ActivationDataset(out).manifest
    run, total = manifest["run"], manifest["rows"]
    kept = shards[2]["rows"][1]
    assert run["resumed"] == {
        "shards": 3, "documents": shards[2]["docs"][1], "rows": kept, "tokens": kept,
    }  # fmt: skip
    assert (run["rows"], run["tokens"], run["shards"]) == (
        total - kept,
        total - kept,
        len(shards) - 3,
    )
    assert run["documents"] == 16 - shards[2]["docs"][1]
    dataset, this_run = stdout.splitlines()[:2]
    assert dataset.startswith(f"wrote {out}: {total} rows (tokens) from 16 documents;")
    assert this_run.startswith(
        f"this run: {total - kept} tokens of {run['documents']} documents through the model, "
        f"{total - kept} rows written, in "
    )
    assert this_run.endswith(
        f"; the other {shards[2]['docs'][1]} documents ({kept} rows, 3 shards) were on disk "
        "from an earlier run"
    )


def test_interrupted_before_any_shard_keeps_nothing_and_says_so(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    corpus: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(threads, "_save_file", interrupted)
    out = tmp_path / "acts"
    code, _, err = _extract_cli(capsys, "--input", str(corpus), "--text-field", "body", *ARGS,
                                "--out", str(out))  # fmt: skip
    assert code == 130
    assert err == (
        f"introspect: interrupted: no shard was complete, nothing kept in {out}; rerun the same "
        "command to start\n"
    )


# -- inputs --------------------------------------------------------------------------------------


def test_inputs_txt_jsonl_and_their_errors(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"\xef\xbb\xbfone\r\n\r\nthree")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"body": "four", "n": 1}\n\n{"body": "five"}\n')
    docs = read_inputs([txt, jsonl], text_field="body")
    assert docs.texts(0, 5) == ["one", "", "three", "four", "five"]
    described = docs.describe()
    assert [d["documents"] for d in described] == [[0, 3], [3, 5]]
    assert described[1]["text_field"] == "body" and len(described[0]["sha256"]) == 64
    assert docs.weights().tolist() == [3, 0, 5, 24, 16]

    cases = {
        "missing.txt": (None, r"--input .*missing\.txt does not exist"),
        "empty.txt": ("", r"holds no documents: it is empty"),
        "latin.txt": (b"caf\xe9\n", r"line 1 is not UTF-8 text"),
        "bad.jsonl": ('{"text": "ok"}\n{oops\n', r"line 2 is not JSON"),
        "field.jsonl": ('{"body": "x"}\n', r"line 1 has no 'text' field \(its fields: body\)"),
        "list.jsonl": ("[1]\n", r"line 1 is not a JSON object"),
        "data.csv": ("a,b\n", r"use a \.txt file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(CorpusError, match=message):
            read_inputs([path])
    (tmp_path / "folder").mkdir()
    with pytest.raises(CorpusError, match="not one datasets' save_to_disk wrote"):
        read_inputs([tmp_path / "folder"])
    with pytest.raises(CorpusError, match="at least one --input"):
        read_inputs([])


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_input(tmp_path: Path) -> None:
    path = _corpus(tmp_path, ["a"])
    path.chmod(0)
    with pytest.raises(CorpusError, match="permission denied"):
        read_inputs([path])


def test_datasets_folder_input(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"content": ["first doc", "", "third"], "label": [1, 0, 1]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    docs = read_inputs([tmp_path / "ds"], text_field="content")
    assert len(docs) == 3 and docs.texts(1, 3) == ["", "third"]
    assert docs.weights().tolist() == [9, 0, 5]
    assert docs.describe()[0]["kind"] == "datasets"
    with pytest.raises(CorpusError, match=r"no 'text' column \(its columns: content, label\)"):
        read_inputs([tmp_path / "ds"])
    with pytest.raises(CorpusError, match=r"'label' holds .*not text"):
        read_inputs([tmp_path / "ds"], text_field="label")
    # End to end: the folder's rows, in order, the empty one without rows.
    model = build_tiny(LlamaForCausalLM, llama_config(layers=1))
    manifest = extract(
        Inspector(model), CharTokenizer(), [tmp_path / "ds"], ["block[0]"], tmp_path / "acts",
        text_field="content",
    )  # fmt: skip
    assert manifest["inputs"][0]["kind"] == "datasets" and manifest["documents"]["empty"] == [1]
    ds = ActivationDataset(tmp_path / "acts")
    assert len(ds) == len("first doc") + len("third") and ds.rows_of(2) == range(9, 14)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(CorpusError, match=r"several splits \(train\): pass one"):
        read_inputs([tmp_path / "dd"], text_field="content")


def test_a_datasets_folder_without_datasets_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "introspect-lm\[data\]"'):
        read_inputs([tmp_path / "ds"])


# -- the command -------------------------------------------------------------------------------

ARGS = ["--at", "block[:]", "--batch-size", "4", "--shard-rows", "40"]


def _extract_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["extract", "toy-llama", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    lines = [line.replace(".", " The") for line in _lines(16, seed=2)]
    path = folder / "corpus.jsonl"
    path.write_text(
        "".join(json.dumps({"body": line, "id": i}) + "\n" for i, line in enumerate(lines))
    )
    return path


def test_cli_extract_writes_the_manifest_the_issue_lists(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, corpus: Path
) -> None:
    out = tmp_path / "acts"
    code, stdout, err = _extract_cli(
        capsys, "--input", str(corpus), "--text-field", "body", "--out", str(out), *ARGS,
        "--positions", "last", "--dtype", "bfloat16", "--max-length", "6",
    )  # fmt: skip
    assert code == 0, err
    assert stdout.startswith(f"wrote {out}: 16 rows (documents, last token) from 16 documents;")
    assert "4 locators (block[0], ..., block[3]) of 64 bfloat16 values" in stdout
    assert "documents truncated to 6 tokens" in stdout
    manifest = json.loads((out / MANIFEST).read_text())
    assert not (out / PROGRESS).exists()
    for key in ("model", "adapter", "locators", "dtype", "positions", "inputs", "documents",
                "shards", "versions", "truncation"):  # fmt: skip
        assert key in manifest
    assert manifest["model"] == "toy-llama" and manifest["adapter"] == "llama"
    assert manifest["locators"] == [f"block[{i}]" for i in range(4)]
    assert (manifest["dtype"], manifest["positions"]) == ("bfloat16", "last")
    assert manifest["inputs"][0]["sha256"] and manifest["inputs"][0]["documents"] == [0, 16]
    assert manifest["documents"]["done"] == manifest["documents"]["total"] == 16
    assert {"introspect", "torch", "transformers"} <= set(manifest["versions"])
    ends = [s["rows"] for s in manifest["shards"]]
    assert ends[0][0] == 0 and ends[-1][1] == manifest["rows"] == 16
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ends))
    ds = ActivationDataset(out)
    assert ds["block[-1]"].dtype == torch.bfloat16 and (ds.tokens.pos[:] <= 5).all()
    # The same command again has nothing to do; other arguments are refused, --force redoes.
    code, stdout, _ = _extract_cli(
        capsys, "--input", str(corpus), "--text-field", "body", "--out", str(out), *ARGS,
        "--positions", "last", "--dtype", "bfloat16", "--max-length", "6", "--json",
    )  # fmt: skip
    assert code == 0 and json.loads(stdout)["fingerprint"] == manifest["fingerprint"]
    code, _, err = _extract_cli(
        capsys, "--input", str(corpus), "--text-field", "body", "--out", str(out), *ARGS,
    )  # fmt: skip
    line = error_line(err)
    assert code == 1 and "holds an extraction made with other arguments (positions:" in line
    assert '"last" there, "all" now; dtype: "bfloat16" there, "float16" now' in line
    assert line.endswith("or add --force to start over")
    code, stdout, err = _extract_cli(
        capsys, "--input", str(corpus), "--text-field", "body", "--out", str(out), *ARGS,
        "--force",
    )  # fmt: skip
    assert code == 0, err
    assert ActivationDataset(out).manifest["positions"] == "all"


def test_cli_errors_come_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import introspect.zoo

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not load")

    monkeypatch.setattr(introspect.zoo, "load_model", boom)
    corpus = _corpus(tmp_path, ["hello", "world"])
    out = tmp_path / "acts"
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a-file").write_text("x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.md").write_text("mine")
    shards_only = tmp_path / "shards-only"
    shards_only.mkdir()
    (shards_only / "shard-000000000-000000002.safetensors").write_text("")
    cases = [
        (["--input", str(corpus), "--at", "block[", "--out", str(out)], "cannot parse locator"),
        (["--input", str(tmp_path / "empty.txt"), "--at", "block[0]", "--out", str(out)],
         "holds no documents"),
        (["--input", str(tmp_path / "nope.txt"), "--at", "block[0]", "--out", str(out)],
         "does not exist"),
        (["--input", str(corpus), "--at", "block[0]", "--out", str(tmp_path / "a-file")],
         "is a file: name a folder"),
        (["--input", str(corpus), "--at", "block[0]", "--out", str(busy), "--force"],
         "holds files introspect extract did not write (notes.md)"),
        (["--input", str(corpus), "--at", "block[0]", "--out", str(shards_only)],
         "holds shards but neither manifest.json nor progress.json: add --force"),
    ]  # fmt: skip
    for argv, message in cases:
        code, _, err = _extract_cli(capsys, *argv)
        assert code == 1 and message in error_line(err), (argv, err)
    assert not out.exists()
    assert (busy / "notes.md").read_text() == "mine"


def test_cli_unknown_locators_fail_before_any_file_is_written(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    corpus = _corpus(tmp_path, ["hello"])
    for loc, message in [
        ("block[9]", "block[9] is out of range for llama (4 blocks: use -4..3)"),
        ("bogus", "bogus"),
        ("block[0].attn.pattern", "not one row per token"),
    ]:
        code, _, err = _extract_cli(
            capsys, "--input", str(corpus), "--at", loc, "--out", str(tmp_path / "acts")
        )
        assert code == 1 and message in error_line(err), err
        assert not (tmp_path / "acts").exists()


def test_max_length_past_the_position_table_fails_before_any_file_is_written(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # toy-gpt2 looks positions up in a table of 512 rows: position 512 would be an IndexError
    # inside the embedding, after progress.json was written.
    corpus = _corpus(tmp_path, ["a " * 1100])  # 1,100 tokens
    out = tmp_path / "acts"
    code = main(["extract", "toy-gpt2", "--input", str(corpus), "--at", "block[0]",
                 "--out", str(out), "--max-length", "1000"])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 1
    assert error_line(err) == (
        "introspect: error: --max-length 1000 is more than this model's 512 positions "
        "(GPT2LMHeadModel looks each position up in a table of 512 rows): use --max-length 512 "
        "or less, or leave it out (the default is the model's context)"
    )
    assert not out.exists()
    # The table's own length is allowed, and a rotary model may run past its configured length.
    code, _, err = _extract_cli(capsys, "--input", str(corpus), "--at", "block[0]", "--out",
                                str(tmp_path / "rotary"), "--max-length", "1000")  # fmt: skip
    assert code == 0, err
    assert ActivationDataset(tmp_path / "rotary").manifest["max_length"] == 1000


def test_full_disk_keeps_complete_shards_and_resumes(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    corpus: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = ["--input", str(corpus), "--text-field", "body", *ARGS, "--dtype", "float32"]
    reference = tmp_path / "reference"
    assert _extract_cli(capsys, *argv, "--out", str(reference))[0] == 0
    out = tmp_path / "acts"
    real = threads._save_file
    calls = []

    def disk_full(tensors: Any, path: str, metadata: Any) -> None:
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as handle:  # half a file, then the disk is full
                handle.write(b"\0" * 100)
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata)

    monkeypatch.setattr(threads, "_save_file", disk_full)
    code, _, err = _extract_cli(capsys, *argv, "--out", str(out))
    line = error_line(err)
    assert code == 1
    assert "No space left on device" in line and "rerun the same command to resume" in line
    names = sorted(n for n in os.listdir(out) if not n.startswith("."))
    assert names == [PROGRESS, *sorted(n for n in names if n.startswith("shard-"))]
    assert len(names) == 3  # two complete shards, no half-written one, no manifest
    assert not list((out / ".partial").iterdir())  # the half-written file is gone too
    with pytest.raises(DatasetError, match="unfinished extraction"):
        ActivationDataset(out)
    monkeypatch.setattr(threads, "_save_file", real)
    code, _, err = _extract_cli(capsys, *argv, "--out", str(out))
    assert code == 0, err
    _assert_same(ActivationDataset(out), ActivationDataset(reference), exact=True)


def test_a_stale_partial_shard_is_removed_on_resume(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, corpus: Path
) -> None:
    argv = ["--input", str(corpus), "--text-field", "body", *ARGS, "--out", str(tmp_path / "a")]
    assert _extract_cli(capsys, *argv)[0] == 0
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    # What a SIGKILL during the last shard's write and before the manifest leaves behind: the
    # shard half-written in the work folder (and safetensors' own temporary file), a manifest
    # not yet renamed into place.
    folder = tmp_path / "a"
    last = manifest["shards"][-1]["file"]
    (folder / MANIFEST).rename(folder / ".manifest.json.0123abcd.partial")
    (folder / ".partial").mkdir()
    (folder / last).rename(folder / ".partial" / f"{last}.89abcdef")
    (folder / ".partial" / ".tmpAbC123").write_bytes(b"\0" * 10)
    progress = {**manifest, "status": "running", "attempt": 1}
    (folder / PROGRESS).write_text(json.dumps(progress))
    with pytest.raises(DatasetError, match="unfinished extraction"):
        ActivationDataset(folder)
    code, _, err = _extract_cli(capsys, *argv)
    assert code == 0, err
    assert not [n for n in os.listdir(tmp_path / "a") if n.startswith(".")]
    assert ActivationDataset(tmp_path / "a").manifest["shards"] == manifest["shards"]


def _assert_same(ours: ActivationDataset, theirs: ActivationDataset, *, exact: bool) -> None:
    assert len(ours) == len(theirs) and ours.locators == theirs.locators
    for name in ("doc", "pos", "token_id"):
        assert torch.equal(ours.tokens[name][:], theirs.tokens[name][:])
    for loc in ours.locators:
        if exact:
            assert torch.equal(ours[loc][:], theirs[loc][:]), loc
        else:
            torch.testing.assert_close(ours[loc][:], theirs[loc][:], rtol=1e-5, atol=1e-5)


def test_right_padding_matches_pad_batch() -> None:
    from introspect._batching import pad_batch

    sequences = [[5, 6, 7], [8], [9, 10]]
    fast = engine._pad_right(sequences, pad_id=3)
    slow = pad_batch(sequences, padding_side="right", pad_token_id=3)
    assert {k: v.tolist() for k, v in fast.items()} == {k: v.tolist() for k, v in slow.items()}
