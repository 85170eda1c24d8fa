"""ViT (Dosovitskiy et al. 2021): patches -> linear embedding + position + [CLS] -> pre-norm
Transformer encoder -> final norm; [CLS] (or mean) pooled; optional classification head."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ImageEmbeddings, PreNormBlock, Transformer, pool_cls, pool_mean
from ..layers.init import init_weights as _init_weights
from .base import Output, VLModel, register


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"
    eps: float = 1e-12
    qkv_bias: bool = True
    stem: str = "patch"          # "patch" (linear patch projection) or "conv" (small conv stem)
    patch_bias: bool = True
    pre_norm: bool = False       # LayerNorm before the encoder (CLIP's ln_pre)
    pool: str = "cls"            # "cls" or "mean"
    drop_path: float = 0.0
    dropout: float = 0.0
    patch_dropout: float = 0.0   # training only: drop this fraction of patch tokens (FLIP), CLS kept
    num_classes: int = 0         # >0 adds a linear classification head on the pooled feature
    class_names: list[str] = field(default_factory=list)
    # >0: a per-patch head names the object under every patch token (one of the classes, or
    # background), trained with this weight beside the image-level loss, on the synthetic
    # world's images of one to three objects: the patch tokens (what fusion models attend to)
    # are trained to carry each object's colour and shape, as region features from an object
    # detector did for the first vision-language models. (The tiny preset after 3 CPU minutes:
    # colour 0.89, shape 0.54 per patch; see the README.)
    dense_weight: float = 0.0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)


PRESETS = {
    # Learns the synthetic world's colour x shape classes in minutes on a laptop CPU.
    # A conv stem (BatchNorm + ReLU) to 4x4 tokens of 16 px, one Transformer layer, [CLS]
    # pooling, trained at lr 1e-3 (vlkit.train.run). Measured sample efficiency (seen-class test
    # accuracy after 51k / 64k / 77k training images; 3 CPU minutes are ~60k): [CLS] with lr
    # 1.5e-3 0.84 / 0.90 / 0.95; mean pooling with lr 4e-3 0.31 / 0.52 / 0.69 (a long plateau
    # before shape is learned); lr 8e-3 never left the plateau; 8 px tokens learn a little faster
    # per image but cost 1.4x per image; a linear patch projection stayed at 0.41.
    "tiny": dict(image_size=64, patch_size=16, dim=128, depth=1, heads=2, mlp_dim=512,
                 stem="conv", eps=1e-6, pool="cls"),
    "small": dict(image_size=224, patch_size=16, dim=384, depth=12, heads=6, mlp_dim=1536, eps=1e-6),
    "base": dict(image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072),
}


class VisionTransformer(nn.Module):
    """The image encoder shared by ViT, CLIP, ALBEF and BLIP."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = ImageEmbeddings(cfg.image_size, cfg.patch_size, cfg.dim, cfg.in_chans,
                                     cfg.stem, cfg.patch_bias, cfg.dropout)
        self.norm_pre = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.pre_norm else nn.Identity()
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.encoder = Transformer([
            PreNormBlock(cfg.dim, cfg.heads, cfg.mlp_dim, act=cfg.act, eps=cfg.eps,
                         qkv_bias=cfg.qkv_bias, drop=cfg.dropout, drop_path=r) for r in rates])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Training only: keep the CLS token and a random ``1 - patch_dropout`` share of the
        patch tokens, chosen independently per image (FLIP, Li et al. 2023). (B, 1+N, D) ->
        (B, 1+K, D) with K = max(1, int(N * (1 - patch_dropout)))."""
        p = self.cfg.patch_dropout
        if not self.training or p <= 0:
            return x
        if not 0 <= p < 1:
            raise ValueError(f"patch_dropout must lie in [0, 1), got {p}")
        b, n = x.shape[0], x.shape[1] - 1
        keep = max(1, int(n * (1 - p)))
        idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep] + 1  # (B, K)
        patches = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        return torch.cat([x[:, :1], patches], dim=1)

    def forward_features(self, pixel_values: torch.Tensor, return_attention: bool = False):
        x = self.norm_pre(self.drop_patches(self.embed(pixel_values)))  # (B, 1+N, D); 1+K in training
        if return_attention:
            x, maps = self.encoder(x, return_attention=True)
            return self.norm(x), maps
        return self.norm(self.encoder(x))  # (B, 1+N, D)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return pool_cls(features) if self.cfg.pool == "cls" else pool_mean(features, skip_prefix=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled feature (B, D). With CLS pooling the last block runs for the CLS token
        only (``Transformer.forward_at``): the other tokens' last outputs are never read."""
        if self.cfg.pool != "cls":
            return self.pool(self.forward_features(pixel_values))
        x = self.norm_pre(self.drop_patches(self.embed(pixel_values)))
        return self.norm(self.encoder.forward_at(x, 0))[:, 0]  # (B, D)


