"""Shared fixtures: tiny random GPT-2 and Llama models (nothing downloads)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _support.models import FAMILIES
from _support.threads import ALL_THREADS
from torch import nn

import introspect.zoo
from introspect.testing import build_tiny


def pytest_configure(config: pytest.Config) -> None:
    """Tiny models compute on one thread (why: ``_support.threads``)."""
    torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    torch.set_num_threads(ALL_THREADS)


@pytest.fixture(scope="session", autouse=True)
def _proof_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Verdicts of proof at first use go to a folder of this run: a verdict another version
    of this code left in the user's cache must never make a test pass."""
    import os

    before = os.environ.get("INTROSPECT_PROOF_CACHE")
    os.environ["INTROSPECT_PROOF_CACHE"] = str(tmp_path_factory.mktemp("proofs"))
    yield
    if before is None:
        os.environ.pop("INTROSPECT_PROOF_CACHE", None)
    else:
        os.environ["INTROSPECT_PROOF_CACHE"] = before


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def lm(family: str) -> nn.Module:
    config_fn, head_cls, _ = FAMILIES[family]
    return build_tiny(head_cls, config_fn())


@pytest.fixture
def base_model(family: str) -> nn.Module:
    config_fn, _, base_cls = FAMILIES[family]
    return build_tiny(base_cls, config_fn())


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 42, 9, 77, 3], [8, 1, 99, 23, 4, 60]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class CharTokenizer:
    """A stand-in tokenizer with the call signature the notebook uses (no files needed)."""

    def __call__(self, text: str, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        ids = torch.tensor([[ord(c) % 120 + 4 for c in text]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: a command's error must come before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not load")

    monkeypatch.setattr(introspect.zoo, "load_model", refuse)


@pytest.fixture(scope="session")
def built() -> Callable[[Any], Any]:
    """Build each registry case's model once per test run, or skip with the reason.

    The cases and how they build live in ``_support.registry_cases`` (``CASES``,
    ``build_case``). Tests must not change the models they get (edits and captures are
    undone on exit; weights are never written).
    """
    from _support.registry_cases import build_case as _build

    cache: dict[Any, Any] = {}

    def get(case: Any) -> Any:
        if case not in cache:
            cache[case] = _build(case)
        found = cache[case]
        if isinstance(found, str):
            pytest.skip(found)
        return found

    return get
