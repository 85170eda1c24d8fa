"""VLMo: modality-expert routing, per-expert norms, the two modes, stage-2 freezing through the
trainer, hard negatives, 2 processes = 1 process, a falling loss, and the pipeline."""
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import vlkit
from vlkit.layers import ModalityExperts, NormMlp
from vlkit.losses import distill

SMALL = dict(dim=32, depth=3, heads=2, mlp_dim=64, vl_layers=1, embed_dim=16, vocab_size=60, max_text_len=16)
SMALL_SET = [x for k, v in SMALL.items() if k != "vocab_size" for x in ("--set", f"{k}={v}")]
TEXT_ONLY = ["text_embed.*", "blocks.*.mlp.experts.text.*", "mlm_head.*"]


def _model(**kw):
    torch.manual_seed(0)
    return vlkit.create_model("vlmo", **{**SMALL, **kw}).eval()


def _inputs(b=3, length=7):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(b, 3, 64, 64, generator=g)
    ids = torch.randint(5, 60, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return pixels, ids, mask


def _record_experts(model):
    """{(block, expert): [sequence lengths it was called on]} filled by forward hooks."""
    calls, handles = {}, []
    for i, block in enumerate(model.blocks):
        for name, expert in block.mlp.experts.items():
            handles.append(expert.register_forward_hook(
                lambda mod, inp, out, key=(i, name): calls.setdefault(key, []).append(inp[0].shape[1])))
    return calls, handles


def test_vl_expert_only_in_the_top_layers():
    model = _model(depth=4, vl_layers=2)
    assert [sorted(b.mlp.experts) for b in model.blocks] == [["image", "text"]] * 2 + [["image", "text", "vl"]] * 2
    assert all(isinstance(b.norm2, torch.nn.Identity) for b in model.blocks)  # each expert has its own norm
    assert [sorted(b.mlp.experts) for b in _model(depth=4, vl_layers=0).blocks] == [["image", "text"]] * 4
    with pytest.raises(ValueError, match="vl_layers 5"):
        _model(depth=4, vl_layers=5)


def test_routing_each_token_reaches_only_its_modality_expert():
    model = _model()
    pixels, ids, mask = _inputs()
    n_img = 1 + model.image_embed.grid[0] * model.image_embed.grid[1]
    calls, handles = _record_experts(model)
    with torch.no_grad():
        model.encode_image(pixels)
    # V-FFN in every block, nothing else (the last block runs for [CLS] alone)
    assert calls == {(0, "image"): [n_img], (1, "image"): [n_img], (2, "image"): [1]}
    calls.clear()
    with torch.no_grad():
        model.encode_text(ids, mask)
    assert calls == {(0, "text"): [7], (1, "text"): [7], (2, "text"): [1]}
    calls.clear()
    with torch.no_grad():
        model.match(pixels, ids, mask)
    # fusion: text tokens to the L-FFN and image tokens to the V-FFN below the top block, all to the VL-FFN in it
    assert calls == {(0, "text"): [7], (0, "image"): [n_img], (1, "text"): [7], (1, "image"): [n_img],
                     (2, "vl"): [7 + n_img]}
    for h in handles:
        h.remove()
    # the values: the text expert never touches an image-only pass, the image expert a text-only pass
    before_img, before_txt = model.encode_image(pixels), model.encode_text(ids, mask)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.experts["text"].mlp.fc2.weight.normal_()
    assert torch.equal(model.encode_image(pixels), before_img)
    assert not torch.allclose(model.encode_text(ids, mask), before_txt)
    with torch.no_grad():
        model.blocks[0].mlp.experts["image"].mlp.fc2.weight.normal_()
    assert not torch.allclose(model.encode_image(pixels), before_img)


def test_modality_experts_segments_and_errors():
    experts = ModalityExperts({"a": torch.nn.Linear(4, 4), "b": torch.nn.Identity()})
    x = torch.randn(2, 5, 4)
    out = experts(x, modality=[("a", 2), ("b", 3)])
    assert torch.equal(out[:, 2:], x[:, 2:]) and torch.allclose(out[:, :2], experts.experts["a"](x[:, :2]))
    with pytest.raises(ValueError, match="no 'vl' expert"):
        experts(x, modality="vl")
    with pytest.raises(ValueError, match="cover 4 tokens"):
        experts(x, modality=[("a", 2), ("b", 2)])


def test_per_expert_norms_are_separate_parameters():
    model = _model()
    norms = {name: e.norm for name, e in model.blocks[2].mlp.experts.items()}
    assert all(isinstance(e, NormMlp) for e in model.blocks[2].mlp.experts.values())
    assert len({id(n.weight) for n in norms.values()}) == 3
    pixels, ids, mask = _inputs()
    img, txt, itm = model.encode_image(pixels), model.encode_text(ids, mask), model.match(pixels, ids, mask)
    with torch.no_grad():
        norms["vl"].weight.mul_(3.0)  # the VL expert's own norm: fusion changes, the dual passes do not
    assert torch.equal(model.encode_image(pixels), img) and torch.equal(model.encode_text(ids, mask), txt)
    assert not torch.allclose(model.match(pixels, ids, mask), itm)
    with torch.no_grad():
        norms["text"].bias.add_(0.5)
    assert torch.equal(model.encode_image(pixels), img)
    assert not torch.allclose(model.encode_text(ids, mask), txt)


def test_layer_scale_starts_at_0_1_and_q_v_bias_option():
    model = _model()
    assert torch.all(model.blocks[0].gamma_1 == 0.1) and torch.all(model.blocks[0].gamma_2 == 0.1)
    assert model.blocks[0].attn.k.bias is not None  # the tiny preset: q/v biases off (q, k and v biased)
    beit = _model(qv_bias=True)
    attn = beit.blocks[0].attn
    assert attn.q.bias is not None and attn.v.bias is not None and attn.k.bias is None
    assert _model(qv_bias=False).blocks[0].attn.k.bias is not None
    assert _model(layer_scale=0.0).blocks[0].gamma_1 is None


def test_output_shapes_of_each_mode():
    model = _model(num_answers=3, answer_names=["a", "b", "c"], pair_classes=2)
    pixels, ids, mask = _inputs()
    n_img = 1 + 16
    with torch.no_grad():
        assert model.forward_features(pixels).shape == (3, n_img, 32)
        img, txt = model.encode_image(pixels), model.encode_text(ids, mask)
        assert img.shape == txt.shape == (3, 16)
        assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))
        # the last block runs for [CLS] alone: the same as the full pass
        full_img = torch.nn.functional.normalize(model.image_proj(model.forward_features(pixels)[:, 0]), dim=-1)
        full_txt = torch.nn.functional.normalize(model.text_proj(model.text_hidden(ids, mask)[:, 0]), dim=-1)
        assert (img - full_img).abs().max() <= 1e-6 and (txt - full_txt).abs().max() <= 1e-6
        out = model(pixels, ids, mask)
        assert out.features.shape == (3, 7 + n_img, 32) and out.pooled.shape == (3, 32)
        assert model.match(pixels, ids, mask).shape == (3, 2)
        score = model.score(pixels, ids, mask)
        assert score.shape == (3,) and bool((score <= 0).all())  # a log-probability
        assert torch.allclose(score, model.match(pixels, ids, mask).log_softmax(-1)[:, 1])
        assert model.mlm_logits(pixels, ids, mask).shape == (3, 7, 60)
        assert model.vqa_logits(pixels, ids, mask).shape == (3, 3)
        assert set(model.answer(pixels, ids, mask)) <= {"a", "b", "c"}
        assert model.pair_logits(pixels, pixels.flip(0), ids, mask).shape == (3, 2)
    plain = _model()
    assert not hasattr(plain, "answer") and not hasattr(plain, "pair_logits")


