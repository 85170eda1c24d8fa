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

from ..layers import (AttentionGuide, BertEmbeddings, ImageEmbeddings, MLMHead, Pooler, PreNormBlock, Transformer,
                      check_directional_heads, classifier, grid_pos_embed, init_weights, joint_directional_mask,
                      padding_mask, sincos_2d)
from ..losses.matching import itm_accuracy, itm_batch_from_swaps, itm_loss, pad_cat
from ..losses.mlm import mask_tokens, mlm_loss
from ..losses.vqa import batch_vqa_loss, vqa_loss
from ..objectives import FusionSpec, ObjectiveOptions, Step, build_objectives, match_log_score
from .base import Output, VLModel, answer_names, register, requires_head

__all__ = ["ViLT", "ViLTConfig", "PRESETS", "classifier"]


@dataclass
class ViLTConfig(ObjectiveOptions):
    """The objectives' options (``grounding_weight`` ...) come from ``ObjectiveOptions``."""
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
    # architecture variant: in every layer the text rows of self-attention head
    # directional_head_index (negative: from the end) see only the text at or before them, of
    # the next head only the text at or after them, and neither sees the image
    # (``layers.directional_mask``); grounding and relation heads must come before them
    directional_heads: bool = False
    directional_head_index: int = -2

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


