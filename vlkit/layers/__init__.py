"""Shared layers every vlkit model is built from."""
from .attention import (Attention, AttentionGuide, KVCache, causal_mask, check_directional_heads, combine_masks, directional_mask, joint_directional_mask, fused_attention,
                        by_length, fused_attention_enabled, length_groups, padding_mask, patch_attention, plain_attention, set_fused_attention)
from .blocks import PostNormBlock, PreNormBlock, Transformer
from .drop import DropPath
from .embeddings import (BertEmbeddings, ImageEmbeddings, PatchEmbed, TextEmbeddings,
                         grid_pos_embed, interpolate_pos_embed, sincos_2d, sincos_square)
from .int8 import Int8Linear, quantize_int8
from .mlp import Mlp, ModalityExperts, NormMlp, QuickGELU, activation
from .momentum import FeatureQueue, MomentumCopy
from .init import init_weights
from .pooling import MLMHead, Pooler, classifier, eot_positions, pool_cls, pool_eot, pool_mean

__all__ = [
    "Attention", "AttentionGuide", "KVCache", "causal_mask", "check_directional_heads", "combine_masks", "directional_mask", "joint_directional_mask", "fused_attention",
    "by_length", "fused_attention_enabled", "length_groups", "padding_mask", "patch_attention", "plain_attention", "set_fused_attention",
    "PostNormBlock", "PreNormBlock", "Transformer", "DropPath", "BertEmbeddings",
    "ImageEmbeddings", "PatchEmbed", "TextEmbeddings", "grid_pos_embed", "interpolate_pos_embed", "sincos_2d", "sincos_square", "Mlp", "ModalityExperts", "NormMlp",
    "Int8Linear", "quantize_int8", "QuickGELU", "activation", "MLMHead", "Pooler", "classifier", "init_weights", "eot_positions", "pool_cls", "pool_eot",
    "pool_mean", "FeatureQueue", "MomentumCopy",
]
