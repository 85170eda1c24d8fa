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
statement, two images; ``pair_classes``, ``pair_logits``) on the two fused [CLS] states.
Auxiliary objectives (``vlkit.objectives``: phrase and relation grounding, replaced-word
correction, attention forcing) read the fusion cross-attention and the fused states through the
taps of ``training_losses``. Architecture variants: ``fusion_pos``, ``directional_heads``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (BertEmbeddings, FeatureQueue, MLMHead, MomentumCopy, PostNormBlock,
                      Transformer, check_directional_heads, classifier, directional_mask, init_weights, padding_mask,
                      patch_attention, sincos_square)
from ..losses.distill import alpha_at, itc_queue_loss, itm_hard_negative_index, mlm_distill_loss
from ..losses.matching import gather_itm_batch, itm_accuracy, itm_loss, pad_cat
from ..losses.mlm import mask_tokens
from ..losses.vqa import batch_vqa_loss, vqa_loss
from ..collective import all_gather_no_grad, all_gather_padded, call_generator, global_mean_scale
from ..objectives import FusionSpec, ObjectiveOptions, Step, build_objectives, match_log_score
from ..objectives.taps import tapped_cross_attention
from .base import Output, VLModel, answer_names, image_spec, register, requires_head
from .clip import PRESETS as CLIP_PRESETS
from .vit import ViTConfig, VisionTransformer

BERT_IDS = dict(mask_token_id=103, pad_token_id=0, special_token_ids=(0, 100, 101, 102, 103))


@dataclass
class ALBEFConfig(ObjectiveOptions):
    """The objectives' options (``grounding_weight`` ...) come from ``ObjectiveOptions``."""
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
    # architecture variant: in every text and fusion layer, self-attention head
    # directional_head_index (negative: from the end) sees only the tokens at or before its
    # query, the next head only those at or after it (``layers.directional_mask``)
    directional_heads: bool = False
    directional_head_index: int = -2
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


