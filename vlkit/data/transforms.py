"""Image loading and the image pipeline (no torchvision).

`load_image` turns any file PIL can read into an upright RGB image or raises `ImageError`
naming the path. The functional ops follow torchvision's arithmetic (shorter-side resize with
`int(size * long / short)`, centre crop offsets rounded, the 10-try random-resized-crop
algorithm) so that preprocessing matches the reference processors. `ImageTransform` chains
them: eval = resize shorter side + centre crop; train = random resized crop + optional
horizontal flip, which also swaps "left"/"right" in the caption (a mirrored image makes
spatial captions false otherwise).
"""
from __future__ import annotations

import math
import os
import random
import re
import warnings
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # mean and std of ViT (google/vit-*) and ViLT

BICUBIC = Image.Resampling.BICUBIC
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (~ 9459 x 9459)

PathLike = Union[str, os.PathLike]
ImageInput = Union[Image.Image, np.ndarray, PathLike]


class ImageError(ValueError):
    """An image file that is missing, unreadable, corrupt, truncated or too large. ``reason``
    names the kind in a few words (e.g. "truncated image"), for counting skipped samples."""

    def __init__(self, message: str, reason: str = "corrupt image"):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- loading
def load_image(path: PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> Image.Image:
    """Read `path` as an upright RGB PIL image.

    EXIF orientation is applied; L/LA/P/CMYK/I;16/I/F/RGBA... are converted to RGB
    (transparency is composited onto white, 16-bit data is scaled to 8 bits). Raises
    `ImageError` (a ValueError) naming the path if the file is missing, not an image,
    truncated, or has more than `max_pixels` pixels (decompression-bomb guard; None = off, though
    PIL still refuses images over twice its own `Image.MAX_IMAGE_PIXELS`). `path` may also be
    a binary file object, with `name` (e.g. a tar member) used in the messages.
    """
    label = name or path
    try:
        if isinstance(path, (str, os.PathLike)) and os.path.exists(path) and not os.path.isdir(path) \
                and not os.path.isfile(path):  # a FIFO or device would block or never end
            raise ImageError(f"{label}: not a regular file", "corrupt image")
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path) and os.path.getsize(path) == 0 \
                or hasattr(path, "getbuffer") and path.getbuffer().nbytes == 0:
            raise ImageError(f"{label}: empty file (0 bytes)", "empty image file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides
            with Image.open(path) as img:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageError(f"{label}: image of {w}x{h} pixels exceeds the limit of "
                                     f"{max_pixels} (possible decompression bomb)", "image too large")
                if w < 1 or h < 1:
                    raise ImageError(f"{label}: image of {w}x{h} pixels has no content", "corrupt image")
                img.load()
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception:  # malformed EXIF: keep the stored orientation
                    pass
                return to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{label}: no such image file", "missing image") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, not an image", "missing image") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{label}: not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{label}: {e}", "image too large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        truncated = "truncated" in str(e).lower() or isinstance(e, EOFError)
        raise ImageError(f"{label}: corrupt or truncated image ({e})",
                         "truncated image" if truncated else "corrupt image") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited onto white, 16/32-bit scaled to 8-bit."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img)
        if mode.startswith("I;16"):
            a8 = (a.astype(np.uint32) >> 8).astype(np.uint8)
        else:
            a = a.astype(np.float64)
            hi = float(a.max()) if a.size else 0.0
            if mode == "F" and hi <= 1.0:
                a = a * 255.0
            elif hi > 65535:
                a = a * (255.0 / hi)
            elif hi > 255:
                a = a / 257.0
            a8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def as_pil(img: ImageInput) -> Image.Image:
    """PIL image (any mode), numpy uint8 HxW / HxWx3 / HxWx4 array or path -> RGB PIL image.
    An image without pixels (0 wide or 0 high) is an `ImageError`."""
    if isinstance(img, Image.Image):
        if img.width < 1 or img.height < 1:
            raise ImageError(f"image of {img.width}x{img.height} pixels has no content", "corrupt image")
        return to_rgb(img)
    if isinstance(img, np.ndarray):
        if img.size == 0:
            raise ImageError(f"image array of shape {img.shape} has no pixels", "corrupt image")
        if img.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8, got {img.dtype}")
        if img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3, 4)):
            if img.ndim == 3 and img.shape[2] == 1:
                img = img[:, :, 0]
            return to_rgb(Image.fromarray(np.ascontiguousarray(img)))
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 array, got shape {img.shape}")
    if isinstance(img, (str, os.PathLike)):
        return load_image(img)
    raise TypeError(f"expected a PIL image, a numpy array or a path, got {type(img).__name__}")


