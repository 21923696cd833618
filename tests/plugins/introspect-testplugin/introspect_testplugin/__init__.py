"""A third-party plugin: an adapter for TinyNet, a plain PyTorch model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from introspect import AdapterSpec, hookimpl


class Block(nn.Module):
    """A residual MLP block: it returns the updated residual stream, as transformer blocks do."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class TinyNet(nn.Module):
    """Embedding, residual MLP blocks, a final LayerNorm and a head."""

    def __init__(self, vocab: int = 32, hidden: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


TINYNET = AdapterSpec(
    name="tinynet",
    architectures=("TinyNet",),
    description="TinyNet from introspect-testplugin",
    embed="embed",
    blocks="blocks",
    mlp="mlp",
    final_norm="norm",
    lm_head="head",
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(TINYNET)
