"""Pooling of token sequences and small heads."""
from __future__ import annotations

import torch
from torch import nn


def pool_cls(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, D): the first token."""
    return x[:, 0]


def pool_mean(x: torch.Tensor, mask: torch.Tensor | None = None, skip_prefix: int = 0) -> torch.Tensor:
    """Mean over tokens (after ``skip_prefix`` tokens), counting only mask==1 positions."""
    x = x[:, skip_prefix:]
    if mask is None:
        return x.mean(dim=1)
    m = mask[:, skip_prefix:].to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def eot_positions(input_ids: torch.Tensor, eot_token_id: int | None = None) -> torch.Tensor:
    """(B,) end-of-text position of each row: the first ``eot_token_id``, or, when None, the
    position of the largest id (original CLIP, whose end token has the largest id)."""
    if eot_token_id is None:
        return input_ids.argmax(dim=-1)
    hits = (input_ids == eot_token_id).int()
    if not bool(hits.any(dim=-1).all()):
        raise ValueError(f"a text has no end-of-text token (id {eot_token_id})")
    return hits.argmax(dim=-1)


def pool_eot(x: torch.Tensor, input_ids: torch.Tensor, eot_token_id: int | None = None) -> torch.Tensor:
    """Token at the end-of-text position (``eot_positions``)."""
    index = eot_positions(input_ids, eot_token_id)
    return x[torch.arange(x.shape[0], device=x.device), index]


class Pooler(nn.Module):
    """tanh(dense(first token)) (BERT, ViLT)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder to the vocabulary."""

    def __init__(self, dim: int, vocab_size: int, eps: float = 1e-12, act: str = "gelu"):
        super().__init__()
        from .mlp import activation
        self.dense = nn.Linear(dim, dim)
        self.act = activation(act)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


def classifier(dim: int, hidden: int, out: int) -> nn.Sequential:
    """ViLT's VQA / NLVR2 head (ALBEF's too): Linear, LayerNorm (PyTorch's default eps 1e-5),
    GELU, Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out))
