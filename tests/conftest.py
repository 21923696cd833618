"""Shared fixtures: tiny random GPT-2 and Llama models (nothing downloads).

Nothing heavy is imported at the top: under pytest-xdist the controlling process loads this
file too, and runs no test; torch and transformers load in the processes that run tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from _support import FAMILY_NAMES

if TYPE_CHECKING:
    import torch
    from torch import nn


def _runs_tests(config: pytest.Config) -> bool:
    # pytest-xdist's controlling process hands the tests to its workers.
    controls = bool(getattr(config.option, "numprocesses", None))
    return not controls or hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    """Tiny models compute on one thread (why: ``_support.threads``)."""
    if _runs_tests(config):
        import torch
        from _support.threads import ALL_THREADS  # torch's own choice, read before changing it

        assert ALL_THREADS >= 1
        torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _runs_tests(config):
        import torch
        from _support.threads import ALL_THREADS

        torch.set_num_threads(ALL_THREADS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that drives Chromium (test_views' ``browser_runs``, used directly or through
    another fixture) is ``slow``: `make test` leaves it to `make test-slow`."""
    for item in items:
        if "browser_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def lm(family: str) -> nn.Module:
    from _support.models import FAMILIES

    from introspect.testing import build_tiny

    config_fn, head_cls, _ = FAMILIES[family]
    return build_tiny(head_cls, config_fn())


@pytest.fixture
def base_model(family: str) -> nn.Module:
    from _support.models import FAMILIES

    from introspect.testing import build_tiny

    config_fn, _, base_cls = FAMILIES[family]
    return build_tiny(base_cls, config_fn())


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    import torch

    ids = torch.tensor([[5, 17, 42, 9, 77, 3], [8, 1, 99, 23, 4, 60]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class CharTokenizer:
    """A stand-in tokenizer with the call signature the notebook uses (no files needed)."""

    def __call__(self, text: str, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        import torch

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

    import introspect.zoo

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
