"""Sparse autoencoders on any architecture: load, splice, evaluate, train.

- :mod:`._model`: :class:`SparseAutoencoder`, one module for every architecture in SAELens's
  parameter layout, with the format's input processing stated as data;
- :mod:`._sites`: the formats' site names mapped onto locators, as a table;
- :mod:`._formats`: :func:`load_sae`, reading SAELens, Gemma Scope, Llama Scope,
  dictionary_learning and sparsify folders;
- :mod:`._use`: :func:`splice` and :func:`evaluate_sae`, built on the Inspector's public edits;
- :mod:`._train`: :func:`train_sae`, a TopK SAE from an ``introspect extract`` folder.
"""

from __future__ import annotations

from introspect._sae._formats import FORMATS, detect_format, load_sae
from introspect._sae._model import InputProcessing, SparseAutoencoder
from introspect._sae._sites import SITE_NAMES, Site, SiteRule, map_site, tl_hook_name
from introspect._sae._train import train_sae
from introspect._sae._use import (
    InspectorLike,
    SAEEvaluation,
    Splice,
    evaluate_sae,
    site_locator,
    splice,
)

__all__ = [
    "FORMATS",
    "SITE_NAMES",
    "InputProcessing",
    "InspectorLike",
    "SAEEvaluation",
    "Site",
    "SiteRule",
    "SparseAutoencoder",
    "Splice",
    "detect_format",
    "evaluate_sae",
    "load_sae",
    "map_site",
    "site_locator",
    "splice",
    "tl_hook_name",
    "train_sae",
]
