"""Momentum (EMA) copies of encoders and the feature queues they fill (ALBEF, BLIP).

- :class:`MomentumCopy` holds frozen deep copies of some modules of a model and moves them
  towards the online modules with ``update()``: p_m <- m * p_m + (1 - m) * p, under no_grad.
  Buffers (e.g. BatchNorm statistics) are copied as they are. The copies are registered
  submodules, so their weights are part of the model's state dict (checkpoints resume exactly);
  the online modules are only referenced, not registered a second time.
- :class:`FeatureQueue` is a ring buffer of named feature sets (e.g. image and text embeddings
  of the momentum encoders) plus an id per entry. ``enqueue`` gathers the features of every
  process first (one global batch per call) and writes them at the pointer, wrapping around at
  the end. The queue and its pointer are buffers, saved with the model.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..collective import all_gather_no_grad


class MomentumCopy(nn.Module):
    """EMA copies of ``modules`` (name -> online module); ``copy[name]`` is the momentum module."""

    def __init__(self, modules: dict[str, nn.Module], momentum: float = 0.995):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.copies = nn.ModuleDict({name: copy.deepcopy(m) for name, m in modules.items()})
        for p in self.copies.parameters():
            p.requires_grad_(False)
        self.online = dict(modules)  # a plain dict: not registered, not in the state dict

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]

    def pairs(self):
        """(momentum parameter, online parameter) for every parameter of every copy."""
        for name, online in self.online.items():
            yield from zip(self.copies[name].parameters(), online.parameters())

    @torch.no_grad()
    def update(self, momentum: float | None = None) -> None:
        """p_m = m * p_m + (1 - m) * p for every parameter; buffers copied."""
        m = self.momentum if momentum is None else float(momentum)
        pairs = list(self.pairs())
        if pairs:
            ours = [pm for pm, _ in pairs]
            torch._foreach_mul_(ours, m)
            torch._foreach_add_(ours, torch._foreach_mul([p.detach() for _, p in pairs], 1.0 - m))
        for name, online in self.online.items():
            for bm, b in zip(self.copies[name].buffers(), online.buffers()):
                bm.copy_(b)

    @torch.no_grad()
    def reset(self) -> None:
        """Make every copy equal to its online module (m = 0)."""
        self.update(0.0)


class FeatureQueue(nn.Module):
    """A ring buffer of ``size`` entries of named features, e.g. ``FeatureQueue(4096, image=256,
    text=256)``; each starts as random unit vectors (as in ALBEF) with id -1 (matches nothing).

    ``queue.image`` (size, D) etc. are the features; ``queue.ids`` (size,) the ids; ``queue.ptr``
    the next slot. ``enqueue(ids=..., image=..., text=...)`` gathers every process's rows (the
    global batch), writes them at the pointer and wraps around; the global batch may not exceed
    the queue (checked with a clear error).
    """

    def __init__(self, size: int, normalize: bool = True, **dims: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        if not dims:
            raise ValueError("a feature queue needs at least one named feature, e.g. image=256")
        self.size, self.names = int(size), tuple(dims)
        for name, dim in dims.items():
            init = torch.randn(size, dim)
            self.register_buffer(name, F.normalize(init, dim=-1) if normalize else init)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def features(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    @torch.no_grad()
    def enqueue(self, ids: torch.Tensor | None = None, **feats: torch.Tensor) -> None:
        """Write the gathered global batch of every named feature (and ids, -1 when None)."""
        if set(feats) != set(self.names):
            raise ValueError(f"enqueue needs exactly the features {list(self.names)}, got {list(feats)}")
        n_local = next(iter(feats.values())).shape[0]
        if ids is None:
            ids = torch.full((n_local,), -1, dtype=torch.long, device=self.ids.device)
        gathered = {k: all_gather_no_grad(v.detach()) for k, v in feats.items()}
        gathered_ids = all_gather_no_grad(ids.to(self.ids.device).long())
        n = gathered_ids.shape[0]
        if any(v.shape[0] != n for v in gathered.values()):
            raise ValueError("enqueue: the feature sets have different numbers of rows")
        if n > self.size:
            raise ValueError(f"the global batch of {n} does not fit the feature queue of {self.size}; "
                             f"use a queue size of at least {n} (a multiple of the global batch)")
        slots = (int(self.ptr) + torch.arange(n, device=self.ids.device)) % self.size  # wraps around
        for name, value in gathered.items():
            buf = getattr(self, name)
            buf[slots] = value.to(buf.dtype)
        self.ids[slots] = gathered_ids
        self.ptr.fill_((int(self.ptr) + n) % self.size)
