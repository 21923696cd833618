"""ToyLM: a small decoder-only language model in plain PyTorch (no transformers).

It follows the Hugging Face conventions introspect's conformance checks compare with: called
with ``output_hidden_states=True`` it returns ``hidden_states`` (the input of block 0, the
output of every block, the last one after the final norm) next to ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ToyLMConfig:
    """ToyLM's sizes; ``logit_scale`` multiplies the logits after the head."""

    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 3
    num_heads: int = 4
    max_positions: int = 64
    logit_scale: float = 0.5


class ToyAttention(nn.Module):
    """Causal multi-head self-attention; returns ``(output, attention weights)``."""

    def __init__(self, config: ToyLMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, -1).unbind(dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(batch, seq, hidden)
        return self.out(mixed), weights


class ToyBlock(nn.Module):
    """A pre-norm transformer block; like many transformers 4.x blocks it returns a tuple."""

    def __init__(self, config: ToyLMConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size)
        self.attn = ToyAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, 4 * config.hidden_size),
            nn.GELU(),
            nn.Linear(4 * config.hidden_size, config.hidden_size),
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn_out, weights = self.attn(self.attn_norm(hidden_states))
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states, weights


class ToyLM(nn.Module):
    """Token and position embeddings, ToyBlocks, a final LayerNorm, a head, a logit scale.

    Example:
        >>> model = ToyLM(ToyLMConfig(num_layers=2))
        >>> model(torch.tensor([[1, 2, 3]]))["logits"].shape
        torch.Size([1, 3, 64])
    """

    def __init__(self, config: ToyLMConfig | None = None) -> None:
        super().__init__()
        self.config = config or ToyLMConfig()
        c = self.config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos = nn.Embedding(c.max_positions, c.hidden_size)
        self.blocks = nn.ModuleList(ToyBlock(c) for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(c.hidden_size)
        self.head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> dict[str, Any]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Positions are added outside the embedding module: hidden_states[0] is block 0's
        # input, not the embedding's output.
        hidden = self.embed(input_ids) + self.pos(positions)
        states = [hidden]
        for block in self.blocks:
            hidden = block(hidden)[0]
            states.append(hidden)
        hidden = self.norm(hidden)
        states[-1] = hidden  # as in Hugging Face: the last entry is after the final norm
        logits = self.head(hidden) * self.config.logit_scale
        out: dict[str, Any] = {"logits": logits}
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return out
