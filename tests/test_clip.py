import pytest
import torch

import vlkit
from vlkit.convert.common import ConversionError
from vlkit.layers import Int8Linear

transformers = pytest.importorskip("transformers")


def _hf_clip(tmp_path, eos_token_id=98, act="quick_gelu"):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                         vocab_size=99, max_position_embeddings=16, eos_token_id=eos_token_id,
                         bos_token_id=97, pad_token_id=1, hidden_act=act),
        vision_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=30,
                           image_size=32, patch_size=8, hidden_act=act),
        projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)
    model.save_pretrained(tmp_path)
    return model


def _text_batch(eos):
    ids = torch.tensor([[97, 5, 6, 7, eos, 1, 1], [97, 10, 11, 12, 13, 14, eos], [97, eos, 1, 1, 1, 1, 1]])
    mask = (torch.arange(7)[None] <= (ids == eos).int().argmax(-1)[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("eos", [98, 2])
def test_clip_parity_with_transformers(tmp_path, eos):
    ref = _hf_clip(tmp_path, eos_token_id=eos)
    pipe = vlkit.load(tmp_path)
    model = pipe.model
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = _text_batch(98)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        img = model.encode_image(pixels)
        txt = model.encode_text(ids, mask)
        logits = model(pixels, ids, mask).logits
        feats = model.forward_features(pixels)
        hf_feats = ref.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(img, out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, out.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-5, rtol=0)
    # forward_features is after the last norm: HF applies post_layernorm to the pooled token only
    torch.testing.assert_close(feats[:, 0], ref.vision_model.post_layernorm(hf_feats[:, 0]), atol=1e-5, rtol=0)
    assert model.cfg.text.eot_token_id == (None if eos == 2 else eos)


def test_clip_gelu_variant_and_bad_folder(tmp_path):
    ref = _hf_clip(tmp_path / "a", act="gelu")
    model = vlkit.load(tmp_path / "a").model
    ids, mask = _text_batch(98)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        torch.testing.assert_close(model.encode_text(ids, mask), out.text_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_image(pixels), out.image_embeds, atol=1e-5, rtol=0)
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "a" / "model.safetensors"))
    state["visual_projection.weight"] = state["visual_projection.weight"][:, :10].contiguous()
    save_file(state, str(tmp_path / "a" / "model.safetensors"))
    with pytest.raises(ConversionError, match="shape mismatch"):
        vlkit.load(tmp_path / "a")


def test_clip_training_losses_and_hard_negatives():
    torch.manual_seed(0)
    model = vlkit.create_model("clip", "tiny", hard_negatives=True)
    b = 4
    ids = torch.randint(5, 100, (b, 8))
    ids[:, -1] = model.cfg.text.eot_token_id or 3
    batch = {"pixel_values": torch.randn(b, 3, 64, 64), "input_ids": ids,
             "attention_mask": torch.ones(b, 8, dtype=torch.long),
             "neg_input_ids": ids[:2].flip(1), "neg_attention_mask": torch.ones(2, 8, dtype=torch.long)}
    batch["neg_input_ids"][:, -1] = ids[0, -1]
    with_neg = model.training_losses(batch)["loss"]
    model.cfg.hard_negatives = False
    without = model.training_losses(batch)["loss"]
    assert with_neg > without  # extra negatives can only enlarge the image->text partition
    with_neg.backward()
    assert model.logit_scale.grad is not None
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.after_step(0)
    assert model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item())


