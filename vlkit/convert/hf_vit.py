"""Hugging Face ``ViTModel`` / ``ViTForImageClassification`` folders -> vlkit ViT."""
from __future__ import annotations

from pathlib import Path

from ..models.vit import ViT, ViTConfig
from .common import ConversionError, checked_config, load_strict, read_hf_weights, rename, strip_prefix

# Both the classic layout (what save_pretrained writes) and the renamed in-memory layout.
_L = r"(?:encoder\.layer|layers)\.(\d+)\."
def layer_rules(hf_layer: str, ours: str) -> list[tuple[str, str]]:
    """Rename rules of the Hugging Face ViT layer layout (query/key/value, layernorm_before/after,
    intermediate/output) onto a vlkit PreNormBlock; ``hf_layer`` captures the layer index."""
    return [
        (hf_layer + r"attention\.(?:attention\.)?(?:query|q_proj)\.(weight|bias)", ours + r"attn.q.\2"),
        (hf_layer + r"attention\.(?:attention\.)?(?:key|k_proj)\.(weight|bias)", ours + r"attn.k.\2"),
        (hf_layer + r"attention\.(?:attention\.)?(?:value|v_proj)\.(weight|bias)", ours + r"attn.v.\2"),
        (hf_layer + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", ours + r"attn.proj.\2"),
        (hf_layer + r"layernorm_before\.(weight|bias)", ours + r"norm1.\2"),
        (hf_layer + r"layernorm_after\.(weight|bias)", ours + r"norm2.\2"),
        (hf_layer + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", ours + r"mlp.fc1.\2"),
        (hf_layer + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", ours + r"mlp.fc2.\2"),
    ]


RULES = [
    (r"embeddings\.cls_token", r"vision.embed.cls_token"),
    (r"embeddings\.position_embeddings", r"vision.embed.pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"vision.embed.patch_embed.proj.\1"),
    *layer_rules(_L, r"vision.encoder.blocks.\1."),
    (r"layernorm\.(weight|bias)", r"vision.norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]
IGNORE = [r"pooler\.dense\.(weight|bias)"]  # ViTModel's tanh pooler is not part of ViT classification


def config_from_hf(hf: dict) -> ViTConfig:
    if hf.get("model_type") != "vit":
        raise ConversionError(f"expected a ViT config (model_type 'vit'), got {hf.get('model_type')!r}")
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "quick_gelu": "quick_gelu", "relu": "relu"}.get(hf["hidden_act"])
    if act is None:
        raise ConversionError(f"unsupported ViT activation {hf.get('hidden_act')!r}")
    archs = hf.get("architectures") or []
    labels = hf.get("id2label") or {}
    classify = any("ImageClassification" in a for a in archs)
    names = [labels[k] for k in sorted(labels, key=int)] if classify else []
    return ViTConfig(image_size=hf["image_size"], patch_size=hf["patch_size"],
                     in_chans=hf["num_channels"], dim=hf["hidden_size"],
                     depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                     mlp_dim=hf["intermediate_size"], act=act, eps=hf["layer_norm_eps"],
                     qkv_bias=hf["qkv_bias"], num_classes=len(names), class_names=names)


def load_hf_vit(folder: str | Path, hf_config: dict) -> ViT:
    cfg = checked_config(config_from_hf(hf_config), folder)
    state = strip_prefix(read_hf_weights(folder), "vit.")
    model = ViT(cfg)
    load_strict(model, rename(state, RULES, IGNORE), str(folder))
    return model.eval()
