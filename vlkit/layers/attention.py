"""Multi-head attention for self- and cross-attention.

One module serves both: given ``context`` it attends from ``x`` to ``context`` (cross-attention),
otherwise to ``x`` itself. Queries, keys and values have separate projections, so checkpoints with
either separate or fused q/k/v load by a rename table; the forward pass computes them as one
product over the stacked weights.

Two code paths compute the same thing:
- fused: ``F.scaled_dot_product_attention`` (the default);
- plain: softmax(QKᵀ/√d + mask)V in PyTorch ops, which can also return the attention maps.
The switch is global (``set_fused_attention``) and per call (``return_attention=True`` forces the
plain path); bf16 training on the CPU over short sequences takes the plain path, which the CPU
differentiates several times faster (``use_fused``). Both honour the same boolean masks: ``True``
means "may attend".
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .int8 import Int8Linear, Int8Weights, int8_linear, stack_int8

_FUSED = True


def set_fused_attention(enabled: bool) -> None:
    """Use ``F.scaled_dot_product_attention`` (True) or the plain PyTorch path (False) globally."""
    global _FUSED
    _FUSED = bool(enabled)


def fused_attention_enabled() -> bool:
    return _FUSED


# The CPU kernel of F.scaled_dot_product_attention differentiates bf16 inputs 5-13x slower than
# the plain path for sequences of up to a few hundred tokens (fp32 it does not; forward passes
# are close): benchmarks/attention_paths.py. Such attention, while gradients are recorded, takes
# the plain path; longer sequences keep the fused kernel, whose memory does not grow with N·M.
PLAIN_BF16_CPU_MAX_TOKENS = 256


def use_fused(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether attention of queries ``q`` over keys ``k`` (B, heads, N|M, head_dim) takes the
    fused kernel: the global switch, except bf16 training on the CPU over short sequences."""
    if not _FUSED:
        return False
    return not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
                and (q.requires_grad or k.requires_grad)
                and max(q.shape[-2], k.shape[-2]) <= PLAIN_BF16_CPU_MAX_TOKENS)


