"""The official VLMo checkpoints (microsoft/unilm ``vlmo/``) into vlkit's VLMo, by a rename table
with strict checks: every checkpoint key has a place in the model and every model key is filled
(``steps_done``, vlkit's own step counter, excepted), shapes equal.

The official layout: ``transformer.{patch_embed.proj, cls_token, pos_embed, norm}``,
``transformer.blocks.N.{norm1, attn.qkv (no bias), attn.q_bias, attn.v_bias, attn.proj, gamma_1,
gamma_2, norm2_text, norm2_imag, norm2_vl, mlp_text, mlp_imag, mlp_vl (.fc1/.fc2)}``,
``text_embeddings.{word,position,token_type}_embeddings`` and ``.LayerNorm``,
``token_type_embeddings``, ``pooler.dense``, ``itc_{text,image}_proj.fc``,
``itc_vl_{text,image}_proj.fc``, ``logit_scale``, ``logit_vl_scale``, ``itm_score.fc``,
``mlm_score.{transform.dense, transform.LayerNorm, decoder, bias}``, ``vqa_classifier.N``.
A checkpoint with a ``relative_position_bias_table`` is refused (vlkit's VLMo has no relative
position bias); its index buffers and ``text_embeddings.position_ids`` carry no weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .common import ConversionError, check_fit, load_strict, rename

_E = {"text": "text", "imag": "image", "vl": "vl"}  # official expert suffix -> vlkit expert name

RULES = [
    (r"transformer\.patch_embed\.proj\.(weight|bias)", r"image_embed.patch_embed.proj.\1"),
    (r"transformer\.(cls_token|pos_embed)", r"image_embed.\1"),
    (r"transformer\.norm\.(weight|bias)", r"norm.\1"),
    (r"transformer\.blocks\.(\d+)\.(norm1\.(?:weight|bias)|attn\.proj\.(?:weight|bias)|gamma_1|gamma_2)",
     r"blocks.\1.\2"),
    (r"transformer\.blocks\.(\d+)\.attn\.q_bias", r"blocks.\1.attn.q.bias"),
    (r"transformer\.blocks\.(\d+)\.attn\.v_bias", r"blocks.\1.attn.v.bias"),
    *[(rf"transformer\.blocks\.(\d+)\.norm2_{k}\.(weight|bias)", rf"blocks.\1.mlp.experts.{v}.norm.\2")
      for k, v in _E.items()],
    *[(rf"transformer\.blocks\.(\d+)\.mlp_{k}\.(fc1|fc2)\.(weight|bias)", rf"blocks.\1.mlp.experts.{v}.mlp.\2.\3")
      for k, v in _E.items()],
    (r"text_embeddings\.word_embeddings\.weight", "text_embed.word.weight"),
    (r"text_embeddings\.position_embeddings\.weight", "text_embed.position.weight"),
    (r"text_embeddings\.token_type_embeddings\.weight", "text_embed.token_type.weight"),
    (r"text_embeddings\.LayerNorm\.(weight|bias)", r"text_embed.norm.\1"),
    (r"token_type_embeddings\.weight", "type_embed.weight"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.dense.\1"),
    (r"itc_(text|image)_proj\.fc\.weight", r"\1_proj.weight"),
    (r"itc_vl_(text|image)_proj\.fc\.weight", r"itc_vl_\1_proj.weight"),
    (r"(logit_scale|logit_vl_scale)", r"\1"),
    (r"itm_score\.fc\.(weight|bias)", r"itm_head.\1"),
    (r"mlm_score\.transform\.dense\.(weight|bias)", r"mlm_head.dense.\1"),
    (r"mlm_score\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.norm.\1"),
    (r"mlm_score\.decoder\.weight", "mlm_head.decoder.weight"),
    (r"mlm_score\.bias", "mlm_head.decoder.bias"),
    (r"vqa_classifier\.(\d+)\.(weight|bias)", r"vqa_head.\1.\2"),
]
IGNORE = [r"text_embeddings\.position_ids", r"(text_|text_imag_)?relative_position_index"]
QKV = "transformer.blocks.{}.attn.qkv.weight"


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an official checkpoint file (``torch.load(weights_only=True)``: no
    pickle code runs), unwrapped from Lightning's ``state_dict`` or a ``model`` entry."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise ConversionError(f"{path}: cannot be read as plain tensors ({e})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: not a state dict of tensors")
    return obj


def convert_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> vlkit's: the fused ``qkv`` weight split into q, k, v (k has no bias)."""
    if any(k.endswith("relative_position_bias_table") for k in state):
        raise ConversionError("the checkpoint uses relative position bias (relative_position_bias_table), "
                              "which vlkit's VLMo does not implement")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    out, rest = {}, {}
    for key, value in state.items():
        if key.endswith(".attn.qkv.weight") and key.startswith("transformer.blocks."):
            block = key.split(".")[2]
            if value.shape[0] % 3:
                raise ConversionError(f"{key}: {tuple(value.shape)} is not three stacked projections")
            for name, part in zip("qkv", value.chunk(3)):
                out[f"blocks.{block}.attn.{name}.weight"] = part
        else:
            rest[key] = value
    out.update(rename(rest, RULES, IGNORE))
    return out