@register("vilt")
class ViLT(VLModel):
    config_class = ViLTConfig
    presets = PRESETS
    task = "fusion"
    # task heads that ``vlkit train --init`` may initialise afresh when the source lacks them
    optional_heads = ("itm_head", "rank_head", "mlm_head", "vqa_head", "pair_head", "relation_grounding",
                      "attention_forcing")

    def __init__(self, cfg: ViLTConfig):
        super().__init__()
        if cfg.pair_classes and cfg.modality_types < 3:
            raise ValueError("pair classification needs modality_types=3 (text, image 1, image 2)")
        if cfg.answer_names and len(cfg.answer_names) != cfg.num_answers:
            raise ValueError(f"{len(cfg.answer_names)} answer_names for num_answers={cfg.num_answers}")
        blind = ()
        if cfg.directional_heads:
            first = check_directional_heads(cfg.heads, cfg.directional_head_index)
            blind = (first, first + 1)
        if cfg.image_pos not in ("", "sincos") or (cfg.image_pos and cfg.dim % 4):
            raise ValueError(f"image_pos must be '' or 'sincos' (which needs dim divisible by 4), "
                             f"got {cfg.image_pos!r} with dim={cfg.dim}")
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
        spec = FusionSpec("backbone", cfg.depth, cfg.heads, d, tuple(self.image_embed.grid),
                          all_patches="set max_image_tokens=0" if cfg.max_image_tokens > 0 else "",
                          blind_heads=blind, blind_reason="directional_heads", mlm_head=cfg.mlm_head,
                          itm_pass=cfg.itm_head and "itm" in cfg.objectives, hard_negatives=cfg.hard_negatives)
        self.objectives = build_objectives(cfg, spec)  # each registered under its name: weights in the run
        for objective in self.objectives:
            self.add_module(objective.name, objective)
        self.vqa_head = classifier(d, 2 * d, cfg.num_answers) if cfg.num_answers else None
        self.pair_head = classifier(2 * d, 2 * d, cfg.pair_classes) if cfg.pair_classes else None
        self.apply(init_weights)
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

    def vision_init_state(self, tower_state: dict, label: str) -> dict:
        """ViLT starts from a ViT (the paper: ImageNet ViT-B/32): a tower's state under this
        model's names -- its patch embeddings ([CLS], positions), its Transformer blocks as the
        first blocks of the backbone and its final LayerNorm (``vlkit.factory.init_pretrained``
        loads it); text embeddings, the later blocks and the heads start fresh."""
        state = {}
        for key, value in tower_state.items():
            if key.startswith("norm_pre."):
                raise ValueError(f"{label}: a tower with a pre-encoder LayerNorm (CLIP) does not fit ViLT")
            state[("image_embed." + key[len("embed."):]) if key.startswith("embed.") else key] = value
        return state

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
            x = x + grid_pos_embed(emb.pos_embed, emb.grid, [grid[0]], [grid[1]], grid)  # one grid for all: no host sync
        else:  # nearest-neighbour downsampling of the pixel mask to the patch grid
            valid = F.interpolate(pixel_mask[:, None].float(), size=grid)[:, 0] > 0.5
            x = x + grid_pos_embed(emb.pos_embed, emb.grid, valid.sum(1)[:, 0].tolist(),
                                   valid.sum(2)[:, 0].tolist(), grid)
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
        """Padding, and with ``directional_heads`` two text-only heads, one looking back and one
        ahead (``layers.joint_directional_mask``): what precedes a relation word (its subject) and
        what follows it (its object) reach it apart, undiluted by the image tokens."""
        if not self.cfg.directional_heads:
            return padding_mask(mask)
        return joint_directional_mask(mask, text_len, self.cfg.heads, self.cfg.directional_head_index)

    @property
    def grounding_grid(self) -> tuple[int, int] | None:
        """The patch grid grounding targets are made for, when this model trains grounding."""
        return tuple(self.image_embed.grid) if self.cfg.grounding_weight > 0 else None

    def forward_tapped(self, pixel_values, input_ids, attention_mask, step: Step, targets: dict):
        """Features after the final norm, as ``forward``, tapped for the objectives
        (``vlkit.objectives.base``): the self-attention of the layers they read, text rows over
        the image patches (after the image [CLS]), (B, heads, L, P), and attention forcing of
        those layers in training."""
        from ..objectives.grounding import check_targets
        x, mask = self.embed(pixel_values, input_ids, attention_mask)
        n, length = input_ids.shape[1], x.shape[1]
        check_targets(targets["names"], input_ids.shape, length - n - 1)
        targets = {k: None if v is None else v.to(x.device) for k, v in targets.items()}
        forced, guides = step.guides(targets), None
        if forced is not None:  # text rows over the patches
            guides = {layer: {"self": AttentionGuide(first, F.pad(t.to(x.dtype), (n + 1, 0, 0, length - n)),
                                                     forced[1])}
                      for layer, (first, t) in forced[0].items()}
        x, maps = self.encoder.forward_with_maps_of(x, step.attention_layers(), mask=self._joint_mask(mask, n),
                                                    guides=guides)
        x = self.norm(x)
        step.read("text", lambda layer, heads: maps[layer]["self"][:, heads, :n, n + 1:], x[:, :n], targets)
        return x

    @requires_head("itm_head", "rank_head")
    def match(self, pixel_values, input_ids, attention_mask=None, pixel_mask=None) -> torch.Tensor:
        """(B, 2) ITM logits of zipped pairs (column 1 = match). A model with only the 1-way
        retrieval head returns [0, rank score], so softmax[:, 1] = sigmoid(rank score)."""
        return self._match_logits(self(pixel_values, input_ids, attention_mask, pixel_mask=pixel_mask).pooled)

    def _match_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.itm_head is not None:
            return self.itm_head(pooled)
        rank = self.rank_head(pooled)  # (B, 1)
        return torch.cat([torch.zeros_like(rank), rank], dim=1)

    @requires_head("itm_head", "rank_head")
    def score(self, pixel_values, input_ids, attention_mask=None, pixel_mask=None) -> torch.Tensor:
        """(B,) log-probability that each zipped pair matches (``VLModel`` documents ``score``):
        the ITM head's, adjusted by the objectives (``match_score="itm+edit"``)."""
        out = self(pixel_values, input_ids, attention_mask, pixel_mask=pixel_mask)
        return match_log_score(self.objectives, self._match_logits(out.pooled),
                               lambda: self.mlm_head(out.features[:, :input_ids.shape[1]]), input_ids, attention_mask)

    @requires_head("mlm_head")
    def mlm_logits(self, pixel_values, input_ids, attention_mask=None, pixel_mask=None) -> torch.Tensor:
        """(B, L, vocab) predictions for every text position."""
        features = self(pixel_values, input_ids, attention_mask, pixel_mask=pixel_mask).features
        return self.mlm_head(features[:, :input_ids.shape[1]])

    @requires_head("vqa_head")
    def vqa_logits(self, pixel_values, input_ids, attention_mask=None, pixel_mask=None) -> torch.Tensor:
        """(B, num_answers) answer logits (sigmoid scores, trained with soft-score BCE)."""
        return self.vqa_head(self(pixel_values, input_ids, attention_mask, pixel_mask=pixel_mask).pooled)

    @requires_head("vqa_head")
    def answer(self, pixel_values, input_ids, attention_mask=None) -> list[str]:
        """The highest-scoring answer for each (image, question)."""
        return answer_names(self.cfg, self.vqa_logits(pixel_values, input_ids, attention_mask).argmax(-1).tolist())

    @requires_head("pair_head")
    def pair_logits(self, pixel_values_1, pixel_values_2, input_ids, attention_mask=None) -> torch.Tensor:
        """NLVR2 "pair" setting: the text runs once with each image (modality types 1 and 2);
        the two pooled outputs, concatenated, go to the classifier. (B, pair_classes)."""
        pooled = [self(p, input_ids, attention_mask, image_token_type=i + 1).pooled
                  for i, p in enumerate((pixel_values_1, pixel_values_2))]
        return self.pair_head(torch.cat(pooled, dim=-1))

    # -- training -------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After each optimiser step: the objectives' clocks (attention forcing)."""
        for objective in self.objectives:
            objective.after_step()

    def training_losses(self, batch: dict) -> dict:
        """The config's ``objectives`` among: ITM (in-batch image swaps, + the batch's negative
        captions with ``hard_negatives``), MLM on the captions of the true pairs, and VQA when the
        batch has ``vqa_targets``. Each needs its head. The auxiliary objectives read the tapped
        passes: the MLM pass, the VQA questions, and the ITM pass when no MLM is trained."""
        pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        out, losses = {}, []
        objectives = self.cfg.objectives
        step = Step(self.objectives, batch, self.training, word_logits=self.mlm_head,
                    draw=lambda rows: torch.rand(rows.shape[0], device=ids.device),
                    fuse=lambda rows, t, m: self(pixels[rows], t, m).features[:, :t.shape[1]])
        mlm = self.mlm_head is not None and "mlm" in objectives
        if self.itm_head is not None and "itm" in objectives:
            index, labels = itm_batch_from_swaps(ids.shape[0], self.cfg.itm_swap_prob, device=ids.device)
            own = index == torch.arange(ids.shape[0], device=index.device)  # rows with their own image
            itm_pixels, itm_ids, itm_mask = pixels[index], ids, mask
            negative_rows = torch.zeros(0, dtype=torch.long, device=ids.device)
            neg_ids = batch.get("neg_input_ids")
            if self.cfg.hard_negatives and neg_ids is not None and neg_ids.shape[0] > 0:
                owner = batch["neg_owner"].to(ids.device)
                itm_pixels = torch.cat([itm_pixels, pixels[owner]])
                itm_ids, itm_mask = pad_cat(ids, mask, neg_ids, batch["neg_attention_mask"],
                                            self.cfg.pad_token_id)
                labels = torch.cat([labels, torch.zeros_like(owner)])
                negative_rows = ids.shape[0] + torch.arange(owner.shape[0], device=ids.device)
            # rows 0..B-1: the captions, with their own image where not swapped; the dataset
            # negatives, each with its own image, from row B on
            caption_rows = torch.where(own, torch.arange(ids.shape[0], device=own.device), -1)
            if step.taps_attention and not mlm:  # the true pairs carry the targets
                targets = step.targets_at("caption", caption_rows, itm_ids.shape[0], itm_ids.shape[1])
                features = self.forward_tapped(itm_pixels, itm_ids, itm_mask, step, targets)
                logits = self.itm_head(self.pooler(features))
            else:
                result = self(itm_pixels, itm_ids, itm_mask)
                features, logits = result.features, self.itm_head(result.pooled)
            step.itm_rows(features[:, :itm_ids.shape[1]], caption_rows, negative_rows)
            out["itm_loss"] = itm_loss(logits, labels)
            out["itm_acc"] = itm_accuracy(logits.detach(), labels)
            losses.append(out["itm_loss"])
        if mlm:
            word_ids = batch.get("word_ids") if self.cfg.whole_word_mask else None
            if self.cfg.whole_word_mask and word_ids is None:
                raise ValueError("whole_word_mask needs batch['word_ids'] "
                                 "(tokenize with return_word_ids=True)")
            masked, labels = mask_tokens(ids, mask, self.cfg.special_token_ids, self.cfg.mask_token_id,
                                         self.cfg.vocab_size, self.cfg.mlm_prob, word_ids=word_ids)
            masked, labels = step.mask_words(ids, mask, masked, labels)
            if step.taps_attention:
                features = self.forward_tapped(pixels, masked, mask, step, step.targets("caption"))
            else:
                features = self(pixels, masked, mask).features
            hit = labels != -100  # the head runs on the masked positions only
            logits = self.mlm_head(features[:, :ids.shape[1]][hit])  # (M, vocab)
            out["mlm_loss"] = mlm_loss(logits, labels[hit])
            out["mlm_acc"] = (logits.detach().argmax(-1) == labels[hit]).float().mean() \
                if bool(hit.any()) else logits.new_zeros(())
            losses.append(out["mlm_loss"])
        if "vqa_targets" in batch and "vqa" in objectives:
            if step.taps_attention and "question_grounding" in batch and self.vqa_head is not None:
                q_ids, q_mask = batch["question_input_ids"], batch["question_attention_mask"]
                features = self.forward_tapped(pixels, q_ids, q_mask, step, step.targets("question"))
                out["vqa_loss"] = vqa_loss(self.vqa_head(self.pooler(features)), batch["vqa_targets"])
            else:
                out["vqa_loss"] = batch_vqa_loss(self, batch, pixels, ids, mask)
            losses.append(out["vqa_loss"])
        losses.extend(step.finish(out))
        if not losses:
            raise ValueError(f"nothing to train: objectives {list(objectives)} need their heads "
                             "(and VQA needs vqa_targets in the batch)")
        out["loss"] = torch.stack(losses).sum()
        return out

