"""BLIP (Li et al. 2022): a ViT image encoder and one BERT-style post-norm text stack with
cross-attention to the image tokens in every layer, used three ways:

  1. unimodal text encoder ([CLS] first, cross-attention skipped): ITC against the image [CLS];
  2. image-grounded text encoder ([ENC] first, cross-attention on): ITM head on its first token;
  3. image-grounded causal decoder ([DEC] first, causal self-attention, cross-attention on): LM
     head (captioning).
The encoder and the decoder share every parameter (embeddings, cross-attention, MLP and their
LayerNorms) except the self-attention and its LayerNorm; the LM head belongs to the decoder and
is tied to the word embeddings (``tie_lm_head=False``: a matrix of its own, as folders written by
transformers 4.x hold). ``tie_decoder=False`` gives the decoder a text stack of its own
(BLIP's VQA model); ``text_encoder=False`` / ``text_decoder=False`` drop a part (Hugging Face's
captioning and retrieval models hold only one).

Training (``training_losses``), equally weighted, the config's ``objectives`` where the part exists:
  - ITC with momentum encoders (EMA), feature queues (any batch size: the queue wraps around) and
    momentum distillation (α ramped over ``alpha_ramp_steps``), as ALBEF;
  - ITM on the grounded encoder: each positive pair, one negative text per image and one negative
    image per text drawn by in-batch similarity, and with ``hard_negatives`` the dataset's
    negative captions of each image;
  - LM on the decoder: [DEC] + prompt + caption, label smoothing 0.1, caption tokens only scored;
  - VQA (batches with ``answer_input_ids``): the question through the grounded encoder, the answer
    decoded from [DEC] with cross-attention to the question's states, LM loss on the answer's
    tokens and end token (``vlkit train --vqa`` trains it alone, as the paper's fine-tuning).
Under a process group the ITC columns hold the momentum features of the global batch, the ITM
negatives are drawn for the global batch (seeded by run seed and ``steps_done``) and every mean
is over the global batch: W processes train as one does on the same global batch.
Auxiliary objectives (``vlkit.objectives``: phrase and relation grounding, replaced-word
correction with a word head of its own, attention forcing) read the grounded encoder's ITM pass:
the cross-attention of the captions shown with their own image, and the states of every row.
Architecture variants as ALBEF's: ``fusion_pos``, ``directional_heads``.
``score_captions`` is the unsmoothed log-likelihood of captions; ``generate`` decodes captions
with ``vlkit.models.generate`` on the layers' KV cache (image encoded once, cross-attention keys
and values computed once per image). ``hf_compat`` reproduces Hugging Face's BLIP, which gives
the grounded encoder [CLS] where the paper gives [ENC].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..collective import all_gather_no_grad, call_generator, global_mean_scale
from ..layers import (BertEmbeddings, FeatureQueue, MLMHead, MomentumCopy, PostNormBlock, Transformer,
                      check_directional_heads, directional_mask, init_weights, padding_mask, patch_attention,
                      sincos_square)
from ..losses.captioning import caption_labels, lm_loss, sequence_log_likelihood, unlikelihood_loss
from ..losses.distill import alpha_at, itc_queue_loss, itm_token_pairs
from ..losses.matching import gather_token_batch, itm_accuracy, itm_loss
from ..losses.vqa import answer_log_likelihood, answer_lm_loss
from ..objectives import FusionSpec, ObjectiveOptions, Step, build_objectives, match_log_score
from ..objectives.taps import tapped_cross_attention
from .base import Output, VLModel, image_spec, register
from .clip import PRESETS as CLIP_PRESETS
from .generate import decode
from .vit import ViTConfig, VisionTransformer


def _needs(part: str):
    """A method that exists only on a BLIP with ``part`` (``text_decoder``; ``retrieval``: the
    text encoder with the ITC projections and ITM head; ``vqa``: encoder and decoder), so ``hasattr(model, "generate")`` tells
    the pipeline and the evaluation what it can do."""
    def wrap(fn):
        def get(self):
            cfg = self.cfg
            have = {"retrieval": cfg.text_encoder and cfg.retrieval_heads,
                    "vqa": cfg.text_encoder and cfg.text_decoder}.get(part, getattr(cfg, part, False))
            if not have:
                raise AttributeError(f"this BLIP has no {part.replace('_', ' ')} for {fn.__name__}")
            return fn.__get__(self)
        return property(get, doc=fn.__doc__)
    return wrap


@dataclass
class BLIPConfig(ObjectiveOptions):
    """The objectives' options (``grounding_weight`` ...) come from ``ObjectiveOptions``."""
    vision: ViTConfig = field(default_factory=ViTConfig)
    dim: int = 768                  # text width (BERT hidden size)
    layers: int = 12                # text layers, each with self-, cross-attention and MLP
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"
    eps: float = 1e-12
    dropout: float = 0.0
    vocab_size: int = 30524         # BERT's 30522 + [DEC] + [ENC]
    max_text_len: int = 512         # text position embeddings
    embed_dim: int = 256            # the shared ITC space
    temp: float = 0.07              # learnable, clamped to [0.001, 0.5]
    queue_size: int = 57600
    momentum: float = 0.995
    text_encoder: bool = True       # the unimodal / image-grounded encoder (ITC, ITM)
    text_decoder: bool = True       # the image-grounded decoder (LM, captioning)
    tie_decoder: bool = True        # the decoder shares all but self-attention with the encoder
    tie_lm_head: bool = True        # the LM head's output matrix is the decoder's word embeddings
    retrieval_heads: bool = True    # with the encoder: ITC projections, ITM head, momentum and queues
    hf_compat: bool = False         # grounded encoder fed [CLS] as Hugging Face does, not [ENC]
    vision_init: str = ""           # a ViT or CLIP run (or HF folder) whose image tower fits ``vision``
    # "sincos": fixed 2-D position codes added to the image tokens the cross-attention reads (the
    # grounded encoder's and the decoder's), as ALBEF's ``fusion_pos``
    fusion_pos: str = ""
    # architecture variant: in the encoder's self-attention (unimodal and grounded), head
    # directional_head_index (negative: from the end) sees only the tokens at or before its
    # query, the next head only those at or after it (``layers.directional_mask``)
    directional_heads: bool = False
    directional_head_index: int = -2
    # the objectives that read attention (grounding, relations with their geometry term, attention
    # forcing) read the decoder's LM pass too, each position against the targets of the word it
    # writes next: the position before a word that names an object looks at that object, the one
    # before a relation word at its subject and object (``next_word_targets``)
    decoder_grounding: bool = False
    # matching (``score``: compositional evaluation, pair scores): this weight times the decoder's
    # log-likelihood of the text after the prompt (``score_captions``) is added to the ITM (and
    # word head) log-probability. The decoder reads a caption word by word over the image and
    # checks word order and relations that the pooled ITM head misses; needs the decoder.
    match_lm_weight: float = 0.0
    # captioning's default decoding (``Pipeline.caption`` and the caption evaluation, when no
    # decoding is asked for): >0 draws this many captions by beam search and keeps the one
    # ``score`` ranks first (matching and the decoder's likelihood together); 0: greedy
    caption_rerank: int = 0
    # training
    # the decoder's unlikelihood of words the data marks false of a record's image where they stand
    # (records' ``false_captions``: "one circle and one circle", false at the second "circle";
    # "a blue star" for a blue circle, false at "star"), -log(1 - p) at that word after the text
    # before it, over the image; this weight times its mean
    false_word_weight: float = 0.0
    distill: bool = True
    alpha: float = 0.4
    alpha_ramp_steps: int = 1000
    itm_hard_negatives: bool = True
    hard_negatives: bool = False    # the dataset's negative captions join ITM
    label_smoothing: float = 0.1
    prompt: str = "a picture of "   # captions are decoded after it; it is never scored
    prompt_ids: tuple[int, ...] = ()  # its tokens without begin/end (from the tokenizer)
    pad_token_id: int = 0
    eot_token_id: int = 3           # [SEP]: the decoder's end token
    dec_token_id: int = 5           # [DEC] (vlkit's WordPiece with BLIP's extra tokens)
    enc_token_id: int = 6           # [ENC]
    special_token_ids: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)  # never words (the objectives' word head)
    objectives: tuple[str, ...] = ("itc", "itm", "lm", "vqa")  # losses trained, where the part exists
    answer_names: list[str] = field(default_factory=list)  # VQA: the training answers (eval ranks them)


