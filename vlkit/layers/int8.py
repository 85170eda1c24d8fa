"""Int8 inference for linear layers.

``quantize_int8(model)`` replaces a model's ``nn.Linear`` layers by :class:`Int8Linear`: int8
weights with one scale per output channel (symmetric, absmax), and activations quantized per
row at run time (dynamic, symmetric, absmax), multiplied exactly in int32 by ``torch._int_mm``
and rescaled to the activations' dtype. On CPUs with VNNI the int8 product runs at about twice
the bf16 rate (``benchmarks/int8_speed.py``). Everything else (norms, attention scores,
activations, embeddings) stays in the model's floating-point dtype. The result approximates the
float model (per-row int8 keeps about two decimal digits of each activation): embeddings agree
with fp32 at a cosine above 0.999 in the tests. Inference only: gradients do not flow through
the rounding, so a call that would need them raises.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Int8Weights(NamedTuple):
    weight: torch.Tensor         # (N, K) int8
    scale: torch.Tensor          # (N,) fp32: weight ≈ weight_int8 · scale[:, None]
    bias: torch.Tensor | None    # (N,) fp32


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> ((N, K) int8, (N,) fp32 scales), per output channel, absmax / 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def int8_linear(x: torch.Tensor, w: Int8Weights) -> torch.Tensor:
    """x (..., K) float -> (..., N) in x's dtype: x quantized per row, times the int8 weights in
    int32, rescaled by both scales, plus the bias."""
    if x.requires_grad:
        raise RuntimeError("int8 linear layers are for inference: run under torch.no_grad() "
                           "(or keep the float model for training)")
    rows = x.reshape(-1, x.shape[-1])
    scale = rows.abs().amax(dim=1, keepdim=True).float().clamp_min_(1e-12).div_(127)  # (M, 1), exact absmax
    q = (rows / scale).round_().clamp_(-127, 127).to(torch.int8)
    if x.device.type == "cuda" and q.shape[0] <= 16:  # the CUDA kernel takes more than 16 rows
        q = torch.cat([q, q.new_zeros(17 - q.shape[0], q.shape[1])])
    y = torch.mul(torch._int_mm(q, w.weight.t())[:rows.shape[0]], scale)  # (M, N) fp32
    y = torch.addcmul(w.bias, y, w.scale) if w.bias is not None else y.mul_(w.scale)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class Int8Linear(nn.Module):
    """An ``nn.Linear`` with int8 weights for inference (see the module's docstring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_weight(linear.weight)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the buffers; a cast (``.to(torch.bfloat16)``, ``.half()``)
        leaves the scales and the bias in fp32, where bf16 would round a scale by up to 0.4%."""
        scale, bias = self.weight_scale, self.bias
        super()._apply(fn, recurse)
        device = self.weight_int8.device  # (int8: moved, never cast)
        self.weight_scale = scale.to(device)
        self.bias = bias.to(device) if bias is not None else None
        return self

    @property
    def weights(self) -> Int8Weights:
        return Int8Weights(self.weight_int8, self.weight_scale, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weights)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def stack_int8(layers) -> Int8Weights:
    """Int8 layers' weights stacked along the output dimension (exact: the scales are per
    output channel)."""
    biases = [layer.bias for layer in layers]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else layer.weight_scale.new_zeros(layer.out_features) for b, layer in zip(biases, layers)])
    return Int8Weights(torch.cat([layer.weight_int8 for layer in layers]),
                       torch.cat([layer.weight_scale for layer in layers]), bias)


def quantize_int8(model: nn.Module) -> int:
    """Replaces, in place, every ``nn.Linear`` of ``model`` whose sizes are multiples of 8 (what
    the int8 kernels take; the others stay float) by an :class:`Int8Linear`, and puts the model
    in eval mode. Returns how many layers were replaced; raises if none could be."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.in_features % 8 == 0 and child.out_features % 8 == 0:
                setattr(parent, name, Int8Linear(child))
                count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} has no linear layer with sizes that are multiples of 8 to quantize")
    model.eval()
    return count
