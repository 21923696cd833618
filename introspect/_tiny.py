"""Tiny configs: shrink any transformers config to a model that builds and runs in a second.

The shrink is generic: it lowers the usual size attributes (layers, hidden size, heads,
feed-forward width, experts, vocabularies) where a config has them, only ever making them
smaller, also inside sub-configs (``text_config``, ``vision_config``, ...). Special token ids
stay inside the vocabulary, and per-layer lists (layer types, sliding windows) and per-layer
settings keyed by layer index keep up to ``layers`` layers of every kind the full model has, so
a hybrid model keeps an attention layer, and layers of one kind that share weights (Zamba's
hybrid layers share one attention block) still have a partner to share them with. A
``head_dim`` left ``None`` is set to what transformers derives from it,
``hidden_size // num_attention_heads``, for models that read it without the fallback. Nothing
is downloaded.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXTRA_OVERRIDES", "TINY_SIZES", "tiny_config", "tiny_overrides"]

TINY_SIZES: dict[str, int] = {
    "layers": 2,
    "hidden": 64,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 16,
    "ffn": 128,
    "experts": 4,
    "experts_per_token": 2,
    "vocab": 128,
    "rank": 16,
    "dense_layers": 1,
    "expert_groups": 1,
    "chunk": 16,
}
"""The sizes :func:`tiny_overrides` shrinks to (hidden 64 = 4 heads of 16; ``layers`` per kind)."""

_MAX_SAMPLED_LAYERS = 6

# Config attribute names (generic transformers vocabulary) for each size.
_ATTRS: dict[str, tuple[str, ...]] = {
    "layers": (
        "num_hidden_layers",
        "n_layer",
        "n_layers",
        "num_layers",
        "num_decoder_layers",
        "num_encoder_layers",
        "encoder_layers",
        "decoder_layers",
    ),
    "hidden": (
        "hidden_size",
        "n_embd",
        "n_embed",
        "d_model",
        "dim",
        "embed_dim",
        "emb_dim",
        "model_dim",
        "embedding_size",
    ),
    "heads": (
        "num_attention_heads",
        "n_head",
        "n_heads",
        "num_heads",
        "encoder_attention_heads",
        "decoder_attention_heads",
    ),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "head_dim": ("head_dim", "d_kv", "kv_channels", "attention_head_dim", "d_head"),
    "ffn": (
        "intermediate_size",
        "ffn_dim",
        "d_ff",
        "d_inner",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "ffn_hidden_size",
        "expert_ffn_hidden_size",
        "hidden_dim",
        "n_inner",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "expert_intermediate_size",
    ),
    "experts": ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
    "experts_per_token": (
        "num_experts_per_tok",
        "num_experts_per_token",
        "moe_top_k",
        "moe_k",
        "num_selected_experts",
    ),
    "rank": ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim"),
    # Leading dense layers of mixture-of-experts models: keep one so an MoE block remains.
    "dense_layers": ("first_k_dense_replace",),
    # Group-limited routing must fit the fewer experts.
    "expert_groups": ("n_group", "topk_group"),
    # Mamba-2's scan pads every call to a whole chunk (256 by default): 16x the work.
    "chunk": ("chunk_size",),
}


def _config_int(value: Any) -> int | None:
    """A config value that is a plain int (a bool is not)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# Config dicts keyed by small integers that are not about layers.
_NOT_PER_LAYER = {"id2label", "label2id"}


def _layer_keyed(value: Any, layers: int) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(str(k).isdigit() and int(k) < layers for k in value)
    )


def _by_layer(value: dict[Any, Any]) -> dict[int, Any]:
    # transformers writes these keys zero-padded ("05") so that JSON sorts them, and reads
    # them back with int(): compare them as integers too.
    return {int(k): v for k, v in value.items()}


def _sample_layers(values: dict[str, Any], old: int, wanted: int) -> list[int]:
    """Layer indices to keep: the first layer of every kind, then up to ``wanted`` of each."""
    per_layer: list[Any] = [v for v in values.values() if isinstance(v, list) and len(v) == old]
    per_layer += [
        [by_layer.get(i) for i in range(old)]
        for by_layer in (
            _by_layer(v)
            for k, v in values.items()
            if k not in _NOT_PER_LAYER and _layer_keyed(v, old)
        )
    ]
    kinds = [tuple(repr(v[i]) for v in per_layer) for i in range(old)]
    most = max(_MAX_SAMPLED_LAYERS, wanted)
    keep: list[int] = []
    for i, kind in enumerate(kinds):
        if kind not in (kinds[j] for j in keep) and len(keep) < most:
            keep.append(i)
    for i, kind in enumerate(kinds):
        if i not in keep and len(keep) < most and sum(kinds[j] == kind for j in keep) < wanted:
            keep.append(i)
    return sorted(keep)


def _shrunk_layer(value: Any, wanted: dict[str, int]) -> Any:
    return {**value, **_shrink(value, wanted)} if isinstance(value, dict) else value


def _first_int(values: dict[str, Any], overrides: dict[str, Any], attrs: tuple[str, ...]) -> int:
    for attr in attrs:
        value = _config_int(overrides.get(attr, values.get(attr)))
        if value:
            return value
    return 0