def test_hard_negatives_never_draw_the_positive(monkeypatch):
    """ITM negatives ∝ softmax(ITC logits) over the batch, in one process (no group needed):
    even with a huge temperature and near-identical embeddings, never the pair's own image or
    caption, nor another caption of the same image."""
    drawn = []
    original = distill.itm_hard_negative_index  # what ``itm_token_pairs`` draws with

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        drawn.append(out)
        return out
    monkeypatch.setattr(distill, "itm_hard_negative_index", spy)
    model = _model(objectives=["itc", "itm"])
    with torch.no_grad():
        model.logit_scale.fill_(4.6)
    model.train()
    pixels, ids, mask = _inputs(b=6)
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3])  # rows 0/1 and 4/5: captions of one image
    for _ in range(20):
        model.training_losses(dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, image_ids=image_ids))
        model.after_step(0)
    assert len(drawn) == 20
    for neg_text, neg_image in drawn:
        for row in range(6):
            assert image_ids[neg_text[row]] != image_ids[row] and image_ids[neg_image[row]] != image_ids[row]


def test_itc_through_the_vl_experts_is_averaged_in():
    model = _model(itc_vl=True, objectives=["itc"]).train()
    pixels, ids, mask = _inputs(b=4)
    out = model.training_losses(dict(pixel_values=pixels, input_ids=ids, attention_mask=mask))
    assert "itc_vl_loss" in out and out["loss"].requires_grad
    out["loss"].backward()
    assert model.itc_vl_image_proj.weight.grad is not None and model.logit_vl_scale.grad is not None
    assert model.blocks[-1].mlp.experts["vl"].mlp.fc1.weight.grad is not None
    assert _model(objectives=["itc"]).blocks[-1].mlp.experts["vl"].mlp.fc1.weight.grad is None


