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


@torch.no_grad()
def all_gather_padded(x: torch.Tensor, length: int, value=0, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """(B_r, L_r, ...) on each rank r -> (sum_r B_r, length, ...) in rank order, detached: each
    rank's rows padded along dim 1 with ``value`` to ``length`` (at least every rank's L_r), e.g.
    token ids padded to the longest text of the global batch."""
    if x.shape[1] > length:
        raise ValueError(f"rows of length {x.shape[1]} do not fit the padded length {length}")
    pad = [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]]
    return all_gather_no_grad(torch.nn.functional.pad(x, pad, value=value), sizes)


def global_mean_scale(count: int | torch.Tensor, device=None) -> float:
    """The factor n_r·W / Σ_r n_r that turns a mean over this rank's n_r items (e.g. masked
    tokens) into its share of the mean over every rank's items, so that DDP's average of the
    rank losses (and of their gradients) is the single-process mean over the global batch.
    1 without a process group; 0 when no rank has an item (collective: every rank calls it)."""
    if not (is_dist() and world_size() > 1):
        return 1.0
    n = float(count)
    total = float(all_reduce_sum(torch.tensor([n], dtype=torch.float64, device=device))[0])
    return n * world_size() / total if total > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Randomness that depends on the global batch, not on the number of processes
# --------------------------------------------------------------------------------------------
_RUN_SEED = 0


def set_run_seed(seed: int) -> None:
    """The seed `global_generator` mixes in (the trainer sets its run's seed)."""
    global _RUN_SEED
    _RUN_SEED = int(seed)


def global_generator(step: int, draw: int = 0, device=None) -> torch.Generator:
    """A generator seeded alike on every rank from (run seed, ``step``, ``draw``). Draws made
    from it for every row of the global batch, of which each rank then keeps its own rows, are
    the same whatever the number of processes; with ``step`` taken from saved state (e.g. a
    model's step buffer) a resumed run repeats them exactly."""
    import hashlib
    key = f"{_RUN_SEED}:{int(step)}:{int(draw)}".encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(seed)
    return g


def call_generator(calls: dict, step: int, training: bool, device=None) -> torch.Generator:
    """The `global_generator` of one ``training_losses`` call at optimiser step ``step``, seeded
    from the run seed, ``step`` and the number of calls made so far at this step in this mode (the
    micro-batches of an accumulated step draw apart; evaluation calls, ``training=False``, count
    apart). ``calls`` (mode -> (step, calls at that step)) is the caller's record, updated here."""
    step = int(step)
    last, n = calls.get(training, (step, -1))
    n = n + 1 if last == step else 0
    calls[training] = (step, n)
    return global_generator(step, 2 * n + (0 if training else 1), device)


# --------------------------------------------------------------------------------------------
# Process group set-up (torchrun) and small collectives for the trainer
# --------------------------------------------------------------------------------------------
def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK): gloo on CPU, NCCL on CUDA. Returns True when this
    process runs distributed (world size > 1). A no-op without WORLD_SIZE or when a group
    already exists."""
    import os
    if is_dist():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return world_size() > 1


def local_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK under NCCL, else cuda or cpu."""
    import os
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if is_dist() else
                            torch.cuda.current_device())
    return torch.device("cpu")


def is_main() -> bool:
    """True on rank 0 (the one that writes files) or without a process group."""
    return rank() == 0


def barrier() -> None:
    if is_dist() and world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; identity without a process group)."""
    x = x.clone()
    if is_dist() and world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (pickled; [obj] without a process group)."""
    if not (is_dist() and world_size() > 1):
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s obj on every rank."""
    if not (is_dist() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _AllReduceWithGrad(torch.autograd.Function):
    """all_reduce(sum); backward = all_reduce(sum) of the gradient (the convention above:
    every rank's loss depends on the sum, so the gradient of the sum of the rank losses
    reaches each rank's contribution)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks; identity without a process group."""
    if not is_dist() or world_size() == 1:
        return x
    return _AllReduceWithGrad.apply(x)


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch: per-channel sums
    are all-reduced (with gradient) over the ranks, so W processes with B/W samples each
    normalise exactly as one process with B samples. (torch's SyncBatchNorm does the same on
    GPUs only; this one runs on any backend, gloo included.) Evaluation mode and a world of
    one use the plain kernel. The state dict is that of ``nn.BatchNorm*d``."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and is_dist() and world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = all_reduce_sum(torch.tensor([float(x.numel() // x.shape[1])], device=x.device))
        n = count[0]
        mean = all_reduce_with_grad(xf.sum(dims)) / n  # (C,)
        centred = xf - mean.view(shape)
        var = all_reduce_with_grad((centred * centred).sum(dims)) / n  # biased, for normalising
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                unbiased = var * (n / max(float(n) - 1, 1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach().to(self.running_var.dtype), alpha=m)
        return y.to(x.dtype)


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm*d by one normalising over the global batch: torch's
    SyncBatchNorm on CUDA, `GlobalBatchNorm` elsewhere. Parameters and buffers are kept
    (the same tensors), so state-dict keys do not change."""
    if module.__class__ in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d):
        cls = torch.nn.SyncBatchNorm if module.weight is not None and module.weight.is_cuda \
            else GlobalBatchNorm
        new = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new = convert_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def is_main_env() -> bool:
    """True unless torchrun's environment names this process a rank other than 0 (usable after
    the process group is gone)."""
    import os
    return int(os.environ.get("RANK", "0")) == 0
