"""Proof at first use: an adapter's facts are proven on the user's own install before use.

Adapters state facts (where ``hidden_states[0]`` comes from, what follows the last block, how
logits are made) measured on the transformers versions our tests run. A user may run another
version, and a release may move a fact: then a stated fact would give a wrong number without a
word. So the first :class:`~introspect.Inspector` of a given adapter spec and model class on an
install proves the block-level facts on a shrunk random clone of the model (its own class, its
own config shrunk by :func:`introspect._tiny.tiny_config`), against Hugging Face's own
``output_hidden_states`` and logits:

- every ``hidden_states`` entry equals the locator the adapter names for it;
- ``hidden_states[-1]`` equals what the adapter says follows the last block;
- ``logits(last block output)`` equals the model's logits, where the model has a head;
- every locator the adapter declares resolves and is recorded.

The verdict is cached on disk (``$INTROSPECT_PROOF_CACHE``, else ``proofs`` in
``$INTROSPECT_CACHE``, else in ``$XDG_CACHE_HOME/introspect`` or ``~/.cache/introspect``), keyed by the spec's content, the model class, and the
transformers, torch and introspect versions, so an upgrade of any of them proves again; within
a process it is kept in memory. A fact that fails is a :class:`~introspect.FactError` naming
it, the versions and ``introspect verify``; never a wrong number.

Where no clone can be built (a plain ``nn.Module``, a config that does not shrink or build),
the facts are proven on the real model the first time they are used: ``hidden_states()``
then asks the model for its own ``output_hidden_states`` in the same forward and compares.
``INTROSPECT_PROVE=0`` turns proving off, with an :class:`UnprovenWarning` saying what is then
unproven.

The checks themselves (:func:`block_checks`) are the ones :mod:`introspect.testing` runs for
our own adapters and for plugin authors: one definition of what "supported" means.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from introspect._errors import FactError, IntrospectError
from introspect._spec import AdapterSpec, StackSpec, installed_transformers
from introspect._tiny import EXTRA_OVERRIDES, tiny_config
from introspect._version import __version__

__all__ = [
    "BLOCKS",
    "PROOF_FORMAT",
    "Check",
    "Proof",
    "ProvableView",
    "UnprovenWarning",
    "block_checks",
    "cache_dir",
    "close",
    "example_inputs",
    "perturb",
    "proof_key",
    "prove_at_first_use",
    "remember",
    "reports_hidden_states",
    "verdict",
]

PROOF_FORMAT = 1
"""Bumped when the checks change, so verdicts of older checks are proven again."""
_ENV_OFF = "INTROSPECT_PROVE"
_ENV_CACHE = "INTROSPECT_CACHE"
_ENV_PROOF_CACHE = "INTROSPECT_PROOF_CACHE"


class UnprovenWarning(UserWarning):
    """Proof at first use is off (``INTROSPECT_PROVE=0``): the adapter's facts are unproven."""


@dataclass(frozen=True)
class Check:
    """One conformance check: what it compared, whether it held, and the largest difference."""

    name: str
    passed: bool
    max_diff: float = 0.0
    detail: str = ""


def check_lines(checks: Sequence[Check]) -> list[str]:
    """One line per check, failures first.

    Example:
        >>> check_lines([Check("a", True), Check("b", False, 0.5)])
        ['  FAIL b: max |diff| 0.5', '  ok   a: max |diff| 0']
    """
    return [
        f"  {'ok  ' if c.passed else 'FAIL'} {c.name}: max |diff| {c.max_diff:.3g}"
        + (f" ({c.detail})" if c.detail else "")
        for c in sorted(checks, key=lambda c: c.passed)
    ]


# -- comparing ---------------------------------------------------------------------------------


