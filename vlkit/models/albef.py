"""ALBEF (Li et al. 2021, "Align before Fuse"): a ViT image encoder and a BERT split in two —
``text_layers`` (self-attention: the text encoder) and ``fusion_layers`` (self-attention, then
cross-attention to the image tokens) — with linear projections into a shared, L2-normalised
embedding space, a 2-way ITM head on the fused [CLS] and an MLM head.

Training (``training_losses``), as the paper's figure:
  1. ITC, aligned *before* fusion: online features against [momentum features of the batch ;
     feature queue], with soft targets from the momentum encoders (momentum distillation).
  2. ITM on the fused [CLS]: each positive pair, one negative image per text and one negative
     text per image, drawn by in-batch similarity (``itm_hard_negatives``; otherwise uniformly)
     from the global batch; with ``hard_negatives`` the dataset's negative captions join as
     negatives of their image.
  3. MLM conditioned on the image, distilled from the momentum model's predictions.
The momentum encoders (EMA, m=0.995) are updated in ``after_step`` — once per optimiser step,
after it, so the next batch's momentum features come from the updated copy — and the momentum
features of each training batch are enqueued at the end of ``training_losses`` (training mode
only). α ramps from 0 over ``alpha_ramp_steps`` optimiser steps, counted in the ``steps_done``
buffer (saved in checkpoints with the queues and momentum weights, so a resume is exact).
Under a process group the ITC columns hold the momentum features of the global batch, the ITM
negatives and MLM masks are drawn for the global batch from a generator seeded by (run seed,
``steps_done``) and sliced to this process's rows, and the ITM and MLM means are taken over the
global batch: W processes train as one process does on the same global batch (without dropout,
whose masks are drawn per process).
Optional: a VQA classifier over an answer vocabulary on the fused [CLS] (``num_answers``) —
a classification head, not the paper's answer decoder; a pair classifier (NLVR2: one
statement, two images; ``pair_classes``, ``pair_logits``) on the two fused [CLS] states. Also optional, for compositional
matching: replaced-word correction (``edit_weight``, ``edit_pass``, ``match_score``), phrase and
relation grounding of the cross-attention (``grounding_weight``, ``relation_weight``,
``relation_mask_prob``, ``geometry_weight``), attention forcing of the grounded heads
(``attention_forcing_steps``) and directional self-attention heads (``directional_heads``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (BertEmbeddings, FeatureQueue, MLMHead, MomentumCopy, PostNormBlock,
                      Transformer, directional_mask, padding_mask, sincos_2d)
from ..losses.distill import alpha_at, itc_queue_loss, itm_hard_negative_index, mlm_distill_loss
from ..losses.matching import itm_accuracy, itm_loss
from ..losses.mlm import (edit_from_pass, edit_loss_and_accuracy, lowest_word_logprob, mask_tokens,
                          minimal_pairs, no_edit_pairs)
from ..losses.grounding import (GroundedPasses, attention_guides, check_grounding_settings, grounding_losses,
                               mask_relation_words, require_grounding, require_relations)
from ..losses.vqa import batch_vqa_loss, vqa_loss
from ..collective import (all_gather_no_grad, all_gather_padded, all_gather_sizes,
                                 all_gather_with_grad, global_generator, global_mean_scale, is_dist,
                                 rank, world_size)
from .base import Output, VLModel, image_spec, load_vision_tower, register
from .clip import PRESETS as CLIP_PRESETS
from .vilt import classifier
from .vit import ViTConfig, VisionTransformer, _init_weights

BERT_IDS = dict(mask_token_id=103, pad_token_id=0, special_token_ids=(0, 100, 101, 102, 103))


@dataclass
class ALBEFConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    dim: int = 768                  # text width (BERT hidden size)
    text_layers: int = 6            # self-attention only: the text encoder
    fusion_layers: int = 6          # self-attention + cross-attention to the image tokens
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"
    eps: float = 1e-12
    dropout: float = 0.0
    vocab_size: int = 30522
    max_text_len: int = 512         # text position embeddings
    type_vocab_size: int = 2
    embed_dim: int = 256            # the shared ITC space
    temp: float = 0.07              # learnable, clamped to [0.001, 0.5]
    queue_size: int = 65536
    momentum: float = 0.995
    num_answers: int = 0            # >0: VQA classifier over answer_names
    answer_names: list[str] = field(default_factory=list)
    # >0: pair classification (NLVR2: one statement, two images): the text is fused with each
    # image in turn and the two fused [CLS] states, concatenated, go to a classifier (the paper
    # instead gives each fusion layer two cross-attentions; this keeps the pretrained weights as
    # they are and adds only the head)
    pair_classes: int = 0
    text_init: str = ""             # "minilm" or a Hugging Face BERT folder (see init_pretrained)
    vision_init: str = ""           # a ViT or CLIP run (or HF folder) whose image tower fits ``vision``
    # "sincos": fixed 2-D position codes added to the image tokens the fusion layers attend to,
    # so cross-attention can tell where an object is even when the image tower's output tokens
    # have lost their input position embeddings (a tower trained to classify need not keep them)
    fusion_pos: str = ""
    # training
    distill: bool = True            # momentum distillation (ITC and MLM soft targets)
    alpha: float = 0.4
    alpha_ramp_steps: int = 1000
    itm_hard_negatives: bool = True  # similarity-sampled in-batch negatives (else uniform)
    hard_negatives: bool = False    # the dataset's negative captions join ITM
    mlm_prob: float = 0.15
    # >0 (with hard_negatives): replaced-word correction. For a caption and the dataset negative
    # that edits it word for word (a swapped colour, a flipped relation), the fusion layers read
    # the image with either text -- the false one half of the time -- and the MLM head predicts
    # the true words at the edited positions: the words a caption states are checked against
    # the image where they stand, which [CLS]-pooled ITM does not learn for swaps and flips.
    edit_weight: float = 0.0
    # where replaced-word correction reads the pairs: "separate" (a fusion pass of its own over
    # each caption's first minimal-pair negative, shown false or true at random) or "itm" (the
    # ITM pass's fused states, which already hold every dataset negative with its image and every
    # caption with its image: each minimal pair is read both ways, at no extra fusion cost)
    edit_pass: str = "separate"
    # how ``score`` rates a pair: "itm" (the ITM head's match probability) or "itm+edit" (that,
    # times the MLM head's probability of the least likely word of the caption as it stands,
    # read from the same fused forward pass: a word the image contradicts lowers the score)
    match_score: str = "itm"
    # phrase grounding (vlkit.losses.grounding): the cross-attention of words that name an object
    # (boxes in the data) is pulled onto its patches, in the MLM pass and the VQA questions
    grounding_weight: float = 0.0
    grounding_layer: int = 0        # the fusion layer whose cross-attention is supervised
    grounding_heads: int = 1        # its first heads are supervised, the others stay free
    # relation phrases ("left of"): in fusion layer relation_layer, one cross-attention head looks
    # from the relation words at the first object, the next at the second (grounding entries
    # with a role): the two after the grounding heads in grounding_layer, else heads 0 and 1
    relation_weight: float = 0.0
    relation_layer: int = 0
    # the share of captions whose relation words (grounding entries with a role) are all masked
    # in the MLM pass, on top of mlm_prob: more practice at reading a relation off the image
    relation_mask_prob: float = 0.0
    # a linear head on the relation words' output states regresses the subject's centre minus the
    # object's (from the relation targets' patches), in every grounded pass (needs relation_weight)
    geometry_weight: float = 0.0
    # >0: attention forcing, a curriculum for the supervised heads (grounding and relation): in
    # the grounded passes they read the image through their targets, mixed with their own
    # attention at a share falling linearly from 1 to 0 over this many optimiser steps
    attention_forcing_steps: int = 0
    # self-attention head 0 of every text and fusion layer sees only the tokens at or before its
    # query, head 1 only those at or after it: what precedes a relation word (its subject) and
    # what follows it (its object) are told apart by the mask instead of learned positions
    directional_heads: bool = False
    whole_word_mask: bool = False   # needs batch["word_ids"]
    mask_token_id: int = 4          # vlkit's WordPiece ids ([PAD]=0 ... [MASK]=4)
    pad_token_id: int = 0
    special_token_ids: tuple[int, ...] = (0, 1, 2, 3, 4)


def _vit(**kw) -> ViTConfig:
    base = dict(eps=1e-6, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    return ViTConfig(**{**base, **kw})


PRESETS = {
    # The synthetic world at 64 px: CLIP tiny's image tower (conv stem, 16 px tokens). A run of a
    # few hundred steps needs momentum encoders that keep up: with m = 0.995 (a time constant of
    # 200 steps) they, and so the queue and the distillation targets, stayed near their random
    # start, and ITC did not learn in 15 CPU minutes; m = 0.95 and a 1024-feature queue did.
    "tiny": dict(vision=dataclasses.replace(CLIP_PRESETS["tiny"]["vision"]), dim=192, text_layers=2,
                 fusion_layers=2, heads=3, mlp_dim=768, eps=1e-6, vocab_size=2000, max_text_len=40,
                 embed_dim=128, queue_size=1024, momentum=0.95, alpha_ramp_steps=200),
    "small": dict(vision=_vit(image_size=224, dim=384, depth=12, heads=6, mlp_dim=1536), dim=384,
                  text_layers=4, fusion_layers=4, heads=6, mlp_dim=1536, queue_size=16384, dropout=0.1,
                  **BERT_IDS),
    # ViT-B/16 at 256 px + BERT-base split 6 + 6; α ramps over one epoch of 4M pairs at batch 512.
    "base": dict(vision=_vit(image_size=256, dim=768, depth=12, heads=12, mlp_dim=3072), dim=768,
                 text_layers=6, fusion_layers=6, heads=12, mlp_dim=3072, queue_size=65536, dropout=0.1,
                 alpha_ramp_steps=7800, **BERT_IDS),
    # The synthetic-world image tower with all-MiniLM-L6-v2's six layers as 3 text + 3 fusion
    # layers (the BERT-uncased vocabulary; cross-attention starts fresh).
    "minilm": dict(vision=dataclasses.replace(CLIP_PRESETS["tiny"]["vision"]), dim=384, text_layers=3,
                   fusion_layers=3, heads=12, mlp_dim=1536, embed_dim=128, queue_size=1024, momentum=0.95,
                   alpha_ramp_steps=200, text_init="minilm", **BERT_IDS),
}


def _vqa_only(fn):
    """A method that exists only with a VQA head, so ``hasattr(model, "answer")`` tells the
    pipeline and the evaluation whether this model answers questions."""
    def get(self):
        if self.vqa_head is None:
            raise AttributeError(f"this ALBEF has no VQA head (num_answers=0) for {fn.__name__}")
        return fn.__get__(self)
    return property(get, doc=fn.__doc__)


@register("albef")
class ALBEF(VLModel):
    config_class = ALBEFConfig
    presets = PRESETS
    task = "fusion"
    # may be missing from an --init source (added for --vqa, or for geometry_weight)
    optional_heads = ("vqa_head", "geometry_head", "pair_head")
    has_queues = True  # the trainer skips BatchNorm recalibration (training_losses fills queues)

    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        if cfg.answer_names and len(cfg.answer_names) != cfg.num_answers:
            raise ValueError(f"{len(cfg.answer_names)} answer_names for num_answers={cfg.num_answers}")
        if cfg.fusion_pos not in ("", "sincos"):
            raise ValueError(f"fusion_pos must be '' or 'sincos', got {cfg.fusion_pos!r}")
        if cfg.edit_weight < 0 or (cfg.edit_weight > 0 and not cfg.hard_negatives):
            raise ValueError(f"edit_weight={cfg.edit_weight}: needs to be >= 0, and > 0 needs "
                             "hard_negatives (--hard-negatives: the dataset's negative captions)")
        if cfg.edit_pass not in ("separate", "itm"):
            raise ValueError(f"edit_pass must be 'separate' or 'itm', got {cfg.edit_pass!r}")
        if cfg.match_score not in ("itm", "itm+edit"):
            raise ValueError(f"match_score must be 'itm' or 'itm+edit', got {cfg.match_score!r}")
        check_grounding_settings(cfg, cfg.fusion_layers, "fusion stack")
        if cfg.directional_heads and cfg.heads < 2:
            raise ValueError(f"directional_heads needs at least 2 attention heads, got heads={cfg.heads}")
        if cfg.grounding_weight > 0 and cfg.vision.patch_dropout:
            raise ValueError("grounding needs every patch token (set vision.patch_dropout=0)")
        if cfg.fusion_pos and cfg.vision.patch_dropout:
            raise ValueError("fusion_pos needs every patch token (set vision.patch_dropout=0)")
        self.cfg = cfg
        d, e = cfg.dim, cfg.embed_dim
        self.vision = VisionTransformer(cfg.vision)
        self.text_embed = BertEmbeddings(cfg.vocab_size, d, cfg.max_text_len, cfg.type_vocab_size,
                                         cfg.eps, cfg.dropout, cfg.pad_token_id)

        def block(context_dim=None):
            return PostNormBlock(d, cfg.heads, cfg.mlp_dim, context_dim=context_dim, act=cfg.act,
                                 eps=cfg.eps, drop=cfg.dropout, attn_drop=cfg.dropout)
        self.text_layers = Transformer([block() for _ in range(cfg.text_layers)])
        self.fusion_layers = Transformer([block(cfg.vision.dim) for _ in range(cfg.fusion_layers)])
        self.image_proj = nn.Linear(cfg.vision.dim, e)
        self.text_proj = nn.Linear(d, e)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        self.itm_head = nn.Linear(d, 2)
        self.mlm_head = MLMHead(d, cfg.vocab_size, cfg.eps, cfg.act)
        self.geometry_head = nn.Linear(d, 2) if cfg.geometry_weight > 0 else None
        self.vqa_head = classifier(d, 2 * d, cfg.num_answers) if cfg.num_answers else None
        if cfg.pair_classes < 0:
            raise ValueError(f"pair_classes must be >= 0, got {cfg.pair_classes}")
        self.pair_head = classifier(2 * d, 2 * d, cfg.pair_classes) if cfg.pair_classes else None
        self.apply(_init_weights)
        for emb in (self.text_embed.word, self.text_embed.position, self.text_embed.token_type):
            nn.init.normal_(emb.weight, std=0.02)
        # momentum encoders (everything ITC and MLM distillation read) and the feature queues
        self.momentum = MomentumCopy({name: getattr(self, name) for name in (
            "vision", "image_proj", "text_embed", "text_layers", "text_proj", "fusion_layers",
            "mlm_head")}, cfg.momentum)
        self.queue = FeatureQueue(cfg.queue_size, image=e, text=e)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._calls: dict[bool, tuple[int, int]] = {}  # mode -> (step, calls at that step)
        self._pos_cache: tuple | None = None  # ((grid side, width, device, dtype), fusion_pos codes)

    def image_spec(self) -> dict:
        return image_spec(self.cfg.vision)

    def init_pretrained(self) -> None:
        """Load ``cfg.text_init`` (a BERT) into the text + fusion stack and ``cfg.vision_init``
        (the image tower of a ViT or CLIP run) into the image encoder; momentum copies follow."""
        if self.cfg.text_init:
            from ..convert.hf_bert import load_bert_text
            load_bert_text(self, self.cfg.text_init)
        if self.cfg.vision_init:
            load_vision_tower(self.vision, self.cfg.vision_init)
        if self.cfg.text_init or self.cfg.vision_init:
            self.momentum.reset()

    def _part(self, name: str, momentum: bool) -> nn.Module:
        return self.momentum[name] if momentum else self.momentum.online[name]

    # -- the two unimodal encoders, then fusion ---------------------------------------------------
    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision.forward_features(pixel_values)  # (B, 1+N, Dv)

    def _image(self, pixel_values, momentum: bool = False):
        """(image tokens (B, 1+N, Dv), normalised embedding (B, E))."""
        vision = self._part("vision", momentum)
        tokens = vision.forward_features(pixel_values)
        return tokens, F.normalize(self._part("image_proj", momentum)(vision.pool(tokens)), dim=-1)

    def _text(self, input_ids, attention_mask, momentum: bool = False):
        """(text hidden states (B, L, D), normalised [CLS] embedding (B, E))."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self._part("text_embed", momentum)(input_ids)  # (B, L, D)
        x = self._part("text_layers", momentum)(x, mask=self._self_mask(attention_mask))
        return x, F.normalize(self._part("text_proj", momentum)(x[:, 0]), dim=-1)

    def fuse(self, text_hidden, attention_mask, image_tokens, momentum: bool = False,
             return_attention: bool = False):
        """Fusion layers over the text hidden states (B, L, D), cross-attending to the image
        tokens (B, 1+N, Dv): (B, L, D) (and the per-layer maps with ``return_attention``)."""
        if attention_mask is None:
            attention_mask = torch.ones(text_hidden.shape[:2], dtype=torch.long, device=text_hidden.device)
        if self.cfg.fusion_pos:
            image_tokens = image_tokens + self._fusion_pos(image_tokens)
        return self._part("fusion_layers", momentum)(
            text_hidden, mask=self._self_mask(attention_mask), context=image_tokens,
            return_attention=return_attention)

    @property
    def grounding_grid(self) -> tuple[int, int] | None:
        """The patch grid grounding targets are made for, when this model trains grounding."""
        return tuple(self.vision.embed.grid) if self.cfg.grounding_weight > 0 else None

    def _fuse_grounded(self, text_hidden, attention_mask, image_tokens, targets, roles=None):
        """(fused (B, L, D), grounding (loss, attention mass), relation (loss, mass) or None):
        the fusion layers, with the cross-attention of ``cfg.grounding_layer`` over the patches
        (after the image [CLS]) held against ``targets`` (B, L, patches), and with relation
        targets ``roles`` (B, 2, L, patches) that of the relation heads of ``cfg.relation_layer``
        (``losses.grounding.relation_heads``) against the subjects and the objects."""
        if targets.shape[:2] != attention_mask.shape:
            raise ValueError(f"grounding targets {tuple(targets.shape)} do not fit the text "
                             f"{tuple(attention_mask.shape)}")
        if targets.shape[2] != image_tokens.shape[1] - 1:
            raise ValueError(f"grounding targets cover {targets.shape[2]} patches, the image has "
                             f"{image_tokens.shape[1] - 1}")
        if self.cfg.fusion_pos:
            image_tokens = image_tokens + self._fusion_pos(image_tokens)
        cfg = self.cfg
        layers = [cfg.grounding_layer] + ([cfg.relation_layer] if roles is not None else [])
        fused, maps = self.fusion_layers.forward_with_maps_of(
            text_hidden, layers, mask=self._self_mask(attention_mask), context=image_tokens,
            guides=self._attention_guides(targets.to(image_tokens.device),
                                          None if roles is None else roles.to(image_tokens.device)))
        named, related = grounding_losses(
            cfg, lambda layer, heads: maps[layer]["cross"][:, heads, :, 1:], targets.to(fused.device),
            None if roles is None else roles.to(fused.device))
        return fused, named, related

    def _self_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text self-attention mask: padding, and with ``directional_heads`` one head that
        looks back and one that looks ahead (``layers.directional_mask``)."""
        if self.cfg.directional_heads:
            return directional_mask(attention_mask, self.cfg.heads)
        return padding_mask(attention_mask)

    def _attention_guides(self, targets, roles) -> dict | None:
        """Attention forcing in training (``attention_forcing_steps``; ``losses.grounding.
        attention_guides``): targets over the patches, none on the image [CLS]."""
        if not self.training:
            return None
        return attention_guides(self.cfg, int(self.steps_done), targets, roles,
                                lambda t: ("cross", F.pad(t.to(self.text_proj.weight.dtype), (1, 0))))

    def _fusion_pos(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """The (1+N, Dv) position codes of a square grid of N patch tokens after [CLS]."""
        n = image_tokens.shape[1] - 1
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"fusion_pos: {n} image tokens after [CLS] do not form a square grid")
        key = (side, image_tokens.shape[-1], image_tokens.device, image_tokens.dtype)
        if self._pos_cache is None or self._pos_cache[0] != key:
            self._pos_cache = (key, sincos_2d((side, side), image_tokens.shape[-1],
                                              device=image_tokens.device, dtype=image_tokens.dtype))
        return self._pos_cache[1]

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._image(pixel_values)[1]  # (B, E)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._text(input_ids, attention_mask)[1]  # (B, E)

    def text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self._text(input_ids, attention_mask)[0]  # (B, L, D)

    def forward(self, pixel_values, input_ids, attention_mask=None) -> Output:
        """features: fused text tokens (B, L, D); pooled: fused [CLS]; logits: ITM (B, 2)."""
        tokens, img = self._image(pixel_values)
        hidden, txt = self._text(input_ids, attention_mask)
        fused = self.fuse(hidden, attention_mask, tokens)
        return Output(features=fused, pooled=fused[:, 0], logits=self.itm_head(fused[:, 0]),
                      image_embeds=img, text_embeds=txt)

    def match_tokens(self, image_tokens, text_hidden, attention_mask=None) -> torch.Tensor:
        """ITM logits (B, 2) of zipped pairs from precomputed encoder outputs (re-ranking)."""
        return self.itm_head(self.fuse(text_hidden, attention_mask, image_tokens)[:, 0])

    def match(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, 2) ITM logits of zipped (image, text) pairs; column 1 = match."""
        return self(pixel_values, input_ids, attention_mask).logits

    def score(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B,) probability that each zipped pair matches: the ITM head's, times the least
        likely word's MLM probability with ``match_score="itm+edit"``."""
        out = self(pixel_values, input_ids, attention_mask)
        p = out.logits.float().softmax(-1)[:, 1]
        if self.cfg.match_score == "itm+edit":
            p = p * self.word_check(out.features, input_ids, attention_mask).exp()
        return p

    def word_check(self, fused, input_ids, attention_mask=None) -> torch.Tensor:
        """(B,) the lowest log-probability the MLM head gives a word of the text where it
        stands (no [MASK]), over the non-special tokens, from fused text states (B, L, D)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return lowest_word_logprob(self.mlm_head(fused), input_ids, attention_mask, self.cfg.special_token_ids)

    def mlm_logits(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, L, vocab) predictions for every text position, conditioned on the image."""
        return self.mlm_head(self(pixel_values, input_ids, attention_mask).features)

    def cross_attention_maps(self, pixel_values, input_ids, attention_mask=None,
                             layer: int | None = None) -> torch.Tensor:
        """(B, L, N): each text token's cross-attention over the N image patches, averaged over
        heads, from fusion layer ``layer`` (negative counts from the end) or the mean of all layers'
        maps. The plain attention path computes the maps; the share of the image [CLS] is dropped
        and each row renormalised to sum 1 over the patches."""
        n_layers = len(self.fusion_layers.blocks)
        if n_layers == 0:
            raise ValueError("this ALBEF has no fusion layers, so no cross-attention maps")
        if layer is not None and not -n_layers <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range: this ALBEF has {n_layers} fusion layers")
        tokens = self.forward_features(pixel_values)
        _, maps = self.fuse(self.text_features(input_ids, attention_mask), attention_mask, tokens,
                            return_attention=True)
        cross = torch.stack([m["cross"] for m in maps])  # (layers, B, heads, L, 1+N)
        if layer is not None:
            cross = cross[layer][None]
        attn = cross.float().mean(dim=2)[..., 1:]  # (layers, B, L, N)
        return (attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)).mean(0)  # (B, L, N)

    @_vqa_only
    def vqa_logits(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, num_answers) answer logits from the fused [CLS] (soft-score BCE)."""
        return self.vqa_head(self(pixel_values, input_ids, attention_mask).pooled)

    @_vqa_only
    def answer(self, pixel_values, input_ids, attention_mask=None) -> list[str]:
        best = self.vqa_logits(pixel_values, input_ids, attention_mask).argmax(-1).tolist()
        names = self.cfg.answer_names or [str(i) for i in range(self.cfg.num_answers)]
        return [names[i] for i in best]

    def pair_logits(self, pixel_values_1, pixel_values_2, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, pair_classes): does the statement hold of the two images? The text is encoded
        once and fused with each image; the two fused [CLS] states, concatenated (first image
        first), go to the pair classifier."""
        if self.pair_head is None:
            raise AttributeError("this ALBEF has no pair head (pair_classes=0)")
        hidden = self._text(input_ids, attention_mask)[0]
        pooled = [self.fuse(hidden, attention_mask, self._image(p)[0])[:, 0]
                  for p in (pixel_values_1, pixel_values_2)]
        return self.pair_head(torch.cat(pooled, dim=-1))

    # -- training ---------------------------------------------------------------------------------
    def alpha(self) -> float:
        """The distillation weight now: 0 without distillation, else ramped by steps_done."""
        if not self.cfg.distill:
            return 0.0
        return alpha_at(int(self.steps_done), self.cfg.alpha, self.cfg.alpha_ramp_steps)

    def _generator(self, device) -> torch.Generator:
        """The generator of one ``training_losses`` call (ITM negatives, MLM masks), seeded alike
        on every process from the run seed, ``steps_done`` and the number of calls so far at this
        step (the micro-batches of an accumulated step; evaluation calls count apart). Its draws
        are made for the whole global batch, so they do not depend on the number of processes,
        and a resumed run repeats them."""
        step = int(self.steps_done)
        last, n = self._calls.get(self.training, (step, -1))
        n = n + 1 if last == step else 0
        self._calls[self.training] = (step, n)
        return global_generator(step, 2 * n + (0 if self.training else 1), device)

    def training_losses(self, batch: dict) -> dict:
        """ITC (queues + distillation), ITM (hard negatives), MLM (distilled) and, when the batch
        has ``vqa_targets``, VQA. Keys: pixel_values, input_ids, attention_mask; optional word_ids,
        image_ids (captions of one image are positives of each other), neg_input_ids /
        neg_attention_mask / neg_owner, question_input_ids / question_attention_mask / vqa_targets."""
        cfg = self.cfg
        pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        image_ids = batch.get("image_ids")
        alpha, temp = self.alpha(), self.temp.clamp(0.001, 0.5)
        generator = self._generator(ids.device)
        image_tokens, image_feat = self._image(pixels)  # (B, 1+N, Dv), (B, E)
        text_hidden, text_feat = self._text(ids, mask)  # (B, L, D), (B, E)
        with torch.no_grad():
            image_tokens_m, image_feat_m = self._image(pixels, momentum=True)
            text_feat_m = self._text(ids, mask, momentum=True)[1]
        # every process's batch: ITC columns, ITM negatives, and the rows random draws are made for
        g = _gather_global(image_tokens, text_hidden, mask, image_feat, text_feat, image_ids)
        rows = slice(g["row_start"], g["row_start"] + ids.shape[0])
        out = {"itc_loss": itc_queue_loss(
            image_feat, text_feat, all_gather_no_grad(image_feat_m, g["sizes"]),
            all_gather_no_grad(text_feat_m, g["sizes"]), self.queue.image, self.queue.text, temp,
            alpha, cfg.distill, g["ids"], self.queue.ids if image_ids is not None else None,
            row_start=g["row_start"])}

        logits, labels, itm_fused = self._itm(batch, g, image_tokens, temp, generator)
        scale = global_mean_scale(labels.shape[0], mask.device)  # the mean over all processes' pairs
        out["itm_loss"] = itm_loss(logits, labels) * scale
        out["itm_acc"] = itm_accuracy(logits.detach(), labels)

        word_ids = batch.get("word_ids") if cfg.whole_word_mask else None
        if cfg.whole_word_mask and word_ids is None:
            raise ValueError("whole_word_mask needs batch['word_ids'] (tokenize with return_word_ids=True)")
        # masks drawn for the global batch (padded to its longest text), then this process's rows
        length = g["length"]
        masked, mlm_labels = mask_tokens(
            all_gather_padded(ids, length, cfg.pad_token_id, g["sizes"]),
            all_gather_padded(mask, length, 0, g["sizes"]), cfg.special_token_ids, cfg.mask_token_id,
            cfg.vocab_size, cfg.mlm_prob, generator=generator,
            word_ids=None if word_ids is None else all_gather_padded(word_ids, length, -1, g["sizes"]))
        masked, mlm_labels = masked[rows, :ids.shape[1]], mlm_labels[rows, :ids.shape[1]]
        if cfg.relation_mask_prob > 0:
            masked, mlm_labels = self._mask_relations(batch, ids, masked, mlm_labels, generator, g)
        hit = mlm_labels != -100  # the head runs on the masked positions only
        grounded = GroundedPasses(cfg, self.geometry_head, tuple(self.vision.embed.grid))
        relations = cfg.relation_weight > 0

        def fuse_grounded(hidden, m, targets, roles):
            fused, named, rel = self._fuse_grounded(hidden, m, image_tokens, targets, roles)
            grounded.add(fused, named, rel, roles)
            return fused

        if cfg.grounding_weight > 0:
            fused = fuse_grounded(self._text(masked, mask)[0], mask, require_grounding(batch),
                                  require_relations(batch) if relations else None)
        else:
            fused = self.fuse(self._text(masked, mask)[0], mask, image_tokens)
        mlm_logits = self.mlm_head(fused[hit])
        mlm_logits_m = None
        if alpha > 0:
            with torch.no_grad():
                hidden_m = self._text(masked, mask, momentum=True)[0]
                fused_m = self.fuse(hidden_m, mask, image_tokens_m, momentum=True)
                mlm_logits_m = self._part("mlm_head", True)(fused_m[hit])
        scale = global_mean_scale(int(hit.sum()), mask.device)  # all masked tokens
        out["mlm_loss"] = mlm_distill_loss(mlm_logits, mlm_labels[hit], mlm_logits_m, alpha) * scale

        losses = [out["itc_loss"], out["itm_loss"], out["mlm_loss"]]
        if cfg.edit_weight > 0:
            # "itm": the ITM pass holds the B captions with their images in its first rows and
            # the dataset negatives with theirs from row 3B on (``_itm``)
            out.update(self._edit_loss(batch, image_tokens, generator, g) if cfg.edit_pass == "separate"
                       else edit_from_pass(self.mlm_head, itm_fused, batch, 3 * ids.shape[0]))
            losses.append(cfg.edit_weight * out["edit_loss"])
        if "vqa_targets" in batch:
            if grounded and "question_grounding" in batch and self.vqa_head is not None:
                q_ids, q_mask = batch["question_input_ids"], batch["question_attention_mask"]
                fused = fuse_grounded(self._text(q_ids, q_mask)[0], q_mask, batch["question_grounding"],
                                      require_relations(batch, "question_grounding_roles")
                                      if relations else None)
                out["vqa_loss"] = vqa_loss(self.vqa_head(fused[:, 0]), batch["vqa_targets"])
            else:
                out["vqa_loss"] = batch_vqa_loss(self, batch, pixels, ids, mask)
            losses.append(out["vqa_loss"])
        losses.extend(grounded.losses(out))
        if self.training:
            self.queue.enqueue(ids=image_ids, image=image_feat_m, text=text_feat_m)
        out["loss"] = torch.stack([l.float() for l in losses]).sum()
        out["alpha"] = torch.tensor(alpha)
        return out

    def _itm(self, batch, g, image_tokens, temp, generator):
        """ITM logits, labels and the fused states they come from: B positives, B (text,
        negative image), B (image, negative text), then (image, dataset negative caption) pairs
        with ``hard_negatives``. The negatives are drawn for every row of the global batch ``g``
        (``_gather_global``), then this process's rows are kept."""
        b, mask = image_tokens.shape[0], g["local_mask"]
        with torch.no_grad():
            img, txt = g["image_feat"], g["text_feat"]  # (N, E)
            neg_text, neg_image = (i[g["row_start"]:g["row_start"] + b] for i in itm_hard_negative_index(
                img @ txt.T / temp, txt @ img.T / temp, 0, g["ids"], g["ids"],
                hard=self.cfg.itm_hard_negatives, generator=generator))
        text_p, mask_p = g["local_text"], g["local_mask"]  # padded to the global length
        images = torch.cat([image_tokens, g["image_tokens"][neg_image], image_tokens])
        texts = torch.cat([text_p, text_p, g["text_hidden"][neg_text]])
        masks = torch.cat([mask_p, mask_p, g["mask"][neg_text]])
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(mask.device)
        neg_ids = batch.get("neg_input_ids")
        if self.cfg.hard_negatives and neg_ids is not None and neg_ids.shape[0] > 0:
            owner = batch["neg_owner"].to(mask.device)
            neg_hidden = self._text(neg_ids, batch["neg_attention_mask"])[0]
            texts, masks = _pad_cat(texts, masks, neg_hidden, batch["neg_attention_mask"])
            images = torch.cat([images, image_tokens[owner]])
            labels = torch.cat([labels, torch.zeros_like(owner)])
        fused = self.fuse(texts, masks, images)
        return self.itm_head(fused[:, 0]), labels, fused

    def _mask_relations(self, batch, ids, masked, labels, generator, g):
        """``relation_mask_prob``: in that share of the captions (one draw per row of the global
        batch), every relation word (a token with a role in ``grounding_roles``) is replaced by
        [MASK] and becomes an MLM target."""
        draw = torch.rand(sum(g["sizes"]), generator=generator, device=ids.device)
        pick = draw[g["row_start"]:g["row_start"] + ids.shape[0]] < self.cfg.relation_mask_prob
        return mask_relation_words(require_relations(batch), ids, batch["attention_mask"], masked, labels,
                                   pick, self.cfg.mask_token_id)

    def _edit_loss(self, batch, image_tokens, generator, g) -> dict:
        """Replaced-word correction (``edit_weight``): for each minimal pair of the batch (a
        caption and its first negative, differing in 1-3 tokens), the fusion layers read the
        image with the negative (the edited words visible, no [MASK]) or, with probability 1/2,
        with the caption itself; the MLM head predicts the caption's tokens at the edited
        positions. Reported: the loss, and the accuracy of correcting a false word and of
        keeping a true one (NaN in a batch without such words)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        neg_ids = batch.get("neg_input_ids")
        if neg_ids is None or neg_ids.shape[0] == 0:
            return no_edit_pairs(image_tokens)
        pairs = minimal_pairs(ids, mask, neg_ids, batch["neg_attention_mask"], batch["neg_owner"])
        edited = pairs.edited
        # one draw per row of the global batch, so the choice does not depend on the process count
        show_false = torch.rand(sum(g["sizes"]), generator=generator, device=ids.device)
        show_false = (show_false[g["row_start"]:g["row_start"] + ids.shape[0]] < 0.5)[pairs.rows]
        if pairs.rows.numel() == 0:
            return no_edit_pairs(image_tokens)
        shown = torch.where(show_false[:, None], pairs.neg_ids, pairs.ids)
        fused = self.fuse(self._text(shown, pairs.mask)[0], pairs.mask, image_tokens[pairs.rows])
        logits = self.mlm_head(fused[edited])  # (M, vocab)
        return edit_loss_and_accuracy(logits, pairs.ids[edited], show_false[:, None].expand_as(edited)[edited])

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After each optimiser step: EMA update of the momentum encoders, temperature clamp, and
        the step count behind the α ramp."""
        self.momentum.update()
        self.temp.clamp_(0.001, 0.5)
        self.steps_done += 1


