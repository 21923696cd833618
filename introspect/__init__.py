"""introspect: read and change what every block of a language model receives and produces.

Everything public is importable from here (``from introspect import Inspector``). The names are
loaded on first use, so ``import introspect`` (and the ``introspect`` command's start-up) does
not import torch and transformers until something needs them.

Example:
    >>> import introspect
    >>> "Inspector" in introspect.__all__ and introspect.Inspector.__name__
    'Inspector'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from introspect._version import __version__, check_transformers

check_transformers()

if TYPE_CHECKING:
    from introspect._analysis.atp import (
        PatchingResult,
        attribution_patching,
        patching_agreement,
        patching_result,
    )
    from introspect._analysis.attention import (
        AttentionPatterns,
        HeadScores,
        attention_patterns,
        head_scores,
    )
    from introspect._analysis.attribution import Attribution
    from introspect._analysis.circuits import FactoredMatrix, RotaryWarning
    from introspect._analysis.lens import LensResult, logit_lens
    from introspect._analysis.patching import logit_difference
    from introspect._analysis.tuned import TunedLens, train_tuned_lens
    from introspect._batching import (
        encode_batch,
        last_token_positions,
        pad_batch,
        position_ids_from_mask,
        real_token_positions,
    )
    from introspect._describe import describe
    from introspect._detect import DetectedAdapterWarning, detect_adapter
    from introspect._errors import (
        AdapterConflictError,
        AdapterError,
        AttentionToolError,
        CaptureError,
        ConformanceError,
        CorpusError,
        DatasetError,
        ExtractionError,
        FactError,
        InterventionError,
        IntrospectError,
        LocatorError,
        MissingDependencyError,
        MissingPartError,
        ModelLoadError,
        NoAdapterError,
        PluginLoadError,
        SAEError,
        UnsupportedArchitectureError,
        ViewError,
    )
    from introspect._export import capture_to_file, load_capture, save_tensors
    from introspect._hooks.capture import Capture, Record
    from introspect._hooks.edits import Intervention, mean_activation
    from introspect._hookspecs import hookimpl
    from introspect._html import (
        View,
        attention_view,
        attribution_view,
        check_page_budget,
        head_scores_view,
        lens_view,
        patching_view,
        report_header,
        report_page,
        sae_evaluation_view,
        sae_features_view,
        write_page,
    )
    from introspect._inspector import Inspector, get_hidden_state
    from introspect._locators import Locator
    from introspect._plugins import (
        PluginWarning,
        get_plugin_manager,
        get_registry,
        new_plugin_manager,
    )
    from introspect._proof import UnprovenWarning
    from introspect._report import build_report
    from introspect._sae import SAEEvaluation, SparseAutoencoder, evaluate_sae, load_sae, train_sae
    from introspect._sae._features import SAEFeatures, top_features
    from introspect._scale.dataset import ActivationDataset
    from introspect._scale.run import extract
    from introspect._spec import (
        AdapterSpec,
        HeadSpec,
        LogitOp,
        StackSpec,
        StreamOp,
        VersionFacts,
    )
    from introspect.zoo import ByteTokenizerWarning, load_model

# Where each public name lives (one flat namespace over private parts, as httpx does).
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["AttentionPatterns", "HeadScores", "attention_patterns", "head_scores"],
        "_analysis.attention",
    ),
    **dict.fromkeys(
        ["PatchingResult", "attribution_patching", "patching_agreement", "patching_result"],
        "_analysis.atp",
    ),
    "Attribution": "_analysis.attribution",
    **dict.fromkeys(
        [
            "encode_batch",
            "last_token_positions",
            "pad_batch",
            "position_ids_from_mask",
            "real_token_positions",
        ],
        "_batching",
    ),
    **dict.fromkeys(["Capture", "Record"], "_hooks.capture"),
    **dict.fromkeys(["FactoredMatrix", "RotaryWarning"], "_analysis.circuits"),
    "describe": "_describe",
    **dict.fromkeys(["DetectedAdapterWarning", "detect_adapter"], "_detect"),
    **dict.fromkeys(["capture_to_file", "load_capture", "save_tensors"], "_export"),
    **dict.fromkeys(
        [
            "AdapterConflictError",
            "AdapterError",
            "AttentionToolError",
            "CaptureError",
            "ConformanceError",
            "CorpusError",
            "DatasetError",
            "ExtractionError",
            "FactError",
            "InterventionError",
            "IntrospectError",
            "LocatorError",
            "MissingDependencyError",
            "MissingPartError",
            "ModelLoadError",
            "NoAdapterError",
            "PluginLoadError",
            "UnsupportedArchitectureError",
        ],
        "_errors",
    ),
    "hookimpl": "_hookspecs",
    **dict.fromkeys(["Inspector", "get_hidden_state"], "_inspector"),
    **dict.fromkeys(["Intervention", "mean_activation"], "_hooks.edits"),
    "logit_difference": "_analysis.patching",
    **dict.fromkeys(["LensResult", "logit_lens"], "_analysis.lens"),
    "UnprovenWarning": "_proof",
    "Locator": "_locators",
    **dict.fromkeys(["ByteTokenizerWarning", "load_model"], "zoo"),
    **dict.fromkeys(
        ["PluginWarning", "get_plugin_manager", "get_registry", "new_plugin_manager"], "_plugins"
    ),
    **dict.fromkeys(
        ["AdapterSpec", "HeadSpec", "LogitOp", "StackSpec", "StreamOp", "VersionFacts"], "_spec"
    ),
    "SAEError": "_errors",
    "ViewError": "_errors",
    "build_report": "_report",
    **dict.fromkeys(
        [
            "View",
            "attention_view",
            "attribution_view",
            "check_page_budget",
            "head_scores_view",
            "lens_view",
            "patching_view",
            "report_header",
            "report_page",
            "sae_evaluation_view",
            "sae_features_view",
            "write_page",
        ],
        "_html",
    ),
    **dict.fromkeys(
        ["SAEEvaluation", "SparseAutoencoder", "evaluate_sae", "load_sae", "train_sae"], "_sae"
    ),
    **dict.fromkeys(["SAEFeatures", "top_features"], "_sae._features"),
    "ActivationDataset": "_scale.dataset",
    "extract": "_scale.run",
    **dict.fromkeys(["TunedLens", "train_tuned_lens"], "_analysis.tuned"),
}

__all__ = [
    "ActivationDataset",
    "AdapterConflictError",
    "AdapterError",
    "AdapterSpec",
    "AttentionPatterns",
    "AttentionToolError",
    "Attribution",
    "ByteTokenizerWarning",
    "Capture",
    "CaptureError",
    "ConformanceError",
    "CorpusError",
    "DatasetError",
    "DetectedAdapterWarning",
    "ExtractionError",
    "FactError",
    "FactoredMatrix",
    "HeadScores",
    "HeadSpec",
    "Inspector",
    "Intervention",
    "InterventionError",
    "IntrospectError",
    "LensResult",
    "Locator",
    "LocatorError",
    "LogitOp",
    "MissingDependencyError",
    "MissingPartError",
    "ModelLoadError",
    "NoAdapterError",
    "PatchingResult",
    "PluginLoadError",
    "PluginWarning",
    "Record",
    "RotaryWarning",
    "SAEError",
    "SAEEvaluation",
    "SAEFeatures",
    "SparseAutoencoder",
    "StackSpec",
    "StreamOp",
    "TunedLens",
    "UnprovenWarning",
    "UnsupportedArchitectureError",
    "VersionFacts",
    "View",
    "ViewError",
    "__version__",
    "attention_patterns",
    "attention_view",
    "attribution_patching",
    "attribution_view",
    "build_report",
    "capture_to_file",
    "check_page_budget",
    "describe",
    "detect_adapter",
    "encode_batch",
    "evaluate_sae",
    "extract",
    "get_hidden_state",
    "get_plugin_manager",
    "get_registry",
    "head_scores",
    "head_scores_view",
    "hookimpl",
    "last_token_positions",
    "lens_view",
    "load_capture",
    "load_model",
    "load_sae",
    "logit_difference",
    "logit_lens",
    "mean_activation",
    "new_plugin_manager",
    "pad_batch",
    "patching_agreement",
    "patching_result",
    "patching_view",
    "position_ids_from_mask",
    "real_token_positions",
    "report_header",
    "report_page",
    "sae_evaluation_view",
    "sae_features_view",
    "save_tensors",
    "top_features",
    "train_sae",
    "train_tuned_lens",
    "write_page",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'introspect' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"introspect.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