def diff(a: Any, b: Any) -> float:
    """The largest absolute difference of two tensors (``inf`` unless both are of one shape).

    Example:
        >>> diff(torch.ones(2), torch.zeros(2)), diff(torch.ones(2), torch.ones(3))
        (1.0, inf)
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return float("inf")
    if a.shape != b.shape:
        return float("inf")
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def close(a: Any, b: Any, atol: float, rtol: float) -> bool:
    """Whether ``a`` and ``b`` are tensors of one shape that ``torch.allclose`` (as float).

    Example:
        >>> close(torch.ones(2), torch.ones(2) + 1e-7, 1e-6, 0.0)
        True
    """
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and torch.allclose(a.detach().float(), b.detach().float(), atol=atol, rtol=rtol)
    )


def shape_of(value: Any) -> str:
    """A tensor's shape as a tuple string, else the type name.

    Example:
        >>> shape_of(torch.zeros(1, 2)), shape_of(None)
        ('(1, 2)', 'NoneType')
    """
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def hf_hidden_states(output: Any, stack: str | None, spec: AdapterSpec) -> Any:
    """The ``hidden_states`` Hugging Face returned for one stack of ``spec``.

    Example:
        >>> spec = AdapterSpec(name="x", blocks="h")
        >>> hf_hidden_states({"hidden_states": (1, 2)}, None, spec)
        (1, 2)
    """
    # An encoder-only model (T5EncoderModel) names its one stack "encoder" but HF reports
    # plain hidden_states.
    if stack == "encoder" and "encoder_hidden_states" in output:
        return output["encoder_hidden_states"]
    if "decoder_hidden_states" in output and spec.encoder is not None:
        return output["decoder_hidden_states"]
    return output["hidden_states"]


# -- building a clone ----------------------------------------------------------------------------


def perturb(model: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Add small noise to every parameter so unit norms and zero biases hide nothing.

    Example:
        >>> lin = nn.LayerNorm(4)
        >>> bool(perturb(lin).weight.ne(1).all())
        True
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_(noise.to(param.dtype).to(param.device) * scale)
    return model


def accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes an argument called ``name``.

    Example:
        >>> accepts(nn.Linear(2, 2), "input"), accepts(nn.Linear(2, 2), "decoder_input_ids")
        (True, False)
    """
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return True
    return name in parameters


def reports_hidden_states(model: nn.Module) -> bool:
    """Whether ``model(..., output_hidden_states=True)`` returns Hugging Face's hidden states:
    its forward names the argument, or it is a transformers model (5.x takes it in ``**kwargs``).

    Example:
        >>> reports_hidden_states(nn.Linear(2, 2))
        False
    """
    config = getattr(model, "config", None)
    return accepts(model, "output_hidden_states") or hasattr(config, "to_dict")


def example_inputs(
    config: Any, batch: int = 2, seq: int = 7, seed: int = 0, model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Random token inputs for a model built from ``config`` (decoder ids on seq2seq).

    Given ``model``, decoder ids are added only where its forward takes them (a
    ``T5EncoderModel`` has a seq2seq config but no decoder).

    Example:
        >>> from transformers import GPT2Config
        >>> sorted(example_inputs(GPT2Config(vocab_size=64)))
        ['attention_mask', 'input_ids']
    """
    generator = torch.Generator().manual_seed(seed)
    text_config = getattr(config, "get_text_config", lambda: config)()
    vocab = int(getattr(text_config, "vocab_size", 0) or getattr(config, "vocab_size", 64))
    ids = torch.randint(3, max(vocab, 4), (batch, seq), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    wants_decoder = model is None or accepts(model, "decoder_input_ids")
    if getattr(config, "is_encoder_decoder", False) and wants_decoder:
        inputs["decoder_input_ids"] = torch.randint(
            3, max(vocab, 4), (batch, max(seq - 2, 2)), generator=generator
        )
    return inputs


def build_clone(model: nn.Module) -> nn.Module:
    """A shrunk random model of ``model``'s own class and (shrunk) config, in eval mode.

    Built in float32 on the CPU, with the global random state left as it was. Raises
    ``TypeError``/``ValueError`` (and whatever the class raises) where no clone can be built.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> big = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=96, n_head=4, vocab_size=300))
        >>> clone = build_clone(big)
        >>> type(clone).__name__, clone.config.n_layer, clone.config.n_embd
        ('GPT2LMHeadModel', 2, 64)
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"{type(model).__name__} has no transformers config to shrink")
    model_type = getattr(config, "model_type", "") or ""
    extra = dict(EXTRA_OVERRIDES.get(model_type, {}))
    implementation = getattr(config, "_attn_implementation", None)
    small = tiny_config(config, **extra)
    if implementation is not None:
        small._attn_implementation = implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clone: nn.Module = type(model)(small)
    perturb(clone)
    return clone.float().eval()


# -- the checks --------------------------------------------------------------------------------


class ProvableView(Protocol):
    """What the checks need of an Inspector (typed here, so this module never imports it)."""

    adapter: AdapterSpec

    def hidden_states(
        self,
        *args: Any,
        indices: Sequence[int] | None = ...,
        stack: str | None = ...,
        **inputs: Any,
    ) -> tuple[torch.Tensor, ...]: ...

    def hidden_state_locator(self, i: int, stack: str | None = ...) -> Any: ...

    def capture(self, *locators: Any, **options: Any) -> Any: ...

    def finish(self, hidden: torch.Tensor, stack: str | None = ...) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor, *, finished: bool = ...) -> torch.Tensor: ...

    def module(self, locator: Any) -> nn.Module: ...

    def locators(self, stack: str | None = ..., *, include_head: bool = ...) -> list[Any]: ...