@register("vit")
class ViT(VLModel):
    """ViT image classifier (or feature extractor when ``num_classes == 0``)."""

    config_class = ViTConfig
    presets = PRESETS
    task = "classification"

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else None
        if cfg.dense_weight < 0:
            raise ValueError(f"dense_weight must be >= 0, got {cfg.dense_weight}")
        if cfg.dense_weight > 0 and (not cfg.num_classes or cfg.patch_dropout > 0):
            raise ValueError("dense_weight needs num_classes > 0 and no patch_dropout (each patch "
                             "token is labelled in place)")
        # the classes, then background
        self.patch_head = nn.Linear(cfg.dim, cfg.num_classes + 1) if cfg.dense_weight > 0 else None
        self.apply(_init_weights)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision.forward_features(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> Output:
        features = self.vision.forward_features(pixel_values)
        pooled = self.vision.pool(features)
        logits = self.head(pooled) if self.head is not None else None
        return Output(features=features, pooled=pooled, logits=logits)

    @property
    def patch_grid(self) -> int:
        """Patches per side (0 without a per-patch head): the grid of ``patch_labels``."""
        return self.vision.embed.grid[0] if self.patch_head is not None else 0

    def training_losses(self, batch: dict) -> dict:
        """Cross-entropy of the image-level class (label -100: none); with ``dense_weight``
        also of the object class under each patch (``patch_labels`` (B, N))."""
        if self.head is None:
            raise ValueError("this ViT has no classification head (num_classes=0)")
        out = self(batch["pixel_values"])
        labels = batch["labels"]
        known = labels != -100
        n = known.sum().clamp(min=1)
        # a mean over the labelled images; a batch without any contributes zero, not NaN
        loss = F.cross_entropy(out.logits, labels.clamp(min=0), reduction="none").mul(known).sum() / n
        acc = ((out.logits.argmax(-1) == labels) & known).sum() / n
        result = {"class_loss": loss.detach(), "acc": acc.detach()}
        if self.patch_head is not None:
            target = batch.get("patch_labels")
            if target is None:
                raise ValueError("dense_weight > 0 needs batch['patch_labels'] (the synthetic world's "
                                 "images, which list their objects)")
            patches = out.features[:, 1:]
            if target.shape != patches.shape[:2]:
                raise ValueError(f"patch_labels of shape {tuple(target.shape)} for "
                                 f"{tuple(patches.shape[:2])} patch tokens")
            dense_logits = self.patch_head(patches)
            dense = F.cross_entropy(dense_logits.flatten(0, 1), target.flatten())
            objects = target != self.cfg.num_classes
            hit = (dense_logits.argmax(-1) == target) & objects
            result["patch_loss"] = dense.detach()
            result["patch_object_acc"] = (hit.sum() / objects.sum().clamp(min=1)).detach()
            loss = loss + self.cfg.dense_weight * dense
        result["loss"] = loss
        return result
