"""Hugging Face ViLT folders -> vlkit ViLT: ``ViltModel``, ``ViltForMaskedLM``,
``ViltForQuestionAnswering``, ``ViltForImageAndTextRetrieval`` and
``ViltForImagesAndTextClassification`` (two images, NLVR2).

The HF layer is pre-norm (layernorm_before -> attention -> residual -> layernorm_after -> MLP ->
residual), like vlkit's PreNormBlock; every backbone LayerNorm uses ``layer_norm_eps``, the
classifier heads PyTorch's default 1e-5. HF ties the MLM decoder to the word embeddings and
saves only the word embeddings: the decoder weight is copied from them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.vilt import ViLT, ViLTConfig
from .hf_vit import layer_rules
from .common import ConversionError, checked_config, load_strict, read_hf_weights, rename, strip_prefix

_L = r"encoder\.layer\.(\d+)\."
_B = r"encoder.blocks.\1."
RULES = [
    (r"embeddings\.text_embeddings\.word_embeddings\.weight", "text_embed.word.weight"),
    (r"embeddings\.text_embeddings\.position_embeddings\.weight", "text_embed.position.weight"),
    (r"embeddings\.text_embeddings\.token_type_embeddings\.weight", "text_embed.token_type.weight"),
    (r"embeddings\.text_embeddings\.LayerNorm\.(weight|bias)", r"text_embed.norm.\1"),
    (r"embeddings\.cls_token", "image_embed.cls_token"),
    (r"embeddings\.position_embeddings", "image_embed.pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"image_embed.patch_embed.proj.\1"),
    (r"embeddings\.token_type_embeddings\.weight", "modality_embed.weight"),
    *layer_rules(_L, _B),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.dense.\1"),
    (r"mlm_score\.transform\.dense\.(weight|bias)", r"mlm_head.dense.\1"),
    (r"mlm_score\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.norm.\1"),
    (r"mlm_score\.decoder\.(weight|bias)", r"mlm_head.decoder.\1"),
    (r"rank_output\.(weight|bias)", r"rank_head.\1"),
    # classifier.* -> vqa_head / pair_head, decided by the architecture (see load_hf_vilt)
    (r"classifier\.(\d)\.(weight|bias)", r"CLASSIFIER.\1.\2"),
]
IGNORE = [r".*position_ids", r".*token_type_ids"]
_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
        "quick_gelu": "quick_gelu"}


def _special_ids(folder: Path, hf: dict) -> dict:
    """Mask/pad/special ids from the folder's tokenizer, else BERT-uncased's for its vocabulary."""
    from ..tokenizers import load_tokenizer
    try:
        tok = load_tokenizer(folder)
    except (FileNotFoundError, ValueError):
        tok = None
    if tok is not None and tok.token_to_id("[MASK]") is not None:
        return dict(mask_token_id=tok.token_to_id("[MASK]"), pad_token_id=tok.pad_token_id,
                    special_token_ids=tuple(sorted(tok.special_token_ids | {tok.pad_token_id})))
    if hf["vocab_size"] == 30522:  # bert-base-uncased, ViLT's tokenizer
        return dict(mask_token_id=103, pad_token_id=0, special_token_ids=(0, 100, 101, 102, 103))
    return dict(pad_token_id=hf.get("pad_token_id") or 0)


def config_from_hf(hf: dict, folder: Path | None = None, num_labels: int | None = None) -> ViLTConfig:
    """``num_labels``: the classifier's output size read from the weights (config.json omits
    ``id2label`` when it is the default two labels)."""
    if hf.get("model_type") != "vilt":
        raise ConversionError(f"expected a ViLT config (model_type 'vilt'), got {hf.get('model_type')!r}")
    act = _ACT.get(hf["hidden_act"])
    if act is None:
        raise ConversionError(f"unsupported ViLT activation {hf.get('hidden_act')!r}")
    image_size, patch_size = hf["image_size"], hf["patch_size"]
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ConversionError("only square image_size / patch_size are supported")
    archs = hf.get("architectures") or ["ViltModel"]
    arch = archs[0]
    labels = hf.get("id2label") or {}
    names = [labels[k] for k in sorted(labels, key=int)]
    if num_labels is not None and len(names) != num_labels:
        names = [f"LABEL_{i}" for i in range(num_labels)]
    heads = dict(itm_head=False, mlm_head=arch == "ViltForMaskedLM",
                 rank_head=arch == "ViltForImageAndTextRetrieval")
    if arch == "ViltForQuestionAnswering":
        heads.update(num_answers=len(names), answer_names=names)
    elif arch == "ViltForImagesAndTextClassification":
        if hf["num_images"] != 2:
            raise ConversionError(f"pair classification needs num_images=2, got {hf.get('num_images')}")
        heads.update(pair_classes=len(names))
    elif arch not in ("ViltModel", "ViltForMaskedLM", "ViltForImageAndTextRetrieval"):
        raise ConversionError(f"ViLT architecture {arch!r} cannot be converted")
    max_image = hf["max_image_length"]
    return ViLTConfig(
        image_size=image_size, patch_size=patch_size, in_chans=hf["num_channels"],
        dim=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], act=act, eps=hf["layer_norm_eps"],
        qkv_bias=hf["qkv_bias"], dropout=hf.get("hidden_dropout_prob", 0.0),
        vocab_size=hf["vocab_size"], max_text_len=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"], modality_types=hf["modality_type_vocab_size"],
        max_image_tokens=max_image if isinstance(max_image, int) and max_image > 0 else 0,
        **heads, **(_special_ids(folder, hf) if folder is not None else {}))


def load_hf_vilt(folder: str | Path, hf_config: dict) -> ViLT:
    folder = Path(folder)
    raw = strip_prefix(read_hf_weights(folder), "vilt.")
    # transformers 4.x writes the MLM output bias twice, as the head's own parameter and as the
    # decoder's (the same tensor); 5.x writes the decoder's alone
    bias = raw.pop("mlm_score.bias", None)
    if bias is not None:
        tied = raw.setdefault("mlm_score.decoder.bias", bias)
        if not torch.equal(tied, bias):
            raise ConversionError(f"{folder}: mlm_score.bias and mlm_score.decoder.bias differ "
                                  "(transformers ties them)")
    state = rename(raw, RULES, IGNORE)
    out = state.get("CLASSIFIER.3.weight")
    cfg = checked_config(config_from_hf(hf_config, folder, None if out is None else out.shape[0]), folder)
    head = "vqa_head" if cfg.num_answers else "pair_head"
    state = {k.replace("CLASSIFIER.", f"{head}.") if k.startswith("CLASSIFIER.") else k: v
             for k, v in state.items()}
    if cfg.mlm_head and "mlm_head.decoder.weight" not in state and "text_embed.word.weight" in state:
        state["mlm_head.decoder.weight"] = state["text_embed.word.weight"]  # tied in HF
    model = ViLT(cfg)
    load_strict(model, state, str(folder))
    return model.eval()