def _keep_state_space_heads(values: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Keep Mamba-2's tie ``num_heads * head_dim == hidden_size * expand`` where it held.

    The generic shrink cuts heads, head size and width on their own; a state-space mixer whose
    heads tile its expanded width gets as many heads as the shrunk width needs.
    """
    width, expand = _config_int(values.get("hidden_size")), _config_int(values.get("expand"))
    heads, size = _config_int(values.get("num_heads")), _config_int(values.get("head_dim"))
    if not (width and expand and heads and size) or heads * size != width * expand:
        return
    new_width = _config_int(overrides.get("hidden_size", width)) or width
    new_size = _config_int(overrides.get("head_dim", size)) or size
    if (new_width * expand) % new_size == 0:
        overrides["num_heads"] = new_width * expand // new_size


def _shrink(values: dict[str, Any], wanted: dict[str, int]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for size, attrs in _ATTRS.items():
        if size == "layers":
            continue
        for attr in attrs:
            current = _config_int(values.get(attr))
            if current is not None and current > wanted[size]:
                overrides[attr] = wanted[size]
    heads = [a for a in _ATTRS["heads"] if _config_int(values.get(a))]
    for attr in _ATTRS["kv_heads"]:
        # Multi-head attention (as many key/value heads as heads) stays multi-head, also when
        # the heads need no shrinking (a config shrunk before: shrinking is idempotent).
        if heads and values.get(attr) == values[heads[0]]:
            if heads[0] in overrides:
                overrides[attr] = overrides[heads[0]]
            else:
                overrides.pop(attr, None)
    for attr, value in values.items():
        if "vocab_size" in attr and _config_int(value) is not None and value > wanted["vocab"]:
            overrides[attr] = wanted["vocab"]
    lists_done: set[str] = set()
    for attr in _ATTRS["layers"]:
        old = _config_int(values.get(attr))
        if old is None or old <= wanted["layers"]:
            continue
        keep = _sample_layers(values, old, wanted["layers"])
        overrides[attr] = len(keep)
        for key, value in values.items():
            if key in lists_done:
                continue
            if isinstance(value, list) and len(value) == old:
                overrides[key] = [value[i] for i in keep]
                lists_done.add(key)
            elif key not in _NOT_PER_LAYER and _layer_keyed(value, old):
                # Per-layer settings keyed by layer index follow the kept layers, and shrink
                # like the config they override (a per-layer head_dim of 512 would outgrow a tiny model).
                renumber = {i: new for new, i in enumerate(keep)}
                overrides[key] = {
                    type(k)(renumber[int(k)]): _shrunk_layer(v, wanted)
                    for k, v in value.items()
                    if int(k) in renumber
                }
                lists_done.add(key)
    _keep_state_space_heads(values, overrides)
    if "head_dim" in values and values["head_dim"] is None:
        width = _first_int(values, overrides, _ATTRS["hidden"])
        head_count = _first_int(values, overrides, _ATTRS["heads"])
        if width and head_count and width % head_count == 0:
            overrides["head_dim"] = width // head_count
    vocab = _config_int(overrides.get("vocab_size", values.get("vocab_size")))
    if vocab is not None:
        for attr, value in values.items():
            if not attr.endswith("_token_id"):
                continue
            if _config_int(value) is not None and value >= vocab:
                overrides[attr] = vocab - 1
            elif isinstance(value, list) and any(
                _config_int(v) is not None and v >= vocab for v in value
            ):
                overrides[attr] = [min(v, vocab - 1) for v in value]
    for key, value in values.items():
        if isinstance(value, dict) and "model_type" in value:
            sub = _shrink(value, wanted)
            if sub:
                overrides[key] = {**value, **sub}
    return overrides


def tiny_overrides(config: Any, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """The keyword overrides that shrink ``config`` (never growing a value it has).

    ``sizes`` replaces some of :data:`TINY_SIZES`.

    Example:
        >>> from transformers import GPT2Config
        >>> tiny_overrides(GPT2Config())["n_layer"], tiny_overrides(GPT2Config())["n_embd"]
        (2, 64)
    """
    wanted = {**TINY_SIZES, **(sizes or {})}
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    overrides = _shrink(values, wanted)
    if values.get("use_mamba_kernels"):
        # The fused kernels need CUDA and their own packages; the reference path runs anywhere.
        overrides["use_mamba_kernels"] = False
    return overrides


def tiny_config(model_type_or_config: Any, **extra: Any) -> Any:
    """A shrunk config of a ``model_type`` name (or of a given config), built offline.

    ``extra`` overrides are applied last.

    Example:
        >>> cfg = tiny_config("llama")
        >>> cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
        (2, 64, 128)
    """
    from transformers import AutoConfig

    if isinstance(model_type_or_config, str):
        default = AutoConfig.for_model(model_type_or_config)
        overrides = {**tiny_overrides(default), **extra}
        return AutoConfig.for_model(model_type_or_config, **overrides)
    config = model_type_or_config
    values = config.to_dict()
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    values.update(tiny_overrides(config))
    values.update(extra)
    return type(config)(**values)


EXTRA_OVERRIDES: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"num_experts_per_tok": 2},  # its default (None) does not run
    # transformers 4.x rebuilds attention_layers from attention_types: match the shrunk list.
    "gpt_neo": {"attention_types": [[["global", "local"], 2]]},
    # Its last num_kv_shared_layers layers reuse the caches of layers the shrink drops.
    "gemma3n_text": {"num_kv_shared_layers": 0},
    # One group of B/C projections, as the small checkpoints have (the heads follow the width:
    # _keep_state_space_heads).
    "mamba2": {"n_groups": 1},
    "reformer": {"axial_pos_embds_dim": [32, 32]},
}
"""Overrides some model types need on top of :func:`tiny_config`'s generic shrink.

Their configs tie sizes together in ways the shrink cannot see, or their defaults do not run:
pass
``tiny_config(model_type, **EXTRA_OVERRIDES.get(model_type, {}))``.
"""
