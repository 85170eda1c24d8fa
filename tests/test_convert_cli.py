"""vlkit convert: Hugging Face folders (ViT, CLIP, ViLT, BLIP) to vlkit run folders with identical
outputs, and vlkit CLIP / ViT runs back to folders that transformers loads (within 1e-5)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlkit
from vlkit.checkpoint import WEIGHTS, model_state, save_run_config, save_weights
from vlkit.cli import main
from vlkit.data.synthetic import write_dataset

T = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    "a", "red", "green", "blue", "circle", "square", "star", "left", "of", "right", "above", "below",
    "the", "and", "one", "two", "three", "objects", "yellow", "purple", "triangle", "small", "large"]


def _vocab(folder, size=99):
    words = WORDS + [f"w{i}" for i in range(size - len(WORDS))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")


def _perturb(model, seed=0):
    """Every weight moved off its init (LayerNorm weights not 1, biases not 0): a swapped or
    dropped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _hf(kind, folder):
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    if kind == "vit":
        cfg = T.ViTConfig(**small, image_size=32, patch_size=8, num_labels=3,
                          id2label={0: "cat", 1: "dog", 2: "owl"}, label2id={"cat": 0, "dog": 1, "owl": 2})
        model = T.ViTForImageClassification(cfg)
    elif kind == "clip":
        cfg = T.CLIPConfig(text_config=dict(small, vocab_size=99, max_position_embeddings=16, eos_token_id=3,
                                            bos_token_id=2, pad_token_id=0),
                           vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
        model = T.CLIPModel(cfg)
    elif kind == "vilt":
        cfg = T.ViltConfig(**small, vocab_size=99, max_position_embeddings=16, image_size=32, patch_size=8,
                           max_image_length=-1)
        model = T.ViltForImageAndTextRetrieval(cfg)
    else:
        text = dict(small, vocab_size=99, bos_token_id=97, pad_token_id=0, sep_token_id=3, eos_token_id=2)
        cfg = T.BlipConfig(text_config=text, vision_config=dict(small, image_size=32, patch_size=8,
                                                                layer_norm_eps=1e-6),
                           projection_dim=32, image_text_hidden_size=16)
        model = T.BlipForImageTextRetrieval(cfg)
    _perturb(model.eval()).save_pretrained(folder)
    _vocab(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.4, 0.45, 0.5], "image_std": [0.2, 0.25, 0.3], "size": {"height": 32, "width": 32}}))
    return model


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    write_dataset(folder, num=40, image_size=32)
    return folder