def block_checks(
    insp: ProvableView,
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> list[Check]:
    """The block-level facts of ``insp``'s adapter, checked on ``model`` with ``inputs``.

    ``hidden_states`` entry by entry (and its locators, negative indices included), the
    relation of ``hidden_states[-1]`` to the last block, the logits, and that every locator
    records. Never raises on a mismatch: each fact is a :class:`Check`.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).eval()
        >>> checks = block_checks(Inspector(m), m, {"input_ids": torch.tensor([[1, 2, 3]])})
        >>> all(c.passed for c in checks), len(checks)
        (True, 6)
    """
    checks: list[Check] = []
    add = checks.append
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True)
        for stack in insp.adapter.stack_names:
            label = f"{stack}." if stack else ""
            theirs = hf_hidden_states(reference, stack, insp.adapter)
            ours = insp.hidden_states(**inputs, stack=stack)
            n = len(theirs)
            if len(ours) != n:
                detail = f"ours {len(ours)}, Hugging Face {n}"
                add(Check(f"{label}hidden_states length", False, float("inf"), detail))
                continue
            for i in range(n):
                loc = insp.hidden_state_locator(i, stack)
                negative = insp.hidden_state_locator(i - n, stack)
                ok = close(ours[i], theirs[i], atol, rtol) and loc == negative
                detail = f"locator {loc}; ours {shape_of(ours[i])}, HF {shape_of(theirs[i])}"
                add(Check(f"{label}hidden_states[{i}]", ok, diff(ours[i], theirs[i]), detail))
            # One forward records every locator, the last block among them.
            spec: StackSpec = insp.adapter.stack(stack)
            last_block = f"{label}block[-1]"
            locs = insp.locators(stack)
            with insp.capture(last_block, *locs) as cap:
                model(**inputs)
            raw = cap[last_block].output
            if spec.hidden_states_start == "block_input" or spec.after_blocks:
                finished = insp.finish(raw, stack)
                add(
                    Check(
                        f"{label}hidden_states[-1] == finish(block[-1].output)",
                        close(finished, theirs[-1], atol, rtol),
                        diff(finished, theirs[-1]),
                        " -> ".join(["block[-1]", *spec.after_blocks]),
                    )
                )
            if stack == insp.adapter.stack_name and "logits" in reference:
                try:
                    insp.module("lm_head")
                except Exception as exc:  # a head the adapter cannot find is a failure
                    add(Check("logits(block[-1].output)", False, float("inf"), str(exc)))
                else:
                    logits = insp.logits(raw)
                    add(
                        Check(
                            "logits(block[-1].output) == model logits",
                            close(logits, reference["logits"], atol * 10, rtol * 10),
                            diff(logits, reference["logits"]),
                        )
                    )
            missing = [str(loc) for loc in locs if str(loc) not in cap]
            add(
                Check(
                    f"{label}every locator resolves and records",
                    not missing,
                    0.0,
                    f"not recorded: {', '.join(missing)}" if missing else f"{len(locs)} locators",
                )
            )
    return checks