def test_loss_falls_on_a_fixed_batch():
    model = _model(objectives=["itc", "itm", "mlm"], mlm_prob=0.3).train()
    pixels, ids, mask = _inputs(b=6)
    batch = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for step in range(30):
        loss = model.training_losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(step)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_fused_passes_on_every_nth_row_and_itc_on_all():
    """fusion_every=2: ITC over the whole batch, and ITM and MLM exactly as a model given the
    even rows alone (with their own dataset negatives) computes them."""
    pixels, ids, mask = _inputs(b=6)
    batch = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                 neg_input_ids=ids[[1, 2, 4, 4]].flip(1), neg_attention_mask=torch.ones(4, 7, dtype=torch.long),
                 neg_owner=torch.tensor([1, 2, 4, 4]))
    kw = dict(objectives=["itc", "itm", "mlm"], mlm_prob=0.3, hard_negatives=True)
    every, whole = (_model(fusion_every=2, **kw).train() for _ in range(2))
    whole.cfg.fusion_every = 1
    full = every.training_losses(batch)
    even = whole.training_losses(dict(pixel_values=pixels[::2], input_ids=ids[::2], attention_mask=mask[::2],
                                      neg_input_ids=ids[[2, 4, 4]].flip(1),
                                      neg_attention_mask=torch.ones(3, 7, dtype=torch.long),
                                      neg_owner=torch.tensor([1, 2, 2])))
    ref_itc = whole.training_losses(batch)["itc_loss"]
    assert full["itc_loss"].item() == pytest.approx(ref_itc.item(), abs=1e-6)
    assert full["itc_loss"].item() != pytest.approx(even["itc_loss"].item(), abs=1e-3)
    for key in ("itm_loss", "mlm_loss"):
        assert full[key].item() == pytest.approx(even[key].item(), abs=1e-5), key  # float32 sums in another order
    with pytest.raises(ValueError, match="fusion_every"):
        _model(fusion_every=0)


def test_length_groups_give_the_padded_passes_results():
    """length_groups=3: the dual text pass and the ITM pass run per group of similar length, each
    over its own longest row; every loss and every gradient equals the padded passes' (float32)."""
    g = torch.Generator().manual_seed(3)
    b, length = 9, 12
    pixels = torch.randn(b, 3, 64, 64, generator=g)
    ids = torch.randint(5, 60, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    for row, n in enumerate([12, 4, 7, 9, 3, 12, 5, 8, 6]):
        mask[row, n:] = 0
        ids[row, n:] = 0
    batch = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                 neg_input_ids=ids.flip(0), neg_attention_mask=mask.flip(0), neg_owner=torch.arange(b))
    kw = dict(objectives=["itc", "itm", "mlm"], mlm_prob=0.3, hard_negatives=True, directional_heads=True)
    grads = {}
    for groups in (1, 3):
        model = _model(length_groups=groups, **kw).train()
        out = model.training_losses(batch)
        out["loss"].backward()
        grads[groups] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (one, g1), (three, g3) = grads[1], grads[3]
    for key in ("itc_loss", "itm_loss", "mlm_loss", "loss"):
        assert three[key].item() == pytest.approx(one[key].item(), abs=1e-5), key
    assert g1.keys() == g3.keys()
    for name in g1:
        torch.testing.assert_close(g3[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="length_groups"):
        _model(length_groups=0)


def test_length_groups_of_a_mask():
    from vlkit.layers import by_length, length_groups
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in (6, 2, 4, 3, 1, 5)])
    groups = length_groups(mask, 3)
    assert [sorted(rows.tolist()) for rows, _ in groups] == [[1, 4], [2, 3], [0, 5]]
    assert [n for _, n in groups] == [2, 4, 6]
    rows = torch.arange(6.0)[:, None]
    seen = []
    assert torch.equal(by_length(mask, 3, lambda r, n: seen.append(n) or rows[r]), rows)  # back in row order
    assert seen == [2, 4, 6]
    assert torch.equal(by_length(mask, 1, lambda r, n: seen.append(n) or rows[r]), rows) and seen[-1] == 6
    assert length_groups(mask, 1) is None and length_groups(mask, 4) is None  # too few rows for 4
    assert length_groups(torch.ones(6, 5, dtype=torch.long), 2) is None  # nothing to trim
    assert length_groups(mask.flip(1), 3) is None  # left-padded: not trimmed


