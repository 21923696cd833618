"""The tuned lens: identity at start, training from an extracted dataset, the tuned-lens folder
layout both ways, resume, the logit lens's ``tuned=``, and refusals before any forward."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.models import llama_config
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

from introspect import (
    ActivationDataset,
    CaptureError,
    DatasetError,
    Inspector,
    LocatorError,
    ModelLoadError,
    TunedLens,
    extract,
    logit_lens,
    train_tuned_lens,
)
from introspect.testing import build_tiny

# The reference's TunedLensConfig fields (AlignmentResearch/tuned-lens, tuned_lens/nn/lenses.py).
REFERENCE_FIELDS = {
    "base_model_name_or_path",
    "d_model",
    "num_hidden_layers",
    "bias",
    "base_model_revision",
    "unembed_hash",
    "lens_type",
}


@pytest.fixture(autouse=True)
def _no_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_PROGRESS", "0")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tensors of width 64 gain nothing from a second thread, and on a busy machine threads
    # waiting for each other make every small op cost milliseconds.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CharTokenizer:
    """One token per character (ids 4..123), called on a batch as Hugging Face tokenizers are."""

    pad_token_id = 0

    def __call__(self, texts: list[str], **kwargs: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) % 120 + 4 for c in text] for text in texts]}


def _corpus(folder: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [
        "".join(rng.choice("abcdefgh ,.") for _ in range(rng.randint(12, 40))) for _ in range(count)
    ]
    path = folder / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Trained:
    def __init__(self, insp: Inspector, acts: Path, out: Path, lens: TunedLens) -> None:
        self.insp, self.acts, self.out, self.lens = insp, acts, out, lens


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    folder = tmp_path_factory.mktemp("tuned")
    insp = Inspector(build_tiny(LlamaForCausalLM, llama_config(4)))
    acts = folder / "acts"
    extract(
        insp,
        CharTokenizer(),
        [_corpus(folder, 40)],
        ["block[0].input", "block[:]"],
        acts,
        dtype="float32",
    )
    out = folder / "lens"
    lens = train_tuned_lens(acts, insp, out=out, steps=20, batch_size=48, held_out=0.25)
    yield Trained(insp, acts, out, lens)


def _ids(n: int = 9) -> torch.Tensor:
    return torch.tensor([[5 + (7 * i) % 100 for i in range(n)]])


def test_identity_is_the_logit_lens_exactly(trained: Trained) -> None:
    insp = trained.insp
    lens = TunedLens.for_model(insp)
    assert (lens.d_model, len(lens)) == (64, 4)
    plain = logit_lens(insp, _ids(), include_embed=True)
    tuned = logit_lens(insp, _ids(), include_embed=True, tuned=lens)
    assert (
        tuned.rows
        == plain.rows
        == [
            "block[0].input",
            "block[0]",
            "block[1]",
            "block[2]",
            "block[3]",
        ]
    )
    assert plain.logits is not None and tuned.logits is not None
    assert torch.equal(tuned.logits, plain.logits)
    assert tuned.lens == "tuned" and plain.lens == "logit"
    assert tuned.max_diff is not None and tuned.max_diff < 1e-4
    assert tuned.to_dict()["lens"] == "tuned"
    assert tuned.table()[1] == plain.table()[1]
    assert "lens=tuned" in repr(tuned)


def test_training_lowers_held_out_kl_at_every_block(trained: Trained) -> None:
    info = trained.lens.metadata["training"]
    held = info["held_out"]
    assert held["rows"] == ["block[0].input", "block[0]", "block[1]", "block[2]"]
    assert info["finished"] and info["steps"] == 20
    for row, plain, tuned in zip(held["rows"], held["logit_lens"], held["tuned_lens"], strict=True):
        assert 0 < tuned < plain, (row, plain, tuned)
    assert trained.lens.trained == [0, 1, 2, 3]
    headers, rows = trained.lens.held_out_table()
    assert headers[0] == "block" and [r[0] for r in rows] == held["rows"]


def test_the_held_out_plot_draws_both_lenses_on_a_log_axis(
    trained: Trained, tmp_path: Path
) -> None:
    held = trained.lens.metadata["training"]["held_out"]
    fig = trained.lens.plot_held_out(tmp_path / "kl.png")
    assert (tmp_path / "kl.png").stat().st_size > 0
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["logit lens", "tuned lens"]
    for name, key in (("logit lens", "logit_lens"), ("tuned lens", "tuned_lens")):
        kept = [v for v in held[key] if v > 0]
        assert list(lines[name].get_ydata()) == pytest.approx(kept)
    with pytest.raises(ValueError, match="no held-out evaluation"):
        TunedLens(8, 2).plot_held_out()


def test_held_out_kl_is_what_the_lens_reads_on_a_forward(trained: Trained) -> None:
    """The held-out figures, recomputed through the model: each held-out document's lens
    (plain and tuned) against the model's own logits, averaged over the same tokens."""
    insp, lens = trained.insp, trained.lens
    ds = ActivationDataset(trained.acts)
    held = lens.metadata["training"]["held_out"]
    assert len(held["documents"]) == round(0.25 * ds.num_documents)
    sums = {"logit_lens": torch.zeros(4, dtype=torch.float64), "tuned_lens": torch.zeros(4)}
    count = 0
    for doc in held["documents"]:
        rows = ds.rows_of(doc)
        ids = ds.tokens.token_id[rows].unsqueeze(0)
        count += len(rows)
        for key, tuned in (("logit_lens", None), ("tuned_lens", lens)):
            result = logit_lens(insp, ids, include_embed=True, tuned=tuned)
            assert result.logits is not None and result.model_logits is not None
            target = result.model_logits.log_softmax(-1)
            kl = (target.exp() * (target - result.logits[:4].log_softmax(-1))).sum(-1)
            sums[key] = sums[key] + kl.double().sum(-1)
    assert count == held["tokens"]
    for key, total in sums.items():
        assert (total / count).tolist() == pytest.approx(held[key], abs=2e-4)


