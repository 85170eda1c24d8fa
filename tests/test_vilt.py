"""ViLT: parity with transformers' ViLT classes, patch sampling, the joint padding mask, heads,
training losses and a tiny overfit run."""
import pytest
import torch
import torch.nn.functional as F

import vlkit
from vlkit.convert.common import ConversionError
from vlkit.models import build_model, model_class

transformers = pytest.importorskip("transformers")

SMALL = dict(dim=32, depth=2, heads=4, mlp_dim=64, vocab_size=60)  # fast overrides of "tiny"



# -- Hugging Face parity --------------------------------------------------------------------------
def _hf_vilt(folder, cls_name, **extra):
    """A tiny random HF ViLT with every parameter perturbed (so LayerNorm weights are not 1 and
    biases not 0: a swapped or dropped tensor shows), saved with save_pretrained.

    HF's ViltEmbeddings.visual_embed draws the image patches with torch.multinomial even in
    eval: with max_image_length=-1 (set here) and no padded pixels it keeps all patches but
    in a random order. Text tokens and the pooled output do not depend on that order; for the
    image tokens the tests replace torch.multinomial by the identity order (_identity_sampling)."""
    torch.manual_seed(0)
    cfg = transformers.ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, vocab_size=99, max_position_embeddings=16,
                                  image_size=32, patch_size=8, max_image_length=-1, **extra)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture
def identity_sampling(monkeypatch):
    """Make HF's uniform patch sampling (multinomial without replacement) keep the natural order."""
    calls = []
    real = torch.multinomial

    def fake(probs, n, replacement=False, **kw):
        if replacement:
            return real(probs, n, replacement=True, **kw)
        calls.append(n)
        return torch.arange(n, device=probs.device)
    monkeypatch.setattr(torch, "multinomial", fake)
    return calls


def _inputs(batch=2, size=(32, 32), seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, *size, generator=g)
    ids = torch.randint(5, 99, (batch, 7), generator=g)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return pixels, ids, mask


def test_vilt_model_parity(tmp_path):
    ref = _hf_vilt(tmp_path, "ViltModel")
    model = vlkit.load(tmp_path).model
    assert model.cfg.eps == ref.config.layer_norm_eps and model.cfg.max_image_tokens == 0
    pixels, ids, mask = _inputs()
    with torch.no_grad():  # random patch order in HF: pooled and text tokens are order-free
        out, hf = model(pixels, ids, mask), ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert hf.pooler_output.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(out.pooled, hf.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features[:, :7], hf.last_hidden_state[:, :7], atol=1e-5, rtol=0)


def test_vilt_full_sequence_parity_other_size_and_pixel_mask(tmp_path, identity_sampling):
    """Every token (image ones included), at a non-native resolution (position embeddings
    interpolated to a 6x5 grid) and with a padded image (valid 3x4 patches via pixel_mask)."""
    ref = _hf_vilt(tmp_path, "ViltModel")
    model = vlkit.load(tmp_path).model
    pixels, ids, mask = _inputs(size=(48, 40))
    pixel_mask = torch.ones(2, 48, 40, dtype=torch.long)
    pixel_mask[1, 24:] = 0
    pixel_mask[1, :, 32:] = 0
    with torch.no_grad():
        hf = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        out = model(pixels, ids, mask)
        torch.testing.assert_close(out.features, hf.last_hidden_state, atol=1e-5, rtol=0)
        hf = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_mask=pixel_mask)
        out = model(pixels, ids, mask, pixel_mask=pixel_mask)
    assert identity_sampling  # HF's sampling really went through the patched multinomial
    torch.testing.assert_close(out.pooled, hf.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features[0], hf.last_hidden_state[0], atol=1e-5, rtol=0)
    # image 2: HF moves its 12 valid patches to the front and fills up with random padded ones;
    # vlkit keeps the 6x5 grid with the padded patches masked in place
    valid = [7 + 1 + r * 5 + c for r in range(3) for c in range(4)]
    torch.testing.assert_close(out.features[1, :8], hf.last_hidden_state[1, :8], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features[1, valid], hf.last_hidden_state[1, 8:20], atol=1e-5, rtol=0)
    unpadded = model(pixels[:1], ids[:1], mask[:1]).pooled  # the padding changed image 2 only
    torch.testing.assert_close(unpadded, out.pooled[:1], atol=1e-5, rtol=0)