def test_select_rows_keeps_each_images_negatives():
    from vlkit.data.collate import select_rows
    batch = dict(pixel_values=torch.arange(4.0)[:, None], input_ids=torch.arange(8).view(4, 2),
                 neg_input_ids=torch.arange(10).view(5, 2), neg_owner=torch.tensor([0, 1, 1, 3, 3]),
                 neg_edits_caption=torch.tensor([True, False, True, True, False]), captions=list("abcd"))
    out = select_rows(batch, torch.tensor([1, 3]))
    assert out["pixel_values"].flatten().tolist() == [1.0, 3.0] and out["captions"] == ["b", "d"]
    assert out["neg_owner"].tolist() == [0, 0, 1, 1]
    assert out["neg_input_ids"][:, 0].tolist() == [2, 4, 6, 8]
    assert out["neg_edits_caption"].tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="'odd'"):
        select_rows({**batch, "odd": torch.zeros(3)}, torch.tensor([0]))


def test_collate_spares_the_rows_that_are_not_fused():
    """``fused_rows=(4, offset)``: the same captions for every row, and for the fused rows the
    negatives and grounding targets of the full collate; the other rows get none (zeros). A
    trained VLMo's collate gets its fusion_every and the rank's offset in the global batch."""
    import random
    from vlkit.data.collate import ImageTextCollate, select_rows
    from vlkit.data.synthetic import synthetic_world
    from vlkit.data.transforms import ImageTransform
    from vlkit.tokenizers import build_wordpiece_vocab
    from vlkit.train.run import fused_rows_of
    records = synthetic_world(64).records("train", 12)
    tok = build_wordpiece_vocab([c for r in records for c in r["captions"] + [n["caption"] for n in r["negatives"]]])
    transform = ImageTransform(64, train=True, scale=(1.0, 1.0), hflip=True)
    def batch(rows):
        collate = ImageTextCollate(transform, tok, negatives=1, grounding_grid=(4, 4), fused_rows=rows)
        return collate(records, [random.Random(i) for i in range(12)])
    full, spared, shifted = batch((1, 0)), batch((4, 0)), batch((4, 3))
    assert torch.equal(spared["input_ids"], full["input_ids"]) and torch.equal(spared["pixel_values"], full["pixel_values"])
    assert spared["neg_owner"].tolist() == [0, 4, 8] and shifted["neg_owner"].tolist() == [1, 5, 9]
    for rows, b in ((torch.tensor([0, 4, 8]), spared), (torch.tensor([1, 5, 9]), shifted)):
        a, b = select_rows(full, rows), select_rows(b, rows)
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith("neg_") and a[key].dim() == 2:  # padded to the longest negative drawn
                n = b[key].shape[1]
                assert not a[key][:, n:].any(), key
                assert torch.equal(a[key][:, :n], b[key]), key
            else:
                assert torch.equal(a[key], b[key]), key
        assert a["grounding"].sum() > 0
    unfused = [j for j in range(12) if j % 4]
    assert not spared["grounding"][unfused].any() and not spared["grounding_roles"][unfused].any()
    with pytest.raises(ValueError, match="fused_rows"):
        ImageTextCollate(transform, tok, fused_rows=(0, 0))
    model = _model(fusion_every=4)
    assert fused_rows_of(model, 256, 0, 1) == (4, 0)
    assert fused_rows_of(model, 10, 1, 2) == (4, 1)  # rank 1's rows start at global row 5
    assert fused_rows_of(_model(), 10, 1, 2) == (1, 0)


# -- through the trainer ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlkit.data.synthetic import write_dataset
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, num=48, seed=0, image_size=64)
    return root


