"""VLMo (Bao et al. 2022): one pre-norm Transformer whose blocks share self-attention and route
each token to a modality expert FFN (each expert with its own LayerNorm): a V-FFN and an L-FFN
in every block, a VL-FFN only in the top ``vl_layers`` blocks (F). LayerScale γ on both branches.

  dual mode    image-only pass: V-FFN in every block; text-only pass: L-FFN in every block;
               [CLS] -> final norm -> linear (no bias) -> L2-normalised; logits exp(t)·I·Tᵀ
  fusion mode  [text ; image] in one sequence: below the top F blocks the text tokens go to the
               L-FFN and the image tokens to the V-FFN, in the top F blocks every token to the
               VL-FFN; a pooler tanh(dense(token 0)) feeds ITM, VQA and pair classification

Text: BERT embeddings; image: patches + [CLS] + learned positions; a modality-type embedding
(text 0, image 1) on both, in both modes. Training (``objectives``, one stage each):
  "text_mlm"           MLM over text-only passes (stage 2; freeze the rest with the run's
                       ``trainable`` patterns)
  "itc", "itm", "mlm"  stage 3: ITC over the global batch (with ``itc_vl`` averaged with an ITC
                       whose top F blocks use the VL-FFN), ITM on each pair, one negative image per
                       text and one negative text per image drawn ∝ softmax of the ITC logits over
                       the global batch (positives never drawn), MLM in fusion mode
  "vqa"                the VQA head on batches with ``vqa_targets``
Stage 1 (image-only) is a ViT run: ``vision_init`` copies its patch embeddings, attention and
FFN into the shared attention and every expert (V-FFN, L-FFN, VL-FFN) of the first blocks.
Random draws (ITM negatives, MLM masks) are made for the global batch from a generator seeded by
(run seed, ``steps_done``), so W processes train as one process on the same global batch.
No momentum encoder, no queue. Relative position bias is not implemented.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..collective import all_gather_padded, call_generator, global_mean_scale
from ..data.collate import select_rows
from ..layers import (AttentionGuide, BertEmbeddings, ImageEmbeddings, MLMHead, ModalityExperts, NormMlp, Pooler,
                      PreNormBlock, by_length, check_directional_heads, classifier, directional_mask, init_weights,
                      joint_directional_mask, padding_mask, sincos_2d)
from ..losses.contrastive import ContrastiveLoss
from ..losses.distill import itm_token_pairs
from ..losses.matching import gather_token_batch, itm_accuracy, itm_loss
from ..losses.mlm import mask_tokens, mlm_loss
from ..losses.vqa import batch_vqa_loss
from ..objectives import FusionSpec, ObjectiveOptions, Step, build_objectives, match_log_score
from .base import Output, VLModel, answer_names, register, requires_head

OBJECTIVES = ("itc", "itm", "mlm", "text_mlm", "vqa")
BERT_IDS = dict(mask_token_id=103, pad_token_id=0, special_token_ids=(0, 100, 101, 102, 103))


@dataclass
class VLMoConfig(ObjectiveOptions):
    """The objectives' options (``grounding_weight`` ...) come from ``ObjectiveOptions``."""
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    stem: str = "patch"             # "patch" or "conv" (see PatchEmbed)
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    vl_layers: int = 2              # F: the top blocks with a VL-FFN (base 2 of 12, large 3 of 24)
    act: str = "gelu"
    eps: float = 1e-6
    layer_scale: float = 0.1        # LayerScale γ at the start (0: none)
    qv_bias: bool = True            # BEiT: biases on q and v, none on k (False: on q, k and v)
    dropout: float = 0.0
    drop_path: float = 0.1
    vocab_size: int = 30522
    max_text_len: int = 40
    embed_dim: int = 768            # the ITC space
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    # "sincos": fixed 2-D codes of each patch's row and column added to the patch tokens
    image_pos: str = ""
    num_answers: int = 0            # >0: VQA classifier over answer_names on the pooled token
    answer_names: list[str] = field(default_factory=list)
    pair_classes: int = 0           # >0: NLVR2 classifier on the two pooled tokens, concatenated
    # training
    objectives: tuple[str, ...] = ("itc", "itm", "mlm", "vqa")  # see the module doc
    itc_vl: bool = False            # average in an ITC through the VL-FFN of the top F blocks
    itm_hard_negatives: bool = True  # ITM negatives ∝ softmax(ITC logits) (else uniform)
    fusion_every: int = 1           # ITM, MLM, VQA and the objectives on every n-th row of the global batch, ITC on all
    # >1: the dual text pass and the ITM pass in training run their rows in this many groups of
    # similar length, each padded to its own longest: the same result on fewer padded tokens
    length_groups: int = 1
    hard_negatives: bool = False    # the dataset's negative captions join ITM as negatives
    mlm_prob: float = 0.15
    whole_word_mask: bool = False   # needs batch["word_ids"]
    mask_token_id: int = 4          # vlkit's WordPiece ids ([PAD]=0 ... [MASK]=4)
    pad_token_id: int = 0
    special_token_ids: tuple[int, ...] = (0, 1, 2, 3, 4)
    vision_init: str = ""           # a ViT run (or HF folder): patch embeddings and first blocks
    # in fusion mode the text rows of heads directional_head_index and the next see only the
    # text before / after them (``layers.joint_directional_mask``); in text-only passes likewise
    directional_heads: bool = False
    directional_head_index: int = -2
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)