def test_vilt_mlm_parity(tmp_path):
    ref = _hf_vilt(tmp_path, "ViltForMaskedLM")
    model = vlkit.load(tmp_path).model
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        hf = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        ours = model.mlm_logits(pixels, ids, mask)
    assert ours.shape == (2, 7, 99)
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=0)
    # transformers 5.x ties the decoder to the word embeddings and saves only the latter; 4.x
    # leaves them untied and saves both: either way the converted head is the reference's
    torch.testing.assert_close(model.mlm_head.decoder.weight, ref.mlm_score.decoder.weight, atol=0, rtol=0)
    assert not hasattr(model, "match") and not hasattr(model, "answer")


def test_vilt_vqa_parity(tmp_path):
    names = ["yes", "no", "2", "red", "circle"]
    ref = _hf_vilt(tmp_path, "ViltForQuestionAnswering", id2label=dict(enumerate(names)),
                   label2id={n: i for i, n in enumerate(names)})
    model = vlkit.load(tmp_path).model
    assert model.cfg.answer_names == names
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        hf = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        ours = model.vqa_logits(pixels, ids, mask)
        answers = model.answer(pixels, ids, mask)
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=0)
    assert answers == [names[i] for i in hf.argmax(-1).tolist()]


def test_vilt_retrieval_parity(tmp_path):
    ref = _hf_vilt(tmp_path, "ViltForImageAndTextRetrieval")
    pipe = vlkit.load(tmp_path)
    model = pipe.model
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        hf = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, 0]  # (B,)
        logits = model.match(pixels, ids, mask)
        score = model.score(pixels, ids, mask)
    torch.testing.assert_close(logits[:, 1], hf, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[:, 0], torch.zeros(2))
    torch.testing.assert_close(score, torch.nn.functional.logsigmoid(hf), atol=1e-5, rtol=0)


def test_vilt_pair_parity(tmp_path):
    ref = _hf_vilt(tmp_path, "ViltForImagesAndTextClassification", num_images=2,
                   modality_type_vocab_size=3, num_labels=2)
    model = vlkit.load(tmp_path).model
    pixels, ids, mask = _inputs()
    second = _inputs(seed=2)[0]
    with torch.no_grad():
        hf = ref(input_ids=ids, attention_mask=mask, pixel_values=torch.stack([pixels, second], 1)).logits
        ours = model.pair_logits(pixels, second, ids, mask)
        swapped = model.pair_logits(second, pixels, ids, mask)
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=0)
    assert (swapped - ours).abs().max() > 1e-3  # image 1 and image 2 are told apart


def test_vilt_conversion_is_strict(tmp_path):
    _hf_vilt(tmp_path, "ViltModel")
    from safetensors.torch import load_file, save_file
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    state["pooler.dense.weight"] = state["pooler.dense.weight"][:, :16].contiguous()
    save_file(state, str(path))
    with pytest.raises(ConversionError, match="shape mismatch"):
        vlkit.load(tmp_path)


# -- the vlkit model -------------------------------------------------------------------------------
def _batch(b=4, length=8, seed=0, vocab=60):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    return {"pixel_values": torch.randn(b, 3, 64, 64, generator=g), "input_ids": ids,
            "attention_mask": torch.ones(b, length, dtype=torch.long)}


def test_create_tiny_and_shapes():
    model = vlkit.create_model("vilt", "tiny").eval()
    assert model.task == "fusion" and model.cfg.dim == 192 and model.cfg.stem == "conv"
    assert model.image_spec()["size"] == 64
    assert not hasattr(model, "encode_image") and not hasattr(model, "encode_text")
    assert not hasattr(model, "answer")  # no VQA head in the preset
    b = _batch(2, 6)
    with torch.no_grad():
        out = model(b["pixel_values"], b["input_ids"], b["attention_mask"])
        assert out.features.shape == (2, 6 + 1 + 64, 192) and out.pooled.shape == (2, 192)
        assert out.logits is None
        assert model.match(b["pixel_values"], b["input_ids"], b["attention_mask"]).shape == (2, 2)
        assert model.score(b["pixel_values"], b["input_ids"], b["attention_mask"]).shape == (2,)
        assert model.mlm_logits(b["pixel_values"], b["input_ids"], b["attention_mask"]).shape == (2, 6, 2000)
    rebuilt = build_model("vilt", model.config_dict())
    assert rebuilt.cfg == model.cfg
    b32 = model_class("vilt").make_config("b32")
    assert (b32.dim, b32.depth, b32.heads, b32.mlp_dim, b32.patch_size, b32.image_size) == \
        (768, 12, 12, 3072, 32, 384)


