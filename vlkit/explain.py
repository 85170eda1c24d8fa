"""Where does each word look? Cross-attention of a fusion model's text tokens over the image
patches, per word, drawn as heat maps over the image (Pillow only).

``explain(source, image, caption)`` takes a run folder (or a :class:`~vlkit.pipeline.Pipeline`,
or a model with ``tokenizer=``) and returns the words, their maps (W, gh, gw) — each the mean of
its word pieces' maps, so each sums to 1 over the patches — and a PNG-ready picture: the image
as the model sees it, then one panel per word with the upsampled map in a jet-like colour map
blended over the image and the word written above it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

LABEL_HEIGHT = 16


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3): blue, cyan, yellow, red."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peak at v = 3/4, 1/2, 1/4
    rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _pipeline(source, tokenizer=None, transform=None):
    from .pipeline import Pipeline, image_transform, load
    if isinstance(source, Pipeline):
        return source
    if isinstance(source, (str, Path)):
        return load(source)
    if tokenizer is None:
        raise ValueError("explain with a model needs its tokenizer (tokenizer=...)")
    return Pipeline(source, tokenizer, transform or image_transform(source))


def _shown_image(pixels: torch.Tensor, spec: dict) -> Image.Image:
    """The normalised (3, H, W) tensor back to the RGB picture the model saw."""
    mean = torch.tensor(spec["mean"]).view(3, 1, 1)
    std = torch.tensor(spec["std"]).view(3, 1, 1)
    rgb = ((pixels.float().cpu() * std + mean).clamp(0, 1) * 255 + 0.5).byte()
    return Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB")


@torch.no_grad()
def word_maps(pipe, image, caption: str, layer: int | None = None):
    """(words, maps (W, gh, gw), image as the model saw it): per-word cross-attention over the
    patch grid from fusion layer ``layer`` (None: mean over the fusion layers)."""
    from .data.collate import max_text_length
    model = pipe.model
    if not hasattr(model, "cross_attention_maps"):
        raise ValueError(f"{model.model_name} has no cross-attention from text to image "
                         "(explain needs a model with text-to-image cross-attention: albef, blip)")
    if pipe.tokenizer is None:
        raise ValueError(f"{model.model_name} has no tokenizer")
    pixels = pipe.pixels([image])  # (1, 3, H, W)
    tok = pipe.tokenizer([caption], max_length=max_text_length(model.cfg), return_word_ids=True)
    ids, mask, word_ids = (tok[k].to(pipe.device) for k in ("input_ids", "attention_mask", "word_ids"))
    attn = model.cross_attention_maps(pixels, ids, mask, layer=layer)[0]  # (L, N)
    patch = model.cfg.vision.patch_size
    grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    if grid[0] * grid[1] != attn.shape[-1]:
        raise ValueError(f"{attn.shape[-1]} image tokens do not form the {grid[0]}x{grid[1]} patch grid")
    words, maps = [], []
    for w in sorted(set(word_ids[0].tolist()) - {-1}):
        pos = (word_ids[0] == w).nonzero()[:, 0]
        words.append(pipe.tokenizer.decode(ids[0, pos].tolist()).replace(" ", ""))
        maps.append(attn[pos].mean(0).reshape(grid))
    if not words:
        raise ValueError(f"the caption {caption!r} has no words")
    return words, torch.stack(maps).cpu(), _shown_image(pixels[0], model.image_spec())


def render(picture: Image.Image, words: list[str], maps: torch.Tensor, panel: int = 128,
           blend: float = 0.5) -> Image.Image:
    """One strip: the picture, then one heat-map panel per word (each map scaled to its own
    maximum), with the words above. Size ((1 + W) * panel, panel + LABEL_HEIGHT)."""
    base = picture.convert("RGB").resize((panel, panel), Image.BICUBIC)
    canvas = Image.new("RGB", ((1 + len(words)) * panel, panel + LABEL_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    canvas.paste(base, (0, LABEL_HEIGHT))
    draw.text((2, 2), "image", fill=(0, 0, 0))
    for i, (word, m) in enumerate(zip(words, maps), start=1):
        m = m.float().numpy()
        m = m / m.max() if m.max() > 0 else m
        up = Image.fromarray(m.astype(np.float32), "F").resize((panel, panel), Image.BILINEAR)
        heat = Image.fromarray(jet(np.asarray(up)), "RGB")
        canvas.paste(Image.blend(base, heat, blend), (i * panel, LABEL_HEIGHT))
        draw.text((i * panel + 2, 2), word, fill=(0, 0, 0))
    return canvas


def explain(source, image, caption: str, layer: int | None = None, out: str | Path | None = None,
            panel: int = 128, tokenizer=None, transform=None) -> dict:
    """Per-word cross-attention of ``caption`` over ``image``; saves the picture to ``out`` (PNG)
    when given. Returns {"words", "maps" (W, gh, gw), "picture" (PIL image)}."""
    pipe = _pipeline(source, tokenizer, transform)
    words, maps, shown = word_maps(pipe, image, caption, layer)
    picture = render(shown, words, maps, panel)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        picture.save(out, format="PNG")
    return {"words": words, "maps": maps, "picture": picture}
