"""Distributed helpers: rank/world queries and feature all-gathers for the losses.

Every helper works as the identity (rank 0 of a world of 1) when torch.distributed is not
initialised, so single-process code needs no branches.

Gradient convention of `all_gather_with_grad` (the one DDP expects)
-------------------------------------------------------------------
Each rank r computes a loss L_r from its local rows against the gathered global batch, and
DDP averages parameter gradients over the W ranks, i.e. optimises L = (1/W) * sum_r L_r.
The backward of the gather all-reduces (sums) the incoming gradient over ranks and returns
this rank's slice, so after `L_r.backward()` the gradient held by rank k's local features is
sum_r dL_r/dx_k = W * dL/dx_k. DDP's division by W then makes every parameter gradient equal
to the single-process gradient of L over the global batch. (Replicated parameters used
directly in the loss, such as the temperature, get dL_r/ds on each rank; their DDP average is
dL/ds.) The same holds when every rank computes the full global loss (L_r = L).

Sizes: the gathers accept a different first-dimension size on each rank (e.g. a different
number of hard negatives); pass `sizes` (one int per rank) when they are known, otherwise
they are exchanged first with one small all_gather. Every rank must call each gather.
(The equality with single-process gradients under DDP's plain averaging assumes equal
batch sizes; extra columns such as hard negatives may differ freely between ranks.)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_gather_sizes(counts: int | Sequence[int], device=None) -> list[list[int]]:
    """Exchange a few ints per rank: returns [[counts of rank 0], [counts of rank 1], ...]."""
    counts = [counts] if isinstance(counts, int) else list(counts)
    if not is_dist():
        return [counts]
    t = torch.tensor(counts, dtype=torch.long, device=device)
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]


def _gather(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    x = x.contiguous()
    m = max(sizes)
    if x.shape[0] < m:  # all_gather needs equal shapes: pad, then drop the padding
        x = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))], 0)
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], 0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward = all-reduce(sum) of the gradient, local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        r = dist.get_rank()
        ctx.start, ctx.n = sum(sizes[:r]), x.shape[0]
        return _gather(x, sizes)  # (sum(sizes), ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # all_reduce is in place; never touch autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start:ctx.start + ctx.n], None


def _sizes_of(x: torch.Tensor, sizes: Sequence[int] | None) -> list[int]:
    if sizes is None:
        return [s[0] for s in all_gather_sizes(x.shape[0], x.device)]
    if len(sizes) != world_size() or sizes[rank()] != x.shape[0]:
        raise ValueError(f"sizes {list(sizes)} do not match this rank's {x.shape[0]} rows")
    return list(sizes)


def all_gather_with_grad(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """(B_r, ...) on each rank r -> (sum_r B_r, ...) in rank order, differentiable (see the
    module doc for the gradient convention). Identity without a process group."""
    if not is_dist() or world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x, _sizes_of(x, sizes))


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """(B_r, ...) on each rank r -> (sum_r B_r, ...) in rank order, detached (e.g. for feature
    queues). Without a process group this returns `x.detach()`."""
    if not is_dist() or world_size() == 1:
        return x.detach()
    return _gather(x, _sizes_of(x, sizes))
