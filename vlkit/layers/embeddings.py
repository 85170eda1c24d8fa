"""Image and text embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, D) and the grid size.

    ``stem="patch"``: one P×P convolution with stride P (ViT). ``stem="conv"``: a small stack of
    3×3 stride-2 convolutions (log2 P of them, each with BatchNorm and ReLU) and a 1×1 projection
    — an early convolutional stem (Xiao et al. 2021), which learns shapes faster on small images
    than a linear patch projection.
    """

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3, stem: str = "patch",
                 bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.stem = stem
        if stem == "patch":
            self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, bias=bias)
        elif stem == "conv":
            steps = int(math.log2(patch_size))
            if 2 ** steps != patch_size or steps < 1:
                raise ValueError(f"conv stem needs a power-of-two patch size, got {patch_size}")
            layers, c = [], in_chans
            for i in range(steps):
                out = dim if i == steps - 1 else min(dim, 32 * 2 ** i)  # 32, 64, ... then dim
                layers += [nn.Conv2d(c, out, 3, stride=2, padding=1, bias=False),
                           nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
            layers.append(nn.Conv2d(c, dim, 1, bias=bias))
            self.proj = nn.Sequential(*layers)
        else:
            raise ValueError(f"unknown stem {stem!r} (patch, conv)")

    def forward(self, x: torch.Tensor):
        if x.ndim != 4:
            raise ValueError(f"pixel_values must be (B, C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        if self.stem == "conv":  # channels-last: the 3×3 convolutions run ~1.4× faster on the CPU
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.proj(x)  # (B, D, H/P, W/P)
        grid = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), tuple(grid)  # (B, N, D)


def interpolate_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                          num_prefix: int = 1) -> torch.Tensor:
    """Resize learned position embeddings (1, prefix + H*W, D) to another grid (bicubic)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    d = pos.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, -1, d)
    return torch.cat([prefix, grid], dim=1)


def sincos_2d(grid: tuple[int, int], dim: int, num_prefix: int = 1, temperature: float = 10000.0,
              device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes (num_prefix + H*W, dim), row-major like the patch
    tokens, zeros for the prefix ([CLS]) rows: a quarter of the channels each for sin(y), cos(y),
    sin(x), cos(x) over geometric frequencies (the MAE / MoCo v3 layout). ``dim`` must be a
    multiple of 4."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine position codes need a width divisible by 4, got {dim}")
    h, w = grid
    y, x = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                          torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    codes = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)
    return torch.cat([codes.new_zeros(num_prefix, dim), codes]).to(dtype)


def sincos_square(tokens: torch.Tensor) -> torch.Tensor:
    """``sincos_2d`` codes (1+N, D) for image tokens (B, 1+N, D): a [CLS] and a square grid of N."""
    n = tokens.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} image tokens after [CLS] do not form a square grid")
    return sincos_2d((side, side), tokens.shape[-1], device=tokens.device, dtype=tokens.dtype)


def grid_pos_embed(pos_embed: torch.Tensor, full_grid, heights: list[int], widths: list[int],
                   grid) -> torch.Tensor:
    """(B or 1, N, D): learned position embeddings (1, 1+H*W, D) of the ``full_grid`` patches,
    resized (bilinear, corners aligned, as ViLT) to each image's valid ``heights[i]`` x
    ``widths[i]`` grid and zero-padded to ``grid``. Each size is resized once."""
    spatial = pos_embed[:, 1:].transpose(1, 2).reshape(1, pos_embed.shape[-1], *full_grid)
    made = {}
    for hw in zip(heights, widths):
        if hw not in made:
            if min(hw) == 0:
                raise ValueError("pixel_mask leaves an image without any valid patch")
            p = spatial if hw == tuple(spatial.shape[-2:]) else \
                F.interpolate(spatial, size=hw, mode="bilinear", align_corners=True)
            made[hw] = F.pad(p, (0, grid[1] - hw[1], 0, grid[0] - hw[0]))
    out = torch.cat([made[hw] for hw in zip(heights, widths)])  # (B, D, gh, gw)
    return out.flatten(2).transpose(1, 2)


class ImageEmbeddings(nn.Module):
    """Patches + [CLS] + learned position embeddings, interpolated to other image sizes."""

    def __init__(self, image_size: int, patch_size: int, dim: int, in_chans: int = 3,
                 stem: str = "patch", patch_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, dim, in_chans, stem, patch_bias)
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x, grid = self.patch_embed(pixel_values)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, D)
        x = x + interpolate_pos_embed(self.pos_embed, self.grid, grid)
        return self.dropout(x)


class BertEmbeddings(nn.Module):
    """word + position + token type, then LayerNorm and dropout (BERT, ViLT, ALBEF, BLIP)."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int = 512, type_vocab_size: int = 2,
                 eps: float = 1e-12, dropout: float = 0.0, pad_token_id: int = 0):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.position = nn.Embedding(max_positions, dim)
        self.token_type = nn.Embedding(type_vocab_size, dim) if type_vocab_size else None
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                past_length: int = 0, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.word(input_ids) if inputs_embeds is None else inputs_embeds
        n = x.shape[1]
        if past_length + n > self.position.num_embeddings:
            raise ValueError(f"sequence of {past_length + n} tokens exceeds the "
                             f"{self.position.num_embeddings} position embeddings")
        positions = torch.arange(past_length, past_length + n, device=x.device)
        x = x + self.position(positions)[None]
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(positions)[None]
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class TextEmbeddings(nn.Module):
    """word + learned position (CLIP's text tower): no LayerNorm, no token types."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int = 77):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_positions, dim)
        nn.init.normal_(self.word.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        n = input_ids.shape[1]
        if past_length + n > self.position.num_embeddings:
            raise ValueError(f"sequence of {past_length + n} tokens exceeds the context length "
                             f"{self.position.num_embeddings}")
        positions = torch.arange(past_length, past_length + n, device=input_ids.device)
        return self.word(input_ids) + self.position(positions)[None]