def config_from_state(state: dict[str, torch.Tensor], **overrides):
    """A ``VLMoConfig`` read off an official state dict's shapes (width, depth, F, FFN width,
    vocabulary, text length, image and patch size, ITC width, VQA answers, ``itc_vl``); the
    heads (not in the shapes) default to width / 64, and ``overrides`` win."""
    from ..models.vlmo import PRESETS, VLMoConfig
    need = ["transformer.patch_embed.proj.weight", "transformer.pos_embed", "transformer.blocks.0.mlp_text.fc1.weight",
            "text_embeddings.word_embeddings.weight", "text_embeddings.position_embeddings.weight",
            "itc_text_proj.fc.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionError(f"not an official VLMo state dict (no {', '.join(missing)})")
    dim, _, patch, _ = state[need[0]].shape
    grid = round((state[need[1]].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.blocks."))
    vl_layers = len({k.split(".")[2] for k in state if ".mlp_vl." in k})
    answers = state.get("vqa_classifier.3.weight")
    fields = dict(PRESETS["base"], image_size=grid * patch, patch_size=patch, dim=dim, depth=depth,
                  heads=max(1, dim // 64), mlp_dim=state[need[2]].shape[0], vl_layers=vl_layers,
                  qv_bias="transformer.blocks.0.attn.q_bias" in state,
                  layer_scale=0.1 if "transformer.blocks.0.gamma_1" in state else 0.0,
                  vocab_size=state[need[3]].shape[0], max_text_len=state[need[4]].shape[0],
                  embed_dim=state[need[5]].shape[0], itc_vl="itc_vl_text_proj.fc.weight" in state,
                  num_answers=0 if answers is None else answers.shape[0])
    fields.update(overrides)
    return VLMoConfig(**fields)


def load_official(model, state: dict[str, torch.Tensor], source: str = "official VLMo checkpoint") -> None:
    """Load an official state dict into ``model`` (a ``VLMo``) with strict checks: a missing or
    unexpected key or a shape mismatch is a ConversionError naming them."""
    converted = convert_state(state)
    own = model.state_dict()
    converted["steps_done"] = own["steps_done"]  # vlkit's own step counter
    if model.cfg.layer_scale <= 0 and any(k.endswith("gamma_1") for k in converted):
        raise ConversionError(f"{source}: the checkpoint has LayerScale (gamma_1/gamma_2); build the model "
                              "with layer_scale > 0")
    check_fit(own, converted, source, f"this VLMo ({dataclasses.asdict(model.cfg)['depth']} blocks)")
    load_strict(model, converted, source)


def from_official(state: dict[str, torch.Tensor], **overrides):
    """A ``VLMo`` built from the shapes of an official state dict and loaded from it."""
    from ..models.vlmo import VLMo
    model = VLMo(config_from_state(state, **overrides))
    load_official(model, state)
    return model
