"""Proof at first use: a release that moves a fact is refused with the fact named, verdicts
are cached per spec x class x versions, and proving can be turned off only loudly."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.models import gpt2_config, llama_config, mamba2_config
from transformers import GPT2LMHeadModel, GPT2Model, LlamaForCausalLM

from introspect import FactError, Inspector, UnprovenWarning, _proof
from introspect.testing import build_tiny

IDS = torch.tensor([[5, 17, 42, 9, 77, 3]])


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh cache folder and no verdict in memory."""
    monkeypatch.setenv("INTROSPECT_PROOF_CACHE", str(tmp_path / "proofs"))
    monkeypatch.delenv("INTROSPECT_PROVE", raising=False)
    _proof.forget()
    yield tmp_path / "proofs"
    _proof.forget()


class ShiftedLlama(LlamaForCausalLM):
    """A simulated release: hidden_states loses its embedding entry and repeats the last."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        if out.hidden_states is not None:
            out.hidden_states = (*out.hidden_states[1:], out.hidden_states[-1])
        return out


def test_a_release_that_moves_hidden_states_is_refused_naming_the_fact(cache: Path) -> None:
    model = build_tiny(ShiftedLlama, llama_config())
    with pytest.raises(FactError) as caught:
        Inspector(model, adapter="llama")
    message = str(caught.value)
    assert "adapter 'llama' states facts about ShiftedLlama" in message
    assert "hidden_states[0] (max |diff|" in message
    assert "transformers 5." in message or "transformers 4." in message
    assert "introspect verify" in message
    assert {c.name for c in caught.value.checks if not c.passed} >= {"hidden_states[0]"}
    # The verdict is kept: asked again, it is refused again without building a clone.
    with pytest.raises(FactError):
        Inspector(model, adapter="llama")


def test_a_monkeypatched_forward_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = GPT2Model.forward

    def reversed_forward(self: GPT2Model, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if out.hidden_states is not None:
            out.hidden_states = tuple(reversed(out.hidden_states))
        return out

    monkeypatch.setattr(GPT2Model, "forward", reversed_forward)
    model = build_tiny(GPT2LMHeadModel, gpt2_config())
    with pytest.raises(FactError, match=r"'gpt2' states facts about GPT2LMHeadModel"):
        Inspector(model)


def test_a_proven_verdict_is_cached_on_disk_and_in_memory(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []
    real = _proof.build_clone

    def counting(model: torch.nn.Module) -> torch.nn.Module:
        built.append(type(model).__name__)
        return real(model)

    monkeypatch.setattr(_proof, "build_clone", counting)
    model = build_tiny(GPT2LMHeadModel, gpt2_config())
    first = Inspector(model)
    assert first.proof.status == "proven" and not first.proof.cached
    assert built == ["GPT2LMHeadModel"]
    files = list(cache.glob("*.json"))
    assert len(files) == 1
    verdict = json.loads(files[0].read_text())
    assert verdict["status"] == "proven"
    assert {c["name"] for c in verdict["checks"]} >= {"hidden_states[0]", "hidden_states[2]"}
    Inspector(model)  # in memory
    _proof.forget()
    again = Inspector(build_tiny(GPT2LMHeadModel, gpt2_config(layers=5)))  # same class, spec
    assert again.proof.status == "proven" and again.proof.cached
    assert built == ["GPT2LMHeadModel"]
    # Another class of the same adapter is proven on its own.
    Inspector(build_tiny(GPT2Model, gpt2_config()))
    assert built == ["GPT2LMHeadModel", "GPT2Model"]


def test_an_upgrade_proves_again(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_tiny(GPT2LMHeadModel, gpt2_config())
    key = _proof.proof_key(Inspector(model).adapter, type(model))
    monkeypatch.setattr(_proof, "installed_transformers", lambda: "99.0.0")
    assert _proof.proof_key(Inspector(model, prove=False).adapter, type(model)) != key
    _proof.forget()
    assert not Inspector(model).proof.cached
    assert len(list(cache.glob("*.json"))) == 2


def test_the_clone_leaves_the_random_state_and_the_model_alone(cache: Path) -> None:
    model = build_tiny(GPT2LMHeadModel, gpt2_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    Inspector(model)
    drawn = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(3))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_proving_off_warns_what_is_unproven(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECT_PROVE", "0")
    model = build_tiny(ShiftedLlama, llama_config())
    with pytest.warns(UnprovenWarning, match=r"'llama' is not proven for ShiftedLlama.*wrong"):
        insp = Inspector(model, adapter="llama")
    assert insp.proof.status == "off"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Inspector(model, adapter="llama")  # warned once per adapter and class


def test_without_a_clone_the_real_model_proves_at_first_use(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_clone(model: torch.nn.Module) -> torch.nn.Module:
        raise ValueError("this config does not shrink")

    monkeypatch.setattr(_proof, "build_clone", no_clone)
    good = Inspector(build_tiny(LlamaForCausalLM, llama_config()))
    assert good.proof.status == "deferred" and "does not shrink" in good.proof.reason
    with torch.no_grad():
        states = good.hidden_states(input_ids=IDS)
    assert good.proof.status == "proven" and len(states) == 4
    shifted = Inspector(build_tiny(ShiftedLlama, llama_config()), adapter="llama")
    assert shifted.proof.status == "deferred"
    with pytest.raises(FactError, match=r"hidden_states\[0\]"), torch.no_grad():
        shifted.hidden_states(input_ids=IDS)
    with pytest.raises(FactError), torch.no_grad():
        shifted.hidden_states(input_ids=IDS)  # refused again, never answered


def test_an_unwritable_cache_still_proves(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = cache.parent / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("INTROSPECT_PROOF_CACHE", str(blocker / "proofs"))
    assert Inspector(build_tiny(GPT2LMHeadModel, gpt2_config())).proof.status == "proven"


def test_a_corrupt_verdict_is_proven_again(cache: Path) -> None:
    model = build_tiny(GPT2LMHeadModel, gpt2_config())
    Inspector(model)
    (path,) = cache.glob("*.json")
    path.write_text("{not json")
    _proof.forget()
    assert Inspector(model).proof.status == "proven"
    assert json.loads(path.read_text())["status"] == "proven"


def test_a_transformers_below_the_supported_range_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from introspect import _version

    monkeypatch.setattr(_version, "_installed_transformers", lambda: "4.46.3")
    with pytest.raises(ImportError) as caught:
        _version.check_transformers()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("introspect needs transformers>=4.57 (installed: 4.46.3)")
    monkeypatch.setattr(_version, "_installed_transformers", lambda: "5.99.0.dev0")
    _version.check_transformers()  # newer than tested: accepted, proven at first use
    monkeypatch.setattr(_version, "_installed_transformers", lambda: None)
    _version.check_transformers()  # plain torch models need no transformers


def test_a_head_layout_is_proven_the_first_time_a_head_locator_is_used(cache: Path) -> None:
    from introspect import HeadSpec

    model = build_tiny(LlamaForCausalLM, llama_config())
    insp = Inspector(model)
    assert not list(cache.glob("*.json")) or len(list(cache.glob("*.json"))) == 1
    with insp.capture("block[0].attn.z"), torch.no_grad():
        model(IDS)
    assert len(list(cache.glob("*.json"))) == 2  # the blocks' verdict and the heads'
    # A layout that does not fit the model (key/value heads read as query heads) is refused
    # when a head locator is first used, naming the failed check; blocks still work.
    wrong = insp.adapter.derive(
        name="llama-wrong-heads",
        model_types=(),
        heads={"attn": HeadSpec(o="o_proj", core=None, num_heads="num_key_value_heads")},
    )
    other = Inspector(model, adapter=wrong)
    with torch.no_grad(), other.capture("block[0]"):
        model(IDS)
    with pytest.raises(
        FactError,
        match=r"states a head layout of block\[i\]\.attn for LlamaForCausalLM that does not hold",
    ):
        other.capture("block[0].attn.q")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_config_the_shrink_cannot_build_defers_only_that_config(cache: Path) -> None:
    """A deferred verdict is about one config: another model of the class still proves."""
    import transformers

    unbuildable = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=96, n_head=3, vocab_size=64)
    )
    # 96 wide with 3 heads shrinks to 64 wide with 3 heads, which GPT-2 refuses: no clone.
    assert Inspector(unbuildable).proof.status == "deferred"
    fine = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    )
    assert Inspector(fine).proof.status == "proven"


def test_a_small_mamba2_keeps_its_heads_tied_to_its_width_when_shrunk() -> None:
    """Mamba-2 needs num_heads * head_dim == hidden_size * expand; the clone keeps the tie."""
    import transformers

    config = mamba2_config()
    clone = _proof.build_clone(transformers.Mamba2Model(config))
    assert clone.config.num_heads * clone.config.head_dim == 32 * 2
    assert Inspector(transformers.Mamba2Model(config)).proof.status == "proven"