@register("albef")
class ALBEF(VLModel):
    config_class = ALBEFConfig
    presets = PRESETS
    task = "fusion"
    # may be missing from an --init source (added for --vqa, or by an objective)
    optional_heads = ("vqa_head", "pair_head", "relation_grounding", "attention_forcing")
    has_queues = True  # the trainer skips BatchNorm recalibration (training_losses fills queues)

    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        if cfg.answer_names and len(cfg.answer_names) != cfg.num_answers:
            raise ValueError(f"{len(cfg.answer_names)} answer_names for num_answers={cfg.num_answers}")
        if cfg.fusion_pos not in ("", "sincos"):
            raise ValueError(f"fusion_pos must be '' or 'sincos', got {cfg.fusion_pos!r}")
        if cfg.directional_heads:
            check_directional_heads(cfg.heads, cfg.directional_head_index)
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
        spec = FusionSpec("fusion stack", cfg.fusion_layers, cfg.heads, d, tuple(self.vision.embed.grid),
                          all_patches="set vision.patch_dropout=0" if cfg.vision.patch_dropout else "",
                          hard_negatives=cfg.hard_negatives)
        self.objectives = build_objectives(cfg, spec)  # each registered under its name: weights in the run
        for objective in self.objectives:
            self.add_module(objective.name, objective)
        self.vqa_head = classifier(d, 2 * d, cfg.num_answers) if cfg.num_answers else None
        if cfg.pair_classes < 0:
            raise ValueError(f"pair_classes must be >= 0, got {cfg.pair_classes}")
        self.pair_head = classifier(2 * d, 2 * d, cfg.pair_classes) if cfg.pair_classes else None
        self.apply(init_weights)
        for emb in (self.text_embed.word, self.text_embed.position, self.text_embed.token_type):
            nn.init.normal_(emb.weight, std=0.02)
        # momentum encoders (everything ITC and MLM distillation read) and the feature queues
        self.momentum = MomentumCopy({name: getattr(self, name) for name in (
            "vision", "image_proj", "text_embed", "text_layers", "text_proj", "fusion_layers",
            "mlm_head")}, cfg.momentum)
        self.queue = FeatureQueue(cfg.queue_size, image=e, text=e)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._calls: dict[bool, tuple[int, int]] = {}  # mode -> (step, calls at that step)

    def image_spec(self) -> dict:
        return image_spec(self.cfg.vision)

    @classmethod
    def upgrade_config(cls, data: dict) -> dict:
        """Runs saved before ``directional_head_index`` used heads 0 and 1."""
        if data.get("directional_heads") and "directional_head_index" not in data:
            data["directional_head_index"] = 0
        return data

    def pretrained_loaded(self) -> None:
        """After ``vlkit.factory.init_pretrained`` (``text_init``, ``vision_init``): the momentum
        copies start from the loaded weights."""
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
            image_tokens = image_tokens + sincos_square(image_tokens)
        return self._part("fusion_layers", momentum)(
            text_hidden, mask=self._self_mask(attention_mask), context=image_tokens,
            return_attention=return_attention)

    @property
    def grounding_grid(self) -> tuple[int, int] | None:
        """The patch grid grounding targets are made for, when this model trains grounding."""
        return tuple(self.vision.embed.grid) if self.cfg.grounding_weight > 0 else None

    def fuse_tapped(self, text_hidden, attention_mask, image_tokens, step: Step, targets: dict):
        """The fusion layers as ``fuse``, tapped for the objectives
        (``vlkit.objectives.taps.tapped_cross_attention``)."""
        if self.cfg.fusion_pos:
            image_tokens = image_tokens + sincos_square(image_tokens)
        return tapped_cross_attention(self.fusion_layers, step, text_hidden, attention_mask,
                                      self._self_mask(attention_mask), image_tokens, targets)

    def _self_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text self-attention mask: padding, and with ``directional_heads`` one head that
        looks back and one that looks ahead (``layers.directional_mask``)."""
        if self.cfg.directional_heads:
            return directional_mask(attention_mask, self.cfg.heads, self.cfg.directional_head_index)
        return padding_mask(attention_mask)

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
        """(B,) log-probability that each zipped pair matches (``VLModel`` documents ``score``):
        the ITM head's, adjusted by the objectives (``match_score="itm+edit"``)."""
        out = self(pixel_values, input_ids, attention_mask)
        return match_log_score(self.objectives, out.logits, lambda: self.mlm_head(out.features), input_ids,
                               attention_mask)

    def mlm_logits(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, L, vocab) predictions for every text position, conditioned on the image."""
        return self.mlm_head(self(pixel_values, input_ids, attention_mask).features)

    def cross_attention_maps(self, pixel_values, input_ids, attention_mask=None,
                             layer: int | None = None) -> torch.Tensor:
        """(B, L, N): each text token's cross-attention over the N image patches in the fusion
        layers (``layers.patch_attention``: of ``layer``, or the mean of all)."""
        if len(self.fusion_layers.blocks) == 0:  # before running anything
            patch_attention([], what="this ALBEF")
        _, maps = self.fuse(self.text_features(input_ids, attention_mask), attention_mask,
                            self.forward_features(pixel_values), return_attention=True)
        return patch_attention(maps, layer, "this ALBEF")

    @requires_head("vqa_head")
    def vqa_logits(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, num_answers) answer logits from the fused [CLS] (soft-score BCE)."""
        return self.vqa_head(self(pixel_values, input_ids, attention_mask).pooled)

    @requires_head("vqa_head")
    def answer(self, pixel_values, input_ids, attention_mask=None) -> list[str]:
        return answer_names(self.cfg, self.vqa_logits(pixel_values, input_ids, attention_mask).argmax(-1).tolist())

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

    def training_losses(self, batch: dict) -> dict:
        """ITC (queues + distillation), ITM (hard negatives), MLM (distilled) and, when the batch
        has ``vqa_targets``, VQA. Keys: pixel_values, input_ids, attention_mask; optional word_ids,
        image_ids (captions of one image are positives of each other), neg_input_ids /
        neg_attention_mask / neg_owner, question_input_ids / question_attention_mask / vqa_targets."""
        cfg = self.cfg
        pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        image_ids = batch.get("image_ids")
        alpha, temp = self.alpha(), self.temp.clamp(0.001, 0.5)
        generator = call_generator(self._calls, int(self.steps_done), self.training, ids.device)

        def draw(rows):  # uniform draws for rows of this batch, made for the global batch
            u = torch.rand(sum(g["sizes"]), generator=generator, device=ids.device)
            return u[g["row_start"]:g["row_start"] + ids.shape[0]][rows]
        step = Step(self.objectives, batch, self.training, word_logits=self.mlm_head, draw=draw,
                    fuse=lambda rows, t, m: self.fuse(self._text(t, m)[0], m, image_tokens[rows]))
        image_tokens, image_feat = self._image(pixels)  # (B, 1+N, Dv), (B, E)
        text_hidden, text_feat = self._text(ids, mask)  # (B, L, D), (B, E)
        with torch.no_grad():
            image_tokens_m, image_feat_m = self._image(pixels, momentum=True)
            text_feat_m = self._text(ids, mask, momentum=True)[1]
        # every process's batch: ITC columns, ITM negatives, and the rows random draws are made for
        g = gather_itm_batch(image_tokens, text_hidden, mask, image_feat, text_feat, image_ids)
        rows = slice(g["row_start"], g["row_start"] + ids.shape[0])
        out = {"itc_loss": itc_queue_loss(
            image_feat, text_feat, all_gather_no_grad(image_feat_m, g["sizes"]),
            all_gather_no_grad(text_feat_m, g["sizes"]), self.queue.image, self.queue.text, temp,
            alpha, cfg.distill, g["ids"], self.queue.ids if image_ids is not None else None,
            row_start=g["row_start"])}

        logits, labels = self._itm(batch, g, image_tokens, temp, generator, step)
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
        masked, mlm_labels = step.mask_words(ids, mask, masked, mlm_labels)
        hit = mlm_labels != -100  # the head runs on the masked positions only
        if step.taps_attention:
            fused = self.fuse_tapped(self._text(masked, mask)[0], mask, image_tokens, step, step.targets("caption"))
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
        if "vqa_targets" in batch:
            if step.taps_attention and "question_grounding" in batch and self.vqa_head is not None:
                q_ids, q_mask = batch["question_input_ids"], batch["question_attention_mask"]
                fused = self.fuse_tapped(self._text(q_ids, q_mask)[0], q_mask, image_tokens, step,
                                         step.targets("question"))
                out["vqa_loss"] = vqa_loss(self.vqa_head(fused[:, 0]), batch["vqa_targets"])
            else:
                out["vqa_loss"] = batch_vqa_loss(self, batch, pixels, ids, mask)
            losses.append(out["vqa_loss"])
        losses.extend(step.finish(out))
        if self.training:
            self.queue.enqueue(ids=image_ids, image=image_feat_m, text=text_feat_m)
        out["loss"] = torch.stack([l.float() for l in losses]).sum()
        out["alpha"] = torch.tensor(alpha)
        return out

    def _itm(self, batch, g, image_tokens, temp, generator, step: Step):
        """ITM logits and labels: B positives, B (text, negative image), B (image, negative
        text), then (image, dataset negative caption) pairs with ``hard_negatives``. The
        negatives are drawn for every row of the global batch ``g`` (``losses.matching.gather_itm_batch``), then
        this process's rows are kept. The fused states go to the objectives with their pairing."""
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
        negative_rows = torch.zeros(0, dtype=torch.long, device=mask.device)
        neg_ids = batch.get("neg_input_ids")
        if self.cfg.hard_negatives and neg_ids is not None and neg_ids.shape[0] > 0:
            owner = batch["neg_owner"].to(mask.device)
            neg_hidden = self._text(neg_ids, batch["neg_attention_mask"])[0]
            texts, masks = pad_cat(texts, masks, neg_hidden, batch["neg_attention_mask"])
            images = torch.cat([images, image_tokens[owner]])
            labels = torch.cat([labels, torch.zeros_like(owner)])
            negative_rows = 3 * b + torch.arange(owner.shape[0], device=mask.device)
        fused = self.fuse(texts, masks, images)
        step.itm_rows(fused, torch.arange(b, device=mask.device), negative_rows)
        return self.itm_head(fused[:, 0]), labels

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After each optimiser step: EMA update of the momentum encoders, temperature clamp, and
        the step count behind the α ramp."""
        self.momentum.update()
        self.temp.clamp_(0.001, 0.5)
        self.steps_done += 1
        for objective in self.objectives:
            objective.after_step()

