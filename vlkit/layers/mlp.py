"""Feed-forward layers: the Transformer MLP and a modality-routed mixture of expert MLPs."""
from __future__ import annotations

import torch

from torch import nn


class QuickGELU(nn.Module):
    """x·σ(1.702x), the GELU approximation of the original CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r} (gelu, gelu_tanh, quick_gelu, relu)")


class Mlp(nn.Module):
    """Linear -> activation -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ModalityExperts(nn.Module):
    """One MLP per modality (VLMo's V-FFN, L-FFN, VL-FFN); ``modality`` picks the expert.

    ``modality`` may be a name (the whole sequence goes to one expert) or a list of
    ``(name, length)`` spans that split the sequence, e.g. ``[("language", 40), ("vision", 197)]``.
    """

    def __init__(self, dim: int, hidden_dim: int, experts=("vision", "language", "vl"),
                 act: str = "gelu", drop: float = 0.0):
        super().__init__()
        self.experts = nn.ModuleDict({name: Mlp(dim, hidden_dim, act, drop) for name in experts})

    def forward(self, x: torch.Tensor, modality=None) -> torch.Tensor:
        if modality is None:
            raise ValueError(f"modality experts need a modality, one of {list(self.experts)}")
        if isinstance(modality, str):
            return self._expert(modality)(x)
        parts, start = [], 0
        for name, length in modality:
            parts.append(self._expert(name)(x[:, start:start + length]))
            start += length
        if start != x.shape[1]:
            raise ValueError(f"modality spans cover {start} tokens, sequence has {x.shape[1]}")
        return torch.cat(parts, dim=1)

    def _expert(self, name: str) -> Mlp:
        if name not in self.experts:
            raise ValueError(f"no {name!r} expert here; experts: {list(self.experts)}")
        return self.experts[name]


