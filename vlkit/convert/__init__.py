"""Loading foreign checkpoints (Hugging Face layouts) into vlkit models by rename tables."""
from __future__ import annotations

import json
from pathlib import Path

from .common import ConversionError, read_hf_config, read_hf_weights


def preprocessor_overrides(folder: Path) -> dict:
    """Image size/mean/std from a Hugging Face ``preprocessor_config.json`` when present."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    pre = json.loads(path.read_text())
    out = {}
    if "image_mean" in pre:
        out["mean"] = tuple(pre["image_mean"])
    if "image_std" in pre:
        out["std"] = tuple(pre["image_std"])
    crop = pre.get("crop_size") or pre.get("size")
    if isinstance(crop, dict):
        crop = crop.get("height") or crop.get("shortest_edge")
    if isinstance(crop, int):
        out["size"] = crop
    return out


def _tokenizer_if_present(folder: Path):
    from ..tokenizers import load_tokenizer
    try:
        return load_tokenizer(folder)
    except (FileNotFoundError, ValueError):
        return None


def load_hf(folder: str | Path, hf_config: dict | None = None):
    """(model, tokenizer or None, transform overrides) from a Hugging Face model folder."""
    folder = Path(folder)
    hf_config = hf_config or read_hf_config(folder)
    kind = hf_config.get("model_type")
    if kind == "vit":
        from .hf_vit import load_hf_vit
        model = load_hf_vit(folder, hf_config)
    elif kind == "clip":
        from .hf_clip import load_hf_clip
        model = load_hf_clip(folder, hf_config)
    elif kind == "vilt":
        from .hf_vilt import load_hf_vilt
        model = load_hf_vilt(folder, hf_config)
    elif kind == "blip":
        from .hf_blip import load_hf_blip
        model = load_hf_blip(folder, hf_config)
    else:
        raise ConversionError(f"{folder}: model type {kind!r} cannot be converted "
                              "(supported: vit, clip, vilt, blip)")
    return model, _tokenizer_if_present(folder), preprocessor_overrides(folder)


__all__ = ["ConversionError", "load_hf", "read_hf_config", "read_hf_weights"]