OBJECTIVES = ("itc", "itm", "lm", "vqa")


def _vit(**kw) -> ViTConfig:
    base = dict(eps=1e-6, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    return ViTConfig(**{**base, **kw})


BERT_IDS = dict(vocab_size=30524, pad_token_id=0, eot_token_id=102, dec_token_id=30522, enc_token_id=30523,
                special_token_ids=(0, 100, 101, 102, 103, 30522, 30523))
PRESETS = {
    # the synthetic world at 64 px: CLIP tiny's image tower; momentum and queue sized as ALBEF tiny's
    "tiny": dict(vision=dataclasses.replace(CLIP_PRESETS["tiny"]["vision"]), dim=192, layers=3, heads=3,
                 mlp_dim=768, eps=1e-6, vocab_size=2000, max_text_len=48, embed_dim=128, queue_size=1024,
                 momentum=0.95, alpha_ramp_steps=200),
    "small": dict(vision=_vit(image_size=224, dim=384, depth=12, heads=6, mlp_dim=1536), dim=384, layers=6,
                  heads=6, mlp_dim=1536, queue_size=16384, **BERT_IDS),
    # ViT-B/16 at 384 px + BERT-base (BLIP base)
    "base": dict(vision=_vit(image_size=384, dim=768, depth=12, heads=12, mlp_dim=3072), **BERT_IDS),
}


@register("blip")
class BLIP(VLModel):
    config_class = BLIPConfig
    presets = PRESETS
    task = "fusion"
    has_queues = True
    rerank_adds_itc = True  # retrieval: ITC top-k re-scored by ITM + ITC similarity (the paper's)
    # tokens the tokenizer must hold, and the config fields their ids go to (``vlkit train``)
    special_tokens = {"dec_token_id": "[DEC]", "enc_token_id": "[ENC]"}
    decodes_answers = True  # VQA batches carry the answers' tokens (``data.collate``), not class scores
    # may be missing from an --init source (added by an objective)
    optional_heads = ("word_head", "relation_grounding", "attention_forcing", "question_proj")
    # the objectives' reading of the decoder's LM pass, and its unlikelihood of false words
    objective_fields = ("decoder_grounding", "false_word_weight")

    def __init__(self, cfg: BLIPConfig):
        super().__init__()
        if not (cfg.text_encoder or cfg.text_decoder):
            raise ValueError("a BLIP needs text_encoder or text_decoder")
        unknown = [o for o in cfg.objectives if o not in OBJECTIVES]
        if unknown or not cfg.objectives:
            raise ValueError(f"objectives {list(cfg.objectives)}: choose from {', '.join(OBJECTIVES)}")
        if cfg.fusion_pos not in ("", "sincos") or (cfg.fusion_pos and cfg.vision.patch_dropout):
            raise ValueError(f"fusion_pos must be '' or 'sincos' (which needs every patch token: "
                             f"vision.patch_dropout=0), got {cfg.fusion_pos!r}")
        if cfg.directional_heads:
            check_directional_heads(cfg.heads, cfg.directional_head_index)
        if isinstance(cfg.caption_rerank, bool) or not isinstance(cfg.caption_rerank, int) or cfg.caption_rerank < 0:
            raise ValueError(f"caption_rerank must be a whole number >= 0 (0: greedy), got {cfg.caption_rerank!r}")
        if cfg.caption_rerank and not (cfg.text_decoder and cfg.text_encoder and cfg.retrieval_heads):
            raise ValueError("caption_rerank ranks the decoder's captions by score: it needs the decoder, the "
                             "text encoder and the ITM head")
        self.cfg = cfg
        d, e = cfg.dim, cfg.embed_dim
        self.vision = VisionTransformer(cfg.vision)

        def embed():
            return BertEmbeddings(cfg.vocab_size, d, cfg.max_text_len, 0, cfg.eps, cfg.dropout, cfg.pad_token_id)

        def blocks():
            return [PostNormBlock(d, cfg.heads, cfg.mlp_dim, context_dim=cfg.vision.dim, act=cfg.act, eps=cfg.eps,
                                  drop=cfg.dropout, attn_drop=cfg.dropout, cross_optional=True)
                    for _ in range(cfg.layers)]
        self.text_embed = embed()
        self.text_layers = Transformer(blocks()) if cfg.text_encoder else None
        tied = cfg.text_encoder and cfg.tie_decoder
        self.decoder_embed = embed() if cfg.text_decoder and cfg.text_encoder and not tied else None
        self.decoder_layers = Transformer(blocks()) if cfg.text_decoder else None
        self.retrieval = cfg.text_encoder and cfg.retrieval_heads
        if self.retrieval:
            self.image_proj = nn.Linear(cfg.vision.dim, e)
            self.text_proj = nn.Linear(d, e)
            self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
            self.itm_head = nn.Linear(d, 2)
        # the grounded encoder's word predictions, for replaced-word correction (no MLM trains it)
        self.word_head = MLMHead(d, cfg.vocab_size, cfg.eps, cfg.act) \
            if self.retrieval and (cfg.edit_weight > 0 or cfg.match_score != "itm") else None
        spec = FusionSpec("grounded encoder", cfg.layers, cfg.heads, d, tuple(self.vision.embed.grid),
                          all_patches="set vision.patch_dropout=0" if cfg.vision.patch_dropout else "",
                          mlm_head=self.word_head is not None, mlm_pass=False,
                          itm_pass=self.retrieval and "itm" in cfg.objectives, hard_negatives=cfg.hard_negatives)
        self.objectives = build_objectives(cfg, spec)  # each registered under its name: weights in the run
        if self.objectives and not spec.itm_pass:
            raise ValueError(f"{', '.join(o.name for o in self.objectives)}: the objectives read the grounded "
                             "encoder's ITM pass (needs text_encoder, retrieval_heads and 'itm' in objectives)")
        for objective in self.objectives:
            self.add_module(objective.name, objective)
        if cfg.match_lm_weight < 0 or (cfg.match_lm_weight > 0 and not (cfg.text_decoder and cfg.text_encoder
                                                                         and cfg.retrieval_heads)):
            raise ValueError(f"match_lm_weight={cfg.match_lm_weight}: needs to be >= 0, and > 0 needs the decoder "
                             "and the grounded encoder's ITM head (text_decoder, text_encoder, retrieval_heads)")
        if cfg.decoder_grounding and not (cfg.text_decoder and "lm" in cfg.objectives
                                          and any(o.reads_attention for o in self.objectives)):
            raise ValueError("decoder_grounding reads the decoder's LM pass for the objectives that read "
                             "attention: it needs text_decoder, 'lm' in objectives and grounding_weight > 0")
        self.lm_head = MLMHead(d, cfg.vocab_size, cfg.eps, cfg.act) if cfg.text_decoder else None
        # VQA (a config with answer_names, as --vqa writes): the decoder cross-attends to the question
        # states, which must have the image width its cross-attention reads (equal in BLIP's
        # published sizes; a linear map where they differ)
        self.question_proj = nn.Linear(d, cfg.vision.dim) \
            if cfg.text_encoder and cfg.text_decoder and cfg.answer_names and cfg.vision.dim != d else None
        self.apply(init_weights)
        for emb in (self.text_embed, self.decoder_embed):
            if emb is not None:
                nn.init.normal_(emb.word.weight, std=0.02)
                nn.init.normal_(emb.position.weight, std=0.02)
        if tied and cfg.text_decoder:  # everything but the self-attention and its LayerNorm
            for enc, dec in zip(self.text_layers.blocks, self.decoder_layers.blocks):
                dec.cross_attn, dec.norm_cross, dec.mlp, dec.norm2 = enc.cross_attn, enc.norm_cross, enc.mlp, enc.norm2
        if self.lm_head is not None and cfg.tie_lm_head:
            self.lm_head.decoder.weight = self._dec_embed.word.weight
        if self.retrieval:
            self.momentum = MomentumCopy({name: getattr(self, name) for name in (
                "vision", "image_proj", "text_embed", "text_layers", "text_proj")}, cfg.momentum)
            self.queue = FeatureQueue(cfg.queue_size, image=e, text=e)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._calls: dict[bool, tuple[int, int]] = {}  # mode -> (step, calls at that step): the draws

    @property
    def _dec_embed(self) -> BertEmbeddings:
        return self.decoder_embed if self.decoder_embed is not None else self.text_embed

    def image_spec(self) -> dict:
        return image_spec(self.cfg.vision)

    def pretrained_loaded(self) -> None:
        if self.retrieval:
            self.momentum.reset()

    # -- image and the three text modes ---------------------------------------------------------
    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision.forward_features(pixel_values)  # (B, 1+N, Dv)

    def _part(self, name: str, momentum: bool) -> nn.Module:
        return self.momentum[name] if momentum else getattr(self, name)

    def _image(self, pixel_values, momentum: bool = False):
        """(image tokens (B, 1+N, Dv), normalised embedding (B, E))."""
        tokens = self._part("vision", momentum).forward_features(pixel_values)
        return tokens, F.normalize(self._part("image_proj", momentum)(tokens[:, 0]), dim=-1)

    def _text(self, input_ids, attention_mask, momentum: bool = False):
        """Unimodal encoder: (hidden states (B, L, D), normalised [CLS] embedding (B, E))."""
        mask = _ones_if_none(attention_mask, input_ids)
        x = self._part("text_embed", momentum)(input_ids)
        x = self._part("text_layers", momentum)(x, mask=self._self_mask(mask))
        return x, F.normalize(self._part("text_proj", momentum)(x[:, 0]), dim=-1)

    def ground(self, input_ids, attention_mask, image_tokens, step: Step | None = None,
               targets: dict | None = None) -> torch.Tensor:
        """Image-grounded encoder: (B, L, D) states of the text ([ENC] first) over the image tokens
        (with a ``step``: tapped for the objectives, ``objectives.taps.tapped_cross_attention``)."""
        return self._grounded(self._grounded_ids(input_ids), attention_mask, image_tokens, step, targets)

    def _grounded(self, grounded_ids, attention_mask, image_tokens, step=None, targets=None) -> torch.Tensor:
        mask = _ones_if_none(attention_mask, grounded_ids)
        x, context = self.text_embed(grounded_ids), self._context(image_tokens)
        if step is not None:
            return tapped_cross_attention(self.text_layers, step, x, mask, self._self_mask(mask), context, targets)
        return self.text_layers(x, context=context, mask=self._self_mask(mask))

    def _context(self, image_tokens) -> torch.Tensor:
        """The image tokens as the cross-attention reads them (``fusion_pos``: with 2-D codes)."""
        return image_tokens + sincos_square(image_tokens) if self.cfg.fusion_pos else image_tokens

    def _self_mask(self, attention_mask) -> torch.Tensor:
        """The encoder's self-attention mask: padding, and with ``directional_heads`` one head that
        looks back and one that looks ahead (``layers.directional_mask``)."""
        if self.cfg.directional_heads:
            return directional_mask(attention_mask, self.cfg.heads, self.cfg.directional_head_index)
        return padding_mask(attention_mask)

    @property
    def grounding_grid(self) -> tuple[int, int] | None:
        """The patch grid grounding targets are made for, when this model trains grounding."""
        return tuple(self.vision.embed.grid) if self.cfg.grounding_weight > 0 else None

    def cross_attention_maps(self, pixel_values, input_ids, attention_mask=None,
                             layer: int | None = None) -> torch.Tensor:
        """(B, L, N): each text token's cross-attention over the N image patches in the
        image-grounded encoder (``layers.patch_attention``: of ``layer``, or the mean of all)."""
        context = self._context(self.forward_features(pixel_values))
        _, maps = self.text_layers(self.text_embed(self._grounded_ids(input_ids)), context=context,
                                   return_attention=True, mask=self._self_mask(_ones_if_none(attention_mask, input_ids)))
        return patch_attention(maps, layer, "this BLIP")

    @_needs("retrieval")
    def text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """What the grounded encoder reads of a text: its ids, [ENC] first (``hf_compat``: as
        given); ``match_tokens`` takes them (re-ranking)."""
        return self._grounded_ids(input_ids)

    def _grounded_ids(self, input_ids) -> torch.Tensor:
        if self.cfg.hf_compat:
            return input_ids
        return torch.cat([torch.full_like(input_ids[:, :1], self.cfg.enc_token_id), input_ids[:, 1:]], 1)

    def decode_states(self, input_ids, attention_mask, context, past_length: int = 0, cache=None,
                      context_mask=None) -> torch.Tensor:
        """Causal decoder: (B, T, D) states of ``input_ids`` (already with [DEC] first) that follow
        ``past_length`` cached positions, cross-attending to ``context``."""
        mask = None if attention_mask is None else padding_mask(attention_mask)
        return self.decoder_layers(self._dec_embed(input_ids, past_length=past_length), mask=mask, causal=True,
                                   context=context, context_mask=context_mask, cache=cache)

    def decoder_inputs(self, input_ids, attention_mask):
        """[DEC] + prompt + the caption's tokens after [CLS], cut to ``max_text_len``: (ids, mask,
        number of unscored tokens)."""
        prompt = torch.tensor([self.cfg.dec_token_id, *self.cfg.prompt_ids], device=input_ids.device)
        ids = torch.cat([prompt.expand(input_ids.shape[0], -1), input_ids[:, 1:]], 1)
        mask = _ones_if_none(attention_mask, input_ids)
        mask = torch.cat([torch.ones_like(ids[:, :prompt.numel()]), mask[:, 1:]], 1)
        n = self.cfg.max_text_len
        return ids[:, :n], mask[:, :n], prompt.numel()

    # -- calls ------------------------------------------------------------------------------------
    @_needs("retrieval")
    def encode_image(self, pixel_values) -> torch.Tensor:
        return self._image(pixel_values)[1]

    @_needs("retrieval")
    def encode_text(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self._text(input_ids, attention_mask)[1]

    @_needs("retrieval")
    def match_tokens(self, image_tokens, text_ids, attention_mask=None) -> torch.Tensor:
        """ITM logits (B, 2) from image tokens and ``text_features`` (re-ranking)."""
        return self.itm_head(self._grounded(text_ids, attention_mask, image_tokens)[:, 0])

    @_needs("retrieval")
    def match_log_odds(self, image_tokens, text_ids, attention_mask=None) -> torch.Tensor:
        """(B,) re-ranking scores from image tokens and ``text_features``: the ITM log-odds,
        adjusted as ``score`` is by the objectives (``match_score="itm+edit"``)."""
        states = self._grounded(text_ids, attention_mask, image_tokens)
        return match_log_score(self.objectives, self.itm_head(states[:, 0]), lambda: self.word_head(states),
                               text_ids, attention_mask, log_odds=True)

    @_needs("retrieval")
    def match(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, 2) ITM logits of zipped (image, text) pairs; column 1 = match."""
        return self.itm_head(self.ground(input_ids, attention_mask, self.forward_features(pixel_values))[:, 0])

    @_needs("retrieval")
    def score(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B,) log P(match) of zipped pairs from the ITM head, adjusted by the objectives
        (``match_score="itm+edit"``) and, with ``match_lm_weight``, plus that weight times the
        caption's log-likelihood under the decoder (``VLModel`` documents ``score``)."""
        image_tokens = self.forward_features(pixel_values)
        states = self.ground(input_ids, attention_mask, image_tokens)
        score = match_log_score(self.objectives, self.itm_head(states[:, 0]), lambda: self.word_head(states),
                                input_ids, attention_mask)
        if self.cfg.match_lm_weight > 0:
            lm = self._caption_log_likelihood(image_tokens, input_ids, attention_mask)
            score = score.float() + self.cfg.match_lm_weight * lm.float()
        return score

    def forward(self, pixel_values, input_ids, attention_mask=None) -> Output:
        """Encoder side: grounded states, ITM logits and both ITC embeddings (decoder-only: LM logits)."""
        if not self.retrieval:
            return Output(logits=self.lm_logits(pixel_values, input_ids, attention_mask))
        tokens, img = self._image(pixel_values)
        states = self.ground(input_ids, attention_mask, tokens)
        return Output(features=states, pooled=states[:, 0], logits=self.itm_head(states[:, 0]),
                      image_embeds=img, text_embeds=self.encode_text(input_ids, attention_mask))

    @_needs("text_decoder")
    def lm_logits(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, L', V) next-token logits of [DEC] + prompt + caption (``decoder_inputs``)."""
        ids, mask, _ = self.decoder_inputs(input_ids, attention_mask)
        return self.lm_head(self.decode_states(ids, mask, self._context(self.forward_features(pixel_values))))

    @_needs("text_decoder")
    def score_captions(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B,) log-likelihood of each caption (tokenised with [CLS] ... [SEP]) after the prompt,
        its end token included, without label smoothing."""
        return self._caption_log_likelihood(self.forward_features(pixel_values), input_ids, attention_mask)

    def _caption_log_likelihood(self, image_tokens, input_ids, attention_mask) -> torch.Tensor:
        ids, mask, unscored = self.decoder_inputs(input_ids, attention_mask)
        logits = self.lm_head(self.decode_states(ids, mask, self._context(image_tokens)))
        return sequence_log_likelihood(logits, caption_labels(ids, mask, unscored))

    @_needs("text_decoder")
    @torch.no_grad()
    def generate(self, pixel_values, prompt_ids: list[list[int]] | None = None, max_new_tokens: int = 30,
                 use_cache: bool = True, context: torch.Tensor | None = None,
                 context_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        """(B * num_return_sequences, T) caption tokens after the prompt (end token left out,
        padded). ``prompt_ids``: one list of prompt tokens per image (default: the config's
        prompt); ``context`` (B, M, D) / ``context_mask`` (B, M): states to attend to instead of
        the image's (VQA: the question's); ``options``: see ``vlkit.models.generate.decode``
        (num_beams, do_sample, top_p, generator ...)."""
        if context is None:
            context = self._context(self.forward_features(pixel_values))  # the image, encoded once
        keys = None if context_mask is None else padding_mask(context_mask)  # (B, 1, 1, M)
        b = context.shape[0]
        if prompt_ids is None:
            prompt_ids = [list(self.cfg.prompt_ids)] * b
        if len(prompt_ids) != b:
            raise ValueError(f"{len(prompt_ids)} prompts for {b} images")
        prompts = [[self.cfg.dec_token_id, *p] for p in prompt_ids]

        def step(tokens, past, cache, rows):
            ctx, cm = (context, keys) if rows is None else (context[rows], None if keys is None else keys[rows])
            return self.lm_head(self.decode_states(tokens, None, ctx, past, cache, cm)[:, -1])
        return decode(step, prompts, eos_token_id=self.cfg.eot_token_id, pad_token_id=self.cfg.pad_token_id,
                      max_new_tokens=max_new_tokens, use_cache=use_cache, device=context.device, **options)

    # -- VQA: the question grounded in the image, the answer from the decoder ------------------------
    @_needs("vqa")
    def question_states(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, L, D) the image-grounded encoder's states of the questions, as the decoder's context
        (``_as_context``)."""
        return self._as_context(self.ground(input_ids, attention_mask, self.forward_features(pixel_values)))

    def _as_context(self, states: torch.Tensor) -> torch.Tensor:
        """Question states as the decoder's cross-attention context: mapped to the image width by
        ``question_proj`` where the text and image widths differ."""
        if self.question_proj is not None:
            return self.question_proj(states)
        if states.shape[-1] != self.cfg.vision.dim:
            raise ValueError(f"VQA: this BLIP's text width {states.shape[-1]} differs from its image width "
                             f"{self.cfg.vision.dim} and it has no question_proj: fine-tune it with --vqa, which adds one")
        return states

    @_needs("vqa")
    def answer_tokens(self, pixel_values, input_ids, attention_mask=None, max_new_tokens: int = 10,
                      **options) -> torch.Tensor:
        """(B, T) generated answer tokens (end token left out, padded); options as ``generate``."""
        states = self.question_states(pixel_values, input_ids, attention_mask)
        mask = None if self.cfg.hf_compat else attention_mask  # Hugging Face attends to padding too
        return self.generate(None, prompt_ids=[[]] * states.shape[0], max_new_tokens=max_new_tokens,
                             context=states, context_mask=mask, **options)

    @_needs("vqa")
    def answer_scores(self, pixel_values, input_ids, attention_mask, answer_ids, answer_mask) -> torch.Tensor:
        """(B, C) log-likelihood of each candidate answer (tokenised [CLS] ... [SEP], the end token
        scored) for each question."""
        states = self.question_states(pixel_values, input_ids, attention_mask)
        b, c = states.shape[0], answer_ids.shape[0]
        ids, mask = answer_ids.repeat(b, 1), answer_mask.repeat(b, 1)  # (B*C, L): question-major
        q_mask = None if attention_mask is None else attention_mask.repeat_interleave(c, 0)
        logits = self.answer_logits(states.repeat_interleave(c, 0), q_mask, ids, mask)
        return answer_log_likelihood(logits, ids, mask).view(b, c)

    def answer_logits(self, question_states, question_mask, answer_ids, answer_mask) -> torch.Tensor:
        """(B, L, V) next-token logits of answers (tokenised [CLS] ... [SEP]; [DEC] takes the
        [CLS]'s place) decoded over the question states (B, M, D), question padding skipped
        (``hf_compat``: attended to, as Hugging Face does)."""
        dec = torch.cat([torch.full_like(answer_ids[:, :1], self.cfg.dec_token_id), answer_ids[:, 1:]], 1)
        keys = None if self.cfg.hf_compat or question_mask is None else padding_mask(question_mask)
        return self.lm_head(self.decode_states(dec, answer_mask, question_states, context_mask=keys))

    # -- training ---------------------------------------------------------------------------------
    def alpha(self) -> float:
        return alpha_at(int(self.steps_done), self.cfg.alpha, self.cfg.alpha_ramp_steps) if self.cfg.distill else 0.0

    def training_losses(self, batch: dict) -> dict:
        """The config's ``objectives`` among ITC + ITM + LM + VQA (equal weights). Keys:
        pixel_values, input_ids, attention_mask; optional image_ids (captions of one image are
        positives of each other), neg_input_ids / neg_attention_mask / neg_owner (with
        ``hard_negatives``), question_input_ids / question_attention_mask / answer_input_ids /
        answer_attention_mask (VQA); with the auxiliary objectives, their targets (grounding ...)."""
        cfg, objectives = self.cfg, set(self.cfg.objectives)
        pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        out, losses = {}, []
        image_tokens = self.forward_features(pixels)
        # the random draws of this call (ITM negatives, then the objectives'), made for the global batch
        generator = call_generator(self._calls, int(self.steps_done), self.training, ids.device)
        itc_itm = self.retrieval and bool(objectives & {"itc", "itm"})  # ITM draws its negatives by ITC similarity
        g = gather_token_batch(ids, mask, batch.get("image_ids"), cfg.pad_token_id) if itc_itm else None

        def draw(rows):  # uniform draws for rows of this batch, made for the global batch
            return torch.rand(sum(g["sizes"]), generator=generator, device=ids.device)[g["rows"]][rows]
        step = Step(self.objectives, batch, self.training, word_logits=self.word_head, draw=draw,
                    fuse=lambda rows, t, m: self.ground(t, m, image_tokens[rows]))
        if itc_itm:
            out.update(self._itc_itm(batch, pixels, ids, mask, image_tokens, g, generator, step))
            losses += [out[f"{o}_loss"] for o in ("itc", "itm") if o in objectives]
        if cfg.text_decoder and "lm" in objectives:
            dec_ids, dec_mask, unscored = self.decoder_inputs(ids, mask)
            context = self._context(image_tokens)
            if cfg.decoder_grounding and step.taps_attention:
                targets = {k: next_word_targets(t, unscored, dec_ids.shape[1])
                           for k, t in step.targets("caption").items()}
                states = tapped_cross_attention(self.decoder_layers, step, self._dec_embed(dec_ids), dec_mask,
                                                padding_mask(dec_mask), context, targets, causal=True)
            else:
                states = self.decode_states(dec_ids, dec_mask, context)
            logits = self.lm_head(states)
            out["lm_loss"] = lm_loss(logits, caption_labels(dec_ids, dec_mask, unscored), cfg.label_smoothing,
                                     global_batch=True)
            losses.append(out["lm_loss"])
            if cfg.false_word_weight > 0 and "false_input_ids" in batch:
                out["false_word_loss"] = self._false_word_loss(batch, context)
                losses.append(cfg.false_word_weight * out["false_word_loss"])
        if "answer_input_ids" in batch and "vqa" in objectives:
            q_mask, a_ids, a_mask = (batch["question_attention_mask"], batch["answer_input_ids"],
                                     batch["answer_attention_mask"])
            if not (cfg.text_encoder and cfg.text_decoder):
                raise ValueError("VQA training needs this BLIP's grounded encoder and decoder "
                                 "(text_encoder and text_decoder)")
            states = self._as_context(self.ground(batch["question_input_ids"], q_mask, image_tokens))
            logits = self.answer_logits(states, q_mask, a_ids, a_mask)
            out["vqa_loss"] = answer_lm_loss(logits, a_ids, a_mask, cfg.label_smoothing, global_batch=True)
            losses.append(out["vqa_loss"])
        losses.extend(step.finish(out))
        if not losses:
            raise ValueError(f"nothing to train: objectives {list(cfg.objectives)} need their parts "
                             "(and VQA needs answer_input_ids in the batch)")
        out["loss"] = torch.stack([l.float() for l in losses]).sum()
        return out

    def _false_word_loss(self, batch: dict, context: torch.Tensor) -> torch.Tensor:
        """Unlikelihood of each ``false_input_ids`` row's token at ``false_position`` (the collate's
        ``false_words``) under the decoder, over its owner's image; the rows are decoded up to it."""
        ids, position = batch["false_input_ids"], batch["false_position"]
        dec_ids, dec_mask, unscored = self.decoder_inputs(ids, batch["false_attention_mask"])
        at = position + unscored - 2  # the decoder position whose logits predict caption token j
        if not ids.shape[0]:  # none in this batch: a zero that still reaches every process's mean
            return unlikelihood_loss(context.new_zeros(0, 1), position, global_batch=True)
        end = int(at.max()) + 1
        dec_ids, dec_mask = dec_ids[:, :end], dec_mask[:, :end]
        states = self.decode_states(dec_ids, dec_mask, context[batch["false_owner"]])
        rows = torch.arange(ids.shape[0], device=ids.device)
        logits = self.lm_head(states[rows, at])
        return unlikelihood_loss(logits, ids[rows, position], global_batch=True)

    def _itc_itm(self, batch, pixels, ids, mask, image_tokens, g: dict, generator, step: Step) -> dict:
        """ITC against [momentum features of the global batch ``g`` ; queue] and ITM with negatives
        drawn for the global batch (``losses.distill.itm_token_pairs``), means over the global
        batch; in training the momentum features are enqueued (every process's, in rank order).
        The ITM pass is the objectives' (targets on the positives, ``Step.targets_at``)."""
        cfg, image_ids = self.cfg, batch.get("image_ids")
        alpha, temp = self.alpha(), self.temp.clamp(0.001, 0.5)
        image_feat = F.normalize(self.image_proj(image_tokens[:, 0]), dim=-1)
        text_feat = self._text(ids, mask)[1]
        with torch.no_grad():
            image_feat_m = self._image(pixels, momentum=True)[1]
            text_feat_m = self._text(ids, mask, momentum=True)[1]
        itc = itc_queue_loss(
            image_feat, text_feat, all_gather_no_grad(image_feat_m, g["sizes"]),
            all_gather_no_grad(text_feat_m, g["sizes"]), self.queue.image, self.queue.text, temp, alpha,
            cfg.distill, g["ids"], self.queue.ids if image_ids is not None else None, row_start=g["rows"].start)
        out = {"itc_loss": itc * global_mean_scale(ids.shape[0], ids.device)}
        images, texts, masks, labels, negative_rows = itm_token_pairs(
            g, image_tokens, image_feat, text_feat, 1 / temp.detach(), generator, cfg.itm_hard_negatives,
            batch if cfg.hard_negatives else None, cfg.pad_token_id)
        caption_rows = torch.arange(ids.shape[0], device=ids.device)
        if step.taps_attention:
            targets = step.targets_at("caption", caption_rows, texts.shape[0], texts.shape[1])
            states = self.ground(texts, masks, images, step, targets)
        else:
            states = self.ground(texts, masks, images)
        step.itm_rows(states, caption_rows, negative_rows)
        logits = self.itm_head(states[:, 0])
        out["itm_loss"] = itm_loss(logits, labels) * global_mean_scale(labels.shape[0], ids.device)
        out["itm_acc"] = itm_accuracy(logits.detach(), labels)
        if self.training:
            self.queue.enqueue(ids=image_ids, image=image_feat_m, text=text_feat_m)
        out["alpha"] = torch.tensor(alpha)
        return out

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After each optimiser step: EMA update, temperature clamp, the step count behind α."""
        if self.retrieval:
            self.momentum.update()
            self.temp.clamp_(0.001, 0.5)
        self.steps_done += 1
        for objective in self.objectives:
            objective.after_step()


def next_word_targets(targets: torch.Tensor | None, unscored: int, length: int) -> torch.Tensor | None:
    """Attention targets of captions ([CLS] first: (..., L, P), as the collate writes them) moved
    to the decoder's positions (``decoder_inputs``: [DEC] + prompt + the caption after [CLS],
    ``unscored`` tokens before it, ``length`` positions), each on the position that writes the
    token it belongs to: caption token j is written at position j + unscored - 2."""
    if targets is None:
        return None
    moved = F.pad(targets[..., 1:, :], (0, 0, unscored - 1, max(0, length - targets.shape[-2] - unscored + 2)))
    return moved[..., :length, :]


def _ones_if_none(mask, ids):
    return torch.ones_like(ids) if mask is None else mask
