"""A tapped pass through a stack of text layers that cross-attend to image tokens (ALBEF's fusion
layers, BLIP's image-grounded encoder): the objectives read the cross-attention of the text over
the patches and, in training, force it (``vlkit.objectives.base``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import AttentionGuide
from .base import Step
from .grounding import check_targets


def tapped_cross_attention(stack, step: Step, text_hidden: torch.Tensor, attention_mask: torch.Tensor,
                           self_mask: torch.Tensor, image_tokens: torch.Tensor, targets: dict,
                           causal: bool = False) -> torch.Tensor:
    """``stack`` (a ``layers.Transformer`` of blocks with cross-attention) over the text states
    (B, L, D) with ``self_mask``, cross-attending to the image tokens (B, 1+P, Dv: [CLS] first):
    (B, L, D). The objectives read the cross-attention of their layers, text over the P patches
    (B, heads, L, P), against ``targets`` ({"names": (B, L, P), "roles": (B, 2, L, P) or None});
    attention forcing mixes the targets into those layers in training. ``causal``: the stack's
    self-attention is causal (a decoder's pass)."""
    check_targets(targets["names"], attention_mask.shape, image_tokens.shape[1] - 1)
    targets = {k: None if v is None else v.to(image_tokens.device) for k, v in targets.items()}
    forced, guides = step.guides(targets), None
    if forced is not None:  # no target on the image [CLS]
        guides = {layer: {"cross": AttentionGuide(first, F.pad(t.float(), (1, 0)), forced[1])}
                  for layer, (first, t) in forced[0].items()}
    fused, maps = stack.forward_with_maps_of(text_hidden, step.attention_layers(), mask=self_mask,
                                             context=image_tokens, guides=guides, causal=causal)
    step.read("text", lambda layer, heads: maps[layer]["cross"][:, heads, :, 1:], fused, targets)
    return fused