# -- first use ----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where verdicts are kept: ``$INTROSPECT_PROOF_CACHE``, else ``proofs`` in the cache
    folder (``$INTROSPECT_CACHE``, else ``$XDG_CACHE_HOME/introspect``, else
    ``~/.cache/introspect``).

    Example:
        >>> import os
        >>> os.environ["INTROSPECT_PROOF_CACHE"] = "/tmp/introspect-example"
        >>> str(cache_dir())
        '/tmp/introspect-example'
        >>> del os.environ["INTROSPECT_PROOF_CACHE"]
    """
    found = os.environ.get(_ENV_PROOF_CACHE)
    if found:
        return Path(found)
    folder = os.environ.get(_ENV_CACHE)
    if folder:
        return Path(folder) / "proofs"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "introspect" / "proofs"


def _versions() -> dict[str, str]:
    return {
        "transformers": installed_transformers(),
        "torch": torch.__version__,
        "introspect": __version__,
    }


BLOCKS = "blocks"
"""The block-level facts (``hidden_states``, final norm, logits, locators)."""


def proof_key(spec: AdapterSpec, model_class: type, facts: str = BLOCKS) -> str:
    """The cache key of a proof: the facts, the spec's content, the model class and versions.

    Example:
        >>> from torch import nn
        >>> a = proof_key(AdapterSpec(name="x", blocks="h"), nn.Linear)
        >>> a == proof_key(AdapterSpec(name="x", blocks="layers"), nn.Linear)
        False
    """
    payload = {
        "format": PROOF_FORMAT,
        "facts": facts,
        "spec": spec.model_dump(mode="json"),
        "class": f"{model_class.__module__}.{model_class.__qualname__}",
        **_versions(),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Proof:
    """The verdict on one (adapter spec, model class) on this install.

    ``status`` is ``proven``, ``failed``, ``off`` (``INTROSPECT_PROVE=0``) or ``deferred`` (no
    clone could be built: proven on the real model at first use, see ``reason``).
    """

    status: str
    checks: tuple[Check, ...] = ()
    reason: str = ""
    cached: bool = False

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "checks": [c.__dict__ for c in self.checks],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Proof:
        checks = tuple(Check(**c) for c in data.get("checks", ()))
        return cls(str(data["status"]), checks, str(data.get("reason", "")), cached=True)


_MEMO: dict[tuple[AdapterSpec, type, str], Proof] = {}
_DEFERRED: dict[tuple[Any, ...], Proof] = {}
_LOCK = threading.Lock()
_WARNED: set[tuple[str, type, str]] = set()


def proving_off() -> bool:
    """Whether ``INTROSPECT_PROVE`` turns proof at first use off (``0``, ``false``, ``no``).

    Example:
        >>> import os
        >>> os.environ["INTROSPECT_PROVE"] = "0"
        >>> proving_off()
        True
        >>> del os.environ["INTROSPECT_PROVE"]
    """
    return os.environ.get(_ENV_OFF, "1").strip().lower() in ("0", "false", "no", "off")


def fact_error(
    spec: AdapterSpec, model_class: type, checks: Sequence[Check], facts: str = BLOCKS
) -> FactError:
    """The error for facts that failed: which, on which versions, and what to run.

    Example:
        >>> err = fact_error(AdapterSpec(name="x", blocks="h"), nn.Linear,
        ...                  [Check("hidden_states[0]", False, 2.0, "locator block[0].input")])
        >>> "hidden_states[0]" in str(err) and "introspect verify" in str(err)
        True
    """
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    failed = [c for c in checks if not c.passed]
    names = "; ".join(f"{c.name} (max |diff| {c.max_diff:.3g})" for c in failed)
    if facts == BLOCKS:
        claim = f"states facts about {model_class.__name__} that do not hold"
        check = "introspect.testing.check_conformance"
    else:
        claim = f"states a {facts} for {model_class.__name__} that does not hold"
        check = "introspect.testing.check_heads"
    return FactError(
        f"adapter {spec.name!r} {claim} on this install ({versions}): {names}. A transformers "
        "release has likely moved them; introspect refuses rather than answer wrong numbers. "
        f"Run `introspect verify MODEL` (or {check}) for the details, and state the new fact "
        "for this version range in the adapter (AdapterSpec.by_version)\n"
        + "\n".join(check_lines(list(checks))),
        tuple(checks),
    )


def _read(path: Path) -> Proof | None:
    try:
        return Proof.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: prove again


def _write(path: Path, proof: Proof) -> None:
    partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(proof.to_json(), indent=1))
        os.replace(partial, path)
    except OSError:
        # A read-only or full cache folder only costs a proof per process; no half-written
        # verdict is left behind.
        with contextlib.suppress(OSError):
            partial.unlink()


def prove_at_first_use(
    model: nn.Module,
    spec: AdapterSpec,
    make_view: Callable[[nn.Module], ProvableView],
) -> Proof:
    """Prove ``spec``'s block-level facts for ``model``'s class on this install, once.

    ``make_view(clone)`` gives an Inspector of the clone with ``spec`` (without proving it
    again). Returns the verdict; a failed fact raises :class:`FactError` (every time: a failed
    verdict is cached too, so it costs nothing to repeat).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> spec = Inspector(m).adapter
        >>> make = lambda clone: Inspector(clone, spec, prove=False)
        >>> prove_at_first_use(m, spec, make).status
        'proven'
    """

    def run(clone: nn.Module) -> list[Check]:
        return block_checks(make_view(clone), clone, example_inputs(clone.config, model=clone))

    return verdict(model, spec, BLOCKS, run)


def _config_key(model: nn.Module) -> str:
    """What tells one config of a class from another (its JSON; empty without a config)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return ""
    try:
        return str(config.to_json_string(use_diff=False))
    except (TypeError, ValueError):
        return repr(config)


