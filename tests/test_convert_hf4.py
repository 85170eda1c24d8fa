"""Hugging Face folders as transformers 4.x writes them, read with the installed transformers as
reference: config.json leaves out every field equal to transformers' default (4.x's
``save_pretrained`` writes only the others; a missing field is read as its default), BLIP's LM
head is a matrix of its own (4.x leaves a new model's untied and writes both), and ViLT's MLM
output bias appears twice (the head's own parameter and the decoder's)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlkit
from vlkit.convert.common import HF_DEFAULTS

T = pytest.importorskip("transformers")


def _as_transformers_4(folder, parts: dict[str, type]) -> None:
    """Rewrite ``folder``'s config.json the way 4.x writes it: drop each field equal to the
    default of its config class (``parts``: "" for the top level, "text_config", ...)."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for part, cls in parts.items():
        obj = cfg[part] if part else cfg
        defaults = cls().to_dict()
        for key in [k for k in obj if k not in ("model_type", "architectures") and k in defaults
                    and obj[k] == defaults[k]]:
            del obj[key]
    path.write_text(json.dumps(cfg))


def _blip(folder, cls_name):
    """A tiny random BLIP at transformers' default widths of heads and eps, written as 4.x would."""
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=8, intermediate_size=37,
                bos_token_id=97, pad_token_id=0, sep_token_id=39, eos_token_id=2)
    vision = dict(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37)  # layer_norm_eps left at transformers' 1e-5
    torch.manual_seed(0)
    hf = getattr(T, cls_name)(T.BlipConfig(text_config=text, vision_config=vision, projection_dim=32,
                                           image_text_hidden_size=16)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.2))
    hf.save_pretrained(folder)
    if hasattr(hf, "text_decoder"):  # an LM head of its own, in memory and in the file
        head = hf.text_decoder.cls.predictions
        head.decoder.weight = torch.nn.Parameter(torch.randn(head.decoder.weight.shape, generator=g) * 0.5)
        weights = load_file(folder / "model.safetensors")
        weights["text_decoder.cls.predictions.decoder.weight"] = head.decoder.weight.detach().clone()
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _as_transformers_4(folder, {"": T.BlipConfig, "text_config": T.BlipTextConfig,
                                "vision_config": T.BlipVisionConfig})
    written = json.loads((folder / "config.json").read_text())
    assert not {"layer_norm_eps", "num_attention_heads", "hidden_act"} & set(written["text_config"])
    assert "layer_norm_eps" not in written["vision_config"]
    return hf


def test_defaults_table_is_transformers_own():
    """Every default the converters fill in is the one transformers' config classes hold."""
    classes = {"vit": T.ViTConfig, "bert": T.BertConfig, "vilt": T.ViltConfig, "blip": T.BlipConfig,
               "blip_text_model": T.BlipTextConfig, "blip_vision_model": T.BlipVisionConfig,
               "clip": T.CLIPConfig, "clip_text_model": T.CLIPTextConfig, "clip_vision_model": T.CLIPVisionConfig}
    assert set(classes) == set(HF_DEFAULTS)
    for kind, cls in classes.items():
        theirs = cls().to_dict()
        for key, value in HF_DEFAULTS[kind].items():
            assert theirs[key] == value, (kind, key)


def _pixels_ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (3, 7), generator=g)
    ids[:, 0], ids[:, -1] = 1, 39
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return torch.randn(3, 3, 30, 30, generator=g), ids, mask


def test_blip_captioning_folder_of_transformers_4(tmp_path):
    hf = _blip(tmp_path, "BlipForConditionalGeneration")
    ours = vlkit.load(tmp_path).model
    cfg = ours.cfg
    assert (cfg.heads, cfg.eps, cfg.vision.eps, cfg.tie_lm_head) == (8, 1e-12, 1e-5, False)
    px, ids, mask = _pixels_ids()
    with torch.no_grad():
        ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask).logits
        mine = ours.lm_head(ours.decode_states(ids, mask, ours.forward_features(px)))
        assert (ref - mine).abs().max() <= 1e-5
        for opts in (dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3)):
            expected = hf.generate(pixel_values=px, **opts)[:, 1:].tolist()
            expected = [r[:r.index(39)] if 39 in r else [t for t in r if t != 0] for r in expected]
            got = [[t for t in r if t != 0] for r in ours.generate(px, prompt_ids=[[]] * 3, **opts).tolist()]
            assert got == expected, opts
    # the untied head is its own matrix in vlkit too
    assert ours.lm_head.decoder.weight.data_ptr() != ours._dec_embed.word.weight.data_ptr()


def test_blip_retrieval_folder_of_transformers_4(tmp_path):
    hf = _blip(tmp_path, "BlipForImageTextRetrieval")
    ours = vlkit.load(tmp_path).model
    px, ids, mask = _pixels_ids()
    with torch.no_grad():
        itm = hf(pixel_values=px, input_ids=ids, attention_mask=mask).itm_score
        assert (itm - ours.match(px, ids, mask)).abs().max() <= 1e-5


def test_vit_folder_of_transformers_4(tmp_path):
    """A ViT-B-shaped config.json (4.x writes none of its sizes, all at the defaults) loads with
    ViT-B's sizes; outputs of a small model equal transformers'."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    from vlkit.convert.common import read_hf_config
    from vlkit.convert.hf_vit import config_from_hf
    base = config_from_hf(read_hf_config(tmp_path / "b"))
    assert (base.dim, base.depth, base.heads, base.mlp_dim, base.image_size, base.patch_size) == \
        (768, 12, 12, 3072, 224, 16)
    torch.manual_seed(0)
    hf = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                image_size=32, patch_size=8), add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "s")
    _as_transformers_4(tmp_path / "s", {"": T.ViTConfig})
    assert not {"layer_norm_eps", "hidden_act", "qkv_bias"} & set(json.loads((tmp_path / "s" / "config.json").read_text()))
    ours = vlkit.load(tmp_path / "s").model
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=px).last_hidden_state
        torch.testing.assert_close(ours.forward_features(px), ref, atol=1e-5, rtol=0)


def test_vilt_mlm_folder_of_transformers_4(tmp_path):
    """ViLT MLM: the output bias written twice (the same values) is read once; written twice with
    different values, the folder is refused naming both keys."""
    torch.manual_seed(0)
    cfg = T.ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       vocab_size=99, max_position_embeddings=16, image_size=32, patch_size=8, max_image_length=-1)
    hf = T.ViltForMaskedLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    _as_transformers_4(tmp_path, {"": T.ViltConfig})
    weights = load_file(tmp_path / "model.safetensors")
    bias = hf.mlm_score.decoder.bias.detach().clone()
    weights.update({"mlm_score.bias": bias, "mlm_score.decoder.bias": bias.clone()})
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = vlkit.load(tmp_path).model
    g = torch.Generator().manual_seed(1)
    px, ids = torch.randn(2, 3, 32, 32, generator=g), torch.randint(5, 99, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(ours.mlm_logits(px, ids, mask), hf(input_ids=ids, attention_mask=mask,
                                                                    pixel_values=px).logits, atol=1e-5, rtol=0)
    weights["mlm_score.bias"] = bias + 1
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(vlkit.convert.ConversionError, match="mlm_score.bias and mlm_score.decoder.bias"):
        vlkit.load(tmp_path)
