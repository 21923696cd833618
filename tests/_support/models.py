"""The tiny GPT-2, Llama and Mamba-2 configurations the tests build (nothing downloads), and a helper
that reads every hook a model holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    Mamba2Config,
)

from _support import FAMILY_NAMES

__all__ = ["FAMILIES", "gpt2_config", "hook_state", "llama_config", "mamba2_config"]


def gpt2_config(layers: int = 3) -> GPT2Config:
    return GPT2Config(
        n_layer=layers,
        n_embd=64,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def llama_config(layers: int = 3) -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def mamba2_config() -> Mamba2Config:
    """A Mamba-2 narrower than the generic tiny size (32 wide), chunked every 4 tokens."""
    return Mamba2Config(
        num_hidden_layers=2,
        hidden_size=32,
        state_size=8,
        expand=2,
        head_dim=8,
        num_heads=8,
        n_groups=1,
        conv_kernel=4,
        vocab_size=96,
        chunk_size=4,
    )


FAMILIES: dict[str, tuple[Callable[[], Any], type[nn.Module], type[nn.Module]]] = {
    "gpt2": (gpt2_config, GPT2LMHeadModel, GPT2Model),
    "llama": (llama_config, LlamaForCausalLM, LlamaModel),
}
assert tuple(FAMILIES) == FAMILY_NAMES, "name a new family in _support.FAMILY_NAMES too"


def hook_state(model: nn.Module) -> dict[str, tuple[list[Any], list[Any], list[Any], list[Any]]]:
    """Every module's forward hooks and pre-hooks (with their kwargs flags), by name."""
    return {
        name: (
            list(m._forward_hooks.items()),
            list(m._forward_pre_hooks.items()),
            sorted(m._forward_hooks_with_kwargs),
            sorted(m._forward_pre_hooks_with_kwargs),
        )
        for name, m in model.named_modules()
    }