def test_answer_and_pair_heads():
    names = ["yes", "no", "3"]
    model = vlkit.create_model("vilt", "tiny", **SMALL, num_answers=3, answer_names=names,
                               pair_classes=2).eval()
    b = _batch(3, 5)
    with torch.no_grad():
        answers = model.answer(b["pixel_values"], b["input_ids"], b["attention_mask"])
        pair = model.pair_logits(b["pixel_values"], b["pixel_values"].flip(0), b["input_ids"],
                                 b["attention_mask"])
    assert len(answers) == 3 and set(answers) <= set(names)
    assert pair.shape == (3, 2)
    with pytest.raises(ValueError, match="modality_types"):
        vlkit.create_model("vilt", "tiny", **SMALL, pair_classes=2, modality_types=2)


def test_patch_sampling_train_only_and_seeded():
    model = vlkit.create_model("vilt", "tiny", **SMALL, max_image_tokens=10)
    b = _batch(2, 6)
    args = (b["pixel_values"], b["input_ids"], b["attention_mask"])
    model.eval()
    with torch.no_grad():
        assert model(*args).features.shape[1] == 6 + 1 + 64  # off in evaluation
        first = model(*args).pooled
        torch.testing.assert_close(model(*args).pooled, first, atol=0, rtol=0)
    model.train()
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model(*args)
        assert out.features.shape[1] == 6 + 1 + 10
        runs.append(out.pooled)
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)  # same torch seed, same patches
    assert (runs[0] - runs[2]).abs().max() > 1e-6                 # another seed, other patches