def _gather_global(image_tokens, text_hidden, mask, image_feat, text_feat, ids) -> dict:
    """The global batch for ITM negatives: every process's image tokens and text hidden states
    (with gradient; texts padded to the longest length of all processes), masks, features and ids.
    Without a process group this is the local batch."""
    out = dict(image_tokens=image_tokens, text_hidden=text_hidden, mask=mask, image_feat=image_feat,
               text_feat=text_feat, ids=ids, row_start=0, local_text=text_hidden, local_mask=mask,
               sizes=[image_tokens.shape[0]], length=text_hidden.shape[1])
    if not (is_dist() and world_size() > 1):
        return out
    sizes = all_gather_sizes([image_tokens.shape[0], text_hidden.shape[1]], mask.device)
    b_sizes, length = [s[0] for s in sizes], max(s[1] for s in sizes)
    pad = length - text_hidden.shape[1]
    local_text, local_mask = F.pad(text_hidden, (0, 0, 0, pad)), F.pad(mask, (0, pad))
    out.update(local_text=local_text, local_mask=local_mask, row_start=sum(b_sizes[:rank()]),
               sizes=b_sizes, length=length,
               image_tokens=all_gather_with_grad(image_tokens, b_sizes),
               text_hidden=all_gather_with_grad(local_text, b_sizes),
               mask=all_gather_no_grad(local_mask, b_sizes),
               image_feat=all_gather_no_grad(image_feat, b_sizes),
               text_feat=all_gather_no_grad(text_feat, b_sizes),
               ids=None if ids is None else all_gather_no_grad(ids, b_sizes))
    return out


def _pad_cat(hidden_a, mask_a, hidden_b, mask_b):
    """Stack two (N, L, D) hidden-state batches and their masks, padded to a common length."""
    n = max(hidden_a.shape[1], hidden_b.shape[1])
    hidden = torch.cat([F.pad(hidden_a, (0, 0, 0, n - hidden_a.shape[1])),
                        F.pad(hidden_b, (0, 0, 0, n - hidden_b.shape[1]))])
    masks = torch.cat([F.pad(mask_a, (0, n - mask_a.shape[1])),
                       F.pad(mask_b.to(mask_a.device), (0, n - mask_b.shape[1]))])
    return hidden, masks
