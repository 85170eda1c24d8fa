"""Hugging Face BLIP folders (``BlipForConditionalGeneration``, ``BlipForImageTextRetrieval``,
``BlipForQuestionAnswering``, as ``save_pretrained`` writes them) -> vlkit BLIP.

- captioning: the image tower and ``text_decoder`` (a BLIP with the decoder only);
- retrieval: the image tower, ``text_encoder``, the ITC projections and the ITM head (encoder only);
- question answering: the image tower, ``text_encoder`` and its own ``text_decoder`` (untied).
The vision attention's fused ``qkv`` splits into q, k, v. Sizes, heads and LayerNorm eps come
from the file (Hugging Face's defaults differ from the published checkpoints'), a field it
leaves out (transformers 4.x writes only those that differ from its defaults) taking
transformers' default, as transformers reads it. The LM head's weight is the decoder's word
embeddings when the folder ties them (transformers 5.x writes the matrix once) and its own when
the folder holds a different one (4.x leaves a new model's untied: ``tie_lm_head=False``). The converted model
has ``hf_compat=True``: its grounded encoder reads [CLS], as Hugging Face's does. Momentum
copies start from the loaded weights; the feature queues keep their random start. ``BlipModel``
is refused: its layout matches no published weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.blip import BLIP, BLIPConfig
from ..models.vit import ViTConfig
from .common import ConversionError, checked_config, load_strict, read_hf_weights, rename

_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
KINDS = {"BlipForConditionalGeneration": (False, True), "BlipForImageTextRetrieval": (True, False),
         "BlipForQuestionAnswering": (True, True)}  # (text encoder, text decoder)

_V = r"vision_model\.encoder\.layers\.(\d+)\."
VISION = [
    (r"vision_model\.embeddings\.class_embedding", r"vision.embed.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", r"vision.embed.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"vision.embed.patch_embed.proj.\1"),
    (_V + r"self_attn\.projection\.(weight|bias)", r"vision.encoder.blocks.\1.attn.proj.\2"),
    (_V + r"layer_norm1\.(weight|bias)", r"vision.encoder.blocks.\1.norm1.\2"),
    (_V + r"layer_norm2\.(weight|bias)", r"vision.encoder.blocks.\1.norm2.\2"),
    (_V + r"mlp\.(fc1|fc2)\.(weight|bias)", r"vision.encoder.blocks.\1.mlp.\2.\3"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"vision.norm.\1"),
]


_QKV = (("query", "q"), ("key", "k"), ("value", "v"))


def text_rules(hf: str, embed: str, layers: str) -> list[tuple[str, str]]:
    """A BLIP text stack under ``hf`` (its ``embeddings`` and ``encoder.layer.N``) onto our
    embeddings ``embed`` and blocks ``layers``."""
    L, B = hf + r"encoder\.layer\.(\d+)\.", layers + r".blocks.\1."
    return [
        (hf + r"embeddings\.word_embeddings\.weight", embed + ".word.weight"),
        (hf + r"embeddings\.position_embeddings\.weight", embed + ".position.weight"),
        (hf + r"embeddings\.LayerNorm\.(weight|bias)", embed + r".norm.\1"),
        *[(L + rf"attention\.self\.{hf_name}\.(weight|bias)", B + rf"attn.{ours}.\2") for hf_name, ours in _QKV],
        (L + r"attention\.output\.dense\.(weight|bias)", B + r"attn.proj.\2"),
        (L + r"attention\.output\.LayerNorm\.(weight|bias)", B + r"norm1.\2"),
        *[(L + rf"crossattention\.self\.{hf_name}\.(weight|bias)", B + rf"cross_attn.{ours}.\2") for hf_name, ours in _QKV],
        (L + r"crossattention\.output\.dense\.(weight|bias)", B + r"cross_attn.proj.\2"),
        (L + r"crossattention\.output\.LayerNorm\.(weight|bias)", B + r"norm_cross.\2"),
        (L + r"intermediate\.dense\.(weight|bias)", B + r"mlp.fc1.\2"),
        (L + r"output\.dense\.(weight|bias)", B + r"mlp.fc2.\2"),
        (L + r"output\.LayerNorm\.(weight|bias)", B + r"norm2.\2"),
    ]


LM_HEAD = [
    (r"text_decoder\.cls\.predictions\.transform\.dense\.(weight|bias)", r"lm_head.dense.\1"),
    (r"text_decoder\.cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"lm_head.norm.\1"),
    (r"text_decoder\.cls\.predictions\.(?:decoder\.)?bias", r"lm_head.decoder.bias"),
    (r"text_decoder\.cls\.predictions\.decoder\.weight", r"lm_head.decoder.weight"),
]
HEADS = [(r"(vision_proj)\.(weight|bias)", r"image_proj.\2"), (r"(text_proj|itm_head)\.(weight|bias)", r"\1.\2")]
IGNORE = [r".*position_ids"]


def _kind(hf: dict, folder) -> str:
    archs = hf.get("architectures") or []
    if "BlipModel" in archs or not archs:
        raise ConversionError(f"{folder}: BlipModel folders are not converted (their layout matches no "
                              "published BLIP weights); use BlipForConditionalGeneration, "
                              "BlipForImageTextRetrieval or BlipForQuestionAnswering")
    for arch in archs:
        if arch in KINDS:
            return arch
    raise ConversionError(f"{folder}: BLIP architecture {archs[0]!r} is not converted "
                          f"(supported: {', '.join(KINDS)})")


def config_from_hf(hf: dict, kind: str, folder="", tie_lm_head: bool = True) -> BLIPConfig:
    t, v = hf["text_config"], hf["vision_config"]  # with transformers' defaults (read_hf_config)
    try:
        act_t, act_v = _ACT[t["hidden_act"]], _ACT[v["hidden_act"]]
        vision = ViTConfig(image_size=v["image_size"], patch_size=v["patch_size"], dim=v["hidden_size"],
                           depth=v["num_hidden_layers"], heads=v["num_attention_heads"],
                           mlp_dim=v["intermediate_size"], act=act_v, eps=v["layer_norm_eps"],
                           mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
        encoder, decoder = KINDS[kind]
        vocab, bos = t["vocab_size"], t["bos_token_id"]
        return BLIPConfig(
            vision=vision, dim=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
            mlp_dim=t["intermediate_size"], act=act_t, eps=t["layer_norm_eps"], vocab_size=vocab,
            max_text_len=t["max_position_embeddings"], embed_dim=hf["image_text_hidden_size"],
            text_encoder=encoder, text_decoder=decoder, tie_decoder=False, tie_lm_head=tie_lm_head, hf_compat=True,
            retrieval_heads=kind == "BlipForImageTextRetrieval", prompt="", pad_token_id=t["pad_token_id"],
            eot_token_id=t["sep_token_id"], dec_token_id=bos, enc_token_id=min(bos + 1, vocab - 1))
    except KeyError as e:
        raise ConversionError(f"{Path(folder) / 'config.json'}: BLIP config lacks {e.args[0]!r}") from None


def convert_state(state: dict[str, torch.Tensor], cfg: BLIPConfig, kind: str) -> dict[str, torch.Tensor]:
    """Hugging Face BLIP weights under vlkit's names (the fused vision qkv split)."""
    state = dict(state)
    for key in [k for k in state if k.endswith("self_attn.qkv.weight") or k.endswith("self_attn.qkv.bias")]:
        prefix, kind_ = key.rsplit(".qkv.", 1)
        layer = prefix.split(".")[3]
        for name, part in zip("qkv", state.pop(key).chunk(3, dim=0)):
            state[f"vision.encoder.blocks.{layer}.attn.{name}.{kind_}"] = part
    rules = list(VISION)
    if cfg.text_encoder:
        rules += text_rules(r"text_encoder\.", "text_embed", "text_layers")
        if cfg.text_decoder:
            rules += text_rules(r"text_decoder\.bert\.", "decoder_embed", "decoder_layers")
    else:
        rules += text_rules(r"text_decoder\.bert\.", "text_embed", "decoder_layers")
    rules += LM_HEAD + HEADS + [(r"(vision\.encoder\.blocks\.\d+\.attn\.[qkv]\.(?:weight|bias))", r"\1")]
    out = rename(state, rules, IGNORE)
    if cfg.text_decoder and "lm_head.decoder.weight" not in out:  # tied to the word embeddings
        out["lm_head.decoder.weight"] = out["decoder_embed.word.weight" if "decoder_embed.word.weight" in out
                                            else "text_embed.word.weight"]
    return out


def load_hf_blip(folder: str | Path, hf_config: dict) -> BLIP:
    kind = _kind(hf_config, folder)
    raw = read_hf_weights(folder)
    # transformers 5.x ties the LM head to the decoder's word embeddings and writes the matrix once;
    # 4.x leaves a new model's two untied and writes both
    head, words = (raw.get(f"text_decoder.{k}") for k in ("cls.predictions.decoder.weight",
                                                         "bert.embeddings.word_embeddings.weight"))
    tie = head is None or words is None or torch.equal(head, words)
    cfg = checked_config(config_from_hf(hf_config, kind, folder, tie_lm_head=tie), folder)
    model = BLIP(cfg)
    state = convert_state(raw, cfg, kind)
    # training state Hugging Face does not hold: momentum copies (reset below), queues, step count
    own = model.state_dict()
    for key, value in own.items():
        if key.startswith(("momentum.", "queue.")) or key in ("temp", "steps_done"):
            state.setdefault(key, value)
    load_strict(model, state, str(folder))
    model.pretrained_loaded()
    return model.eval()