# ----------------------------------------------------------------------------- functional ops
def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """size -> (height, width)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize(img: Image.Image, size: int | Sequence[int], interpolation=BICUBIC) -> Image.Image:
    """int: shorter side to `size` keeping the aspect ratio; (h, w): exactly that size."""
    w, h = img.size
    if isinstance(size, int):
        short, long = (w, h) if w <= h else (h, w)
        if short == size:
            return img
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = _pair(size)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), interpolation)


def center_crop(img: Image.Image, size: int | Sequence[int]) -> Image.Image:
    """Crop the centre (h, w); an image smaller than that is padded with black first."""
    th, tw = _pair(size)
    w, h = img.size
    if tw > w or th > h:
        padded = Image.new(img.mode, (max(w, tw), max(h, th)))
        padded.paste(img, ((max(w, tw) - w) // 2, (max(h, th) - h) // 2))
        img, (w, h) = padded, padded.size
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    if (left, top, tw, th) == (0, 0, w, h):
        return img
    return img.crop((left, top, left + tw, top + th))


def random_resized_crop(img: Image.Image, size: int | Sequence[int],
                        scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        rng: random.Random | None = None, interpolation=BICUBIC) -> Image.Image:
    """Crop a random area fraction in `scale` with aspect ratio in `ratio`, resize to `size`.

    torchvision's algorithm (10 tries, then a centre crop clamped to `ratio`); `rng` is a
    `random.Random` (default: the `random` module, which DataLoader seeds per worker).
    """
    rng = random if rng is None else rng
    th, tw = _pair(size)
    w, h = img.size
    area = w * h
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = rng.randint(0, h - ch)
            left = rng.randint(0, w - cw)
            break
    else:  # fallback: central crop with the aspect ratio clamped to `ratio`
        in_ratio = w / h
        if in_ratio < min(ratio):
            cw, ch = w, int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            ch, cw = h, int(round(h * max(ratio)))
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
    return img.resize((tw, th), interpolation, box=(left, top, left + cw, top + ch))


def hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) in [0, 1]."""
    a = np.asarray(img if isinstance(img, np.ndarray) else to_rgb(img), dtype=np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    t = torch.from_numpy(np.array(a.transpose(2, 0, 1), order="C"))  # a writable copy
    return t.to(torch.float32).div_(255.0)


def normalize(t: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(t - mean) / std per channel for (3, H, W) or (B, 3, H, W); returns a new tensor."""
    m = torch.as_tensor(mean, dtype=t.dtype, device=t.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=t.dtype, device=t.device).view(-1, 1, 1)
    return (t - m) / s


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_SWAP = {"left": "right", "right": "left"}


def _swap_word(m: re.Match) -> str:
    word = m.group(0)
    new = _SWAP[word.lower()]
    if word.isupper():
        return new.upper()
    if word[0].isupper():
        return new.capitalize()
    return new


def swap_left_right(caption):
    """Swap the whole words "left" and "right" (case kept): the caption of a mirrored image.

    Accepts a string or a list of strings; "leftover" or "bright" are left alone.
    """
    if isinstance(caption, str):
        return _LEFT_RIGHT.sub(_swap_word, caption)
    return [swap_left_right(c) for c in caption]


# ----------------------------------------------------------------------------- the pipeline
class ImageTransform:
    """Image (PIL / uint8 array / path) -> normalised float tensor (3, size, size).

    eval: shorter side resized to `size` (bicubic), centre crop `size`.
    train: random resized crop (area `scale`, aspect `ratio`) and, if `hflip`, a flip with
    probability 0.5 that also swaps "left"/"right" in the caption. Pass `rng` (a
    `random.Random`) for reproducible augmentation; by default the `random` module is used.
    """

    def __init__(self, size: int, mean: Sequence[float] = HALF, std: Sequence[float] = HALF,
                 train: bool = False, scale: tuple[float, float] = (0.5, 1.0), hflip: bool = False,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation=BICUBIC):
        self.size, self.train, self.hflip = int(size), bool(train), bool(hflip)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.scale, self.ratio, self.interpolation = tuple(scale), tuple(ratio), interpolation
        # (x / 255 - mean) / std  ==  x * a + b, done in one pass over the uint8 data
        std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self._a = (1.0 / (255.0 * std_t))
        self._b = -torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def __call__(self, img: ImageInput, caption=None, rng: random.Random | None = None,
                 return_flip: bool = False):
        """(tensor, caption), or (tensor, caption, flipped) with ``return_flip``."""
        img = as_pil(img)
        flipped = False
        if self.train:
            rng = random if rng is None else rng
            img = random_resized_crop(img, self.size, self.scale, self.ratio, rng, self.interpolation)
            if self.hflip and rng.random() < 0.5:
                img, flipped = hflip(img), True
                if caption is not None:
                    caption = swap_left_right(caption)
        else:
            img = center_crop(resize(img, self.size, self.interpolation), self.size)
        a = np.asarray(img, dtype=np.uint8)
        t = torch.from_numpy(np.array(a.transpose(2, 0, 1), order="C")).to(torch.float32)
        t = torch.addcmul(self._b, t, self._a)
        return (t, caption, flipped) if return_flip else (t, caption)

    def __repr__(self) -> str:
        return (f"ImageTransform(size={self.size}, mean={self.mean}, std={self.std}, "
                f"train={self.train}, scale={self.scale}, hflip={self.hflip})")