PRESETS = {
    # The synthetic world at 64 px: 4x4 tokens of 16 px from a conv stem; 4 blocks, F = 2.
    # LayerScale on, q/v biases and relative position bias off.
    "tiny": dict(image_size=64, patch_size=16, stem="conv", dim=192, depth=4, heads=4, mlp_dim=768,
                 vl_layers=2, qv_bias=False, drop_path=0.0, vocab_size=2000, embed_dim=192),
    "small": dict(image_size=224, dim=384, depth=12, heads=6, mlp_dim=1536, vl_layers=2, embed_dim=384,
                  **BERT_IDS),
    # VLMo-Base: ViT-B/16 at 224 px, 12 blocks, VL-FFN in the top 2 (relative position bias not built)
    "base": dict(image_size=224, dim=768, depth=12, heads=12, mlp_dim=3072, vl_layers=2, embed_dim=768,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **BERT_IDS),
}


@register("vlmo")
class VLMo(VLModel):
    config_class = VLMoConfig
    presets = PRESETS
    task = "fusion"
    optional_heads = ("vqa_head", "pair_head", "itc_vl_image_proj", "itc_vl_text_proj", "logit_vl_scale",
                      "phrase_grounding", "relation_grounding", "replaced_word_correction",
                      "attention_forcing")

    def __init__(self, cfg: VLMoConfig):
        super().__init__()
        unknown = [o for o in cfg.objectives if o not in OBJECTIVES]
        if unknown or not cfg.objectives:
            raise ValueError(f"objectives {list(cfg.objectives)}: choose from {', '.join(OBJECTIVES)}")
        if not 0 <= cfg.vl_layers <= cfg.depth:
            raise ValueError(f"vl_layers {cfg.vl_layers} must be between 0 and depth {cfg.depth}")
        if cfg.image_pos not in ("", "sincos") or (cfg.image_pos and cfg.dim % 4):
            raise ValueError(f"image_pos must be '' or 'sincos' (which needs dim divisible by 4), got {cfg.image_pos!r}")
        if cfg.answer_names and len(cfg.answer_names) != cfg.num_answers:
            raise ValueError(f"{len(cfg.answer_names)} answer_names for num_answers={cfg.num_answers}")
        if cfg.fusion_every < 1:
            raise ValueError(f"fusion_every must be at least 1 (every row), got {cfg.fusion_every}")
        if cfg.length_groups < 1:
            raise ValueError(f"length_groups must be at least 1 (no grouping), got {cfg.length_groups}")
        blind = ()
        if cfg.directional_heads:
            first = check_directional_heads(cfg.heads, cfg.directional_head_index)
            blind = (first, first + 1)
        self.cfg = cfg
        d = cfg.dim
        self.text_embed = BertEmbeddings(cfg.vocab_size, d, cfg.max_text_len, 2, 1e-12, cfg.dropout,
                                         cfg.pad_token_id)
        self.image_embed = ImageEmbeddings(cfg.image_size, cfg.patch_size, d, cfg.in_chans, cfg.stem,
                                           dropout=cfg.dropout)
        self.type_embed = nn.Embedding(2, d)  # modality type: text 0, image 1

        def experts(i: int) -> ModalityExperts:
            names = ("image", "text") + (("vl",) if i >= cfg.depth - cfg.vl_layers else ())
            return ModalityExperts({n: NormMlp(d, cfg.mlp_dim, cfg.act, cfg.dropout, cfg.eps) for n in names})
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList([
            PreNormBlock(d, cfg.heads, cfg.mlp_dim, eps=cfg.eps, drop=cfg.dropout, drop_path=r,
                         mlp=experts(i), mlp_norm=False, layer_scale=cfg.layer_scale,
                         k_bias=False if cfg.qv_bias else None) for i, r in enumerate(rates)])
        self.norm = nn.LayerNorm(d, eps=cfg.eps)
        # dual mode
        self.image_proj = nn.Linear(d, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(d, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        if cfg.itc_vl:
            self.itc_vl_image_proj = nn.Linear(d, cfg.embed_dim, bias=False)
            self.itc_vl_text_proj = nn.Linear(d, cfg.embed_dim, bias=False)
            self.logit_vl_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.itc = ContrastiveLoss()
        # fusion mode
        self.pooler = Pooler(d)
        self.itm_head = nn.Linear(d, 2)
        self.mlm_head = MLMHead(d, cfg.vocab_size, 1e-12, cfg.act)
        self.vqa_head = classifier(d, 2 * d, cfg.num_answers) if cfg.num_answers else None
        self.pair_head = classifier(2 * d, 2 * d, cfg.pair_classes) if cfg.pair_classes else None
        spec = FusionSpec("backbone", cfg.depth, cfg.heads, d, tuple(self.image_embed.grid), blind_heads=blind,
                          blind_reason="directional_heads", itm_pass="itm" in cfg.objectives,
                          hard_negatives=cfg.hard_negatives)
        self.objectives = build_objectives(cfg, spec)  # each registered under its name: weights in the run
        for objective in self.objectives:
            self.add_module(objective.name, objective)
        self.apply(init_weights)
        for emb in (self.text_embed.word, self.text_embed.position, self.text_embed.token_type, self.type_embed):
            nn.init.normal_(emb.weight, std=0.02)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._calls: dict[bool, tuple[int, int]] = {}

    # -- stage 1: the image tower of a ViT run --------------------------------------------------
    @staticmethod
    def with_vision_tower(cfg: VLMoConfig, tower) -> VLMoConfig:
        """``cfg`` with the image and width fields of a ViT tower's config, so ``vision_init``
        fits; the model keeps its own depth if deeper than the tower's."""
        if tower.pre_norm or not tower.patch_bias or not tower.qkv_bias:
            raise ValueError("vision_init: VLMo starts from a ViT classifier's tower (no pre-encoder "
                             "LayerNorm, biased patch and q/k/v projections), not a CLIP image tower")
        return dataclasses.replace(
            cfg, image_size=tower.image_size, patch_size=tower.patch_size, in_chans=tower.in_chans,
            stem=tower.stem, dim=tower.dim, heads=tower.heads, mlp_dim=tower.mlp_dim, act=tower.act,
            eps=tower.eps, qv_bias=False, mean=tuple(tower.mean), std=tuple(tower.std),
            depth=max(cfg.depth, tower.depth))

    def vision_init_state(self, tower_state: dict, label: str) -> dict:
        """A ViT tower's state under this model's names: patch embeddings, final norm, and each
        block's attention (shared) and norm2 + MLP copied into every expert of the same block;
        LayerScale γ of those blocks 1 (the ViT had none). Later blocks and the heads start fresh."""
        state = {}
        for key, value in tower_state.items():
            if key.startswith("norm_pre."):
                raise ValueError(f"{label}: a tower with a pre-encoder LayerNorm (CLIP) does not fit VLMo")
            if key.startswith("embed."):
                state["image_embed." + key[len("embed."):]] = value
                continue
            if not key.startswith("encoder.blocks."):
                state[key] = value
                continue
            i, _, rest = key[len("encoder.blocks."):].partition(".")
            block = f"blocks.{i}"
            part, _, tail = rest.partition(".")
            if part in ("norm2", "mlp"):
                if int(i) >= len(self.blocks):
                    raise ValueError(f"{label}: the tower has more blocks than this VLMo's {len(self.blocks)}")
                for name in self.blocks[int(i)].mlp.experts:
                    state[f"{block}.mlp.experts.{name}.{'norm' if part == 'norm2' else 'mlp'}.{tail}"] = value
            else:
                state[f"{block}.{rest}"] = value
            if self.cfg.layer_scale > 0:
                for gamma in ("gamma_1", "gamma_2"):
                    state[f"{block}.{gamma}"] = torch.ones(self.cfg.dim)
        return state

    # -- embeddings and the routed stack ----------------------------------------------------------
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_embed(input_ids) + self.type_embed.weight[0]  # (B, L, D)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.image_embed(pixel_values)  # (B, 1+N, D)
        if self.cfg.image_pos:
            n = x.shape[1] - 1
            side = math.isqrt(n)
            x = x + sincos_2d((side, n // side), x.shape[-1], device=x.device, dtype=x.dtype)
        return x + self.type_embed.weight[1]

    def route(self, mode: str, text_len: int = 0, image_len: int = 0) -> list:
        """Each block's ``modality`` for a pass: "image" / "text" (dual mode: that expert in every
        block), "image+vl" / "text+vl" (dual below the top F blocks, the VL-FFN in them: ``itc_vl``),
        "fusion" ([text ; image]: text tokens to the L-FFN and image tokens to the V-FFN below the
        top F blocks, every token to the VL-FFN in them)."""
        low = {"image": "image", "text": "text", "image+vl": "image", "text+vl": "text",
               "fusion": [("text", text_len), ("image", image_len)]}
        if mode not in low:
            raise ValueError(f"unknown pass {mode!r} ({', '.join(low)})")
        top = low[mode] if mode in ("image", "text") else "vl"
        first_vl = self.cfg.depth - self.cfg.vl_layers
        return [low[mode] if i < first_vl else top for i in range(self.cfg.depth)]

    def run(self, x: torch.Tensor, mask, route: list, start: int = 0, stop: int | None = None,
            maps_of=(), guides: dict | None = None):
        """Blocks ``start:stop`` over x (B, T, D), block i routed by ``route[i]``; with ``maps_of``
        also {layer: attention maps} of those blocks (``guides``: attention forcing)."""
        maps = {}
        for i in range(start, len(self.blocks) if stop is None else stop):
            if i in maps_of:
                x, maps[i] = self.blocks[i](x, mask=mask, modality=route[i], return_attention=True,
                                            guides=(guides or {}).get(i))
            else:
                x = self.blocks[i](x, mask=mask, modality=route[i])
        return (x, maps) if maps_of else x

    def _text_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.directional_heads:
            return directional_mask(attention_mask, self.cfg.heads, self.cfg.directional_head_index)
        return padding_mask(attention_mask)

    def _joint_mask(self, attention_mask: torch.Tensor, image_len: int) -> torch.Tensor:
        mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], image_len)], dim=1)
        if self.cfg.directional_heads:
            return joint_directional_mask(mask, attention_mask.shape[1], self.cfg.heads,
                                          self.cfg.directional_head_index)
        return padding_mask(mask)

    # -- dual mode --------------------------------------------------------------------------------
    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image-only pass after the final norm, (B, 1+N, D)."""
        return self.norm(self.run(self.embed_image(pixel_values), None, self.route("image")))

    def _cls(self, x: torch.Tensor, mask, route: list) -> torch.Tensor:
        """The final-norm [CLS] (B, D) of a dual pass: every block but the last over the whole
        sequence, the last for the [CLS] position only (``PreNormBlock.forward_at``)."""
        x = self.run(x, mask, route, stop=len(self.blocks) - 1)
        query_mask = None if mask is None else mask[:, :, :1]  # the [CLS] row (directional masks)
        return self.norm(self.blocks[-1].forward_at(x, 0, mask=query_mask, modality=route[-1]))[:, 0]

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cls = self._cls(self.embed_image(pixel_values), None, self.route("image"))
        return F.normalize(self.image_proj(cls), dim=-1)  # (B, E)

    def text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The text-only pass after the final norm, (B, L, D)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.norm(self.run(self.embed_text(input_ids), self._text_mask(attention_mask), self.route("text")))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cls = self._cls(self.embed_text(input_ids), self._text_mask(attention_mask), self.route("text"))
        return F.normalize(self.text_proj(cls), dim=-1)  # (B, E)

    # -- fusion mode ------------------------------------------------------------------------------
    def fuse(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """[text ; image] from embedded image tokens (B, 1+N, D): (B, L+1+N, D) after the final norm."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n, m = input_ids.shape[1], image_tokens.shape[1]
        x = torch.cat([self.embed_text(input_ids), image_tokens], dim=1)
        return self.norm(self.run(x, self._joint_mask(attention_mask, m), self.route("fusion", n, m)))

    def forward(self, pixel_values, input_ids, attention_mask=None) -> Output:
        """features: the joint sequence (B, L+1+N, D), text first; pooled: the pooler's output;
        logits: ITM (B, 2), column 1 = match."""
        x = self.fuse(self.embed_image(pixel_values), input_ids, attention_mask)
        pooled = self.pooler(x)
        return Output(features=x, pooled=pooled, logits=self.itm_head(pooled))

    def match(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, 2) ITM logits of zipped (image, text) pairs; column 1 = match."""
        return self(pixel_values, input_ids, attention_mask).logits

    def score(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B,) log-probability that each zipped pair matches (``VLModel`` documents ``score``):
        the ITM head's, adjusted by the objectives (``match_score="itm+edit"``)."""
        out = self(pixel_values, input_ids, attention_mask)
        return match_log_score(self.objectives, out.logits,
                               lambda: self.mlm_head(out.features[:, :input_ids.shape[1]]), input_ids, attention_mask)

    def mlm_logits(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, L, vocab) predictions for every text position, in fusion mode."""
        return self.mlm_head(self(pixel_values, input_ids, attention_mask).features[:, :input_ids.shape[1]])

    @requires_head("vqa_head")
    def vqa_logits(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, num_answers) answer logits from the pooled token (soft-score BCE)."""
        return self.vqa_head(self(pixel_values, input_ids, attention_mask).pooled)

    @requires_head("vqa_head")
    def answer(self, pixel_values, input_ids, attention_mask=None) -> list[str]:
        return answer_names(self.cfg, self.vqa_logits(pixel_values, input_ids, attention_mask).argmax(-1).tolist())

    @requires_head("pair_head")
    def pair_logits(self, pixel_values_1, pixel_values_2, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, pair_classes): the statement fused with each image; the two pooled tokens,
        concatenated (first image first), go to the pair classifier."""
        pooled = [self(p, input_ids, attention_mask).pooled for p in (pixel_values_1, pixel_values_2)]
        return self.pair_head(torch.cat(pooled, dim=-1))

    @property
    def grounding_grid(self) -> tuple[int, int] | None:
        return tuple(self.image_embed.grid) if self.cfg.grounding_weight > 0 else None

    def fuse_tapped(self, image_tokens, input_ids, attention_mask, step: Step, targets: dict):
        """``fuse`` tapped for the objectives (``vlkit.objectives.base``): the self-attention of
        the blocks they read, text rows over the image patches, and attention forcing in training."""
        from ..objectives.grounding import check_targets
        n, m = input_ids.shape[1], image_tokens.shape[1]
        check_targets(targets["names"], input_ids.shape, m - 1)
        x = torch.cat([self.embed_text(input_ids), image_tokens], dim=1)
        targets = {k: None if v is None else v.to(x.device) for k, v in targets.items()}
        forced, guides = step.guides(targets), None
        if forced is not None:  # text rows over the patches
            guides = {layer: {"self": AttentionGuide(first, F.pad(t.to(x.dtype), (n + 1, 0, 0, m)), forced[1])}
                      for layer, (first, t) in forced[0].items()}
        x, maps = self.run(x, self._joint_mask(attention_mask, m), self.route("fusion", n, m),
                           maps_of=set(step.attention_layers()), guides=guides)
        x = self.norm(x)
        step.read("text", lambda layer, heads: maps[layer]["self"][:, heads, :n, n + 1:], x[:, :n], targets)
        return x

    # -- training ---------------------------------------------------------------------------------
    def _mask_words(self, batch, ids, mask, g: dict, generator):
        """MLM masks drawn for the global batch (padded to its longest text), this process's rows."""
        cfg = self.cfg
        word_ids = batch.get("word_ids") if cfg.whole_word_mask else None
        if cfg.whole_word_mask and word_ids is None:
            raise ValueError("whole_word_mask needs batch['word_ids'] (tokenize with return_word_ids=True)")
        length, sizes = g["length"], g["sizes"]
        masked, labels = mask_tokens(
            all_gather_padded(ids, length, cfg.pad_token_id, sizes), all_gather_padded(mask, length, 0, sizes),
            cfg.special_token_ids, cfg.mask_token_id, cfg.vocab_size, cfg.mlm_prob, generator=generator,
            word_ids=None if word_ids is None else all_gather_padded(word_ids, length, -1, sizes))
        return masked[g["rows"], :ids.shape[1]], labels[g["rows"], :ids.shape[1]]

    def _mlm(self, out: dict, key: str, logits_of, labels) -> torch.Tensor:
        hit = labels != -100  # the head runs on the masked positions only
        logits = self.mlm_head(logits_of(hit))
        out[key + "_acc"] = (logits.detach().argmax(-1) == labels[hit]).float().mean() \
            if bool(hit.any()) else logits.new_zeros(())
        out[key + "_loss"] = mlm_loss(logits, labels[hit]) * global_mean_scale(int(hit.sum()), labels.device)
        return out[key + "_loss"]

    def _dual(self, image_tokens, ids, mask, vl: bool = False):
        """Normalised (image, text) embeddings from the dual passes (``vl``: the VL-FFN on top)."""
        img_route, txt_route = self.route("image+vl" if vl else "image"), self.route("text+vl" if vl else "text")
        img_proj, txt_proj = (self.itc_vl_image_proj, self.itc_vl_text_proj) if vl else (self.image_proj, self.text_proj)
        img = self._cls(image_tokens, None, img_route)  # the last block at [CLS] only
        txt = by_length(mask, self.cfg.length_groups, lambda rows, n: self._cls(
            self.embed_text(ids[rows, :n]), self._text_mask(mask[rows, :n]), txt_route))
        return F.normalize(img_proj(img), dim=-1), F.normalize(txt_proj(txt), dim=-1)

    def training_losses(self, batch: dict) -> dict:
        """The config's ``objectives`` (module doc). Keys: pixel_values, input_ids,
        attention_mask; optional word_ids, image_ids (captions of one image are positives of
        each other), neg_input_ids / neg_attention_mask / neg_owner (``hard_negatives``),
        question_input_ids / question_attention_mask / vqa_targets."""
        cfg, objectives = self.cfg, self.cfg.objectives
        ids, mask = batch["input_ids"], batch["attention_mask"]
        generator = call_generator(self._calls, int(self.steps_done), self.training, ids.device)
        g = gather_token_batch(ids, mask, batch.get("image_ids"), cfg.pad_token_id)
        out, losses = {}, []
        if "text_mlm" in objectives:
            masked, labels = self._mask_words(batch, ids, mask, g, generator)
            hidden = self.text_hidden(masked, mask)
            losses.append(self._mlm(out, "text_mlm", lambda hit: hidden[hit], labels))
        if not {"itc", "itm", "mlm", "vqa"} & set(objectives):
            out["loss"] = torch.stack(losses).sum()
            return out
        pixels = batch["pixel_values"]
        image_tokens = self.embed_image(pixels)  # (B, 1+N, D), embedded once for every pass
        if "itc" in objectives or "itm" in objectives:
            img, txt = self._dual(image_tokens, ids, mask)
            scale = self.logit_scale.clamp(max=cfg.logit_scale_max)
            out["itc_loss"] = self.itc(img, txt, scale)
            if cfg.itc_vl:
                img_vl, txt_vl = self._dual(image_tokens, ids, mask, vl=True)
                out["itc_vl_loss"] = self.itc(img_vl, txt_vl, self.logit_vl_scale.clamp(max=cfg.logit_scale_max))
                out["itc_loss"] = (out["itc_loss"] + out["itc_vl_loss"]) / 2
            if "itc" in objectives:
                losses.append(out["itc_loss"])
            out["scale"] = scale.detach().exp()
        if cfg.fusion_every > 1:  # the fused passes on every n-th row of the global batch
            keep = (torch.arange(g["rows"].start, g["rows"].stop) % cfg.fusion_every == 0).nonzero().flatten()
            batch, keep = select_rows(batch, keep), keep.to(ids.device)
            image_tokens = image_tokens[keep]
            if "itc" in objectives or "itm" in objectives:
                img, txt = img[keep], txt[keep]
            ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
            g = gather_token_batch(ids, mask, batch.get("image_ids"), cfg.pad_token_id)
        step = Step(self.objectives, batch, self.training, word_logits=self.mlm_head,
                    draw=lambda rows: torch.rand(sum(g["sizes"]), generator=generator, device=ids.device)[g["rows"]][rows],
                    fuse=lambda rows, t, m: self.fuse(image_tokens[rows], t, m)[:, :t.shape[1]])
        if "itm" in objectives:
            logits, labels = self._itm(batch, g, image_tokens, img, txt, scale.detach(), generator, step)
            out["itm_loss"] = itm_loss(logits, labels) * global_mean_scale(labels.shape[0], ids.device)
            out["itm_acc"] = itm_accuracy(logits.detach(), labels)
            losses.append(out["itm_loss"])
        if "mlm" in objectives:
            masked, labels = self._mask_words(batch, ids, mask, g, generator)
            masked, labels = step.mask_words(ids, mask, masked, labels)
            if step.taps_attention:
                fused = self.fuse_tapped(image_tokens, masked, mask, step, step.targets("caption"))
            else:
                fused = self.fuse(image_tokens, masked, mask)
            losses.append(self._mlm(out, "mlm", lambda hit: fused[:, :ids.shape[1]][hit], labels))
        if "vqa" in objectives and "vqa_targets" in batch:
            out["vqa_loss"] = batch_vqa_loss(self, batch, pixels, ids, mask)
            losses.append(out["vqa_loss"])
        losses.extend(step.finish(out))
        if not losses:
            raise ValueError(f"nothing to train: objectives {list(objectives)} (VQA needs vqa_targets in the batch)")
        out["loss"] = torch.stack([l.float() for l in losses]).sum()
        return out

    def _itm(self, batch, g, image_tokens, img, txt, scale, generator, step: Step):
        """ITM logits and labels: B positives, B (text, negative image), B (image, negative text),
        then (image, dataset negative caption) with ``hard_negatives``. Negatives are drawn for
        every row of the global batch, ∝ softmax of the ITC logits, positives excluded."""
        cfg = self.cfg
        images, ids, masks, labels, negative_rows = itm_token_pairs(
            g, image_tokens, img, txt, scale.exp(), generator, cfg.itm_hard_negatives,
            batch if cfg.hard_negatives else None, cfg.pad_token_id)
        # a group's text states padded back to the batch's length (zeros past its longest text)
        fused = by_length(masks, cfg.length_groups, lambda rows, n: self._padded(
            self.fuse(images[rows], ids[rows, :n], masks[rows, :n]), n, ids.shape[1]))
        step.itm_rows(fused[:, :ids.shape[1]], torch.arange(image_tokens.shape[0], device=ids.device),
                      negative_rows)
        return self.itm_head(self.pooler(fused)), labels

    @staticmethod
    def _padded(fused: torch.Tensor, n: int, length: int) -> torch.Tensor:
        """A joint sequence over n text tokens, (B, n+1+N, D), as one over ``length``: zeros after the text."""
        if n == length:
            return fused
        return torch.cat([F.pad(fused[:, :n], (0, 0, 0, length - n)), fused[:, n:]], dim=1)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After each optimiser step: the temperature clamp, the step count behind the random
        draws, the objectives' clocks."""
        self.logit_scale.clamp_(0, self.cfg.logit_scale_max)
        self.steps_done += 1
        for objective in self.objectives:
            objective.after_step()