def test_text_mean_pooling_option():
    model = vlkit.create_model("clip", "tiny", **{"text.pool": "mean", "text.depth": 1, "vision.depth": 1})
    ids = torch.tensor([[5, 9, 12, 3, 0, 0], [7, 8, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = model.text.forward_features(ids, mask)
        want = torch.stack([hidden[i, :int(mask[i].sum())].mean(0) for i in range(2)])
        got = model.text(ids, mask)
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="text.pool"):
        vlkit.create_model("clip", "tiny", **{"text.pool": "max"})


def test_clip_vision_init_takes_a_vit_runs_tower(tmp_path):
    from vlkit.train.run import RunArgs, train
    vit = tmp_path / "vit"
    train(RunArgs(model="vit", out=str(vit), steps=2, batch_size=8, progress=False,
                  overrides={"depth": 1, "dim": 48, "heads": 2, "mlp_dim": 96}))
    run = tmp_path / "clip"
    train(RunArgs(model="clip", out=str(run), steps=0, batch_size=8, progress=False,
                  overrides={"text.depth": 1, "vision_init": str(vit)}))
    source, model = vlkit.load(vit).model.vision, vlkit.load(run).model
    assert model.cfg.vision.dim == 48 and not model.cfg.vision.pre_norm and model.cfg.vision.num_classes == 0
    mine = model.vision.state_dict()
    for key, value in source.state_dict().items():
        if "running_" not in key and "num_batches" not in key:  # BatchNorm statistics are recomputed
            assert torch.equal(mine[key], value), key
    with pytest.raises(ValueError, match="no ViT image tower|does not fit"):
        vlkit.create_model("clip", "tiny", vision_init=str(vit))  # the preset's tower is another shape


def _tiny_clip_pipelines(n_images: int = 3):
    """(a function giving a fresh Pipeline over a copy of one random tiny CLIP, n random images)."""
    import copy

    import numpy as np
    from PIL import Image

    from vlkit.pipeline import Pipeline, image_transform
    torch.manual_seed(0)
    model = vlkit.create_model("clip", "tiny")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8))
              for i in range(n_images)]
    return (lambda: Pipeline(copy.deepcopy(model), transform=image_transform(model))), images


def test_pipeline_in_bf16_weights():
    """Pipeline.to(dtype=torch.bfloat16) casts the weights, feeds the images in bf16 and returns
    fp32 embeddings close to the fp32 model's."""
    pipeline, images = _tiny_clip_pipelines()
    full, half = pipeline(), pipeline().to(dtype=torch.bfloat16)
    assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert half.pixels(images).dtype == torch.bfloat16
    a, b = full.embed_images(images), half.embed_images(images)
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    assert (a - b).abs().max() > 0  # the weights did change precision
    with pytest.raises(ValueError, match="floating-point"):
        half.to(dtype=torch.int8)


@pytest.mark.parametrize("pool,causal", [("eot", True), ("eot", False), ("mean", True)])
def test_text_tower_runs_only_the_positions_that_decide_its_output(pool, causal):
    """TextTransformer.forward trims padding after the last caption's end (to a multiple of 8)
    and runs the last block for the end-of-text token only: the pooled features and their
    gradients equal pooling the full-length forward_features (in float64, where the only
    difference, the order of summation, stays below 1e-10)."""
    torch.manual_seed(0)
    model = vlkit.create_model("clip", "tiny", **{"text.pool": pool, "text.causal": causal}).text.double()
    ids = torch.randint(1, 400, (3, 32))
    lengths = [5, 11, 3]  # the longest caption ends at position 10: 16 positions run
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, n - 1] = 511  # the end-of-text token has the largest id
        ids[i, n:] = 0
        mask[i, :n] = 1
    index = torch.tensor(lengths) - 1
    assert model.needed_length(ids, mask, index if pool == "eot" else None) == 16
    full = model.forward_features(ids, mask)
    ref = full[torch.arange(3), index] if pool == "eot" else (full * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    seen = []
    hook = model.encoder.blocks[0].register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
    out = model(ids, mask)
    hook.remove()
    assert seen == [16]
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    g_out = torch.autograd.grad(out.square().sum(), model.embed.word.weight)[0]
    g_ref = torch.autograd.grad(ref.square().sum(), model.embed.word.weight)[0]
    torch.testing.assert_close(g_out, g_ref, atol=1e-10, rtol=0)


def test_image_tower_runs_its_last_block_for_the_cls_token_only():
    torch.manual_seed(0)
    vision = vlkit.create_model("clip", "tiny").vision.eval()
    px = torch.randn(2, 3, 64, 64)
    seen = []
    hook = vision.encoder.blocks[-1].mlp.register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
    out = vision(px)
    hook.remove()
    assert seen == [1]
    torch.testing.assert_close(out, vision.forward_features(px)[:, 0], atol=1e-5, rtol=0)


def test_pipeline_quantize_int8_and_after_bf16():
    """Pipeline.quantize(): int8 linear layers under the float (or bf16) rest of the model;
    fp32 embeddings close to the float model's."""
    pipeline, images = _tiny_clip_pipelines()
    full, q, qh = pipeline(), pipeline().quantize(), pipeline().to(dtype=torch.bfloat16).quantize("int8")
    a = full.embed_images(images)
    for p, floor in ((q, 0.999), (qh, 0.99)):
        b = p.embed_images(images)
        assert b.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a, b).min() > floor
        assert any(isinstance(m, Int8Linear) for m in p.model.modules())
    assert qh.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="int4"):
        q.quantize("int4")