def test_sincos_image_positions():
    """image_pos="sincos" adds each patch's row and column codes to its token, and nothing to
    [CLS] or the text; with a padded image its valid patches keep their codes."""
    from vlkit.layers import sincos_2d
    plain = vlkit.create_model("vilt", "tiny", **SMALL).eval()
    coded = vlkit.create_model("vilt", "tiny", **SMALL, image_pos="sincos").eval()
    coded.load_state_dict(plain.state_dict())
    b = _batch(2, 6)
    args = (b["pixel_values"], b["input_ids"], b["attention_mask"])
    with torch.no_grad():
        x0, m0 = plain.embed(*args)
        x1, m1 = coded.embed(*args)
        pixel_mask = torch.ones(2, 64, 64, dtype=torch.long)
        pixel_mask[1, :, 40:] = 0  # the second image: 5 of 8 patch columns valid
        p0, _ = plain.embed_image(b["pixel_values"], pixel_mask)
        p1, _ = coded.embed_image(b["pixel_values"], pixel_mask)
    codes = sincos_2d((8, 8), 32)  # zeros for [CLS]
    assert torch.equal(m0, m1)
    torch.testing.assert_close(x1[:, :6], x0[:, :6], atol=0, rtol=0)  # the text is untouched
    torch.testing.assert_close(x1[:, 6:] - x0[:, 6:], codes.expand(2, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(p1 - p0, codes.expand(2, -1, -1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image_pos"):
        vlkit.create_model("vilt", "tiny", **SMALL, image_pos="learned")
    with pytest.raises(ValueError, match="image_pos"):
        vlkit.create_model("vilt", "tiny", **{**SMALL, "dim": 30, "heads": 3}, image_pos="sincos")


def test_joint_padding_mask():
    """Extra padded text positions change nothing for the real tokens (text or image)."""
    model = vlkit.create_model("vilt", "tiny", **SMALL).eval()
    b = _batch(2, 6)
    ids, mask = b["input_ids"], b["attention_mask"]
    pad_ids = torch.cat([ids, torch.full((2, 5), 7)], dim=1)  # padding with a *non*-pad id
    pad_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = model(b["pixel_values"], ids, mask)
        p = model(b["pixel_values"], pad_ids, pad_mask)
        unmasked = model(b["pixel_values"], pad_ids, torch.ones_like(pad_mask))
    torch.testing.assert_close(p.features[:, :6], a.features[:, :6], atol=1e-5, rtol=0)
    torch.testing.assert_close(p.features[:, 11:], a.features[:, 6:], atol=1e-5, rtol=0)
    torch.testing.assert_close(p.pooled, a.pooled, atol=1e-5, rtol=0)
    assert (unmasked.pooled - a.pooled).abs().max() > 1e-4  # the mask is what made the difference


def test_training_losses_and_hard_negatives():
    torch.manual_seed(0)
    model = vlkit.create_model("vilt", "tiny", **SMALL, hard_negatives=True, num_answers=3)
    b = _batch(4, 8)
    b["neg_input_ids"] = b["input_ids"][:3, :6].clone()
    b["neg_attention_mask"] = torch.ones(3, 6, dtype=torch.long)
    b["neg_owner"] = torch.tensor([0, 0, 2])
    b["vqa_targets"] = torch.tensor([[1.0, 0, 0], [0, 1 / 3, 2 / 3], [0, 0, 1], [0, 0, 0]])
    seen = []
    hook = model.itm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    losses = model.training_losses(b)
    hook.remove()
    assert seen == [4 + 3]  # the batch's pairs plus one ITM pair per negative caption
    assert {"loss", "itm_loss", "mlm_loss", "vqa_loss", "itm_acc", "mlm_acc"} <= set(losses)
    total = losses["itm_loss"] + losses["mlm_loss"] + losses["vqa_loss"]
    torch.testing.assert_close(losses["loss"], total)
    losses["loss"].backward()
    for name in ("itm_head.weight", "mlm_head.decoder.weight", "vqa_head.3.weight",
                 "image_embed.pos_embed", "modality_embed.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.cfg.whole_word_mask = True
    with pytest.raises(ValueError, match="word_ids"):
        model.training_losses(b)


def test_tiny_overfit():
    """ITM + MLM on four fixed pairs: the loss falls clearly within 30 CPU steps (mostly MLM: from
    scratch, ITM sits at chance for a few hundred steps before it binds captions to images)."""
    torch.manual_seed(0)
    model = vlkit.create_model("vilt", "tiny", image_size=32, dim=64, depth=2, heads=2, mlp_dim=128,
                               vocab_size=40, mlm_prob=0.5)
    b = _batch(4, 8, vocab=40)
    b["pixel_values"] = b["pixel_values"][:, :, :32, :32]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        losses = model.training_losses(b)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append((losses["loss"].item(), losses["mlm_loss"].item(), losses["itm_loss"].item()))
    first = [sum(h[k] for h in history[:5]) / 5 for k in range(3)]
    last = [sum(h[k] for h in history[-5:]) / 5 for k in range(3)]
    assert last[0] < 0.65 * first[0], history
    assert last[1] < 0.5 * first[1], history
    assert last[2] < 1.0, history  # ITM stays near chance (log 2 = 0.69) but does not blow up


def test_edit_loss_and_itm_plus_edit_score():
    """edit_weight: replaced-word correction on the minimal pairs (a caption and its first
    negative, differing word for word); match_score="itm+edit" adds the MLM head's lowest
    log-probability of a shown word to the ITM head's log-probability."""
    torch.manual_seed(0)
    model = vlkit.create_model("vilt", "tiny", **SMALL, hard_negatives=True, edit_weight=1.0)
    b = _batch(4, 8)
    neg = b["input_ids"].clone()
    neg[:, 3] = 7  # word 3 replaced
    b.update(neg_input_ids=neg, neg_attention_mask=b["attention_mask"].clone(), neg_owner=torch.arange(4))
    out = model.training_losses(b)
    assert {"edit_loss", "edit_fix_acc", "edit_keep_acc"} <= set(out) and out["edit_loss"] > 0
    torch.testing.assert_close(out["loss"], out["itm_loss"] + out["mlm_loss"] + out["edit_loss"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        out = model.training_losses(b)
        opt.zero_grad()
        out["edit_loss"].backward()
        opt.step()
    assert out["edit_loss"].item() < 0.5
    with pytest.raises(ValueError, match="hard_negatives"):
        vlkit.create_model("vilt", "tiny", **SMALL, edit_weight=1.0)
    model.eval()
    model.cfg.match_score = "itm+edit"
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        score = model.score(b["pixel_values"], ids, mask)
        o = model(b["pixel_values"], ids, mask)
        logp = model.mlm_head(o.features[:, :ids.shape[1]]).log_softmax(-1)
        itm = model.itm_head(o.pooled).log_softmax(-1)[:, 1]
    for i in range(4):
        words = [t for t in range(ids.shape[1]) if mask[i, t] and ids[i, t] >= 5]
        want = itm[i].item() + min(logp[i, t, ids[i, t]].item() for t in words)
        assert score[i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    model.cfg.match_score = "itm"
    with torch.no_grad():
        torch.testing.assert_close(model.score(b["pixel_values"], ids, mask), itm)
    with pytest.raises(ValueError, match="match_score"):
        vlkit.create_model("vilt", "tiny", **SMALL, match_score="mlm")


@pytest.mark.parametrize("swap_prob", [0.0, 1.0])
def test_edit_pass_itm_reads_the_itm_pass(swap_prob):
    """edit_pass="itm": the correction is read off the ITM pass, from every negative's row (the
    false word shown) and from its caption's row where that row shows the caption's own image
    (none when every image is swapped); checked against passes of each text alone."""
    torch.manual_seed(0)
    model = vlkit.create_model("vilt", "tiny", **SMALL, hard_negatives=True, edit_weight=1.0,
                               edit_pass="itm", itm_swap_prob=swap_prob).eval()
    b = _batch(3, 8)
    ids, mask = b["input_ids"], b["attention_mask"]
    neg = torch.cat([ids, ids[:1]])
    neg[[0, 1, 2, 3], [3, 4, 2, 5]] = 7  # one word replaced in each
    neg = torch.cat([neg, torch.full((4, 2), 9)], 1)  # padded longer than the captions
    neg_mask = torch.cat([torch.cat([mask, mask[:1]]), torch.zeros(4, 2, dtype=torch.long)], 1)
    b.update(neg_input_ids=neg, neg_attention_mask=neg_mask, neg_owner=torch.tensor([0, 1, 2, 0]),
             neg_edits_caption=torch.tensor([True, True, True, False]))
    out = model.training_losses(b)
    logits, targets, false = [], [], []
    with torch.no_grad():
        for k in range(3):
            pos = int((neg[k, :8] != ids[k]).nonzero())
            texts = [neg[k:k + 1, :8]] + ([ids[k:k + 1]] if swap_prob == 0.0 else [])
            for j, text in enumerate(texts):
                features = model(b["pixel_values"][k:k + 1], text, mask[k:k + 1]).features
                logits.append(model.mlm_head(features[0, pos]))
                targets.append(ids[k, pos])
                false.append(j == 0)
    order = [i for i in range(len(logits)) if false[i]] + [i for i in range(len(logits)) if not false[i]]
    want = F.cross_entropy(torch.stack([logits[i] for i in order]), torch.stack([targets[i] for i in order]))
    assert len(logits) == (6 if swap_prob == 0.0 else 3)
    torch.testing.assert_close(out["edit_loss"], want, atol=1e-5, rtol=1e-5)
    assert (out["edit_keep_acc"] == out["edit_keep_acc"]) == (swap_prob == 0.0)  # NaN: none kept
    with pytest.raises(ValueError, match="edit_pass"):
        vlkit.create_model("vilt", "tiny", **SMALL, hard_negatives=True, edit_weight=1.0, edit_pass="both")
    with pytest.raises(ValueError, match="edit_pass"):
        vlkit.create_model("vilt", "tiny", **SMALL, hard_negatives=True, edit_weight=1.0, edit_pass="itm",
                           objectives=("mlm",))


def test_relation_words_are_masked_whole():
    """relation_mask_prob=1: every relation word (a token with a role) is [MASK] and a target."""
    torch.manual_seed(0)
    model = vlkit.create_model("vilt", "tiny", **SMALL, itm_head=False, objectives=("mlm",),
                               grounding_weight=1.0, relation_weight=1.0, relation_mask_prob=1.0,
                               mlm_prob=0.0)
    b = _batch(4, 8)
    n, cells = b["input_ids"].shape[1], model.image_embed.grid[0] * model.image_embed.grid[1]
    b["grounding"] = torch.zeros(4, n, cells)
    b["grounding_roles"] = torch.zeros(4, 2, n, cells)
    b["grounding_roles"][:, 0, 3:5, 0] = 1
    b["grounding_roles"][:, 1, 3:5, 1] = 1
    seen = []
    hook = model.mlm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    out = model.training_losses(b)
    hook.remove()
    assert seen == [8] and out["mlm_loss"] > 0 and out["relation_loss"] > 0  # 2 words x 4 captions
    with pytest.raises(ValueError, match="relation_mask_prob"):
        vlkit.create_model("vilt", "tiny", **SMALL, relation_mask_prob=0.5)
