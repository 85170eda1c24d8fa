"""Whole folders: a Hugging Face model folder written as a vlkit run folder (``hf_to_run``), and
a vlkit CLIP or ViT written as a Hugging Face folder that ``transformers`` loads
(``run_to_hf``: ``CLIPModel``, ``ViTModel`` or ``ViTForImageClassification``).

A run folder holds ``config.json`` (model name + config), ``model.safetensors`` and
``tokenizer/``; the image normalisation of the Hugging Face ``preprocessor_config.json`` is
written into the model config, so ``vlkit.load(RUN)`` gives the same pipeline (and outputs) as
``vlkit.load(HF_DIR)``. The Hugging Face side is written with the loaders' own rename tables
read backwards (``common.unrename``): every weight must have a place, and a model whose config
the Hugging Face class cannot express (a conv stem, mean pooling, SigLIP's bias ...) is refused
with the reasons listed. Both are built in a hidden folder beside ``out`` and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from ..checkpoint import WEIGHTS, atomic_save_tensors, model_state, save_run_config, save_weights
from . import hf_clip, hf_vit, load_hf, read_hf_config
from .common import ConversionError, rename, unrename

# vlkit activation -> the name transformers' ACT2FN knows
HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}


def check_new_folder(out: str | Path, option: str = "--out") -> None:
    """``out`` must not exist or be an empty folder (a ValueError naming the option)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{option} {out}: exists and is not an empty folder; give a new folder")


@contextmanager
def new_folder(out: str | Path, option: str = "--out"):
    """A hidden folder beside ``out`` to write into, renamed to ``out`` when the block ends
    without an error (`check_new_folder` first)."""
    check_new_folder(out, option)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.convert-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        if out.is_dir():
            out.rmdir()
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _summary(name: str, state: dict[str, torch.Tensor]) -> dict:
    return {"model": name, "tensors": len(state), "parameters": sum(t.numel() for t in state.values())}


def _image_config(cfg):
    """The config whose image_size / mean / std drive the transform (the model's or its tower's)."""
    return cfg if hasattr(cfg, "mean") else cfg.vision


def hf_to_run(folder: str | Path, out: str | Path) -> dict:
    """Write the Hugging Face model folder ``folder`` (ViT, CLIP, ViLT, BLIP) as a vlkit run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    hf = read_hf_config(folder)
    if "model_type" not in hf:
        raise ConversionError(f"{folder / 'config.json'}: not a Hugging Face model config (no \"model_type\"); "
                              "a vlkit run converts with --to hf")
    model, tokenizer, spec = load_hf(folder, hf)
    image_cfg = _image_config(model.cfg)
    if spec.get("size", image_cfg.image_size) != image_cfg.image_size:
        raise ConversionError(f"{folder / 'preprocessor_config.json'}: image size {spec['size']} differs from the "
                              f"model's image_size {image_cfg.image_size}; a vlkit run has one image size")
    for key in ("mean", "std"):
        if key in spec:
            setattr(image_cfg, key, tuple(spec[key]))
    state = model_state(model)
    with new_folder(out) as stage:
        save_run_config(stage, model.model_name, model.config_dict(), {"converted_from": str(folder.resolve())})
        save_weights(stage / WEIGHTS, state)
        if tokenizer is not None:
            tokenizer.save(stage / "tokenizer")
    return _summary(model.model_name, state)


# -- vlkit -> Hugging Face ------------------------------------------------------------------------

def _refuse(model, problems: list[str]) -> None:
    if problems:
        raise ConversionError(f"this {model.model_name} cannot be written as a Hugging Face model: "
                              + "; ".join(problems))


def _act(act: str, where: str, problems: list[str]) -> str:
    if act not in HF_ACT:
        problems.append(f"{where}act {act!r} (supported: {', '.join(HF_ACT)})")
    return HF_ACT.get(act, act)


def _vision_problems(v, clip: bool) -> list[str]:
    """What a Hugging Face ViT (or CLIP's vision tower) cannot express of a ViTConfig."""
    where = "vision." if clip else ""
    problems = []
    if v.stem != "patch":
        problems.append(f"{where}stem {v.stem!r} (Hugging Face has a linear patch projection: 'patch')")
    if v.pre_norm != clip:
        problems.append(f"{where}pre_norm {v.pre_norm} ({'CLIP has' if clip else 'ViT has no'} a LayerNorm "
                        "before the encoder)")
    if clip and v.patch_bias:
        problems.append("vision.patch_bias True (CLIP's patch projection has no bias)")
    if clip and not v.qkv_bias:
        problems.append("vision.qkv_bias False (CLIP's attention has biases)")
    if v.pool != "cls":
        problems.append(f"{where}pool {v.pool!r} (Hugging Face pools the [CLS] token)")
    if getattr(v, "dense_weight", 0):
        problems.append("dense_weight > 0 (a per-patch head)")
    return problems


def _vit_config(model, problems: list[str]) -> dict:
    c = model.cfg
    hf = dict(model_type="vit", hidden_size=c.dim, num_hidden_layers=c.depth, num_attention_heads=c.heads,
              intermediate_size=c.mlp_dim, hidden_act=_act(c.act, "", problems), layer_norm_eps=c.eps,
              image_size=c.image_size, patch_size=c.patch_size, num_channels=c.in_chans, qkv_bias=c.qkv_bias,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if c.num_classes:
        names = c.class_names or [f"LABEL_{i}" for i in range(c.num_classes)]
        hf.update(architectures=["ViTForImageClassification"], id2label=dict(enumerate(names)),
                  label2id={n: i for i, n in enumerate(names)})
    else:
        hf.update(architectures=["ViTModel"])
    return hf


def _vit_state(model) -> dict[str, torch.Tensor]:
    state = model_state(model)
    if not model.cfg.patch_bias:  # Hugging Face's projection has a bias: zero is the same map
        weight = state["vision.embed.patch_embed.proj.weight"]
        state["vision.embed.patch_embed.proj.bias"] = weight.new_zeros(weight.shape[0])
    prefix = "vit." if model.cfg.num_classes else ""
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    body = {k: v for k, v in state.items() if k not in head}
    return {**unrename(body, hf_vit.RULES, prefix=prefix), **unrename(head, hf_vit.RULES)}


def _clip_config(model, problems: list[str]) -> dict:
    c, v, t = model.cfg, model.cfg.vision, model.cfg.text
    problems += _vision_problems(v, clip=True)
    if c.loss == "siglip":
        problems.append("loss 'siglip' (CLIPModel has no logit bias)")
    if not t.causal or t.pool != "eot":
        problems.append("text.causal False or text.pool 'mean' (CLIP's text tower is causal, pooled at the "
                        "end-of-text token)")
    if t.eot_token_id == 2:
        problems.append("text.eot_token_id 2 (transformers reads eos_token_id 2 as 'pool at the largest id')")
    text = dict(model_type="clip_text_model", vocab_size=t.vocab_size, hidden_size=t.dim,
                intermediate_size=t.mlp_dim, num_hidden_layers=t.depth, num_attention_heads=t.heads,
                max_position_embeddings=t.context_length, hidden_act=_act(t.act, "text.", problems),
                layer_norm_eps=t.eps, projection_dim=c.embed_dim,
                eos_token_id=2 if t.eot_token_id is None else t.eot_token_id, bos_token_id=None, pad_token_id=0)
    vision = dict(model_type="clip_vision_model", hidden_size=v.dim, intermediate_size=v.mlp_dim,
                  num_hidden_layers=v.depth, num_attention_heads=v.heads, image_size=v.image_size,
                  patch_size=v.patch_size, num_channels=v.in_chans, hidden_act=_act(v.act, "vision.", problems),
                  layer_norm_eps=v.eps, projection_dim=c.embed_dim)
    return dict(model_type="clip", architectures=["CLIPModel"], projection_dim=c.embed_dim,
                logit_scale_init_value=c.logit_scale_init, text_config=text, vision_config=vision)


def _clip_state(model) -> dict[str, torch.Tensor]:
    state = unrename(model_state(model), hf_clip.RULES)
    state["vision_model.embeddings.class_embedding"] = state["vision_model.embeddings.class_embedding"].reshape(-1)
    pos = "vision_model.embeddings.position_embedding.weight"
    state[pos] = state[pos].squeeze(0)
    return state


def _preprocessor(cfg) -> dict:
    """The image processor doing what vlkit's evaluation transform does (shorter side resized to
    the size, bicubic; the centre square cropped; normalised): ``CLIPImageProcessor``, for ViT
    too (``ViTImageProcessor`` cannot crop). ``convert.preprocessor_overrides`` reads it back."""
    size = cfg.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.mean),
            "image_std": list(cfg.std), "do_convert_rgb": True}


