"""vlkit export --onnx: the image and text towers of CLIP and VLMo (dual mode) and ViT, with dynamic
batch size (and text length), checked against PyTorch under onnxruntime at two batch sizes."""
import json

import numpy as np
import pytest
import torch

import vlkit
from vlkit.checkpoint import WEIGHTS, model_state, save_run_config, save_weights
from vlkit.cli import main
from vlkit.export import export_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _run(folder, name, **overrides):
    torch.manual_seed(0)
    model = vlkit.create_model(name, "tiny", **overrides).eval()
    folder.mkdir()
    save_run_config(folder, name, model.config_dict())
    save_weights(folder / WEIGHTS, model_state(model))
    return folder, model


def test_clip_towers_match_pytorch_at_two_batch_sizes(tmp_path, capsys):
    run, model = _run(tmp_path / "run", "clip", vision=dict(depth=1), text=dict(depth=1))
    out = tmp_path / "onnx"
    assert main(["export", str(run), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "image.onnx: inputs pixel_values -> outputs image_embeds" in printed
    info = json.loads((out / "onnx.json").read_text())
    assert info["files"]["text.onnx"]["inputs"]["input_ids"]["shape"] == ["batch", "sequence"]
    assert info["text"]["max_length"] == 32 and info["image"]["size"] == 64
    image = ort.InferenceSession(str(out / "image.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(out / "text.onnx"), providers=["CPUExecutionProvider"])
    for batch, length in ((2, 6), (5, 32)):  # other sizes than the exporter saw, and padding
        px = torch.randn(batch, 3, 64, 64)
        ids = torch.randint(5, 400, (batch, length))
        ids[:, -1] = 511  # end-of-text: the largest id (eot_token_id None)
        ids[0, 3], ids[0, 4:] = 511, 0
        mask = (torch.arange(length)[None] <= ids.argmax(-1)[:, None]).long()
        with torch.no_grad():
            want_img, want_txt = model.encode_image(px), model.encode_text(ids, mask)
        got_img = image.run(None, {"pixel_values": px.numpy()})[0]
        got_txt = text.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert got_img.shape == (batch, 128) and got_txt.shape == (batch, 128)
        np.testing.assert_allclose(got_img, want_img.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got_txt, want_txt.numpy(), atol=1e-4, rtol=0)


def test_vit_classifier_and_vlmo_dual_towers(tmp_path):
    run, model = _run(tmp_path / "vit", "vit", num_classes=4)
    info = export_onnx(run, tmp_path / "vit-onnx")
    assert list(info["files"]) == ["image.onnx"] and not (tmp_path / "vit-onnx" / "text.onnx").exists()
    assert list(info["files"]["image.onnx"]["outputs"]) == ["pooled", "logits"]
    session = ort.InferenceSession(str(tmp_path / "vit-onnx" / "image.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        px = torch.randn(batch, 3, 64, 64)
        pooled, logits = session.run(None, {"pixel_values": px.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(px).logits.numpy(), atol=1e-4, rtol=0)
        assert pooled.shape == (batch, 128)
    run, _ = _run(tmp_path / "vlmo", "vlmo", depth=2, vl_layers=1)
    info = export_onnx(run, tmp_path / "vlmo-onnx")
    assert set(info["files"]) == {"image.onnx", "text.onnx"}
    assert max(f["max_abs_diff"] for f in info["files"].values()) < 1e-4


def test_refusals(tmp_path, capsys):
    run, _ = _run(tmp_path / "vilt", "vilt")
    assert main(["export", str(run), "--onnx", str(tmp_path / "o")]) == 2
    assert "covers the image and text towers of clip, vlmo and vit, not vilt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["export", str(run), "--onnx", str(run)]) == 2  # never into a folder that holds something
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["export", str(run), "--onnx", str(tmp_path / "o"), "--opset", "11"]) == 2
    assert "--opset must be 18 to" in capsys.readouterr().err