def _train(out, data, steps, **kw):
    from vlkit.train.run import RunArgs, train
    overrides = {k: v for k, v in SMALL.items() if k != "vocab_size"}
    overrides.update(kw.pop("overrides", {}))
    return train(RunArgs(model="vlmo", data=str(data), out=str(out), steps=steps, batch_size=8, workers=0,
                         progress=False, precision="fp32", overrides=overrides, **kw))


TEXT_STAGE = dict(overrides={"objectives": ["text_mlm"]}, trainable=TEXT_ONLY, lr=1e-2)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, data):
    """A text-stage run of 0 steps: the initial weights, exported."""
    run = tmp_path_factory.mktemp("untrained") / "run"
    _train(run, data, 0, **TEXT_STAGE)
    return run


def test_stage_2_trains_only_the_text_parameters(tmp_path, data, untrained):
    """The text-only stage's freezing is data (``trainable`` patterns): after a step every other
    parameter and buffer is bit-identical, the text ones have moved."""
    _train(tmp_path / "step", data, 2, **TEXT_STAGE)
    a, b = load_file(str(untrained / "model.safetensors")), load_file(str(tmp_path / "step" / "model.safetensors"))
    assert a.keys() == b.keys()
    from fnmatch import fnmatchcase
    trained = {k for k in a if any(fnmatchcase(k, p) for p in TEXT_ONLY)}
    assert {k for k in a if k.startswith("blocks.0.mlp.experts.text.norm.")} <= trained
    frozen = set(a) - trained - {"steps_done"}
    assert {"blocks.0.attn.q.weight", "blocks.0.mlp.experts.image.mlp.fc1.weight", "norm.weight",
            "image_embed.pos_embed", "type_embed.weight", "itm_head.weight"} <= frozen
    assert all(torch.equal(a[k], b[k]) for k in frozen), [k for k in frozen if not torch.equal(a[k], b[k])]
    moved = [k for k in trained if not torch.equal(a[k], b[k])]
    assert "text_embed.word.weight" in moved and "blocks.0.mlp.experts.text.mlp.fc1.weight" in moved
    assert "mlm_head.decoder.weight" in moved
    assert json.loads((tmp_path / "step" / "config.json").read_text())["trainable"] == TEXT_ONLY
    with pytest.raises(ValueError, match="'blocks.*.mlp.txt.*' matches no parameter"):
        _train(tmp_path / "typo", data, 1, trainable=["blocks.*.mlp.txt.*"])
    assert not (tmp_path / "typo").exists()


def test_pipeline_dual_and_fusion_calls(data, untrained):
    pipe = vlkit.load(untrained)
    images = [data / "images" / p for p in sorted(os.listdir(data / "images"))[:4]]
    texts = ["a red circle", "a blue square", "a green triangle", "two circles"]
    assert pipe.embed_images(images).shape == pipe.embed_texts(texts).shape == (4, 16)
    assert len(pipe.zero_shot(images, ["red circle", "blue square"])) == 4
    assert pipe.match(images, texts).shape == (4,)
    top = pipe.retrieve(texts[0], images, k=2, rerank=3)
    assert len(top) == 2 and all(0 <= i < 4 for i, _ in top)
    from vlkit.eval.run import default_tasks
    assert {"retrieval", "zeroshot", "itm"} <= set(default_tasks(pipe.model))


# -- 2 processes = 1 process ----------------------------------------------------------------------
def _dist_args(out, data):
    """ITC over the global batch, ITM negatives and MLM masks drawn for it, the dataset's
    negative captions, the fused passes on every 2nd row of the global batch, no dropout or
    drop path."""
    return ["train", "vlmo", "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "8",
            "--lr", "3e-3", "--no-eval", "--no-progress", "--workers", "0", "--precision", "fp32",
            "--hard-negatives", *SMALL_SET, "--set", "mlm_prob=0.3", "--set", "itc_vl=true",
            "--set", "fusion_every=2"]


def _dist_worker(rank, world, port, out_dir, data):
    from vlkit.cli import main
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert main(_dist_args(Path(out_dir), data)) == 0