def _tokenizer_config(tokenizer, max_length: int) -> dict:
    """What ``transformers.AutoTokenizer`` needs besides tokenizer.json: the class, the longest
    text the model takes, and the begin, end and padding tokens."""
    name = tokenizer.id_to_token
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
            "bos_token": name(tokenizer.bos_token_id), "eos_token": name(tokenizer.eos_token_id),
            "pad_token": name(tokenizer.pad_token_id)}


def run_to_hf(model, out: str | Path, tokenizer=None) -> dict:
    """Write a vlkit CLIP or ViT (a loaded model, e.g. ``vlkit.load(RUN).model``) as a Hugging
    Face folder: config.json, model.safetensors, preprocessor_config.json and, given a
    tokenizer, tokenizer.json (+ vlkit_tokenizer.json, which vlkit reads back exactly)."""
    problems: list[str] = []
    if model.model_name == "vit":
        problems += _vision_problems(model.cfg, clip=False)
        config = _vit_config(model, problems)
        _refuse(model, problems)
        state, rules, image_cfg = _vit_state(model), hf_vit.RULES, model.cfg
        max_length = tokenizer.max_length if tokenizer is not None else 0
    elif model.model_name == "clip":
        config = _clip_config(model, problems)
        _refuse(model, problems)
        state, rules, image_cfg = _clip_state(model), hf_clip.RULES, model.cfg.vision
        max_length = model.cfg.text.context_length
    else:
        raise ConversionError(f"a {model.model_name} model cannot be written as a Hugging Face folder "
                              "(supported: clip, vit)")
    back = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in state.items()}
    assert len(rename(back, rules)) == len(state)  # every written key reads back (``unrename`` checks names)
    config.update(torch_dtype="float32", converted_by="vlkit")
    with new_folder(out) as stage:
        atomic_save_tensors(stage / "model.safetensors", state, {"format": "pt"})
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (stage / "preprocessor_config.json").write_text(
            json.dumps(_preprocessor(image_cfg), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(stage)
            (stage / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tokenizer, max_length), indent=2) + "\n")
    return _summary(model.model_name, state)


__all__ = ["hf_to_run", "run_to_hf", "new_folder", "check_new_folder", "HF_ACT"]
