"""CLIP (Radford et al. 2021): a ViT image tower and a causal text Transformer pooled at the
end-of-text token, linear projections into one space, L2-normalised embeddings, and logits
exp(t)·I·Tᵀ with a learnable temperature, trained with the symmetric contrastive loss over
in-batch negatives (optionally with the dataset's hard-negative captions, NegCLIP style)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import PreNormBlock, TextEmbeddings, Transformer, eot_positions, padding_mask, pool_mean
from ..losses.contrastive import ContrastiveLoss
from .base import Output, VLModel, image_spec, register
from ..layers.init import init_weights as _init_weights
from .vit import ViTConfig, VisionTransformer


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    dim: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    eps: float = 1e-5
    eot_token_id: int | None = None   # None: pool at the largest id (original CLIP vocabulary)
    causal: bool = True
    pool: str = "eot"                 # "eot" (CLIP) or "mean" over the caption's tokens


@dataclass
class CLIPConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    loss: str = "infonce"              # "infonce" or "siglip"
    hard_negatives: bool = False       # dataset negatives join the image->text softmax
    loss_chunk_size: int | None = None  # stream the logit matrix in chunks of this many rows
    vision_init: str = ""              # start the image tower from a ViT (or CLIP) run (LiT-style)


def _vision(**kw) -> ViTConfig:
    base = dict(pre_norm=True, patch_bias=False, eps=1e-5, act="quick_gelu",
                mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    return ViTConfig(**{**base, **kw})


PRESETS = {
    # The synthetic world at 64 px: a conv stem so shapes are learned within minutes on a CPU.
    "tiny": dict(vision=_vision(image_size=64, patch_size=16, dim=192, depth=3, heads=3, mlp_dim=768,
                                stem="conv", act="gelu", mean=(0.5,) * 3, std=(0.5,) * 3),
                 text=TextConfig(vocab_size=512, context_length=32, dim=192, depth=3, heads=3,
                                 mlp_dim=768, act="gelu"),
                 embed_dim=128),
    "small": dict(vision=_vision(image_size=224, patch_size=16, dim=384, depth=12, heads=6, mlp_dim=1536),
                  text=TextConfig(dim=384, depth=12, heads=6, mlp_dim=1536), embed_dim=384),
    "b32": dict(vision=_vision(image_size=224, patch_size=32, dim=768, depth=12, heads=12, mlp_dim=3072),
                text=TextConfig(), embed_dim=512),
    "b16": dict(vision=_vision(image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072),
                text=TextConfig(), embed_dim=512),
}


class TextTransformer(nn.Module):
    """Token + position embeddings -> causal pre-norm Transformer -> final norm -> EOT token."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.pool not in ("eot", "mean"):
            raise ValueError(f"text.pool: {cfg.pool!r} is not 'eot' or 'mean'")
        self.cfg = cfg
        self.embed = TextEmbeddings(cfg.vocab_size, cfg.dim, cfg.context_length)
        self.encoder = Transformer([PreNormBlock(cfg.dim, cfg.heads, cfg.mlp_dim, act=cfg.act, eps=cfg.eps)
                                    for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = self.embed(input_ids)  # (B, L, D)
        return self.norm(self.encoder(x, mask=self._mask(attention_mask), causal=self.cfg.causal))  # (B, L, D)

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        # no padding in the batch: no mask, so causal attention takes the kernel's causal mode.
        # Under torch.compile the mask is always used: the check would break the graph
        pad = attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all()))
        return padding_mask(attention_mask) if pad else None

    @torch.compiler.disable  # reads a length off the data: compiled code breaks its graph here
    def needed_length(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      index: torch.Tensor | None) -> int:
        """How many leading positions decide the pooled feature: up to the last end-of-text
        token in a causal tower (a position sees only those before it), else up to the last
        unmasked position (a masked key is never attended). Rounded up to a multiple of 8 so
        that batches of similar lengths share kernels (and compiled graphs)."""
        length = input_ids.shape[1]
        if self.cfg.causal and index is not None:
            needed = int(index.max()) + 1
        elif attention_mask is not None:
            needed = int(attention_mask.any(dim=0).nonzero().max()) + 1 if bool(attention_mask.any()) else length
        else:
            return length
        return min(length, -(-needed // 8) * 8)

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The pooled feature (B, D), computed on the leading positions that decide it
        (``needed_length``): padding after the last caption's end is never run through the
        tower, and with end-of-text pooling the last block runs for that token only
        (``Transformer.forward_at``). The same result as pooling ``forward_features``."""
        index = eot_positions(input_ids, self.cfg.eot_token_id) if self.cfg.pool == "eot" else None
        keep = self.needed_length(input_ids, attention_mask, index)
        input_ids = input_ids[:, :keep]
        attention_mask = attention_mask[:, :keep] if attention_mask is not None else None
        if self.cfg.pool == "mean":
            return pool_mean(self.forward_features(input_ids, attention_mask), attention_mask)
        x = self.embed(input_ids)  # (B, keep, D)
        x = self.encoder.forward_at(x, index, mask=self._mask(attention_mask), causal=self.cfg.causal)
        return self.norm(x)[:, 0]


@register("clip")
class CLIP(VLModel):
    config_class = CLIPConfig
    presets = PRESETS
    task = "image_text"

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.text = TextTransformer(cfg.text)
        self.image_proj = nn.Linear(cfg.vision.dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if cfg.loss == "siglip" else None
        self.loss_fn = ContrastiveLoss(kind=cfg.loss, chunk_size=cfg.loss_chunk_size)
        self.apply(_init_weights)
        nn.init.normal_(self.text.embed.word.weight, std=0.02)
        nn.init.normal_(self.text.embed.position.weight, std=0.01)

    def image_spec(self) -> dict:
        return image_spec(self.cfg.vision)

    # -- towers ---------------------------------------------------------------------------------
    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision.forward_features(pixel_values)  # (B, 1+N, Dv)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.image_proj(self.vision(pixel_values))  # (B, E)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        z = self.text_proj(self.text(input_ids, attention_mask))  # (B, E)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, pixel_values, input_ids, attention_mask=None) -> Output:
        img = self.encode_image(pixel_values)
        txt = self.encode_text(input_ids, attention_mask)
        logits = self.logit_scale.exp() * img @ txt.T  # (B_img, B_txt)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return Output(image_embeds=img, text_embeds=txt, logits=logits)

    def score(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B,) log-score of zipped (image, text) pairs (``VLModel`` documents ``score``): the
        logit ``exp(t) * cos``, CLIP's log-probability up to the candidate set's normaliser."""
        sim = (self.encode_image(pixel_values) * self.encode_text(input_ids, attention_mask)).sum(-1)
        return self.logit_scale.clamp(max=self.cfg.logit_scale_max).exp() * sim

    # -- training -------------------------------------------------------------------------------
    def training_losses(self, batch: dict) -> dict:
        img = self.encode_image(batch["pixel_values"])
        txt = self.encode_text(batch["input_ids"], batch["attention_mask"])
        extra = None
        if self.cfg.hard_negatives and batch.get("neg_input_ids") is not None \
                and batch["neg_input_ids"].shape[0] > 0:
            extra = self.encode_text(batch["neg_input_ids"], batch["neg_attention_mask"])
        scale = self.logit_scale.clamp(max=self.cfg.logit_scale_max)
        if self.cfg.loss == "siglip":
            loss = self.loss_fn(img, txt, scale, logit_bias=self.logit_bias)
        else:
            loss = self.loss_fn(img, txt, scale, extra_text_emb=extra)
        return {"loss": loss, "scale": scale.detach().exp()}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.logit_scale.clamp_(0, self.cfg.logit_scale_max)
