"""Weight initialisation shared by several models (timm's ``layers/weight_init.py`` in spirit)."""
from __future__ import annotations

from torch import nn


def init_weights(m: nn.Module) -> None:
    """ViT / BERT style: Linear weights truncated-normal (std 0.02), biases 0; LayerNorm 1 and 0.
    Use as ``model.apply(init_weights)``."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
