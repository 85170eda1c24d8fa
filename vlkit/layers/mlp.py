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


class NormMlp(nn.Module):
    """LayerNorm -> Mlp: an expert that owns its norm (VLMo's norm2_text + mlp_text)."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", drop: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden_dim, act, drop)

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        return self.mlp(self.norm(x))


class ModalityExperts(nn.Module):
    """A mixture of modality experts (VLMo): one module per modality name, chosen by
    ``forward``'s ``modality`` argument — a name (the whole sequence goes to that expert) or a
    sequence of ``(name, length)`` segments covering the sequence in order (e.g. ``[("text", L),
    ("image", 1 + N)]``: the first L tokens go to the text expert, the rest to the image expert).
    No routing is learned; a name without an expert is an error."""

    def __init__(self, experts: dict[str, nn.Module]):
        super().__init__()
        self.experts = nn.ModuleDict(experts)

    def _expert(self, name: str) -> nn.Module:
        if name not in self.experts:
            raise ValueError(f"no {name!r} expert here (experts: {', '.join(self.experts)})")
        return self.experts[name]

    def forward(self, x: torch.Tensor, modality=None) -> torch.Tensor:
        if isinstance(modality, str):
            return self._expert(modality)(x)
        if not modality:
            raise ValueError("modality experts need a modality: a name or (name, length) segments")
        lengths = [n for _, n in modality]
        if sum(lengths) != x.shape[1]:
            raise ValueError(f"modality segments {list(modality)} cover {sum(lengths)} tokens, "
                             f"the sequence has {x.shape[1]}")
        parts = x.split(lengths, dim=1)
        return torch.cat([self._expert(name)(part) for (name, _), part in zip(modality, parts)], dim=1)
