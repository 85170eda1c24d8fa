"""Hugging Face ``CLIPModel`` folders -> vlkit CLIP (e.g. openai/clip-vit-base-patch32 on disk)."""
from __future__ import annotations

from pathlib import Path

from ..models.clip import CLIP, CLIPConfig, TextConfig
from ..models.vit import ViTConfig
from .common import ConversionError, checked_config, load_strict, read_hf_weights, rename

_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _tower_rules(hf: str, ours: str) -> list[tuple[str, str]]:
    layer = rf"{hf}\.encoder\.layers\.(\d+)\."
    to = rf"{ours}.encoder.blocks.\1."
    return [
        (layer + r"self_attn\.q_proj\.(weight|bias)", to + r"attn.q.\2"),
        (layer + r"self_attn\.k_proj\.(weight|bias)", to + r"attn.k.\2"),
        (layer + r"self_attn\.v_proj\.(weight|bias)", to + r"attn.v.\2"),
        (layer + r"self_attn\.out_proj\.(weight|bias)", to + r"attn.proj.\2"),
        (layer + r"layer_norm1\.(weight|bias)", to + r"norm1.\2"),
        (layer + r"layer_norm2\.(weight|bias)", to + r"norm2.\2"),
        (layer + r"mlp\.fc1\.(weight|bias)", to + r"mlp.fc1.\2"),
        (layer + r"mlp\.fc2\.(weight|bias)", to + r"mlp.fc2.\2"),
    ]


RULES = [
    (r"vision_model\.embeddings\.class_embedding", "vision.embed.cls_token"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "vision.embed.patch_embed.proj.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "vision.embed.pos_embed"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"vision.norm_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"vision.norm.\1"),
    *_tower_rules(r"vision_model", "vision"),
    (r"text_model\.embeddings\.token_embedding\.weight", "text.embed.word.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "text.embed.position.weight"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"text.norm.\1"),
    *_tower_rules(r"text_model", "text"),
    (r"visual_projection\.weight", "image_proj.weight"),
    (r"text_projection\.weight", "text_proj.weight"),
    (r"logit_scale", "logit_scale"),
]
IGNORE = [r".*position_ids"]


def config_from_hf(hf: dict) -> CLIPConfig:
    if hf.get("model_type") != "clip":
        raise ConversionError(f"expected a CLIP config (model_type 'clip'), got {hf.get('model_type')!r}")
    v, t = hf["vision_config"], hf["text_config"]

    def act(cfg):
        name = cfg["hidden_act"]
        if name not in _ACT:
            raise ConversionError(f"unsupported CLIP activation {name!r}")
        return _ACT[name]

    # fields the file leaves out are transformers' defaults, filled by read_hf_config
    eos = t["eos_token_id"]
    vision = ViTConfig(image_size=v["image_size"], patch_size=v["patch_size"], in_chans=v["num_channels"],
                       dim=v["hidden_size"], depth=v["num_hidden_layers"], heads=v["num_attention_heads"],
                       mlp_dim=v["intermediate_size"], act=act(v), eps=v["layer_norm_eps"], pre_norm=True,
                       patch_bias=False,
                       mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    text = TextConfig(vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"],
                      dim=t["hidden_size"], depth=t["num_hidden_layers"], heads=t["num_attention_heads"],
                      mlp_dim=t["intermediate_size"], act=act(t), eps=t["layer_norm_eps"],
                      # configs from before the end-token fix say 2: they pool at the largest id
                      eot_token_id=None if eos == 2 else eos)
    return CLIPConfig(vision=vision, text=text, embed_dim=hf["projection_dim"],
                      logit_scale_init=hf["logit_scale_init_value"])


def load_hf_clip(folder: str | Path, hf_config: dict) -> CLIP:
    model = CLIP(checked_config(config_from_hf(hf_config), folder))
    state = rename(read_hf_weights(folder), RULES, IGNORE)
    if "vision.embed.cls_token" in state:
        state["vision.embed.cls_token"] = state["vision.embed.cls_token"].reshape(1, 1, -1)
    if "vision.embed.pos_embed" in state:
        state["vision.embed.pos_embed"] = state["vision.embed.pos_embed"].unsqueeze(0)
    load_strict(model, state, str(folder))
    return model.eval()