def verdict(
    model: nn.Module,
    spec: AdapterSpec,
    facts: str,
    run: Callable[[nn.Module], Sequence[Check]],
) -> Proof:
    """The verdict on ``facts`` (a name: ``blocks``, ``heads block.attn``) of ``spec`` for
    ``model``'s class: from memory, else from the disk cache, else ``run`` on a shrunk clone.

    Raises :class:`FactError` where the verdict is ``failed``; warns once and returns an
    ``off`` verdict where ``INTROSPECT_PROVE=0``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> spec = AdapterSpec(name="x", blocks="h")
        >>> verdict(m, spec, "example", lambda clone: [Check("holds", True)]).status
        'proven'
    """
    model_class = type(model)
    if proving_off():
        if (spec.name, model_class, facts) not in _WARNED:
            _WARNED.add((spec.name, model_class, facts))
            what = "its hidden_states layout, final norm and logits are"
            if facts != BLOCKS:
                what = f"its {facts} layout is"
            warnings.warn(
                f"INTROSPECT_PROVE=0: adapter {spec.name!r} is not proven for "
                f"{model_class.__name__} on this install (transformers "
                f"{installed_transformers()}): {what} stated, not checked, and a transformers "
                "release that moved one would give wrong numbers without an error",
                UnprovenWarning,
                stacklevel=4,
            )
        return Proof("off")
    memo = (spec, model_class, facts)
    with _LOCK:
        found = _MEMO.get(memo)
    deferred_key: tuple[Any, ...] | None = None
    if found is None:
        # A deferred verdict is about this model's config (one the shrink cannot build), not
        # its class: another config of the class may prove, so it is kept per config.
        deferred_key = (*memo, _config_key(model))
        with _LOCK:
            found = _DEFERRED.get(deferred_key)
    if found is None:
        found = _prove(model, spec, facts, run)
        with _LOCK:
            if found.status == "deferred" and deferred_key is not None:
                _DEFERRED[deferred_key] = found
            else:
                _MEMO[memo] = found
    if found.status == "failed":
        raise fact_error(spec, model_class, found.checks, facts)
    return found


def _prove(
    model: nn.Module,
    spec: AdapterSpec,
    facts: str,
    run: Callable[[nn.Module], Sequence[Check]],
) -> Proof:
    path = cache_dir() / f"{proof_key(spec, type(model), facts)}.json"
    cached = _read(path)
    if cached is not None:
        return cached
    try:
        clone = build_clone(model)
    except Exception as exc:  # any class or config that cannot be shrunk and built
        reason = f"no shrunk clone of {type(model).__name__}: {type(exc).__name__}: {exc}"
        return Proof("deferred", reason=reason[:500])
    try:
        checks = tuple(run(clone))
    except IntrospectError as exc:
        # Our own refusal while checking (a head count the attention function contradicts):
        # the stated facts do not fit this class.
        checks = (Check(f"{facts} ({type(exc).__name__})", False, float("inf"), str(exc)[:300]),)
    except Exception as exc:
        # A clone that does not run (a config the shrink broke) proves nothing either way.
        reason = f"the shrunk clone did not run: {type(exc).__name__}: {exc}"
        return Proof("deferred", reason=reason[:500])
    if not checks:
        return Proof("deferred", reason=f"the shrunk clone has no {facts} to check")
    proof = Proof("proven" if all(c.passed for c in checks) else "failed", checks)
    _write(path, proof)
    return proof


def remember(spec: AdapterSpec, model_class: type, proof: Proof) -> None:
    """Keep a verdict reached on a real model for this process (not on disk: one model's
    forward proves less than a clone's full checks).

    Example:
        >>> remember(AdapterSpec(name="x", blocks="h"), nn.Linear, Proof("proven"))
        >>> forget()
    """
    with _LOCK:
        _MEMO[(spec, model_class, BLOCKS)] = proof


def forget() -> None:
    """Forget this process's verdicts (the disk cache stays): for tests and ``verify``.

    Example:
        >>> forget()
    """
    with _LOCK:
        _MEMO.clear()
        _DEFERRED.clear()
        _WARNED.clear()


def lazy_hidden_checks(
    ours: Sequence[torch.Tensor],
    theirs: Sequence[torch.Tensor],
    locators: Sequence[Any],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> Iterator[Check]:
    """The hidden-state checks of a forward on the real model (where no clone was built).

    Example:
        >>> t = torch.ones(1, 2, 4)
        >>> [c.passed for c in lazy_hidden_checks([t], [t], ["block[0].input"])]
        [True]
    """
    if len(ours) != len(theirs):
        detail = f"ours {len(ours)}, Hugging Face {len(theirs)}"
        yield Check("hidden_states length", False, float("inf"), detail)
        return
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        yield Check(
            f"hidden_states[{i}]", close(a, b, atol, rtol), diff(a, b), f"locator {locators[i]}"
        )
