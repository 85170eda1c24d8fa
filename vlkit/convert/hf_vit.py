"""Hugging Face ``ViTModel`` / ``ViTForImageClassification`` folders -> vlkit ViT."""
from __future__ import annotations

from pathlib import Path

from ..models.vit import ViT, ViTConfig
from .common import ConversionError, load_strict, read_hf_weights, rename, strip_prefix

# Both the classic layout (what save_pretrained writes) and the renamed in-memory layout.
_L = r"(?:encoder\.layer|layers)\.(\d+)\."
RULES = [
    (r"embeddings\.cls_token", r"vision.embed.cls_token"),
    (r"embeddings\.position_embeddings", r"vision.embed.pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"vision.embed.patch_embed.proj.\1"),
    (_L + r"attention\.(?:attention\.)?(?:query|q_proj)\.(weight|bias)", r"vision.encoder.blocks.\1.attn.q.\2"),
    (_L + r"attention\.(?:attention\.)?(?:key|k_proj)\.(weight|bias)", r"vision.encoder.blocks.\1.attn.k.\2"),
    (_L + r"attention\.(?:attention\.)?(?:value|v_proj)\.(weight|bias)", r"vision.encoder.blocks.\1.attn.v.\2"),
    (_L + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"vision.encoder.blocks.\1.attn.proj.\2"),
    (_L + r"layernorm_before\.(weight|bias)", r"vision.encoder.blocks.\1.norm1.\2"),
    (_L + r"layernorm_after\.(weight|bias)", r"vision.encoder.blocks.\1.norm2.\2"),
    (_L + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"vision.encoder.blocks.\1.mlp.fc1.\2"),
    (_L + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"vision.encoder.blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"vision.norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]
IGNORE = [r"pooler\.dense\.(weight|bias)"]  # ViTModel's tanh pooler is not part of ViT classification


def config_from_hf(hf: dict) -> ViTConfig:
    if hf.get("model_type") != "vit":
        raise ConversionError(f"expected a ViT config (model_type 'vit'), got {hf.get('model_type')!r}")
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "quick_gelu": "quick_gelu", "relu": "relu"}.get(hf.get("hidden_act", "gelu"))
    if act is None:
        raise ConversionError(f"unsupported ViT activation {hf.get('hidden_act')!r}")
    archs = hf.get("architectures") or []
    labels = hf.get("id2label") or {}
    classify = any("ImageClassification" in a for a in archs)
    names = [labels[k] for k in sorted(labels, key=int)] if classify else []
    return ViTConfig(image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
                     in_chans=hf.get("num_channels", 3), dim=hf["hidden_size"],
                     depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                     mlp_dim=hf["intermediate_size"], act=act, eps=hf.get("layer_norm_eps", 1e-12),
                     qkv_bias=hf.get("qkv_bias", True), num_classes=len(names), class_names=names)


def load_hf_vit(folder: str | Path, hf_config: dict) -> ViT:
    cfg = config_from_hf(hf_config)
    state = strip_prefix(read_hf_weights(folder), "vit.")
    model = ViT(cfg)
    load_strict(model, rename(state, RULES, IGNORE), str(folder))
    return model.eval()