@pytest.mark.parametrize("kind", ["vit", "clip", "vilt", "blip"])
def test_hf_folder_to_run_gives_identical_outputs(tmp_path, kind, dataset, capsys):
    _hf(kind, tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert f"{kind}: " in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"] == kind and (tmp_path / "run" / WEIGHTS).is_file()
    a, b = vlkit.load(tmp_path / "hf"), vlkit.load(tmp_path / "run")
    assert b.model.image_spec() == {"size": 32, "mean": (0.4, 0.45, 0.5), "std": (0.2, 0.25, 0.3)}
    assert b.tokenizer(["a red circle"])["input_ids"].tolist() == a.tokenizer(["a red circle"])["input_ids"].tolist()
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and (torch.equal(va, vb) or ka.startswith("queue.")), ka  # BLIP's queues start random
    images = [dataset / "images" / f"test_{i:06d}.png" for i in range(3)]
    texts = ["a red circle", "two objects", "the blue star left of a square"]
    assert torch.equal(a.pixels(images), b.pixels(images))  # preprocessor_config.json's normalisation
    if kind == "vit":
        assert a.classify(images, top_k=3) == b.classify(images, top_k=3)
    elif kind == "clip":
        assert torch.equal(a.embed_images(images), b.embed_images(images))
        assert torch.equal(a.embed_texts(texts), b.embed_texts(texts))
    else:
        assert torch.equal(a.match(images, texts), b.match(images, texts))
    if kind == "clip":  # vlkit eval reads the run: the same figures as from the Hugging Face folder
        for name, src in (("hf.json", "hf"), ("run.json", "run")):
            assert main(["eval", str(tmp_path / src), "--data", str(dataset), "--tasks", "retrieval",
                         "--out", str(tmp_path / name)]) == 0
        metrics = [json.loads((tmp_path / n).read_text())["metrics"] for n in ("hf.json", "run.json")]
        assert metrics[0] == metrics[1] and "retrieval.i2t_r1" in metrics[0]


def _run(folder, model, tokenizer=None):
    """A vlkit run folder holding ``model`` (as ``vlkit train`` writes one)."""
    folder.mkdir()
    save_run_config(folder, model.model_name, model.config_dict())
    save_weights(folder / WEIGHTS, model_state(model))
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer")
    return folder


def test_clip_run_to_transformers_clipmodel(tmp_path, capsys):
    model = _perturb(vlkit.create_model("clip", "tiny", vision=dict(stem="patch", image_size=32, act="quick_gelu"),
                                        text=dict(vocab_size=99, context_length=16))).eval()
    run = _run(tmp_path / "run", model)
    assert main(["convert", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "clip: " in capsys.readouterr().out
    ref = T.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.tensor([[5, 6, 7, 98, 0, 0], [5, 9, 10, 11, 12, 98], [5, 98, 0, 0, 0, 0]])  # end = largest id
    mask = (ids != 0).long()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        torch.testing.assert_close(model.encode_image(pixels), out.image_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(ids, mask), out.text_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(pixels, ids, mask).logits, out.logits_per_image, atol=1e-5, rtol=0)
    back = vlkit.load(tmp_path / "hf")  # and vlkit reads its own Hugging Face folder back
    assert (back.transform.size, back.transform.mean, back.transform.std) == (32, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        torch.testing.assert_close(back.model.encode_text(ids, mask), model.encode_text(ids, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("classes", [0, 3])
def test_vit_run_to_transformers_vit(tmp_path, classes):
    model = _perturb(vlkit.create_model("vit", "tiny", stem="patch", image_size=32, patch_size=8,
                                        patch_bias=False, num_classes=classes,
                                        class_names=["cat", "dog", "owl"][:classes])).eval()
    run = _run(tmp_path / "run", model)
    assert main(["convert", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if classes:
            ref = T.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
            torch.testing.assert_close(model(x).logits, ref(pixel_values=x).logits, atol=1e-5, rtol=0)
            assert ref.config.id2label[2] == "owl"
        else:  # the tanh pooler of ViTModel has no vlkit counterpart: not written
            ref = T.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
            torch.testing.assert_close(model.forward_features(x), ref(pixel_values=x).last_hidden_state,
                                       atol=1e-5, rtol=0)


def test_refusals_name_the_reason(tmp_path, capsys):
    def err(*argv):
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    conv = _run(tmp_path / "conv", vlkit.create_model("clip", "tiny"))  # conv stem
    assert "stem 'conv'" in err("convert", str(conv), "--to", "hf", "--out", str(tmp_path / "a"))
    vilt = _run(tmp_path / "vilt", vlkit.create_model("vilt", "tiny"))
    assert "supported: clip, vit" in err("convert", str(vilt), "--to", "hf", "--out", str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    _hf("vit", tmp_path / "hf")
    assert "not an empty folder" in err("convert", str(tmp_path / "hf"), "--out", str(conv))
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    extra = dict(state, **{"vit.encoder.layer.0.attention.attention.extra.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "hf" / "model.safetensors"), {"format": "pt"})
    assert "extra.weight" in err("convert", str(tmp_path / "hf"), "--out", str(tmp_path / "b"))
    del state["vit.layernorm.bias"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), {"format": "pt"})
    assert "missing 1: vision.norm.bias" in err("convert", str(tmp_path / "hf"), "--out", str(tmp_path / "b"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "cannot be converted" in err("convert", str(tmp_path / "hf"), "--out", str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()