def test_save_load_round_trip_gives_identical_logits(trained: Trained) -> None:
    insp = trained.insp
    loaded = TunedLens.load(trained.out)
    config = json.loads((trained.out / "config.json").read_text())
    assert set(config) == REFERENCE_FIELDS
    assert config["lens_type"] == "linear_tuned_lens"
    assert (config["d_model"], config["num_hidden_layers"], config["bias"]) == (64, 4, True)
    state = torch.load(trained.out / "params.pt", weights_only=True)
    assert sorted(state) == sorted(f"{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert loaded.trained == trained.lens.trained
    assert loaded.metadata["training"]["held_out"] == trained.lens.metadata["training"]["held_out"]
    before = logit_lens(insp, _ids(), include_embed=True, tuned=trained.lens)
    after = logit_lens(insp, _ids(), include_embed=True, tuned=loaded)
    assert before.logits is not None and after.logits is not None
    assert torch.equal(before.logits, after.logits)
    plain = logit_lens(insp, _ids(), include_embed=True)
    assert plain.logits is not None and not torch.equal(plain.logits[:4], after.logits[:4])
    # The last block has no translator: its row is the model's own output either way.
    assert torch.equal(plain.logits[4], after.logits[4])


def test_a_folder_in_the_reference_layout_loads(trained: Trained, tmp_path: Path) -> None:
    """Written by hand from the reference's documented fields: ``config.json`` as
    ``TunedLensConfig.to_dict()`` and ``params.pt`` as ``layer_translators.state_dict()``."""
    insp = trained.insp
    generator = torch.Generator().manual_seed(3)
    state = {}
    for i in range(4):
        state[f"{i}.weight"] = 0.05 * torch.randn(64, 64, generator=generator)
        state[f"{i}.bias"] = 0.05 * torch.randn(64, generator=generator)
    torch.save(state, tmp_path / "params.pt")
    config = {
        "base_model_name_or_path": "tiny-llama",
        "d_model": 64,
        "num_hidden_layers": 4,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": None,
        "lens_type": "linear_tuned_lens",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    lens = TunedLens.load(tmp_path)
    assert lens.trained is None and lens.base_model_name_or_path == "tiny-llama"
    # hidden_states[i] goes through translator i: the embedding entry through 0, block[j]
    # through j + 1, and the last block (hidden_states[-1]) through none.
    assert lens.rows(insp) == ["block[0].input", "block[0]", "block[1]", "block[2]"]
    with torch.no_grad(), insp.capture("block[1]") as cap:
        insp.model(_ids())
    h = cap["block[1]"].output
    by_hand = h + h @ state["2.weight"].T + state["2.bias"]
    assert torch.allclose(lens.translate(insp, h, "block[1]"), by_hand, atol=1e-6)
    result = logit_lens(insp, _ids(), tuned=lens)
    assert result.rows == ["block[0]", "block[1]", "block[2]", "block[3]"]
    assert result.logits is not None
    expected = insp.logits(by_hand)[0]
    assert torch.allclose(result.logits[1], expected, atol=1e-5)
    # Without a bias, as the reference's bias=False writes it.
    torch.save({k: v for k, v in state.items() if k.endswith("weight")}, tmp_path / "params.pt")
    (tmp_path / "config.json").write_text(json.dumps({**config, "bias": False}))
    no_bias = TunedLens.load(tmp_path)
    assert not no_bias.bias
    assert torch.allclose(no_bias.translate(insp, h, "block[1]"), h + h @ state["2.weight"].T)


def test_resume_gives_the_uninterrupted_run_bit_for_bit(trained: Trained, tmp_path: Path) -> None:
    insp, acts = trained.insp, trained.acts
    kwargs: dict[str, Any] = {"steps": 6, "batch_size": 32, "held_out": 0.25, "blocks": [1, 2]}
    whole = train_tuned_lens(acts, insp, out=tmp_path / "whole", **kwargs)
    part = train_tuned_lens(acts, insp, out=tmp_path / "part", stop_after=4, **kwargs)
    assert part.metadata["training"]["steps"] == 4 and not part.metadata["training"]["finished"]
    assert not (tmp_path / "part" / "config.json").exists()
    resumed = train_tuned_lens(acts, insp, out=tmp_path / "part", **kwargs)
    assert resumed.metadata["training"]["steps"] == 6
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert whole.trained == [2, 3]  # block[1] and block[2]: hidden_states[2] and [3]
    assert whole.default_blocks(insp) == [1, 2, 3]
    # A finished run with the same settings is read back, not trained again.
    again = train_tuned_lens(acts, insp, out=tmp_path / "whole", **kwargs)
    assert again.metadata["training"] == whole.metadata["training"]
    # A checkpoint of other settings is refused unless resume=False.
    train_tuned_lens(acts, insp, out=tmp_path / "other", stop_after=1, **kwargs)
    with pytest.raises(DatasetError, match="other settings"):
        train_tuned_lens(acts, insp, out=tmp_path / "other", **{**kwargs, "steps": 7})
    fresh = train_tuned_lens(
        acts, insp, out=tmp_path / "other", resume=False, **{**kwargs, "steps": 2}
    )
    assert fresh.metadata["training"]["steps"] == 2
    # Rows without a trained translator are refused before the forward.
    with pytest.raises(LocatorError, match=r"no trained translator for block\[0\]"):
        logit_lens(insp, _ids(), blocks=[0], tuned=whole)


class Forwards:
    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        model.register_forward_pre_hook(self._seen)

    def _seen(self, *args: Any) -> None:
        self.count += 1


def test_bad_input_is_refused_before_any_forward(trained: Trained, tmp_path: Path) -> None:
    insp = trained.insp
    forwards = Forwards(insp.model)
    with pytest.raises(CaptureError, match="d_model 32 and 4 hidden layers") as wide:
        logit_lens(insp, _ids(), tuned=TunedLens(32, 4, base_model_name_or_path="other"))
    assert "\n" not in str(wide.value) and "'other'" in str(wide.value)
    with pytest.raises(CaptureError, match="d_model 64 and 6 hidden layers"):
        logit_lens(insp, _ids(), tuned=TunedLens(64, 6))
    assert forwards.count == 0
    # A dataset without the last block.
    partial = tmp_path / "partial"
    extract(insp, CharTokenizer(), [_corpus(tmp_path, 4)], ["block[0]", "block[1]"], partial)
    forwards.count = 0
    with pytest.raises(DatasetError, match=r"does not hold the last block \(block\[3\]\)") as no:
        train_tuned_lens(partial, insp)
    assert "\n" not in str(no.value) and forwards.count == 0
    (partial / "manifest.json").write_text(
        (partial / "manifest.json").read_text().replace('"block[1]"', '"block[3]"')
    )
    with pytest.raises(DatasetError, match=r"does not hold block\[2\]"):
        train_tuned_lens(partial, insp, blocks=[2])
    # A dataset of another model.
    other = Inspector(build_tiny(LlamaForCausalLM, llama_config(3)))
    with pytest.raises(DatasetError, match="with 4 blocks; this one has 3"):
        train_tuned_lens(trained.acts, other)


def test_lens_files_that_need_pickle_or_disagree_are_refused(
    trained: Trained, tmp_path: Path
) -> None:
    good = TunedLens(8, 2).save(tmp_path / "good")

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("this ran while loading",))

    torch.save({"0.weight": Payload()}, good / "params.pt")
    with pytest.raises(ModelLoadError, match="weights_only=True") as refused:
        TunedLens.load(good)
    assert "\n" not in str(refused.value)
    TunedLens(8, 2).save(good)
    torch.save({"0.weight": torch.zeros(8, 8)}, good / "params.pt")
    with pytest.raises(ModelLoadError, match=r"missing 0\.bias, 1\.weight"):
        TunedLens.load(good)
    torch.save(
        {f"{i}.{p}": torch.zeros(4) for i in range(2) for p in ("weight", "bias")},
        good / "params.pt",
    )
    with pytest.raises(ModelLoadError, match="has shape"):
        TunedLens.load(good)
    (good / "config.json").write_text(
        json.dumps({"d_model": 8, "num_hidden_layers": 2, "lens_type": "x"})
    )
    with pytest.raises(ModelLoadError, match="'x' lens"):
        TunedLens.load(good)
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        TunedLens.load(tmp_path)


def test_a_final_soft_cap_is_the_models_own(tmp_path: Path) -> None:
    """Gemma-2 soft-caps its logits after the head (the reference repository's unembedding
    does not): targets and read-outs go through ``insp.logits``, so the cap is applied."""
    config = Gemma2Config(
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        max_position_embeddings=64,
        final_logit_softcapping=2.0,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    insp = Inspector(build_tiny(Gemma2ForCausalLM, config))
    acts = tmp_path / "acts"
    extract(insp, CharTokenizer(), [_corpus(tmp_path, 24)], ["block[:]"], acts, dtype="float32")
    ds = ActivationDataset(acts)
    rows = ds.rows_of(0)
    with torch.no_grad():
        own = insp.model(ds.tokens.token_id[rows].unsqueeze(0)).logits[0]
        read = insp.logits(ds["block[-1]"][rows].unsqueeze(0))[0]
    assert own.abs().max() <= 2.0 and torch.allclose(read, own, atol=1e-5)
    lens = train_tuned_lens(acts, insp, steps=8, batch_size=32, held_out=0.25)
    held = lens.metadata["training"]["held_out"]
    assert held["rows"] == ["block[0]", "block[1]"]
    assert all(t < p for p, t in zip(held["logit_lens"], held["tuned_lens"], strict=True))
    result = logit_lens(insp, _ids(), tuned=lens)
    assert result.logits is not None and result.logits.abs().max() <= 2.0
    assert result.max_diff is not None and result.max_diff < 1e-4
