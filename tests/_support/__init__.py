"""Support code shared by the tests (never a test module imported by another)."""

FAMILY_NAMES = ("gpt2", "llama")
"""The tiny model families every ``family``-parametrised test runs on: the keys of
``_support.models.FAMILIES``, named here so the conftest needs no torch to parametrise."""