@contextlib.contextmanager
def fused_attention(enabled: bool):
    """Context manager form of :func:`set_fused_attention`."""
    previous = _FUSED
    set_fused_attention(enabled)
    try:
        yield
    finally:
        set_fused_attention(previous)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, M) 1/0 key mask -> (B, 1, 1, M) boolean mask, True where a key may be attended."""
    return attention_mask.bool()[:, None, None, :]


def length_groups(attention_mask: torch.Tensor, groups: int) -> list[tuple[torch.Tensor, int]] | None:
    """The rows of a right-padded (B, L) 1/0 mask in ``groups`` groups of similar length (the
    rows sorted by length, cut into equal counts): [(row indices, the group's longest length)].
    A pass run per group over its own first n columns computes every real token as the padded
    pass does (keys beyond a row's length are masked), on fewer padded tokens. None when there
    is nothing to gain or the mask is not right-padded (a row with a 1 after its group's length)."""
    b, n = attention_mask.shape
    if groups <= 1 or b < 2 * groups:
        return None
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    out = []
    for rows in order.chunk(groups):
        m = max(int(lengths[rows].max()), 1)
        if m < n and bool(attention_mask[rows, m:].any()):
            return None
        out.append((rows, m))
    return out if any(m < n for _, m in out) else None


def by_length(attention_mask: torch.Tensor, groups: int, run) -> torch.Tensor:
    """``run(rows, n)`` -- a pass over the batch's ``rows`` and their first ``n`` columns -- per
    group of ``length_groups(attention_mask, groups)``, the outputs back in the batch's row
    order; one call over every row and column when there is nothing to group."""
    found = length_groups(attention_mask, groups)
    if found is None:
        return run(slice(None), attention_mask.shape[1])
    order = torch.cat([rows for rows, _ in found])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return torch.cat([run(rows, n) for rows, n in found])[inverse]


def check_directional_heads(heads: int, first: int) -> int:
    """The first directional head (``directional_head_index`` made non-negative), or a clear
    error when a layer of ``heads`` heads has no room for the two."""
    if heads < 2:
        raise ValueError(f"directional_heads needs at least 2 attention heads, got heads={heads}")
    index = first % heads if first < 0 else first
    if not -heads <= first < heads or index + 2 > heads:
        raise ValueError(f"directional_head_index {first}: heads {index} and {index + 1} do not fit "
                         f"a layer of {heads} heads")
    return index


def directional_mask(attention_mask: torch.Tensor, heads: int, first: int = 0) -> torch.Tensor:
    """(B, heads, L, L) self-attention mask over a padded sequence in which head ``first``
    (negative: counted from the end) sees only the keys at or before its query and the next
    head only those at or after it (the others see every real token): a token can tell what
    precedes it from what follows it (the subject of a relation from its object) from the first
    step. Every query sees itself."""
    if heads < 2:
        raise ValueError(f"directional heads need at least 2 attention heads, got {heads}")
    first = check_directional_heads(heads, first)
    n, device = attention_mask.shape[1], attention_mask.device
    i = torch.arange(n, device=device)
    back, ahead = i[None, :] <= i[:, None], i[None, :] >= i[:, None]
    full = torch.ones(n, n, dtype=torch.bool, device=device)
    per_head = torch.stack([full] * first + [back, ahead] + [full] * (heads - first - 2))
    return (padding_mask(attention_mask) & per_head[None]) | torch.eye(n, dtype=torch.bool, device=device)


def joint_directional_mask(mask: torch.Tensor, text_len: int, heads: int, first: int) -> torch.Tensor:
    """(B, heads, L, L) self-attention mask of a joint [text ; image] sequence (1/0 ``mask``
    (B, L), text first, ``text_len`` text tokens) in which the text rows of heads ``first`` and
    ``first + 1`` see only text -- the first the text at or before them, the second the text at
    or after them (``directional_mask``) -- and every other row sees every real token."""
    keys, n = padding_mask(mask), text_len
    full = keys.expand(-1, heads, mask.shape[1], -1)
    text = torch.cat([directional_mask(mask[:, :n], 2),
                      torch.zeros_like(full[:, :2, :n, n:])], dim=3)  # (B, 2, n, L)
    first = check_directional_heads(heads, first)
    top = torch.cat([full[:, :first, :n], text, full[:, first + 2:, :n]], dim=1)
    return torch.cat([top, full[:, :, n:]], dim=2)


def patch_attention(maps: list[dict], layer: int | None = None, what: str = "the model") -> torch.Tensor:
    """(B, L, N): each text token's cross-attention over N image patches from the per-layer maps
    a stack returns with ``return_attention`` (``{"cross": (B, heads, L, 1+N)}`` each): of layer
    ``layer`` (negative counts from the end) or the mean over layers, averaged over heads, the
    image [CLS]'s share dropped and each row renormalised to sum 1 over the patches."""
    n_layers = len(maps)
    if n_layers == 0:
        raise ValueError(f"{what} has no cross-attention layers, so no cross-attention maps")
    if layer is not None and not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: {what} has {n_layers} cross-attention layers")
    cross = torch.stack([m["cross"] for m in maps])  # (layers, B, heads, L, 1+N)
    if layer is not None:
        cross = cross[layer][None]
    attn = cross.float().mean(dim=2)[..., 1:]  # (layers, B, L, N)
    return (attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)).mean(0)  # (B, L, N)


def causal_mask(n: int, m: int | None = None, device=None) -> torch.Tensor:
    """(N, M) boolean lower-triangular mask aligned to the end: query i sees keys j <= i + (M - N)."""
    m = n if m is None else m
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(diagonal=m - n)


def combine_masks(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """AND of boolean masks that broadcast together; None entries are ignored."""
    out = None
    for mask in masks:
        if mask is None:
            continue
        out = mask if out is None else (out & mask)
    return out


@dataclass
class KVCache:
    """Keys and values of previous decoding steps, one entry per attention module.

    Self-attention appends the new step's keys/values; cross-attention computes them from the
    context once and reuses them (a *static* entry). A static entry may hold one row per image
    while the queries hold G rows per image (beams, or several samples of one image): the
    attention then reads the image's keys once for its G query rows, so they are never copied.
    ``reorder`` follows beam search (with ``static=False`` inside each image's group of rows,
    the static entries staying);
    ``select`` keeps some rows (decoding rows that finished are dropped).
    """

    store: dict = field(default_factory=dict)
    static: set = field(default_factory=set)
    masks: dict = field(default_factory=dict)  # static entry -> its context mask (B, 1, 1, M)

    def get(self, key):
        return self.store.get(key)

    def set(self, key, k: torch.Tensor, v: torch.Tensor, static: bool = False,
            mask: torch.Tensor | None = None) -> None:
        self.store[key] = (k, v)
        if static:
            self.static.add(key)
            if mask is not None:
                self.masks[key] = mask

    def reorder(self, index: torch.Tensor, static: bool = True) -> None:
        """Row i of every entry becomes row ``index[i]`` (beam search: a beam's new parent).
        ``static=False`` leaves the static entries (and their masks) as they are: beams that
        stay among the rows of their own image, which read its one row of keys and values."""
        kept = set() if static else self.static
        self.store = {key: kv if key in kept else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for key, kv in self.store.items()}
        if static:
            self.masks = {key: m.index_select(0, index) if m.shape[0] > 1 else m for key, m in self.masks.items()}

    def select(self, rows: torch.Tensor, static_rows: torch.Tensor | None = None) -> None:
        """Keep the growing entries' ``rows`` and the static entries' ``static_rows`` (by
        default the same rows)."""
        static_rows = rows if static_rows is None else static_rows
        self.store = {key: (kv[0].index_select(0, static_rows if key in self.static else rows),
                            kv[1].index_select(0, static_rows if key in self.static else rows))
                      for key, kv in self.store.items()}
        self.masks = {key: m.index_select(0, static_rows) if m.shape[0] > 1 else m for key, m in self.masks.items()}

    def __len__(self) -> int:
        return len(self.store)

    def seq_len(self, key) -> int:
        entry = self.store.get(key)
        return 0 if entry is None else entry[0].shape[2]


class Attention(nn.Module):
    """Multi-head attention; cross-attention when ``context_dim`` is given. ``k_bias=False``
    with ``qkv_bias=True``: biases on the query and value projections only (BEiT, VLMo)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 k_bias: bool | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.is_cross = context_dim is not None
        kv_dim = context_dim if context_dim is not None else dim
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(kv_dim, dim, bias=qkv_bias if k_bias is None else k_bias)
        self.v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self._stacked: dict = {}  # inference cache of stacked projection weights (see _project)

    def _project(self, x: torch.Tensor, name: str, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
        """``layer(x)`` for each layer as one product over their stacked weights. In inference
        (eval mode, autograd off) the stacked weights are kept until a parameter changes (its
        version counter, storage or dtype) or the module changes mode, so inference does not copy
        them on every call. The mode switch matters: the fused AdamW kernel updates parameters in
        place without bumping their version counters, so a cache kept across a training step
        would serve stale weights (a model evaluated between steps, as learning curves do). Under
        ``torch.compile`` the weights are stacked in the graph: the cache's pointer checks would
        break it, and a cached tensor could be a CUDA-graph output that a later replay overwrites."""
        if not (all(type(layer) is nn.Linear for layer in layers)
                or all(isinstance(layer, Int8Linear) for layer in layers)):
            return tuple(layer(x) for layer in layers)  # a mix: one product each
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return _project(x, _stack(layers), layers)
        params = [p for layer in layers for p in _tensors(layer)]
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        hit = self._stacked.get(name)
        if hit is None or hit[0] != key:
            hit = (key, _stack(layers))
            self._stacked[name] = hit
        return _project(x, hit[1], layers)

    def train(self, mode: bool = True):
        self._stacked.clear()  # see _project: weights may change while in training mode
        return super().train(mode)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None, return_attention: bool = False,
                guide: AttentionGuide | None = None):
        """x: (B, N, D); context: (B, M, Dc) for cross-attention; mask: bool, broadcastable to
        (B, heads, N, M), True = attend. ``causal`` adds a causal mask (self-attention only).
        With ``cache``, keys/values of earlier steps are reused (decoding). ``guide``: attention
        forcing (``AttentionGuide``; computed with the plain attention)."""
        if self.is_cross and context is None:
            raise ValueError("cross-attention needs a context")
        key = id(self)
        if self.is_cross:
            q = self._heads(self.q(x))  # (B, heads, N, head_dim)
            cached = cache.get(key) if cache is not None else None
            if cached is None:
                k, v = (self._heads(t) for t in self._project(context, "kv", self.k, self.v))
                if cache is not None:
                    cache.set(key, k, v, static=True, mask=mask)
            else:
                k, v = cached
                mask = cache.masks.get(key)  # the context's mask, selected with its rows
            if k.shape[0] != q.shape[0]:  # G query rows per context row (see KVCache)
                return self._grouped(x, q, k, v, mask, return_attention)
        else:
            q, k, v = (self._heads(t) for t in self._project(x, "qkv", self.q, self.k, self.v))
            if cache is not None:
                past = cache.get(key)
                if past is not None:
                    k = torch.cat([past[0], k], dim=2)
                    v = torch.cat([past[1], v], dim=2)
                cache.set(key, k, v)
        n, m = q.shape[2], k.shape[2]
        fused = not return_attention and guide is None and use_fused(q, k)
        # causal alone, square: the kernel's own causal mode (no mask tensor, a faster kernel)
        kernel_causal = causal and not self.is_cross and mask is None and n == m and fused
        if causal and not self.is_cross and not kernel_causal:
            mask = combine_masks(mask, causal_mask(n, m, device=x.device))
        drop = self.attn_drop if self.training else 0.0
        if fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop,
                                                 is_causal=kernel_causal)
            attn = None
        else:
            out, attn = plain_attention(q, k, v, mask, drop, self.training, guide)
        out = out.transpose(1, 2).reshape(x.shape[0], n, -1)  # (B, N, D)
        out = self.proj_drop(self.proj(out))
        return (out, attn) if return_attention else out

    def _grouped(self, x, q, k, v, mask, return_attention: bool):
        """Cross-attention of (B*G, heads, N, head_dim) queries to (B, heads, M, head_dim) keys and
        values: the G rows of each image become G*N query rows of one attention."""
        bg, h, n, d = q.shape
        b = k.shape[0]
        if bg % b or (mask is not None and mask.shape[0] not in (1, b)):
            raise ValueError(f"{bg} query rows for {b} context rows"
                             + (f" and a context mask of {mask.shape[0]}" if mask is not None else ""))
        g = bg // b
        q = q.view(b, g, h, n, d).transpose(1, 2).reshape(b, h, g * n, d)  # (B, heads, G*N, head_dim)
        if not return_attention and use_fused(q, k):
            out, attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
        else:
            out, attn = plain_attention(q, k, v, mask)
        out = out.view(b, h, g, n, d).permute(0, 2, 3, 1, 4).reshape(bg, n, h * d)  # (B*G, N, D)
        out = self.proj_drop(self.proj(out))
        if return_attention:
            attn = attn.view(b, h, g, n, -1).transpose(1, 2).reshape(bg, h, n, -1)
            return out, attn
        return out

    def forward_at(self, x: torch.Tensor, index, mask: torch.Tensor | None = None,
                   causal: bool = False) -> torch.Tensor:
        """Self-attention output at one query position per row, (B, 1, D): the query from
        ``x[b, index[b]]`` (``index`` an int, the same position in every row, or a (B,) tensor),
        keys and values from every position of x (B, N, D). ``causal`` masks the keys after the
        query's position. Equal to ``forward(x, mask=mask, causal=causal)`` at those positions,
        for 1/N of the query-side work (what a model pooling one token needs of its last block)."""
        if self.is_cross:
            raise ValueError("forward_at is self-attention; this module is cross-attention")
        b, n, _ = x.shape
        q = self._heads(self.q(pick_rows(x, index)))  # (B, heads, 1, head_dim)
        k, v = (self._heads(t) for t in self._project(x, "kv", self.k, self.v))
        if causal:
            position = torch.full((b,), index, device=x.device) if isinstance(index, int) else index
            mask = combine_masks(mask, (torch.arange(n, device=x.device) <= position[:, None])[:, None, None, :])
        drop = self.attn_drop if self.training else 0.0
        if use_fused(q, k):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        else:
            out = plain_attention(q, k, v, mask, drop, self.training)[0]
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, 1, -1)))


def pick_rows(x: torch.Tensor, index) -> torch.Tensor:
    """(B, N, D) -> (B, 1, D): position ``index`` of every row (an int), or ``index[b]`` of row b
    (a (B,) tensor)."""
    if isinstance(index, int):
        return x[:, index:index + 1]
    return x[torch.arange(x.shape[0], device=x.device), index].unsqueeze(1)


def _tensors(layer) -> list[torch.Tensor]:
    tensors = layer.weights if isinstance(layer, Int8Linear) else (layer.weight, layer.bias)
    return [t for t in tensors if t is not None]


def _stack(layers):
    """The layers' weights (and biases) stacked along the output dimension: (weight, bias), or
    ``Int8Weights`` for int8 layers."""
    if isinstance(layers[0], Int8Linear):
        return stack_int8(layers)
    weight = torch.cat([layer.weight for layer in layers])
    biases = [layer.bias for layer in layers]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat([b if b is not None else layer.weight.new_zeros(layer.out_features)
                              for b, layer in zip(biases, layers)])


def _project(x: torch.Tensor, stacked, layers) -> tuple[torch.Tensor, ...]:
    """One matrix product over stacked weights, split back per layer (the weights stay separate
    parameters); on a CPU one wide product is much faster than three in training."""
    if isinstance(stacked, Int8Weights):
        out = int8_linear(x, stacked)
    else:
        out = F.linear(x, *stacked)
    return out.split([layer.out_features for layer in layers], dim=-1)


class AttentionGuide(NamedTuple):
    """Attention forcing: heads ``first_head ... first_head + h - 1`` read their values through
    (1 - weight) · their own attention + weight · ``target`` (B, h, N, M), in the query rows
    where the target has mass (normalised there; other rows keep their own attention). The maps
    returned stay the heads' own, so a loss on them still trains the attention itself."""
    first_head: int
    target: torch.Tensor
    weight: float


def _guided(attn: torch.Tensor, guide: AttentionGuide) -> torch.Tensor:
    h0, t = guide.first_head, guide.target.to(attn.dtype)
    heads = slice(h0, h0 + t.shape[1])
    if t.shape[0] != attn.shape[0] or t.shape[2:] != attn.shape[2:] or heads.stop > attn.shape[1]:
        raise ValueError(f"attention guide {tuple(t.shape)} from head {h0} does not fit the "
                         f"attention {tuple(attn.shape)}")
    mass = t.sum(-1, keepdim=True)
    w = guide.weight * (mass > 0).to(attn.dtype)
    mixed = attn[:, heads] * (1 - w) + w * t / mass.clamp_min(1e-12)
    return torch.cat([attn[:, :heads.start], mixed, attn[:, heads.stop:]], dim=1)


def plain_attention(q, k, v, mask=None, dropout_p: float = 0.0, training: bool = False,
                    guide: AttentionGuide | None = None):
    """softmax(QKᵀ/√d + mask) V in plain PyTorch; returns (output, attention probabilities).
    With a ``guide`` the values are read through the forced attention (``AttentionGuide``)."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, heads, N, M)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    attn = scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)  # fp32 sums under bf16
    if mask is not None:  # rows with no allowed key: zero, as SDPA gives for fully masked rows
        attn = attn.masked_fill(~mask, 0.0)
    probs = attn if guide is None or guide.weight <= 0 else _guided(attn, guide)
    probs = F.dropout(probs, dropout_p) if training and dropout_p > 0 else probs
    return probs @ v, attn
