"""Transformer blocks: pre-norm (ViT, CLIP, ViLT, VLMo) and post-norm (BERT: ALBEF, BLIP text).

A block gains cross-attention when given ``context_dim`` (with ``cross_optional`` a call without a
context skips it: BLIP's text encoder, unimodal or image-grounded); the MLP may be replaced by any
module taking ``(x, modality=...)`` (a router over modality experts, ``layers.mlp.ModalityExperts``),
which, with ``mlp_norm=False``, applies its own LayerNorm (one per expert). ``layer_scale`` > 0
multiplies each residual branch of a pre-norm block by a learned per-channel γ starting at that
value (LayerScale: BEiT, VLMo). Nothing else varies.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, KVCache, pick_rows
from .drop import DropPath
from .mlp import Mlp


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, context_dim: int | None = None,
                 act: str = "gelu", eps: float = 1e-6, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, mlp: nn.Module | None = None,
                 mlp_norm: bool = True, layer_scale: float = 0.0, k_bias: bool | None = None,
                 cross_optional: bool = False):
        super().__init__()
        self.cross_optional = cross_optional
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                              k_bias=k_bias)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=eps)
            self.cross_attn = Attention(dim, num_heads, context_dim=context_dim, qkv_bias=qkv_bias,
                                        attn_drop=attn_drop, proj_drop=drop)
        else:
            self.norm_cross = self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim, eps=eps) if mlp_norm else nn.Identity()
        self.mlp = mlp if mlp is not None else Mlp(dim, mlp_dim, act, drop)
        self.drop_path = DropPath(drop_path)
        if layer_scale > 0:  # LayerScale: γ per channel on the attention and MLP branches
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _scaled(self, branch: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        return self.drop_path(branch if gamma is None else gamma * branch)

    @property
    def has_cross(self) -> bool:
        return self.cross_attn is not None

    def _check_context(self, context) -> bool:
        """Whether this call runs the cross-attention."""
        if self.has_cross and context is None and not self.cross_optional:
            raise ValueError("this block has cross-attention and needs a context")
        return self.has_cross and context is not None


class PreNormBlock(_Block):
    """x + attn(norm(x)) [+ cross(norm(x), context)] + mlp(norm(x))."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, modality=None, return_attention: bool = False,
                guides: dict | None = None):
        cross_on = self._check_context(context)
        guides = guides or {}
        attn = self.attn(self.norm1(x), mask=mask, causal=causal, cache=cache,
                         return_attention=return_attention, guide=guides.get("self"))
        maps = {}
        if return_attention:
            attn, maps["self"] = attn
        x = x + self._scaled(attn, self.gamma_1)
        if cross_on:
            cross = self.cross_attn(self.norm_cross(x), context=context, mask=context_mask,
                                    cache=cache, return_attention=return_attention,
                                    guide=guides.get("cross"))
            if return_attention:
                cross, maps["cross"] = cross
            x = x + self.drop_path(cross)
        x = x + self._scaled(self.mlp(self.norm2(x), modality=modality), self.gamma_2)
        return (x, maps) if return_attention else x

    def forward_at(self, x: torch.Tensor, index, mask: torch.Tensor | None = None, causal: bool = False,
                   context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                   modality=None) -> torch.Tensor:
        """The block's output at one position per row, (B, 1, D) (``index``: an int or a (B,)
        tensor): equal to ``forward(x, ...)`` there, with the attention queries, the residual
        stream and the MLP computed for that position only."""
        cross_on = self._check_context(context)
        h = self.norm1(x)
        x = pick_rows(x, index) + self._scaled(self.attn.forward_at(h, index, mask=mask, causal=causal),
                                               self.gamma_1)
        if cross_on:
            x = x + self.drop_path(self.cross_attn(self.norm_cross(x), context=context, mask=context_mask))
        return x + self._scaled(self.mlp(self.norm2(x), modality=modality), self.gamma_2)


class PostNormBlock(_Block):
    """norm(x + attn(x)) [-> norm(x + cross(x, context))] -> norm(x + mlp(x)) (BERT)."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("layer_scale", 0.0) > 0 or kwargs.get("mlp_norm", True) is False:
            raise ValueError("layer_scale and mlp_norm=False are pre-norm block options")
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, modality=None, return_attention: bool = False,
                guides: dict | None = None):
        cross_on = self._check_context(context)
        guides = guides or {}
        attn = self.attn(x, mask=mask, causal=causal, cache=cache, return_attention=return_attention,
                         guide=guides.get("self"))
        maps = {}
        if return_attention:
            attn, maps["self"] = attn
        x = self.norm1(x + self.drop_path(attn))
        if cross_on:
            cross = self.cross_attn(x, context=context, mask=context_mask, cache=cache,
                                    return_attention=return_attention, guide=guides.get("cross"))
            if return_attention:
                cross, maps["cross"] = cross
            x = self.norm_cross(x + self.drop_path(cross))
        x = self.norm2(x + self.drop_path(self.mlp(x, modality=modality)))
        return (x, maps) if return_attention else x


class Transformer(nn.Module):
    """A stack of blocks sharing one call signature; optional activation checkpointing."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, return_attention: bool = False, **kwargs):
        if not return_attention:
            return self._run(self.blocks, x, **kwargs)
        maps = []
        for block in self.blocks:
            x, m = block(x, return_attention=True, **kwargs)
            maps.append(m)
        return x, maps

    def forward_at(self, x: torch.Tensor, index, **kwargs) -> torch.Tensor:
        """The stack's output at one position per row, (B, 1, D) (``index``: an int or a (B,)
        tensor): every block but the last runs on the whole sequence, the last only where its
        output is read (``PreNormBlock.forward_at``). For a model that pools one token (CLS,
        end-of-text), the same result as ``forward`` for about 1/depth less work."""
        x = self._run(self.blocks[:-1], x, **kwargs)
        return self.blocks[-1].forward_at(x, index, **kwargs)

    def _run(self, blocks, x: torch.Tensor, **kwargs) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and self.training and kwargs.get("cache") is None:
                x = torch.utils.checkpoint.checkpoint(
                    lambda t, b=block: b(t, **kwargs), x, use_reentrant=False)
            else:
                x = block(x, **kwargs)
        return x

    def forward_with_maps_of(self, x: torch.Tensor, layer, guides: dict | None = None, **kwargs):
        """(output, the attention maps of block ``layer``): the other blocks run as in
        ``forward`` (fused kernels, checkpointing); only that block computes its maps. With a
        sequence of layers, the maps are a dict from each of them. ``guides`` {layer: {"self" or
        "cross": AttentionGuide}} forces the attention of those layers (among ``layer``)."""
        wanted = sorted({layer} if isinstance(layer, int) else set(layer))
        for k in wanted:
            if not 0 <= k < len(self.blocks):
                raise ValueError(f"layer {k}: this stack has {len(self.blocks)} blocks")
        if guides and not set(guides) <= set(wanted):
            raise ValueError(f"attention guides for layers {sorted(guides)}, maps of {wanted}")
        maps, done = {}, 0
        for k in wanted:
            x = self._run(self.blocks[done:k], x, **kwargs)
            x, maps[k] = self.blocks[k](x, return_attention=True, guides=(guides or {}).get(k), **kwargs)
            done = k + 1
        x = self._run(self.blocks[done:], x, **kwargs)
        return x, (maps[layer] if isinstance(layer, int) else maps)
