"""ViLT (Kim et al. 2021): one single-stream pre-norm Transformer over [text tokens ; image patches].

Text: BERT embeddings (word + position + segment, LayerNorm). Image: ViT patches + [CLS] + learned
position embeddings, interpolated to each image's valid patch grid. Each part gets a modality-type
embedding (text 0, image 1, a second image 2). After the encoder: LayerNorm, then the pooler
tanh(dense(token 0)) feeds the heads: ITM (2-way), retrieval rank (1-way, Hugging Face's
ViltForImageAndTextRetrieval), VQA and pair (NLVR2) classifiers; MLM reads the text tokens.
Training (the config's ``objectives``): ITM with in-batch image swaps (+ the dataset's negative
captions), MLM, and VQA (soft-score BCE) on batches that carry VQA targets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (BertEmbeddings, ImageEmbeddings, MLMHead, Pooler, PreNormBlock, Transformer,
                      directional_mask, padding_mask, sincos_2d)
from ..losses.matching import itm_accuracy, itm_batch_from_swaps, itm_loss
from ..losses.mlm import (edit_from_pass, edit_loss_and_accuracy, lowest_word_logprob, mask_tokens, minimal_pairs,
                          mlm_loss, no_edit_pairs)
from ..losses.grounding import (GroundedPasses, attention_guides, check_grounding_settings,
                               grounding_losses, mask_relation_words, relation_heads, require_grounding,
                               require_relations)
from ..losses.vqa import batch_vqa_loss, vqa_loss
from .base import Output, VLModel, register, source_vision_tower
from .vit import _init_weights


@dataclass
class ViLTConfig:
    image_size: int = 384
    patch_size: int = 32
    in_chans: int = 3
    stem: str = "patch"             # "patch" (ViT) or "conv" (small conv stem, see PatchEmbed)
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"
    eps: float = 1e-12              # every LayerNorm of the backbone and the MLM head
    qkv_bias: bool = True
    dropout: float = 0.1
    drop_path: float = 0.0
    vocab_size: int = 30522
    max_text_len: int = 40
    type_vocab_size: int = 2        # BERT segment ids of the text
    modality_types: int = 2         # text 0, image 1 (and 2: second image, needs 3)
    max_image_tokens: int = 0       # >0: training keeps at most this many random patches per image
    # "sincos": fixed 2-D sine-cosine codes of each patch's row and column added to the patch
    # tokens on top of the learned position embeddings, so every layer can read where a patch is
    # (a ViT trained to classify keeps its learned positions only weakly; spatial relations need them)
    image_pos: str = ""
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # heads
    itm_head: bool = True           # 2-way image-text matching
    mlm_head: bool = True
    rank_head: bool = False         # 1-way retrieval score (HF ViltForImageAndTextRetrieval)
    num_answers: int = 0            # >0: VQA classifier over answer_names
    answer_names: list[str] = field(default_factory=list)
    pair_classes: int = 0           # >0: NLVR2 classifier over two images (needs modality_types 3)
    # training
    objectives: tuple[str, ...] = ("itm", "mlm", "vqa")  # losses trained, where the head exists
    hard_negatives: bool = False    # the dataset's negative captions join ITM as negatives
    itm_swap_prob: float = 0.5
    mlm_prob: float = 0.15
    whole_word_mask: bool = False   # needs batch["word_ids"] (tokenizer(..., return_word_ids=True))
    mask_token_id: int = 4          # ids of vlkit's WordPiece vocabulary ([PAD]=0 ... [MASK]=4)
    pad_token_id: int = 0
    special_token_ids: tuple[int, ...] = (0, 1, 2, 3, 4)
    vision_init: str = ""           # a ViT run (or HF folder): patch embeddings and first blocks
    # phrase grounding (vlkit.losses.grounding): words that name an object attend to its patches
    grounding_weight: float = 0.0   # >0: needs batches with grounding targets (boxes in the data)
    grounding_layer: int = 0        # the block whose self-attention is supervised
    grounding_heads: int = 1        # its first heads are supervised, the others stay free
    # relation phrases ("left of"): in block relation_layer, one head attends from the relation
    # words to the first object and the next head to the second (grounding entries with a role):
    # heads 0 and 1, or the two after the grounding heads when it is grounding_layer; by default
    # a later block than grounding_layer, so the words can first read the phrases
    relation_weight: float = 0.0
    relation_layer: int = 1
    # replaced-word correction (needs hard_negatives and the MLM head): for each caption and its
    # first negative, when they differ word for word, the model reads the negative (or, half of
    # the time, the caption) with the image and the MLM head predicts the caption's words where
    # they differ; match_score="itm+edit" then scores a pair by the ITM head and the least likely
    # word the text shows (vlkit.losses.mlm.lowest_word_logprob)
    edit_weight: float = 0.0
    # where the correction reads the pairs: "separate" (a pass of its own over each caption's
    # first minimal-pair negative, shown false or true at random) or "itm" (the ITM pass, which
    # holds every dataset negative with its image and the captions left with their own image:
    # every minimal pair read both ways at no extra cost; needs the "itm" objective)
    edit_pass: str = "separate"
    match_score: str = "itm"
    # the share of captions whose relation words (grounding entries with a role) are all masked
    # in the MLM pass, on top of mlm_prob (needs grounding)
    relation_mask_prob: float = 0.0
    # a linear head on the relation words' output states regresses the subject's centre minus the
    # object's (from the relation targets' patches), in every grounded pass (needs relation_weight)
    geometry_weight: float = 0.0
    # >0: attention forcing (vlkit.losses.grounding.attention_guides): in the grounded passes the
    # supervised heads read the image through their targets, mixed into their own attention at a
    # share falling linearly from 1 to 0 over this many optimiser steps
    attention_forcing_steps: int = 0
    # the last two self-attention heads of every layer let a text token see only the text at or
    # before it (the second-to-last head) or at or after it (the last), and no image token: a
    # relation word tells its subject from its object by the mask instead of learned positions
    # (the grounding and relation heads come first, so they need two heads more than they use)
    directional_heads: bool = False


OBJECTIVES = ("itm", "mlm", "vqa")

PRESETS = {
    # The synthetic world at 64 px: 8x8 = 64 patches from a conv stem.
    "tiny": dict(image_size=64, patch_size=8, stem="conv", dim=192, depth=4, heads=3, mlp_dim=768,
                 max_text_len=40, vocab_size=2000, eps=1e-6, dropout=0.0, modality_types=3),
    "small": dict(image_size=224, patch_size=16, dim=384, depth=12, heads=6, mlp_dim=1536,
                  max_text_len=40, eps=1e-6, modality_types=3),
    # ViLT-B/32 at 384 px (keys and shapes of dandelin/vilt-b32-mlm); 200 image tokens in training.
    "b32": dict(image_size=384, patch_size=32, dim=768, depth=12, heads=12, mlp_dim=3072,
                max_text_len=40, max_image_tokens=200, mask_token_id=103,
                special_token_ids=(0, 100, 101, 102, 103)),
}


def classifier(dim: int, hidden: int, out: int) -> nn.Sequential:
    """ViLT's VQA / NLVR2 head: Linear, LayerNorm (PyTorch's default eps 1e-5), GELU, Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out))


