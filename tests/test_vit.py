import pytest
import torch

import vlkit
from vlkit.convert.common import ConversionError

transformers = pytest.importorskip("transformers")


def _hf_vit(tmp_path, classify=False, **kw):
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=37, image_size=32, patch_size=8, **kw)
    torch.manual_seed(0)
    if classify:
        cfg.num_labels = 3
        cfg.id2label = {0: "cat", 1: "dog", 2: "owl"}
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        model = transformers.ViTForImageClassification(cfg).eval()
    else:
        model = transformers.ViTModel(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


def test_vit_parity_with_transformers(tmp_path):
    ref = _hf_vit(tmp_path)
    pipe = vlkit.load(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(pixel_values=x).last_hidden_state
        got = pipe.model.forward_features(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # interpolated position embeddings: same code path, other image size
    with torch.no_grad():
        x = torch.randn(1, 3, 48, 48)
        expected = ref(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        got = pipe.model.forward_features(x)
    assert got.shape == expected.shape == (1, 37, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_vit_classifier_parity_and_labels(tmp_path):
    ref = _hf_vit(tmp_path, classify=True)
    pipe = vlkit.load(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(x).logits, ref(pixel_values=x).logits, atol=1e-5, rtol=0)
    assert pipe.model.cfg.class_names == ["cat", "dog", "owl"]


def test_wrong_checkpoint_is_refused(tmp_path):
    _hf_vit(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ConversionError, match="missing"):
        vlkit.load(tmp_path)


def test_vit_preset_and_training_loss():
    model = vlkit.create_model("vit", preset="tiny", num_classes=5)
    batch = {"pixel_values": torch.randn(4, 3, 64, 64), "labels": torch.tensor([0, 1, 2, 3])}
    losses = model.training_losses(batch)
    assert losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="unknown preset"):
        vlkit.create_model("vit", preset="huge")
    with pytest.raises(ValueError, match="unknown vit config field"):
        vlkit.create_model("vit", widht=3)
    base = vlkit.models.model_class("vit").make_config("base")
    assert (base.depth, base.dim, base.heads, base.mlp_dim, base.patch_size) == (12, 768, 12, 3072, 16)