def test_two_processes_match_one_process(tmp_path, monkeypatch, data):
    import socket
    monkeypatch.setenv("VLKIT_NO_PROGRESS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two, one = tmp_path / "two", tmp_path / "one"
    ctx = mp.spawn(_dist_worker, args=(2, port, str(two), str(data)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("distributed workers timed out")
    from vlkit.cli import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_dist_args(one, data)) == 0
    finally:
        torch.set_num_threads(threads)
    metrics = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [m["step"] for m in metrics[0]] == [m["step"] for m in metrics[1]]
    for key in ("loss", "itc_loss", "itc_vl_loss", "itm_loss", "mlm_loss"):
        assert [m[key] for m in metrics[1]] == pytest.approx([m[key] for m in metrics[0]], abs=1e-5), key
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert torch.equal(wa["steps_done"], wb["steps_done"]) and int(wa["steps_done"]) == 4
    assert max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa) <= 1e-5


# -- the official checkpoint layout ---------------------------------------------------------------
def _official_state(model) -> dict:
    """The model's weights under the official microsoft/unilm vlmo key names."""
    s, out = model.state_dict(), {}
    expert = {"text": "text", "image": "imag", "vl": "vl"}
    for i, block in enumerate(model.blocks):
        p, o = f"blocks.{i}.", f"transformer.blocks.{i}."
        out[o + "attn.qkv.weight"] = torch.cat([s[p + f"attn.{n}.weight"] for n in "qkv"])
        out[o + "attn.q_bias"], out[o + "attn.v_bias"] = s[p + "attn.q.bias"], s[p + "attn.v.bias"]
        for n in ("norm1.weight", "norm1.bias", "attn.proj.weight", "attn.proj.bias", "gamma_1", "gamma_2"):
            out[o + n] = s[p + n]
        for name in block.mlp.experts:
            for t in ("weight", "bias"):
                out[o + f"norm2_{expert[name]}.{t}"] = s[p + f"mlp.experts.{name}.norm.{t}"]
                for fc in ("fc1", "fc2"):
                    out[o + f"mlp_{expert[name]}.{fc}.{t}"] = s[p + f"mlp.experts.{name}.mlp.{fc}.{t}"]
    out["transformer.patch_embed.proj.weight"] = s["image_embed.patch_embed.proj.weight"]
    out["transformer.patch_embed.proj.bias"] = s["image_embed.patch_embed.proj.bias"]
    out["transformer.cls_token"], out["transformer.pos_embed"] = s["image_embed.cls_token"], s["image_embed.pos_embed"]
    out["transformer.norm.weight"], out["transformer.norm.bias"] = s["norm.weight"], s["norm.bias"]
    for a, b in (("word_embeddings", "word"), ("position_embeddings", "position"),
                 ("token_type_embeddings", "token_type")):
        out[f"text_embeddings.{a}.weight"] = s[f"text_embed.{b}.weight"]
    out["text_embeddings.LayerNorm.weight"], out["text_embeddings.LayerNorm.bias"] = s["text_embed.norm.weight"], s["text_embed.norm.bias"]
    out["text_embeddings.position_ids"] = torch.arange(s["text_embed.position.weight"].shape[0])[None]
    out["token_type_embeddings.weight"] = s["type_embed.weight"]
    out["pooler.dense.weight"], out["pooler.dense.bias"] = s["pooler.dense.weight"], s["pooler.dense.bias"]
    out["itc_text_proj.fc.weight"], out["itc_image_proj.fc.weight"] = s["text_proj.weight"], s["image_proj.weight"]
    out["itc_vl_text_proj.fc.weight"], out["itc_vl_image_proj.fc.weight"] = s["itc_vl_text_proj.weight"], s["itc_vl_image_proj.weight"]
    out["logit_scale"], out["logit_vl_scale"] = s["logit_scale"], s["logit_vl_scale"]
    out["itm_score.fc.weight"], out["itm_score.fc.bias"] = s["itm_head.weight"], s["itm_head.bias"]
    out["mlm_score.transform.dense.weight"], out["mlm_score.transform.dense.bias"] = s["mlm_head.dense.weight"], s["mlm_head.dense.bias"]
    out["mlm_score.transform.LayerNorm.weight"], out["mlm_score.transform.LayerNorm.bias"] = s["mlm_head.norm.weight"], s["mlm_head.norm.bias"]
    out["mlm_score.decoder.weight"], out["mlm_score.bias"] = s["mlm_head.decoder.weight"], s["mlm_head.decoder.bias"]
    for k in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"):
        out[f"vqa_classifier.{k}"] = s[f"vqa_head.{k}"]
    return out


def test_official_checkpoint_layout_loads_strictly(tmp_path):
    from vlkit.convert.common import ConversionError
    from vlkit.convert.vlmo_official import config_from_state, from_official, load_official, read_official
    kw = dict(stem="patch", qv_bias=True, itc_vl=True, num_answers=5, depth=3, vl_layers=1)
    source = _model(**kw)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # every weight distinct from a fresh model's
    state = _official_state(source)
    torch.save({"state_dict": state}, tmp_path / "vlmo.ckpt")
    state = read_official(tmp_path / "vlmo.ckpt")
    cfg = config_from_state(state, heads=2)
    assert (cfg.dim, cfg.depth, cfg.vl_layers, cfg.mlp_dim, cfg.image_size, cfg.patch_size, cfg.num_answers,
            cfg.vocab_size, cfg.max_text_len, cfg.itc_vl, cfg.qv_bias) == (32, 3, 1, 64, 64, 16, 5, 60, 16, True, True)
    model = from_official(state, heads=2).eval()
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        for name in ("encode_image", "encode_text"):
            args = (pixels,) if name == "encode_image" else (ids, mask)
            assert torch.equal(getattr(model, name)(*args), getattr(source, name)(*args)), name
        assert torch.equal(model.match(pixels, ids, mask), source.match(pixels, ids, mask))
        assert torch.equal(model.vqa_logits(pixels, ids, mask), source.vqa_logits(pixels, ids, mask))
    fresh = _model(**kw)
    for broken, message in (
            ({k: v for k, v in state.items() if k != "transformer.blocks.1.norm2_imag.weight"},
             "missing 1: blocks.1.mlp.experts.image.norm.weight"),
            ({**state, "transformer.blocks.0.mlp_vl.fc1.weight": torch.zeros(64, 32)},
             "unexpected 1: blocks.0.mlp.experts.vl.mlp.fc1.weight"),
            ({**state, "itm_score.fc.weight": torch.zeros(3, 32)}, "shape mismatch: itm_head.weight"),
            ({**state, "transformer.blocks.0.attn.rel_bias": torch.zeros(3)}, "have no place in the model"),
            ({**state, "relative_position_bias_table": torch.zeros(10, 6)}, "relative position bias")):
        with pytest.raises(ConversionError, match=message.replace(".", r"\.")):
            load_official(fresh, broken)


def test_trainable_exclusions():
    """``!`` patterns freeze what they match whatever else matches it; an exclusion that matches
    nothing, or a list of exclusions alone, is refused."""
    from vlkit.train.trainable import apply_trainable
    model = torch.nn.ModuleDict({"stem": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 2)})
    assert apply_trainable(model, ["*", "!stem.*"]) == ["head.weight", "head.bias"]
    assert not model["stem"].weight.requires_grad and model["head"].bias.requires_grad
    assert apply_trainable(model, ["*", "!*.bias"]) == ["stem.weight", "head.weight"]
    assert model["stem"].weight.requires_grad and not model["head"].bias.requires_grad
    with pytest.raises(ValueError, match="'!steam.*' matches no parameter"):
        apply_trainable(model, ["*", "!steam.*"])
    with pytest.raises(ValueError, match="only excludes"):
        apply_trainable(model, ["!stem.*"])


def test_trainable_patterns_as_run_options():
    """``--trainable a,b`` reaches RunArgs as a list; a resumed run keeps its patterns and refuses
    others; a recipe stage takes a list of strings only."""
    from vlkit.train.recipe import RecipeError, check_run_option
    from vlkit.train.run import RunArgs, resolve_resume, validate_run_args
    args = validate_run_args(RunArgs(model="vlmo", steps=1, trainable="text_embed.*, mlm_head.*"))
    assert args.trainable == ["text_embed.*", "mlm_head.*"]
    saved = {"model": "vlmo", "config": {}, "train": {"steps": 1}, "trainable": TEXT_ONLY}
    assert resolve_resume(RunArgs(model="vlmo", resume=True), saved).trainable == TEXT_ONLY
    with pytest.raises(ValueError, match="--trainable with --resume"):
        resolve_resume(RunArgs(model="vlmo", resume=True, trainable=["mlm_head.*"]), saved)
    check_run_option("trainable", TEXT_ONLY, "stage")
    with pytest.raises(RecipeError, match="trainable: expected a list of str"):
        check_run_option("trainable", "mlm_head.*", "stage")