def _with_head(*heads: str):
    """A method that exists only when one of the heads does, so ``hasattr(model, name)`` tells the
    pipeline and the evaluation what this model can do."""
    def wrap(fn):
        def get(self):
            if all(getattr(self, h) is None for h in heads):
                raise AttributeError(f"this ViLT has no {' or '.join(heads)} for {fn.__name__}")
            return fn.__get__(self)
        return property(get, doc=fn.__doc__)
    return wrap


@register("vilt")
class ViLT(VLModel):
    config_class = ViLTConfig
    presets = PRESETS
    task = "fusion"
    # task heads that ``vlkit train --init`` may initialise afresh when the source lacks them
    optional_heads = ("itm_head", "rank_head", "mlm_head", "vqa_head", "pair_head", "geometry_head",
                      "forcing_steps_done")

    def __init__(self, cfg: ViLTConfig):
        super().__init__()
        if cfg.pair_classes and cfg.modality_types < 3:
            raise ValueError("pair classification needs modality_types=3 (text, image 1, image 2)")
        if cfg.answer_names and len(cfg.answer_names) != cfg.num_answers:
            raise ValueError(f"{len(cfg.answer_names)} answer_names for num_answers={cfg.num_answers}")
        check_grounding_settings(cfg, cfg.depth, "backbone")
        if cfg.directional_heads:
            if cfg.heads < 2:
                raise ValueError(f"directional_heads needs at least 2 attention heads, got heads={cfg.heads}")
            # the last two heads read text only: the supervised heads must come before them
            supervised = cfg.grounding_heads if cfg.grounding_weight > 0 else 0
            if cfg.relation_weight > 0:
                supervised = max(supervised, relation_heads(cfg.grounding_layer, cfg.grounding_heads,
                                                            cfg.relation_layer) + 2)
            if supervised > cfg.heads - 2:
                raise ValueError(f"directional_heads: heads {cfg.heads - 2} and {cfg.heads - 1} read "
                                 f"text only, but grounding and relation supervise heads 0 to "
                                 f"{supervised - 1}: use at least {supervised + 2} heads")
        if cfg.edit_weight < 0 or (cfg.edit_weight > 0 and not (cfg.hard_negatives and cfg.mlm_head)):
            raise ValueError(f"edit_weight={cfg.edit_weight}: needs to be >= 0, and > 0 needs "
                             "hard_negatives (--hard-negatives: the dataset's negative captions) "
                             "and the MLM head")
        if cfg.edit_pass not in ("separate", "itm") or (cfg.edit_pass == "itm" and cfg.edit_weight > 0
                                                         and not (cfg.itm_head and "itm" in cfg.objectives)):
            raise ValueError(f"edit_pass must be 'separate' or 'itm' (which needs the ITM head and "
                             f"objective), got {cfg.edit_pass!r}")
        if cfg.match_score not in ("itm", "itm+edit") or (cfg.match_score == "itm+edit" and not cfg.mlm_head):
            raise ValueError(f"match_score must be 'itm' or 'itm+edit' (which needs the MLM head), "
                             f"got {cfg.match_score!r}")
        if cfg.image_pos not in ("", "sincos") or (cfg.image_pos and cfg.dim % 4):
            raise ValueError(f"image_pos must be '' or 'sincos' (which needs dim divisible by 4), "
                             f"got {cfg.image_pos!r} with dim={cfg.dim}")
        if cfg.grounding_weight > 0 and cfg.max_image_tokens > 0:
            raise ValueError("grounding needs every image patch in place (max_image_tokens=0)")
        unknown = [o for o in cfg.objectives if o not in OBJECTIVES]
        if unknown or not cfg.objectives:
            raise ValueError(f"objectives {list(cfg.objectives)}: choose from {', '.join(OBJECTIVES)}")
        self.cfg = cfg
        d = cfg.dim
        self.text_embed = BertEmbeddings(cfg.vocab_size, d, cfg.max_text_len, cfg.type_vocab_size,
                                         cfg.eps, cfg.dropout, cfg.pad_token_id)
        self.image_embed = ImageEmbeddings(cfg.image_size, cfg.patch_size, d, cfg.in_chans, cfg.stem,
                                           dropout=cfg.dropout)
        self.modality_embed = nn.Embedding(cfg.modality_types, d)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.encoder = Transformer([
            PreNormBlock(d, cfg.heads, cfg.mlp_dim, act=cfg.act, eps=cfg.eps, qkv_bias=cfg.qkv_bias,
                         drop=cfg.dropout, drop_path=r) for r in rates])
        self.norm = nn.LayerNorm(d, eps=cfg.eps)
        self.pooler = Pooler(d)
        self.itm_head = nn.Linear(d, 2) if cfg.itm_head else None
        self.rank_head = nn.Linear(d, 1) if cfg.rank_head else None
        self.mlm_head = MLMHead(d, cfg.vocab_size, cfg.eps, cfg.act) if cfg.mlm_head else None
        self.geometry_head = nn.Linear(d, 2) if cfg.geometry_weight > 0 else None
        self.vqa_head = classifier(d, 2 * d, cfg.num_answers) if cfg.num_answers else None
        self.pair_head = classifier(2 * d, 2 * d, cfg.pair_classes) if cfg.pair_classes else None
        if cfg.attention_forcing_steps > 0:  # the schedule's clock, saved with the weights
            self.register_buffer("forcing_steps_done", torch.zeros((), dtype=torch.long))
        self.apply(_init_weights)
        for emb in (self.text_embed.word, self.text_embed.position, self.modality_embed,
                    self.text_embed.token_type):
            nn.init.normal_(emb.weight, std=0.02)

    @staticmethod
    def with_vision_tower(cfg: ViLTConfig, tower) -> ViLTConfig:
        """``cfg`` with the image and backbone fields of a ViT tower's config (``tower``), so
        ``vision_init`` fits; the backbone keeps its own depth if deeper than the tower's."""
        if tower.pre_norm or not tower.patch_bias:
            raise ValueError("vision_init: ViLT starts from a ViT classifier's tower (no pre-encoder "
                             "LayerNorm, a biased patch projection), not a CLIP image tower")
        return dataclasses.replace(
            cfg, image_size=tower.image_size, patch_size=tower.patch_size, in_chans=tower.in_chans,
            stem=tower.stem, dim=tower.dim, heads=tower.heads, mlp_dim=tower.mlp_dim, act=tower.act,
            eps=tower.eps, qkv_bias=tower.qkv_bias, mean=tuple(tower.mean), std=tuple(tower.std),
            depth=max(cfg.depth, tower.depth))

    def init_pretrained(self) -> None:
        """ViLT starts from a ViT (the paper: ImageNet ViT-B/32): ``cfg.vision_init``'s patch
        embeddings ([CLS], positions), its Transformer blocks as the first blocks of the backbone
        and its final LayerNorm; text embeddings, the later blocks and the heads start fresh."""
        if not self.cfg.vision_init:
            return
        from ..convert.common import check_fit
        tower = source_vision_tower(self.cfg.vision_init)
        state = {}
        for key, value in tower.state_dict().items():
            if key.startswith("norm_pre."):
                raise ValueError(f"vision_init {self.cfg.vision_init}: a tower with a pre-encoder "
                                 "LayerNorm (CLIP) does not fit ViLT")
            state[("image_embed." + key[len("embed."):]) if key.startswith("embed.") else key] = value
        own = self.state_dict()
        check_fit(own, state, f"vision_init {self.cfg.vision_init}", "this ViLT", needed=())
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)

    # -- embeddings -----------------------------------------------------------------------------
    def embed_image(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None):
        """(tokens (B, 1+N', D), mask (B, 1+N')): [CLS] + patches with position embeddings.
        ``pixel_mask`` (B, H, W) marks the valid (unpadded) top-left region of each image; position
        embeddings are interpolated (bilinear, corners aligned, as ViLT) to each valid grid and
        padded patches are masked. In training with ``max_image_tokens``, a random subset of the
        valid patches is kept (padded patches fill up the shorter rows, masked)."""
        emb = self.image_embed
        x, grid = emb.patch_embed(pixel_values)  # (B, N, D)
        b, n, d = x.shape
        if pixel_mask is None:
            valid = torch.ones(b, *grid, dtype=torch.bool, device=x.device)
            x = x + self._grid_pos([grid[0]], [grid[1]], grid)  # one grid for all: no host sync
        else:  # nearest-neighbour downsampling of the pixel mask to the patch grid
            valid = F.interpolate(pixel_mask[:, None].float(), size=grid)[:, 0] > 0.5
            x = x + self._grid_pos(valid.sum(1)[:, 0].tolist(), valid.sum(2)[:, 0].tolist(), grid)
        if self.cfg.image_pos:  # row and column codes; a padded image's valid patches keep theirs
            x = x + sincos_2d(grid, d, num_prefix=0, device=x.device, dtype=x.dtype)
        keep = valid.flatten(1)  # (B, N)
        limit = self.cfg.max_image_tokens
        if self.training and limit > 0:
            count = min(limit, int(keep.sum(1).max()))
            key = torch.rand(b, n, device=x.device) + keep  # valid patches first, in random order
            index = key.topk(count, dim=1).indices.sort(dim=1).values  # (B, count)
            x = x.gather(1, index[..., None].expand(-1, -1, d))
            keep = keep.gather(1, index)
        cls = (emb.cls_token + emb.pos_embed[:, :1]).expand(b, -1, -1)
        x = emb.dropout(torch.cat([cls, x], dim=1))  # (B, 1+N', D)
        return x, torch.cat([keep.new_ones(b, 1), keep], dim=1)

    def _grid_pos(self, heights: list[int], widths: list[int], grid) -> torch.Tensor:
        """(B or 1, N, D) position embeddings of each image's valid h x w grid, zero-padded to ``grid``."""
        pos = self.image_embed.pos_embed
        spatial = pos[:, 1:].transpose(1, 2).reshape(1, pos.shape[-1], *self.image_embed.grid)
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

    def embed(self, pixel_values, input_ids, attention_mask, token_type_ids=None, image_token_type=1,
              pixel_mask=None):
        """The joint sequence [text ; image] (B, L+1+N', D) and its 1/0 mask (B, L+1+N')."""
        if image_token_type >= self.cfg.modality_types:
            raise ValueError(f"image modality type {image_token_type} needs modality_types > "
                             f"{image_token_type} (this model has {self.cfg.modality_types})")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = self.text_embed(input_ids, token_type_ids) + self.modality_embed.weight[0]  # (B, L, D)
        image, image_mask = self.embed_image(pixel_values, pixel_mask)
        image = image + self.modality_embed.weight[image_token_type]
        mask = torch.cat([attention_mask.to(image_mask.dtype), image_mask], dim=1)
        return torch.cat([text, image], dim=1), mask

    # -- the single stream ----------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                image_token_type: int = 1, pixel_mask: torch.Tensor | None = None) -> Output:
        """features: the joint sequence after the final norm (B, L+1+N', D), text first;
        pooled: tanh(dense(features[:, 0])) (B, D)."""
        x, mask = self.embed(pixel_values, input_ids, attention_mask, token_type_ids,
                             image_token_type, pixel_mask)
        x = self.norm(self.encoder(x, mask=self._joint_mask(mask, input_ids.shape[1])))
        return Output(features=x, pooled=self.pooler(x))

    def _joint_mask(self, mask: torch.Tensor, text_len: int) -> torch.Tensor:
        """The self-attention mask of the joint sequence (text first): padding, and with
        ``directional_heads`` the text rows of the last two heads see only text -- the
        second-to-last head the text at or before them, the last the text at or after them
        (``layers.directional_mask``) -- as a text encoder's layer would: what precedes a
        relation word (its subject) and what follows it (its object) reach it apart, undiluted
        by the image tokens. The other heads' text rows and every image row see everything."""
        keys = padding_mask(mask)
        if not self.cfg.directional_heads:
            return keys
        heads, n = self.cfg.heads, text_len
        full = keys.expand(-1, heads, mask.shape[1], -1)
        text = torch.cat([directional_mask(mask[:, :n], 2),
                          torch.zeros_like(full[:, :2, :n, n:])], dim=3)  # (B, 2, n, L)
        top = torch.cat([full[:, :heads - 2, :n], text], dim=1)
        return torch.cat([top, full[:, :, n:]], dim=2)

    @property
    def grounding_grid(self) -> tuple[int, int] | None:
        """The patch grid grounding targets are made for, when this model trains grounding."""
        return tuple(self.image_embed.grid) if self.cfg.grounding_weight > 0 else None

    def _grounded(self, pixel_values, input_ids, attention_mask, targets, roles=None):
        """(features after the final norm, grounding (loss, attention mass), relation (loss,
        mass) or None): one pass in which ``cfg.grounding_layer`` (and, given the relation
        targets ``roles`` (B, 2, L, P), ``cfg.relation_layer``) also returns its attention, read
        from the text rows over the image patches (after the image [CLS])."""
        if targets.shape[:2] != input_ids.shape:
            raise ValueError(f"grounding targets {tuple(targets.shape)} do not fit the text "
                             f"{tuple(input_ids.shape)}")
        cfg = self.cfg
        x, mask = self.embed(pixel_values, input_ids, attention_mask)
        layers = [cfg.grounding_layer] + ([cfg.relation_layer] if roles is not None else [])
        n, length = input_ids.shape[1], x.shape[1]
        cells = targets.shape[2]
        if length - n - 1 != cells:
            raise ValueError(f"grounding targets cover {cells} patches, the image has {length - n - 1}")
        guides = None
        if self.training and cfg.attention_forcing_steps > 0:  # text rows over the patches
            guides = attention_guides(cfg, int(self.forcing_steps_done), targets.to(x.device),
                                      None if roles is None else roles.to(x.device),
                                      lambda t: ("self", F.pad(t.to(x.dtype), (n + 1, 0, 0, length - n))))
        x, maps = self.encoder.forward_with_maps_of(x, layers, mask=self._joint_mask(mask, n), guides=guides)
        named, related = grounding_losses(
            cfg, lambda layer, heads: maps[layer]["self"][:, heads, :n, n + 1:], targets.to(x.device),
            None if roles is None else roles.to(x.device))
        return self.norm(x), named, related

    @_with_head("itm_head", "rank_head")
    def match(self, pixel_values, input_ids, attention_mask=None, pixel_mask=None) -> torch.Tensor:
        """(B, 2) ITM logits of zipped pairs (column 1 = match). A model with only the 1-way
        retrieval head returns [0, rank score], so softmax[:, 1] = sigmoid(rank score)."""
        return self._match_logits(self(pixel_values, input_ids, attention_mask, pixel_mask=pixel_mask).pooled)

    def _match_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.itm_head is not None:
            return self.itm_head(pooled)
        rank = self.rank_head(pooled)  # (B, 1)
        return torch.cat([torch.zeros_like(rank), rank], dim=1)

    @_with_head("itm_head", "rank_head")
    def score(self, pixel_values, input_ids, attention_mask=None, pixel_mask=None) -> torch.Tensor:
        """(B,) log-probability that each zipped pair matches: the ITM head's, plus, with
        ``match_score="itm+edit"``, the MLM head's lowest log-probability of a word of the text
        where it stands (one forward pass serves both)."""
        if self.cfg.match_score != "itm+edit":
            return self.match(pixel_values, input_ids, attention_mask, pixel_mask).log_softmax(-1)[:, 1]
        out = self(pixel_values, input_ids, attention_mask, pixel_mask=pixel_mask)
        logits = self._match_logits(out.pooled)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        words = self.mlm_head(out.features[:, :input_ids.shape[1]])
        return logits.float().log_softmax(-1)[:, 1] + lowest_word_logprob(
            words, input_ids, attention_mask, self.cfg.special_token_ids)

    @_with_head("mlm_head")
    def mlm_logits(self, pixel_values, input_ids, attention_mask=None, pixel_mask=None) -> torch.Tensor:
        """(B, L, vocab) predictions for every text position."""
        features = self(pixel_values, input_ids, attention_mask, pixel_mask=pixel_mask).features
        return self.mlm_head(features[:, :input_ids.shape[1]])

    @_with_head("vqa_head")
    def vqa_logits(self, pixel_values, input_ids, attention_mask=None, pixel_mask=None) -> torch.Tensor:
        """(B, num_answers) answer logits (sigmoid scores, trained with soft-score BCE)."""
        return self.vqa_head(self(pixel_values, input_ids, attention_mask, pixel_mask=pixel_mask).pooled)

    @_with_head("vqa_head")
    def answer(self, pixel_values, input_ids, attention_mask=None) -> list[str]:
        """The highest-scoring answer for each (image, question)."""
        best = self.vqa_logits(pixel_values, input_ids, attention_mask).argmax(-1).tolist()
        names = self.cfg.answer_names or [str(i) for i in range(self.cfg.num_answers)]
        return [names[i] for i in best]

    @_with_head("pair_head")
    def pair_logits(self, pixel_values_1, pixel_values_2, input_ids, attention_mask=None) -> torch.Tensor:
        """NLVR2 "pair" setting: the text runs once with each image (modality types 1 and 2);
        the two pooled outputs, concatenated, go to the classifier. (B, pair_classes)."""
        pooled = [self(p, input_ids, attention_mask, image_token_type=i + 1).pooled
                  for i, p in enumerate((pixel_values_1, pixel_values_2))]
        return self.pair_head(torch.cat(pooled, dim=-1))

    # -- training -------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After each optimiser step: the clock of attention forcing, when it is on."""
        if self.cfg.attention_forcing_steps > 0:
            self.forcing_steps_done += 1

    def _edit_loss(self, batch: dict, pixels: torch.Tensor) -> dict:
        """Replaced-word correction (``edit_weight``) on the batch's minimal pairs: the negative
        shown (or, with probability 1/2, the caption), the caption's words the target where the
        two differ (``vlkit.losses.mlm.edit_loss_and_accuracy``)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        neg_ids = batch.get("neg_input_ids")
        if neg_ids is None or neg_ids.shape[0] == 0:
            return no_edit_pairs(pixels)
        pairs = minimal_pairs(ids, mask, neg_ids, batch["neg_attention_mask"], batch["neg_owner"])
        if pairs.rows.numel() == 0:
            return no_edit_pairs(pixels)
        show_false = torch.rand(pairs.rows.shape[0], device=ids.device) < 0.5
        shown = torch.where(show_false[:, None], pairs.neg_ids, pairs.ids)
        features = self(pixels[pairs.rows], shown, pairs.mask).features[:, :shown.shape[1]]
        logits = self.mlm_head(features[pairs.edited])
        return edit_loss_and_accuracy(logits, pairs.ids[pairs.edited],
                                      show_false[:, None].expand_as(pairs.edited)[pairs.edited])

    def training_losses(self, batch: dict) -> dict:
        """The config's ``objectives`` among: ITM (in-batch image swaps, + the batch's negative
        captions with ``hard_negatives``), MLM on the captions of the true pairs, and VQA when the
        batch has ``vqa_targets``. Each needs its head."""
        pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        out, losses = {}, []
        objectives = self.cfg.objectives
        grounding = self.cfg.grounding_weight > 0
        relations = self.cfg.relation_weight > 0
        if grounding:
            require_grounding(batch)
        if relations:
            require_relations(batch)
        grounded = GroundedPasses(self.cfg, self.geometry_head, tuple(self.image_embed.grid))

        def grounded_pass(p, i, m, targets, roles):
            roles = roles if relations else None
            features, named, rel = self._grounded(p, i, m, targets, roles)
            grounded.add(features[:, :i.shape[1]], named, rel, roles)
            return features

        if self.itm_head is not None and "itm" in objectives:
            index, labels = itm_batch_from_swaps(ids.shape[0], self.cfg.itm_swap_prob, device=ids.device)
            own = index == torch.arange(ids.shape[0], device=index.device)  # rows with their own image
            itm_pixels, itm_ids, itm_mask = pixels[index], ids, mask
            neg_ids = batch.get("neg_input_ids")
            if self.cfg.hard_negatives and neg_ids is not None and neg_ids.shape[0] > 0:
                owner = batch["neg_owner"].to(ids.device)
                itm_pixels = torch.cat([itm_pixels, pixels[owner]])
                itm_ids, itm_mask = _pad_cat(ids, mask, neg_ids, batch["neg_attention_mask"],
                                             self.cfg.pad_token_id)
                labels = torch.cat([labels, torch.zeros_like(owner)])
            if grounding and not (self.mlm_head is not None and "mlm" in objectives):
                # the true pairs (their own image, first in the ITM batch) carry the grounding
                n = ids.shape[0]
                def own_rows(t):  # padded to the ITM text length, zero but for the true pairs
                    t = F.pad(t, (0, 0, 0, itm_ids.shape[1] - ids.shape[1]))
                    keep = own.view(-1, *[1] * (t.dim() - 1)).to(t.dtype)
                    return torch.cat([t * keep, t.new_zeros(itm_ids.shape[0] - n, *t.shape[1:])])
                features = grounded_pass(itm_pixels, itm_ids, itm_mask, own_rows(batch["grounding"]),
                                         own_rows(batch["grounding_roles"]) if relations else None)
                logits = self.itm_head(self.pooler(features))
            else:
                result = self(itm_pixels, itm_ids, itm_mask)
                features, logits = result.features, self.itm_head(result.pooled)
            if self.cfg.edit_weight > 0 and self.cfg.edit_pass == "itm":
                # rows 0..B-1: the captions, with their own image where not swapped; the dataset
                # negatives, each with its own image, from row B on
                out.update(edit_from_pass(self.mlm_head, features[:, :itm_ids.shape[1]], batch,
                                          ids.shape[0], own))
            out["itm_loss"] = itm_loss(logits, labels)
            out["itm_acc"] = itm_accuracy(logits.detach(), labels)
            losses.append(out["itm_loss"])
        if self.mlm_head is not None and "mlm" in objectives:
            word_ids = batch.get("word_ids") if self.cfg.whole_word_mask else None
            if self.cfg.whole_word_mask and word_ids is None:
                raise ValueError("whole_word_mask needs batch['word_ids'] "
                                 "(tokenize with return_word_ids=True)")
            masked, labels = mask_tokens(ids, mask, self.cfg.special_token_ids, self.cfg.mask_token_id,
                                         self.cfg.vocab_size, self.cfg.mlm_prob, word_ids=word_ids)
            if self.cfg.relation_mask_prob > 0:
                pick = torch.rand(ids.shape[0], device=ids.device) < self.cfg.relation_mask_prob
                masked, labels = mask_relation_words(require_relations(batch), ids, mask, masked, labels,
                                                     pick, self.cfg.mask_token_id)
            if grounding:
                features = grounded_pass(pixels, masked, mask, batch["grounding"],
                                         batch.get("grounding_roles"))
            else:
                features = self(pixels, masked, mask).features
            hit = labels != -100  # the head runs on the masked positions only
            logits = self.mlm_head(features[:, :ids.shape[1]][hit])  # (M, vocab)
            out["mlm_loss"] = mlm_loss(logits, labels[hit])
            out["mlm_acc"] = (logits.detach().argmax(-1) == labels[hit]).float().mean() \
                if bool(hit.any()) else logits.new_zeros(())
            losses.append(out["mlm_loss"])
        if "vqa_targets" in batch and "vqa" in objectives:
            if grounding and "question_grounding" in batch and self.vqa_head is not None:
                q_ids, q_mask = batch["question_input_ids"], batch["question_attention_mask"]
                if relations:
                    require_relations(batch, "question_grounding_roles")
                features = grounded_pass(pixels, q_ids, q_mask, batch["question_grounding"],
                                         batch.get("question_grounding_roles"))
                out["vqa_loss"] = vqa_loss(self.vqa_head(self.pooler(features)), batch["vqa_targets"])
            else:
                out["vqa_loss"] = batch_vqa_loss(self, batch, pixels, ids, mask)
            losses.append(out["vqa_loss"])
        if self.cfg.edit_weight > 0 and self.mlm_head is not None:
            if self.cfg.edit_pass == "separate":
                out.update(self._edit_loss(batch, pixels))
            losses.append(self.cfg.edit_weight * out["edit_loss"])
        losses.extend(grounded.losses(out))
        if not losses:
            raise ValueError(f"nothing to train: objectives {list(objectives)} need their heads "
                             "(and VQA needs vqa_targets in the batch)")
        out["loss"] = torch.stack(losses).sum()
        return out


def _pad_cat(ids_a, mask_a, ids_b, mask_b, pad_id: int):
    """Stack two tokenised batches padded to a common length."""
    n = max(ids_a.shape[1], ids_b.shape[1])

    def pad(t, value):
        return F.pad(t, (0, n - t.shape[1]), value=value)
    ids = torch.cat([pad(ids_a, pad_id), pad(ids_b.to(ids_a.device), pad_id)])
    return ids, torch.cat([pad(mask_a, 0), pad(mask_b.to(mask_a.device), 0)])
