"""BLIP: one text stack three ways (weight sharing), the LM loss and caption scores, the decoding
loop (cache = no cache, beam 1 = greedy, seeded sampling, per-row prompts, minimum length), the
queue at any batch size, and a few training steps through ``vlkit train``."""
import pytest
import torch

import vlkit
from vlkit.layers import FeatureQueue, KVCache, directional_mask, padding_mask, sincos_square
from vlkit.losses.captioning import caption_labels, lm_loss, sequence_log_likelihood
from vlkit.models.generate import decode, filter_top_k_top_p, repetition_penalty_

SMALL = dict(dim=32, heads=2, mlp_dim=64, layers=2, vocab_size=60, max_text_len=40, embed_dim=16, queue_size=8,
             prompt_ids=(7, 8), **{"vision.dim": 32, "vision.depth": 1, "vision.heads": 2, "vision.mlp_dim": 64})


def _model(**kw):
    torch.manual_seed(0)
    return vlkit.create_model("blip", "tiny", **{**SMALL, **kw}).eval()


def _batch(b=4, length=8, seed=0, vocab=60):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, vocab, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 5:] = 0
    return {"pixel_values": torch.randn(b, 3, 64, 64, generator=g), "input_ids": ids, "attention_mask": mask}


def _lm(model, batch):
    with torch.no_grad():
        return model.lm_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])


# -- one text stack, three ways ------------------------------------------------------------------
def test_decoder_shares_all_but_self_attention_with_the_encoder():
    model, batch = _model(), _batch()
    before = _lm(model, batch)
    enc = model.text_layers.blocks[0]
    with torch.no_grad():  # the encoder's own self-attention: the decoder does not see it
        enc.attn.q.weight.add_(1.0)
        enc.norm1.weight.add_(1.0)
    assert torch.equal(_lm(model, batch), before)
    for name in ("mlp.fc1", "cross_attn.k", "norm_cross", "norm2"):  # shared: the decoder sees it
        module = enc.get_submodule(name)
        with torch.no_grad():
            module.weight.add_(0.5)
        after = _lm(model, batch)
        assert not torch.allclose(after, before), name
        before = after
    with torch.no_grad():  # and the word embeddings, which the LM head reads too
        model.text_embed.word.weight[9].add_(1.0)
    assert not torch.allclose(_lm(model, batch), before)
    assert model.lm_head.decoder.weight is model.text_embed.word.weight


def test_untied_decoder_has_its_own_stack():
    model, batch = _model(tie_decoder=False), _batch()
    before = _lm(model, batch)
    with torch.no_grad():
        model.text_layers.blocks[0].mlp.fc1.weight.add_(1.0)
        model.text_embed.word.weight.add_(1.0)
    assert torch.equal(_lm(model, batch), before)
    with pytest.raises(AttributeError):
        _model(text_encoder=False).match
    assert not hasattr(_model(text_decoder=False), "generate")
    with pytest.raises(ValueError, match="text_encoder or text_decoder"):
        _model(text_encoder=False, text_decoder=False)


def test_unimodal_encoder_skips_cross_attention_and_grounded_encoder_reads_enc():
    model, batch = _model(), _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    emb = model.encode_text(ids, mask)
    with torch.no_grad():
        model.text_layers.blocks[0].cross_attn.q.weight.add_(1.0)
    assert torch.allclose(model.encode_text(ids, mask), emb)
    grounded = model.text_features(ids)
    assert (grounded[:, 0] == model.cfg.enc_token_id).all() and torch.equal(grounded[:, 1:], ids[:, 1:])
    assert torch.equal(_model(hf_compat=True).text_features(ids), ids)


# -- the LM loss ---------------------------------------------------------------------------------
def test_prompt_is_not_scored_and_caption_scores_are_unsmoothed_log_likelihoods():
    model, batch = _model(), _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    dec_ids, dec_mask, unscored = model.decoder_inputs(ids, mask)
    assert unscored == 3 and (dec_ids[:, :3] == torch.tensor([model.cfg.dec_token_id, 7, 8])).all()
    labels = caption_labels(dec_ids, dec_mask, unscored)
    assert (labels[:, :3] == -100).all() and torch.equal(labels[0, 3:], ids[0, 1:])
    assert (labels[1, 3 + 4:] == -100).all()  # padding
    logits = _lm(model, batch)
    logp = logits.log_softmax(-1)
    manual = torch.stack([sum(logp[b, t - 1, dec_ids[b, t]] for t in range(3, dec_ids.shape[1]) if dec_mask[b, t])
                          for b in range(ids.shape[0])])
    with torch.no_grad():
        scores = model.score_captions(batch["pixel_values"], ids, mask)
    assert torch.allclose(scores, manual, atol=1e-4)
    # the prompt's own predictions change nothing
    changed = logits.clone()
    changed[:, :2] = torch.randn_like(changed[:, :2])
    assert torch.allclose(sequence_log_likelihood(changed, labels), scores, atol=1e-4)
    assert torch.allclose(lm_loss(changed, labels), lm_loss(logits, labels))
    smooth = lm_loss(logits, labels, 0.1)
    z, y = logits[:, :-1], labels[:, 1:]
    hit = y != -100
    lp = z[hit].log_softmax(-1)
    expected = (0.9 * -lp.gather(1, y[hit][:, None])[:, 0] - 0.1 * lp.mean(-1)).mean()
    assert torch.allclose(smooth, expected, atol=1e-5)


def test_training_losses_and_queue_take_any_batch_size():
    model = _model().train()
    for b in (3, 5, 7):  # queue of 8: none divides it, each wraps
        out = model.training_losses(_batch(b, seed=b))
        assert set(out) >= {"itc_loss", "itm_loss", "lm_loss", "loss"}
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        model.after_step(0)
    assert int(model.queue.ptr) == (3 + 5 + 7) % 8
    q = FeatureQueue(5, image=2)
    q.enqueue(image=torch.eye(2)[[0, 1, 0]])
    q.enqueue(image=torch.eye(2)[[1, 1, 1]])
    assert torch.equal(q.image, torch.eye(2)[[1, 1, 0, 1, 1]]) and int(q.ptr) == 1


def test_dataset_negatives_join_itm():
    model = _model(hard_negatives=True).train()
    batch = _batch(3)
    batch.update(neg_input_ids=_batch(4, length=10, seed=9)["input_ids"],
                 neg_attention_mask=torch.ones(4, 10, dtype=torch.long), neg_owner=torch.tensor([0, 0, 1, 2]))
    seen = {}
    head = model.itm_head.forward
    model.itm_head.forward = lambda x: seen.setdefault("rows", x.shape[0]) and head(x)
    model.training_losses(batch)
    assert seen["rows"] == 3 * 3 + 4


# -- decoding ------------------------------------------------------------------------------------
def _pixels(b=3, seed=1):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _trained_like(model):
    """Spread the LM head so that greedy and beam paths differ between images."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.ndim == 2 and p.shape[0] == model.cfg.vocab_size else None
    return model


def test_cached_decoding_equals_uncached():
    model = _trained_like(_model())
    px = _pixels()
    for opts in (dict(), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2, length_penalty=0.6),
                 dict(repetition_penalty=1.5, min_new_tokens=4)):
        assert torch.equal(model.generate(px, max_new_tokens=8, **opts),
                           model.generate(px, max_new_tokens=8, use_cache=False, **opts)), opts
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    a = model.generate(px, max_new_tokens=8, do_sample=True, top_k=20, num_return_sequences=2, generator=g1)
    b = model.generate(px, max_new_tokens=8, do_sample=True, top_k=20, num_return_sequences=2, generator=g2,
                       use_cache=False)
    assert torch.equal(a, b)
    # the states themselves: one step at a time on the cache = the whole sequence at once
    ctx = model.forward_features(px)
    ids = torch.randint(9, 60, (3, 6))
    with torch.no_grad():
        full = model.decode_states(ids, None, ctx)
        cache = KVCache()
        steps = [model.decode_states(ids[:, :2], None, ctx, 0, cache)]
        steps += [model.decode_states(ids[:, t:t + 1], None, ctx, t, cache) for t in range(2, 6)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_beam_one_is_greedy_and_greedy_is_the_argmax_path():
    model = _trained_like(_model())
    px = _pixels()
    greedy = model.generate(px, max_new_tokens=6)
    assert torch.equal(model.generate(px, max_new_tokens=6, num_beams=1), greedy)
    # the argmax path, step by step without the loop
    with torch.no_grad():
        ctx = model.forward_features(px)
        seq = torch.tensor([[model.cfg.dec_token_id, 7, 8]] * 3)
        for _ in range(6):
            nxt = model.lm_head(model.decode_states(seq, None, ctx))[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    path = seq[:, 3:]
    for row, out in zip(path.tolist(), greedy.tolist()):
        row = row[:row.index(3)] if 3 in row else row
        assert out[:len(row)] == row and all(t == 0 for t in out[len(row):])


def test_beam_search_finds_a_likelier_caption_than_greedy():
    model = _trained_like(_model())
    px = _pixels(2)
    greedy = model.generate(px, max_new_tokens=5, min_new_tokens=5, prompt_ids=[[], []])
    beam = model.generate(px, max_new_tokens=5, min_new_tokens=5, num_beams=4, prompt_ids=[[], []],
                          length_penalty=0.0)

    def loglik(tokens):
        with torch.no_grad():
            ctx = model.forward_features(px)
            seq = torch.cat([torch.full((2, 1), model.cfg.dec_token_id), tokens], 1)
            logp = model.lm_head(model.decode_states(seq, None, ctx)).log_softmax(-1)
            return logp[:, :-1].gather(-1, seq[:, 1:, None])[..., 0].sum(-1)
    assert (loglik(beam) >= loglik(greedy) - 1e-5).all()


def test_sampling_is_reproducible_with_a_generator():
    model = _trained_like(_model())
    px = _pixels()

    def sample(seed):
        return model.generate(px, max_new_tokens=8, do_sample=True, top_p=0.9, temperature=1.5,
                              num_return_sequences=3, generator=torch.Generator().manual_seed(seed))
    a = sample(0)
    assert a.shape[0] == 9 and torch.equal(a, sample(0)) and not torch.equal(a, sample(1))


def test_per_row_prompts_min_and_max_new_tokens():
    model = _trained_like(_model())
    px = _pixels()
    prompts = [[7], [7, 8, 9, 10], []]
    together = model.generate(px, prompt_ids=prompts, max_new_tokens=5)
    for i, p in enumerate(prompts):  # each row as if decoded alone
        alone = model.generate(px[i:i + 1], prompt_ids=[p], max_new_tokens=5)
        assert together[i, :alone.shape[1]].tolist() == alone[0].tolist()
    out = model.generate(px, max_new_tokens=7, min_new_tokens=7)
    assert out.shape[1] == 7 and not (out == 3).any()
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(px, max_new_tokens=0)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(px, num_beams=2, num_return_sequences=3)


def test_decode_loop_stops_rows_early_and_matches_transformers_processors():
    transformers = pytest.importorskip("transformers")
    calls = []

    def step(tokens, past, cache, rows):  # row 0 ends at once, row 1 never
        calls.append(tokens.shape[0])
        logits = torch.zeros(tokens.shape[0], 5)
        logits[:, 4] = 1.0
        logits[:, 3] = torch.where(tokens[:, -1] == 1, 2.0, 0.0)
        return logits
    out = decode(step, [[1], [2]], eos_token_id=3, pad_token_id=0, max_new_tokens=4)
    assert out.tolist() == [[0, 0, 0, 0], [4, 4, 4, 4]] and calls == [2, 1, 1, 1]
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seqs = torch.randint(0, 50, (3, 6))
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.3)(seqs, scores.clone())
    assert torch.allclose(repetition_penalty_(scores.clone(), seqs, 1.3), ref)
    ref = transformers.TopPLogitsWarper(0.8)(seqs, transformers.TopKLogitsWarper(10)(seqs, scores.clone()))
    assert torch.equal(filter_top_k_top_p(scores, 10, 0.8).isinf(), ref.isinf())


# -- training through the command --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from vlkit.train.run import RunArgs, train
    run = tmp_path_factory.mktemp("blip") / "run"
    train(RunArgs(model="blip", data="synthetic", out=str(run), steps=2, batch_size=8, progress=False,
                  overrides={k: v for k, v in SMALL.items() if k not in ("vocab_size", "prompt_ids")}))
    return run


def test_capfilt_end_to_end(tiny_run, tmp_path):
    """A small dataset through ``vlkit capfilt``: each kept caption is one the filter scores
    above the threshold, the report's counts add up, val/test are copied unchanged."""
    from vlkit.cli import main
    from vlkit.data.synthetic import write_dataset
    import json
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(data, sizes={"train": 6, "val": 2, "test": 2})
    assert main(["capfilt", str(data), "--captioner", str(tiny_run), "--filter", str(tiny_run), "--out", str(out),
                 "--samples", "2", "--threshold", "0.3"]) == 0
    report = json.loads((out / "capfilt.json").read_text())
    details = [json.loads(line) for line in (out / "capfilt.jsonl").read_text().splitlines()]
    assert report["records"] == 6 and len(details) == 6
    verdicts = [v for d in details for v in d["captions"]]
    assert sum(v["source"] == "synthetic" for v in verdicts) == 12
    assert report["original_kept"] + report["original_dropped"] + report["synthetic_kept"] \
        + report["synthetic_dropped"] == len(verdicts)
    assert all(v["kept"] == (v["p_match"] > 0.3) for v in verdicts)
    kept = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(kept) == report["records_kept"]
    for row in kept:
        assert (out / row["image"]).is_file() and row["caption"] == row["captions"][0]
    assert (out / "test.jsonl").read_text() == (data / "test.jsonl").read_text()
    pipe = vlkit.load(tiny_run)
    for d in details[:2]:  # the filter's probability, recomputed
        v = d["captions"][0]
        assert float(pipe.match([str(data / d["image"])], [v["caption"]])[0]) == pytest.approx(v["p_match"], abs=1e-3)
    assert main(["capfilt", str(data), "--captioner", str(tiny_run), "--filter", str(tiny_run), "--out", str(out)]) == 2


def test_capfilt_reindexes_what_points_at_captions():
    """A kept record's caption-indexed fields follow its new caption list: grounding spans of the
    kept originals ([] for a synthetic caption), negatives' sources re-indexed, a negative whose
    source was dropped dropped with it."""
    from vlkit.train.capfilt import _with_captions
    rec = {"image": "a.png", "caption": "c0", "captions": ["c0", "c1", "c2"],
           "captions_grounding": [["g0"], ["g1"], ["g2"]],
           "negatives": [{"caption": "n0", "source": 0}, {"caption": "n2", "source": 2},
                         {"caption": "free"}], "qa": [{"question": "q", "answer": "a"}]}
    row = _with_captions(rec, ["c2", "synthetic one"])
    assert row["caption"] == "c2" and row["captions"] == ["c2", "synthetic one"]
    assert row["captions_grounding"] == [["g2"], []]
    assert row["negatives"] == [{"caption": "n2", "source": 0}, {"caption": "free"}]
    assert row["qa"] == rec["qa"] and rec["captions"] == ["c0", "c1", "c2"]  # the input untouched
    assert "captions_grounding" not in _with_captions({**rec, "captions_grounding": [[]]}, ["c1"])


def test_vlkit_train_and_load(tiny_run):
    run = tiny_run
    pipe = vlkit.load(run)
    tok = pipe.tokenizer
    cfg = pipe.model.cfg
    assert cfg.dec_token_id == tok.token_to_id("[DEC]") and cfg.enc_token_id == tok.token_to_id("[ENC]")
    assert list(cfg.prompt_ids) == tok.encode("a picture of ")[1:-1]
    from PIL import Image
    img = Image.new("RGB", (64, 64), "red")
    caps = pipe.caption([img, img], max_new_tokens=4)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    assert pipe.match([img], ["a red circle"]).shape == (1,)
    assert len(pipe.caption([img, img], prompt=["a red", "there is"], num_beams=2, max_new_tokens=3)) == 2
    with pytest.raises(ValueError, match="prompts"):
        pipe.caption([img, img], prompt=["a", "b", "c"])
    assert pipe.answer([img], ["what colour is the circle?"], candidates=["red", "blue"])[0] in ("red", "blue")
    assert isinstance(pipe.answer([img], ["what colour is the circle?"], max_new_tokens=2)[0], str)


def test_caption_evaluation_decodes_by_beam_search_when_asked(tiny_run, monkeypatch):
    """evaluate(caption_beams=N) scores the captions the pipeline writes with num_beams=N
    (recorded in the result), greedy by default; the world's checks read those captions."""
    from vlkit.data.synthetic import synthetic_world
    from vlkit.eval.run import evaluate
    pipe = vlkit.load(tiny_run)
    recs = synthetic_world(64).records("test", 6)
    asked = []

    def caption(images, **options):  # true captions from beam search, false ones greedily
        asked.append(options)
        return [recs[i]["captions"][0] if options.get("num_beams", 1) > 1 else "a red circle left of"
                for i in range(len(images))]
    monkeypatch.setattr(pipe, "caption", caption)
    greedy = evaluate(pipe, tasks=["caption"], records=(recs, []))
    beam = evaluate(pipe, tasks=["caption"], records=(recs, []), caption_beams=3)
    assert asked == [{}, {"num_beams": 3}]
    assert greedy["metrics"]["caption.correct"] == 0 and greedy["metrics"]["caption.grammatical"] == 0
    assert beam["metrics"]["caption.correct"] == 1 and beam["metrics"]["caption.phrases_true"] == 1
    assert beam["caption_beams"] == 3 and "caption_beams" not in greedy
    with pytest.raises(ValueError, match="caption_beams"):
        evaluate(pipe, tasks=["caption"], records=(recs, []), caption_beams=0)


def test_caption_rerank_keeps_the_beam_the_models_score_ranks_first(tiny_run):
    """caption(rerank=K): K beams per image, the one ``score`` ranks highest kept (checked
    against the beams and their scores computed apart); the config's caption_rerank is the
    default decoding, and an explicit decoding (num_beams, rerank=0) replaces it."""
    import dataclasses
    from vlkit.data.synthetic import synthetic_world
    pipe = vlkit.load(tiny_run)
    images = [r["image"] for r in synthetic_world(64).records("test", 3)]
    k = 4
    beams = pipe.caption(images, num_beams=k, num_return_sequences=k, max_new_tokens=6)
    t = pipe.tokens(beams)
    px = pipe.pixels(images).repeat_interleave(k, 0)
    with torch.no_grad():
        scores = pipe.model.score(px, t["input_ids"], t["attention_mask"]).float().view(3, k)
    expected = [beams[i * k + int(j)] for i, j in enumerate(scores.argmax(1))]
    assert pipe.caption(images, rerank=k, max_new_tokens=6) == expected
    greedy = pipe.caption(images, max_new_tokens=6)
    assert pipe.caption_rerank() == 0
    pipe.model.cfg = dataclasses.replace(pipe.model.cfg, caption_rerank=k)
    assert pipe.caption(images, max_new_tokens=6) == expected              # the config's default
    assert pipe.caption(images, rerank=0, max_new_tokens=6) == greedy
    assert pipe.caption(images, num_beams=k, max_new_tokens=6) == [beams[i * k] for i in range(3)]
    assert pipe.caption_rerank(None, {"do_sample": True}) == 0 and pipe.caption_rerank(2, {}) == 2
    for kwargs, message in [(dict(rerank=k, num_beams=2), "contradicts"),
                            (dict(rerank=k, num_return_sequences=2), "one caption per image"),
                            (dict(rerank=-1), "rerank must be")]:
        with pytest.raises(ValueError, match=message):
            pipe.caption(images, **kwargs)
    with pytest.raises(ValueError, match="caption_rerank must be"):
        _model(caption_rerank=-2)
    with pytest.raises(ValueError, match="needs the decoder, the text encoder"):
        _model(caption_rerank=4, text_encoder=False)


def test_caption_evaluation_reranks_and_counts_the_facts_stated(tiny_run, monkeypatch):
    """evaluate(caption_rerank=K) asks the pipeline for rerank=K and records it (also when the
    model's config sets it); caption.facts is the mean number of noun phrases and relations
    stated (an ungrammatical caption states none)."""
    import dataclasses
    from vlkit.data.synthetic import synthetic_world
    from vlkit.eval.run import evaluate
    pipe = vlkit.load(tiny_run)
    recs = synthetic_world(64).records("test", 4)
    asked = []
    said = ["a red circle", "a red circle left of a blue square", "not a sentence", "two circles"]

    def caption(images, **options):
        asked.append(options)
        return said[:len(images)]
    monkeypatch.setattr(pipe, "caption", caption)
    res = evaluate(pipe, tasks=["caption"], records=(recs, []), caption_rerank=3)
    assert asked[-1] == {"rerank": 3} and res["caption_rerank"] == 3
    # phrases + relations: 1, 2 + 1, none (ungrammatical), none (a count of shapes names no object)
    assert res["metrics"]["caption.facts"] == pytest.approx((1 + 3 + 0 + 0) / 4, abs=1e-4)
    res = evaluate(pipe, tasks=["caption"], records=(recs, []))
    assert asked[-1] == {} and "caption_rerank" not in res
    pipe.model.cfg = dataclasses.replace(pipe.model.cfg, caption_rerank=5)
    assert evaluate(pipe, tasks=["caption"], records=(recs, []))["caption_rerank"] == 5
    assert "caption_rerank" not in evaluate(pipe, tasks=["caption"], records=(recs, []), caption_beams=2)
    with pytest.raises(ValueError, match="leave caption_beams at 1"):
        evaluate(pipe, tasks=["caption"], records=(recs, []), caption_rerank=3, caption_beams=2)
    with pytest.raises(ValueError, match="rerank must be a whole number"):
        evaluate(pipe, tasks=["caption"], records=(recs, []), caption_rerank=-1)


def test_blip_diagnostics_script_scores_three_ways_and_ranks_beams(tiny_run, capsys):
    """scripts/blip_diagnostics.py: compositional accuracy by ITM + word head, by the decoder's
    log-likelihood and by their sum, and captions from k beams (top, oracle, ranked four ways);
    the oracle is never below any of them, and the model's config is left as it was."""
    import importlib.util
    import re
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "blip_diagnostics.py"
    spec = importlib.util.spec_from_file_location("blip_diagnostics", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pipe = vlkit.load(tiny_run)
    with mod.lm_weight(pipe.model, 0.7):
        assert pipe.model.cfg.match_lm_weight == 0.7
    assert pipe.model.cfg.match_lm_weight == 0.0
    mod.main([str(tiny_run), "--records", "4", "--beams", "2"])
    out = capsys.readouterr().out
    rows = {name.strip(): float(v) for name, v in re.findall(r"^  (top beam|any beam \(oracle\)|ranked first by the score|"
                                                              r"\.\.\. by [^0-9]+?)\s+([0-9.]+)$", out, re.M)}
    assert len(rows) == 6 and rows["any beam (oracle)"] >= max(v for k, v in rows.items() if "oracle" not in k)
    assert all(name in out for name in ("ITM + word head", "decoder log-likelihood", "sum"))


def test_caption_errors_script_sorts_captions_by_the_first_rule_they_break(tiny_run, capsys):
    """scripts/caption_errors.py: each caption's kind is the first rule it breaks, and the counts
    over the records add up."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "caption_errors.py"
    spec = importlib.util.spec_from_file_location("caption_errors", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    objs = [{"shape": "circle", "color": "red", "size": "large", "x": 0.2, "y": 0.5},
            {"shape": "circle", "color": "blue", "size": "small", "x": 0.8, "y": 0.5}]
    assert mod.kind_of("a red circle left of a blue circle", objs) == "true"
    assert mod.kind_of("a red circle right of a blue circle", objs) == "false_relation"
    assert mod.kind_of("one circle and one circle", objs) == "shape_named_twice"
    assert mod.kind_of("a green circle and a blue circle", objs) == "false_phrase"
    assert mod.kind_of("three objects: a red circle and a blue circle", objs) == "wrong_count"
    assert mod.kind_of("a red circle and a red circle", objs) == "other"
    assert mod.kind_of("a cat", objs) == "ungrammatical"
    out = mod.main([str(tiny_run), "--records", "3", "--show", "1"])
    assert sum(out["counts"].values()) == 3 and out["true"] == out["counts"]["true"] / 3
    assert '"counts"' in capsys.readouterr().out


# -- Hugging Face parity -------------------------------------------------------------------------
def _hf_blip(cls_name, tmp_path, sep=98, seed=0):
    """A tiny random transformers BLIP (the sizes of transformers' own tests, two layers), its
    weights spread so that images and decoding paths differ, saved with ``save_pretrained``."""
    T = pytest.importorskip("transformers")
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                bos_token_id=97, pad_token_id=0, sep_token_id=sep, eos_token_id=2)  # SEP inside the vocabulary
    vision = dict(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, layer_norm_eps=1e-6)
    cfg = T.BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=16)
    torch.manual_seed(seed)
    hf = getattr(T, cls_name)(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.2))
    folder = tmp_path / cls_name
    hf.save_pretrained(folder)
    return hf, vlkit.load(folder).model


def _hf_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (3, 7), generator=g)
    ids[:, 0], ids[:, -1] = 1, 98
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return torch.randn(3, 3, 30, 30, generator=g), ids, mask


def test_hf_retrieval_parity(tmp_path):
    """ITM logits and ITC similarities within 1e-5 of transformers' BlipForImageTextRetrieval."""
    hf, ours = _hf_blip("BlipForImageTextRetrieval", tmp_path)
    px, ids, mask = _hf_inputs()
    assert ours.cfg.hf_compat and ours.cfg.eps == 1e-12 and ours.cfg.vision.eps == 1e-6
    with torch.no_grad():
        itm = hf(pixel_values=px, input_ids=ids, attention_mask=mask).itm_score
        itc = hf(pixel_values=px, input_ids=ids, attention_mask=mask, use_itm_head=False).itm_score
        assert (itm - ours.match(px, ids, mask)).abs().max() <= 1e-5
        assert (itc - ours.encode_image(px) @ ours.encode_text(ids, mask).T).abs().max() <= 1e-5
    assert not hasattr(ours, "generate")


@pytest.mark.parametrize("sep", [98, 39])  # 39: an end token the random decoder emits mid-caption
def test_hf_captioning_parity_greedy_and_beam(tmp_path, sep):
    """LM logits within 1e-5 of transformers' BlipForConditionalGeneration; greedy and beam-3
    captions (with repetition penalty, length penalty, min/max new tokens, several returned
    sequences) token-identical to its ``generate``."""
    hf, ours = _hf_blip("BlipForConditionalGeneration", tmp_path, sep=sep)
    px, ids, mask = _hf_inputs()
    with torch.no_grad():
        ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask).logits
        mine = ours.lm_head(ours.decode_states(ids, mask, ours.forward_features(px)))
    assert (ref - mine).abs().max() <= 1e-5
    assert not hasattr(ours, "match")
    for opts in (dict(), dict(num_beams=3), dict(repetition_penalty=2.0),
                 dict(num_beams=3, repetition_penalty=2.0, length_penalty=0.5, num_return_sequences=2),
                 dict(num_beams=3, repetition_penalty=1.5, min_new_tokens=4, max_new_tokens=6)):
        opts = {"max_new_tokens": 10, **opts}
        expected = hf.generate(pixel_values=px, **opts)[:, 1:].tolist()  # after [DEC]
        expected = [r[:r.index(sep)] if sep in r else [t for t in r if t != 0] for r in expected]
        got = [[t for t in r if t != 0] for r in ours.generate(px, prompt_ids=[[]] * 3, **opts).tolist()]
        assert got == expected, opts


def test_hf_blip_model_is_refused(tmp_path):
    T = pytest.importorskip("transformers")
    folder = tmp_path / "blipmodel"
    T.BlipModel(T.BlipConfig(text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=4, intermediate_size=37),
                             vision_config=dict(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=4, intermediate_size=37),
                             projection_dim=32)).save_pretrained(folder)
    from vlkit.convert.common import ConversionError
    with pytest.raises(ConversionError, match="BlipModel"):
        vlkit.load(folder)


# -- captioning metrics and the world-grounded check ---------------------------------------------
def test_bleu4_and_cider_d_equal_pycocoevalcap():
    """On a fixed sample of world captions (true, false, and a short one), vlkit's BLEU-4 and
    CIDEr-D equal pycocoevalcap's scorers (given the same word tokens) to 1e-9."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from vlkit.data.synthetic import synthetic_world
    from vlkit.eval import bleu4, cider
    from vlkit.eval.metrics import _tokenize
    recs = synthetic_world(64).records("test", 40)
    cands = [r["captions"][1] if i % 3 else r["negatives"][0]["caption"] for i, r in enumerate(recs)]
    cands[5] = "a red circle"
    refs = [r["captions"][:1] + r["captions"][2:] for r in recs]

    def words(s):
        return " ".join(_tokenize(s))
    gts = {i: [words(x) for x in refs[i]] for i in range(len(recs))}
    res = {i: [words(c)] for i, c in enumerate(cands)}
    assert bleu4(cands, refs) == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3], abs=1e-9)
    assert cider(cands, refs) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)


def test_caption_correct_reads_the_worlds_grammar():
    from vlkit.data.synthetic import caption_is_true, parse_caption, synthetic_world
    recs = synthetic_world(64).records("test", 100)
    assert all(caption_is_true(c, r["objects"]) for r in recs for c in r["captions"])
    assert not any(caption_is_true(n["caption"], r["objects"]) for r in recs for n in r["negatives"])
    rec = recs[0]
    spaced = rec["captions"][0].replace(";", " ;").replace(",", " ,") + " ."  # as a WordPiece decode
    assert caption_is_true(spaced, rec["objects"])
    assert parse_caption("a picture of a cat") is None and not caption_is_true("", rec["objects"])
    # a list names distinct objects: one object named twice is false, though each phrase holds
    two = next(r for r in recs if len(r["objects"]) == 2)
    a, b = (f'a {o["color"]} {o["shape"]}' for o in two["objects"])
    assert caption_is_true(f"two objects: {a} and {b}", two["objects"]) and caption_is_true(f"{b} and {a}", two["objects"])
    assert not caption_is_true(f"two objects: {a} and {a}", two["objects"])
    assert not caption_is_true(f"{b} and {b}", two["objects"])


def test_caption_facts_check_each_phrase_and_relation():
    """caption_facts counts the stated noun phrases and relations and those that hold; every
    reference caption holds throughout, and a negative fails a fact or the whole."""
    from vlkit.data.synthetic import caption_facts, caption_is_true, synthetic_world
    objects = [dict(shape="circle", color="red", size="small", x=0.2, y=0.5, extent=0.2),
               dict(shape="square", color="blue", size="large", x=0.8, y=0.5, extent=0.3)]
    assert caption_facts("a red circle is left of a blue square", objects) == \
        dict(phrases=2, phrases_true=2, relations=1, relations_true=1)
    assert caption_facts("a red circle is to the right of a blue square", objects) == \
        dict(phrases=2, phrases_true=2, relations=1, relations_true=0)
    assert caption_facts("a large red circle and a blue square", objects) == \
        dict(phrases=2, phrases_true=1, relations=0, relations_true=0)
    assert caption_facts("a green circle is left of a blue square", objects)["relations_true"] == 0
    assert caption_facts("a red circle left of", objects) is None
    recs = synthetic_world(64).records("test", 60)
    for r in recs:
        for c in r["captions"]:
            f = caption_facts(c, r["objects"])
            assert f["phrases_true"] == f["phrases"] and f["relations_true"] == f["relations"], c
        for n in r["negatives"]:
            f = caption_facts(n["caption"], r["objects"])
            assert f["phrases_true"] < f["phrases"] or f["relations_true"] < f["relations"] \
                or not caption_is_true(n["caption"], r["objects"])


def test_hf_vqa_parity_and_answers_by_generation_or_ranking(tmp_path):
    """transformers' BlipForQuestionAnswering.generate (greedy and beam 3) token-identical; the
    answer ranking picks the candidate of highest log-likelihood."""
    hf, ours = _hf_blip("BlipForQuestionAnswering", tmp_path, sep=39)
    px, ids, mask = _hf_inputs()
    assert not ours.cfg.tie_decoder and not hasattr(ours, "match")
    for opts in (dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3, repetition_penalty=1.5)):
        expected = hf.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **opts)[:, 1:].tolist()
        expected = [r[:r.index(39)] if 39 in r else [t for t in r if t != 0] for r in expected]
        got = [[t for t in r if t != 0] for r in ours.answer_tokens(px, ids, mask, **opts).tolist()]
        assert got == expected, opts
    answers = torch.tensor([[1, 10, 98, 0], [1, 20, 21, 98], [1, 30, 98, 0]])
    answer_mask = (answers != 0).long()
    with torch.no_grad():
        scores = ours.answer_scores(px, ids, mask, answers, answer_mask)
        states = ours.question_states(px, ids, mask)
        for c in range(3):
            dec = answers[c:c + 1].clone()
            dec[0, 0] = ours.cfg.dec_token_id
            n = int(answer_mask[c].sum())
            logp = ours.lm_head(ours.decode_states(dec[:, :n], None, states[1:2])).log_softmax(-1)
            manual = sum(logp[0, t - 1, dec[0, t]] for t in range(1, n))
            assert scores[1, c] == pytest.approx(float(manual), abs=1e-4)


def test_retrieval_reranks_itc_top_k_by_itm_plus_itc():
    from vlkit.eval.rerank import rerank
    model, batch = _model(), _batch(4)
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        out = rerank(model, px, ids, mask, k=2)
        sim = model.encode_image(px) @ model.encode_text(ids, mask).T
        top = sim.topk(2, dim=1).indices
        for i in range(4):
            for j in top[i].tolist():
                logits = model.match(px[i:i + 1], ids[j:j + 1], mask[j:j + 1])[0]
                assert out["i2t"][i, j] == pytest.approx(float(logits[1] - logits[0] + sim[i, j]), abs=1e-4)


def test_answers_of_padded_questions_equal_answers_alone():
    """The decoder's cross-attention skips question padding, also from the cache (beams and rows
    leaving the batch): each answer equals the one its question gets alone, unpadded (with
    ``hf_compat``, which attends to padding as transformers does, two of these rows differ)."""
    model = _model()
    with torch.no_grad():  # answers that depend on the question
        for name, p in model.named_parameters():
            if "cross_attn" in name or "text_layers" in name:
                p.mul_(3.0)
    batch = _batch(3)
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    mask[2, 3:] = 0
    for opts in (dict(), dict(num_beams=3)):
        together = model.answer_tokens(px, ids, mask, max_new_tokens=6, **opts)
        for i in range(3):
            n = int(mask[i].sum())
            alone = model.answer_tokens(px[i:i + 1], ids[i:i + 1, :n], mask[i:i + 1, :n], max_new_tokens=6, **opts)
            assert together[i, :alone.shape[1]].tolist() == alone[0].tolist(), (opts, i)


def test_cross_attention_maps_are_the_grounded_encoders():
    """BLIP's cross-attention maps (``vlkit explain``, the compare report's heat maps): one row per
    text token over the patches, each summing to 1, the mean of the layers' own maps."""
    from vlkit.layers import patch_attention
    model = vlkit.create_model("blip", "tiny").eval()
    pixels = torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    ids = torch.randint(5, 50, (2, 7))
    ids[:, 0] = 2
    maps = model.cross_attention_maps(pixels, ids)
    patches = model.forward_features(pixels).shape[1] - 1
    assert maps.shape == (2, 7, patches)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 7), atol=1e-5, rtol=0)
    last = model.cross_attention_maps(pixels, ids, layer=-1)
    assert not torch.allclose(last, maps)  # one layer's map is not the mean of all
    with pytest.raises(ValueError, match="out of range"):
        model.cross_attention_maps(pixels, ids, layer=99)
    with pytest.raises(ValueError, match="no cross-attention layers"):
        patch_attention([], what="a stack")


# -- auxiliary objectives on the grounded encoder's ITM pass --------------------------------------
# every objective BLIP can train (relation_mask_prob needs an MLM pass, which BLIP has not)
ALL_OBJECTIVES = dict(grounding_weight=1.0, relation_weight=1.0, relation_layer=1, geometry_weight=1.0,
                      edit_weight=1.0, edit_pass="itm", match_score="itm+edit", attention_forcing_steps=5,
                      directional_heads=True, fusion_pos="sincos", hard_negatives=True)


def _objectives_batch(b=4, seed=0):
    """``_batch`` with grounding (words 1 and 4 name a cell each), relation targets (word 2 looks
    at both) and one minimal-pair negative per caption (word 2 replaced)."""
    batch = _batch(b, seed=seed)
    ids = batch["input_ids"]
    names, roles = torch.zeros(b, 8, 16), torch.zeros(b, 2, 8, 16)
    for i in range(b):
        names[i, 1, i], names[i, 4, 15 - i] = 1, 1
        roles[i, 0, 2, i], roles[i, 1, 2, 15 - i] = 1, 1
    neg = ids.clone()
    neg[:, 2] = 7
    batch.update(grounding=names, grounding_roles=roles, neg_input_ids=neg,
                 neg_attention_mask=batch["attention_mask"].clone(), neg_owner=torch.arange(b))
    return batch


def test_objectives_join_training_and_reach_the_cross_attention():
    """With the objectives on, the training losses hold theirs, finite, summed into the loss with
    their weights; the grounding and relation losses train the cross-attention of their layers."""
    model = _model(**{**ALL_OBJECTIVES, "grounding_weight": 0.5}).train()
    assert [o.name for o in model.objectives] == ["phrase_grounding", "relation_grounding",
                                                  "replaced_word_correction", "attention_forcing"]
    assert model.grounding_grid == (4, 4)
    out = model.training_losses(_objectives_batch())
    parts = ("grounding_loss", "relation_loss", "geometry_loss", "edit_loss", "edit_word_loss")
    assert all(torch.isfinite(out[k]) and out[k] > 0 for k in parts), {k: out.get(k) for k in parts}
    want = out["itc_loss"] + out["itm_loss"] + out["lm_loss"] + 0.5 * out["grounding_loss"] + sum(
        out[k] for k in parts[1:])
    torch.testing.assert_close(out["loss"], want)
    for loss, layer in (("grounding_loss", 0), ("relation_loss", 1)):
        model.zero_grad()
        out[loss].backward(retain_graph=True)
        grad = model.text_layers.blocks[layer].cross_attn.q.weight.grad
        assert grad is not None and grad.abs().sum() > 0, loss
    model.zero_grad()
    (out["edit_loss"] + out["edit_word_loss"]).backward()
    assert model.word_head.decoder.weight.grad.abs().sum() > 0
    assert model.text_layers.blocks[1].cross_attn.v.weight.grad.abs().sum() > 0
    model.after_step(0)
    assert int(model.attention_forcing.steps_done) == 1


def test_grounding_reads_the_itm_pass_positives_cross_attention():
    """The ITM pass is the grounded one: its grounding loss is the loss of the chosen layer's
    cross-attention (patches after the image [CLS], with fusion_pos codes) over the captions with
    their own images alone; the other rows carry no targets."""
    from vlkit.losses.grounding import grounding_loss
    model = _model(grounding_weight=1.0, grounding_layer=1, fusion_pos="sincos")
    batch = _objectives_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        out = model.training_losses(batch)
        tokens = model.forward_features(batch["pixel_values"])
        _, maps = model.text_layers(model.text_embed(model.text_features(ids)), return_attention=True,
                                    context=tokens + sincos_square(tokens), mask=padding_mask(mask))
    want, mass = grounding_loss(maps[1]["cross"][:, :1, :, 1:], batch["grounding"])
    torch.testing.assert_close(out["grounding_loss"], want)
    torch.testing.assert_close(out["grounding_mass"], mass)
    assert "relation_loss" not in out and "edit_loss" not in out


def test_grounding_loss_falls_on_a_fixed_batch(word_squares):
    """Two words, each naming the patch of a bright square (its colour channel the word's) in a
    dark image: a few dozen steps on one batch pull the grounded head's attention onto them."""
    torch.manual_seed(0)
    model = vlkit.create_model("blip", "tiny", **{**SMALL, "grounding_weight": 1.0, "fusion_pos": "sincos"})
    batch = {**word_squares(8, torch.Generator().manual_seed(1), 64), "image_ids": torch.arange(8)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, masses = [], []
    for _ in range(40):
        out = model.training_losses(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.after_step(0)
        losses.append(out["grounding_loss"].item())
        masses.append(out["grounding_mass"].item())
    assert masses[0] < 0.15 and losses[-1] < 0.2 * losses[0] and masses[-1] > 0.8, (losses, masses)


def _itm_plus_edit_model():
    model = _model(hard_negatives=True, edit_weight=1.0, edit_pass="itm", match_score="itm+edit")
    with torch.no_grad():  # a word head with opinions
        for p in model.word_head.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    return model


def test_itm_plus_edit_score_adds_the_lowest_word_log_probability():
    """match_score="itm+edit": ``score`` is the ITM log-probability plus the word head's lowest
    log-probability of a word of the text where it stands (``objectives.match_log_score``); with
    "itm" the ITM head's alone. Re-ranking reads the same word check on top of the ITM log-odds."""
    from vlkit.eval.rerank import rerank
    model, batch = _itm_plus_edit_model(), _batch(3)
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        score = model.score(px, ids, mask)
        states = model.ground(ids, mask, model.forward_features(px))
        itm = model.itm_head(states[:, 0]).log_softmax(-1)
        logp = model.word_head(states).log_softmax(-1)
        lowest = torch.stack([min(logp[i, t, ids[i, t]] for t in range(ids.shape[1])
                                  if mask[i, t] and ids[i, t] > 6) for i in range(3)])
        torch.testing.assert_close(score, itm[:, 1] + lowest)
        reranked = rerank(model, px, ids, mask, k=3)["i2t"]  # every pair is in the top 3
        sim = model.encode_image(px) @ model.encode_text(ids, mask).T
        pairs = model.ground(ids.repeat(3, 1), mask.repeat(3, 1), model.forward_features(px).repeat_interleave(3, 0))
        logits = model.itm_head(pairs[:, 0])  # image-major
        check = model.score(px.repeat_interleave(3, 0), ids.repeat(3, 1), mask.repeat(3, 1)) \
            - logits.log_softmax(-1)[:, 1]  # the word check of each pair
        torch.testing.assert_close(check[::4], lowest)
        want = (logits[:, 1] - logits[:, 0] + check).view(3, 3) + sim
        torch.testing.assert_close(reranked, want, atol=1e-4, rtol=1e-5)
        model.cfg.match_score = "itm"
        plain = model.score(px, ids, mask)
        torch.testing.assert_close(plain, model.match(px, ids, mask).log_softmax(-1)[:, 1])
        torch.testing.assert_close(plain, itm[:, 1])
        assert (score < plain - 1e-3).all()


def test_next_word_targets_sit_on_the_position_that_writes_the_word():
    """A caption token's targets move to the decoder position whose next token it is: the
    decoder reads [DEC] + prompt + the caption after [CLS], so caption token j is written at
    position j + unscored - 2; the result is cut or padded to the decoder's length."""
    from vlkit.models.blip import next_word_targets
    model, batch = _model(), _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    dec_ids, _, unscored = model.decoder_inputs(ids, mask)
    assert unscored == 3  # [DEC] + the two prompt tokens
    names = torch.zeros(4, 8, 5)
    names[:, 1, 0], names[:, 4, 2], names[:, 7, 4] = 1, 1, 1
    roles = torch.stack([names, 2 * names], 1)
    for targets in (names, roles):
        moved = next_word_targets(targets, unscored, dec_ids.shape[1])
        assert moved.shape[:-2] == targets.shape[:-2] and moved.shape[-2:] == (dec_ids.shape[1], 5)
        for j in (1, 4, 7):  # the position that writes caption token j, and the token it writes
            k = j + unscored - 2
            assert torch.equal(dec_ids[:, k + 1], ids[:, j])
            torch.testing.assert_close(moved[..., k, :], targets[..., j, :])
        assert moved.sum() == targets[..., 1:, :].sum()
    assert next_word_targets(names, unscored, 6).shape == (4, 6, 5)  # cut at max_text_len
    assert next_word_targets(names, unscored, 6)[:, 2 + unscored - 2, 2].eq(0).all()
    assert next_word_targets(None, unscored, 6) is None


def test_decoder_grounding_reads_the_decoders_cross_attention():
    """decoder_grounding: the grounding loss averages the grounded encoder's ITM pass and the
    decoder's LM pass, whose term is the decoder's own cross-attention against the next-word
    targets; the LM loss is unchanged (without forcing), and the term trains the decoder's
    self-attention, which the encoder does not have."""
    from vlkit.losses.grounding import grounding_loss
    from vlkit.models.blip import next_word_targets
    batch = _objectives_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kw = dict(grounding_weight=1.0, grounding_layer=1, fusion_pos="sincos")
    plain, model = _model(**kw), _model(**kw, decoder_grounding=True)
    model.load_state_dict(plain.state_dict())
    with torch.no_grad():
        base = plain.training_losses(batch)
    out = model.training_losses(batch)
    torch.testing.assert_close(out["lm_loss"], base["lm_loss"])
    with torch.no_grad():
        dec_ids, dec_mask, unscored = model.decoder_inputs(ids, mask)
        tokens = model.forward_features(batch["pixel_values"])
        _, maps = model.decoder_layers(model._dec_embed(dec_ids), return_attention=True, causal=True,
                                       context=tokens + sincos_square(tokens), mask=padding_mask(dec_mask))
        dec, _ = grounding_loss(maps[1]["cross"][:, :1, :, 1:],
                                next_word_targets(batch["grounding"], unscored, dec_ids.shape[1]))
    torch.testing.assert_close(out["grounding_loss"], (base["grounding_loss"] + dec) / 2)
    assert not torch.allclose(dec, base["grounding_loss"])
    out["grounding_loss"].backward()
    assert model.decoder_layers.blocks[0].attn.q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="decoder_grounding"):
        _model(decoder_grounding=True)


def test_match_lm_weight_adds_the_decoders_caption_log_likelihood_to_the_score():
    """match_lm_weight w: ``score`` = the ITM (+ word head) log-probability + w times the caption's
    log-likelihood under the decoder (``score_captions``); 0 leaves it the ITM head's; it needs
    the decoder and the ITM head."""
    plain = _itm_plus_edit_model()
    model = _model(hard_negatives=True, edit_weight=1.0, edit_pass="itm", match_score="itm+edit",
                   match_lm_weight=0.5)
    model.load_state_dict(plain.state_dict())
    batch = _batch()
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        want = plain.score(px, ids, mask) + 0.5 * plain.score_captions(px, ids, mask)
        torch.testing.assert_close(model.score(px, ids, mask), want)
        assert (plain.score_captions(px, ids, mask) < -1).all()  # the term moves the score
    with pytest.raises(ValueError, match="match_lm_weight"):
        _model(match_lm_weight=-1.0)
    with pytest.raises(ValueError, match="match_lm_weight"):
        _model(match_lm_weight=1.0, text_decoder=False)


def test_objective_settings_blip_cannot_train_are_named():
    with pytest.raises(ValueError, match="relation_mask_prob"):
        _model(grounding_weight=1.0, relation_mask_prob=0.5)
    with pytest.raises(ValueError, match="edit_weight > 0"):
        _model(match_score="itm+edit")
    with pytest.raises(ValueError, match="hard_negatives"):
        _model(edit_weight=1.0)
    with pytest.raises(ValueError, match="ITM pass"):
        _model(grounding_weight=1.0, objectives=("itc", "lm"))
    with pytest.raises(ValueError, match="grounding_layer"):
        _model(grounding_weight=1.0, grounding_layer=2)
    with pytest.raises(ValueError, match="fusion_pos"):
        _model(fusion_pos="learned")
    with pytest.raises(ValueError, match="directional_head_index"):
        _model(directional_heads=True, directional_head_index=1)
    with pytest.raises(ValueError, match="'grounding' targets"):
        _model(grounding_weight=1.0).training_losses(_batch())


def test_position_codes_and_directional_heads_change_the_grounded_encoder():
    """fusion_pos adds 2-D codes to the image tokens the cross-attention reads (encoder and
    decoder); directional_heads restricts two self-attention heads of the encoder, not the
    decoder's; both off by default."""
    plain, batch = _model(), _batch()
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    for kw, decoder_changes in ((dict(fusion_pos="sincos"), True), (dict(directional_heads=True), False)):
        variant = _model(**kw)
        variant.load_state_dict(plain.state_dict())
        with torch.no_grad():
            assert not torch.allclose(variant.match(px, ids, mask), plain.match(px, ids, mask)), kw
            assert torch.allclose(_lm(variant, batch), _lm(plain, batch)) != decoder_changes, kw
    with torch.no_grad():
        unimodal = _model(directional_heads=True, directional_head_index=0)
        unimodal.load_state_dict(plain.state_dict())
        x = unimodal.text_embed(ids)
        want = unimodal.text_layers(x, mask=directional_mask(mask, 2, 0))
        torch.testing.assert_close(unimodal._text(ids, mask)[0], want)


# -- words false for every image -------------------------------------------------------------------
def test_false_word_loss_is_the_unlikelihood_at_the_marked_position():
    """``false_word_weight``: -log(1 - p) of each ``false_input_ids`` row's token at
    ``false_position``, read off the decoder over the owner's image, and a step lowers it."""
    from vlkit.losses.captioning import unlikelihood_loss
    model = _model(false_word_weight=1.0, objectives=("lm",)).train()
    batch = _batch(3)
    false = _batch(2, length=9, seed=5)
    false["attention_mask"][1, 7:] = 0
    batch.update(false_input_ids=false["input_ids"], false_attention_mask=false["attention_mask"],
                 false_owner=torch.tensor([2, 0]), false_position=torch.tensor([4, 6]))
    out = model.training_losses(batch)
    with torch.no_grad():
        logits = model.lm_logits(batch["pixel_values"][[2, 0]], false["input_ids"], false["attention_mask"])
    unscored = 3
    p = torch.stack([logits[0, 4 + unscored - 2].softmax(-1)[false["input_ids"][0, 4]],
                     logits[1, 6 + unscored - 2].softmax(-1)[false["input_ids"][1, 6]]])
    assert torch.allclose(out["false_word_loss"], -(1 - p).log().mean(), atol=1e-5)
    assert torch.allclose(out["loss"], out["lm_loss"] + out["false_word_loss"], atol=1e-6)
    z = torch.randn(4, 7)
    t = torch.tensor([0, 3, 6, 2])
    assert torch.allclose(unlikelihood_loss(z, t), -(1 - z.softmax(-1)[torch.arange(4), t]).log().mean(), atol=1e-6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = float(out["false_word_loss"].detach())
    for _ in range(5):
        opt.zero_grad()
        out = model.training_losses(batch)
        out["false_word_loss"].backward()
        opt.step()
    assert float(model.training_losses(batch)["false_word_loss"].detach()) < before
    # with no such rows, or the weight at 0, nothing is added
    empty = dict(batch, false_input_ids=torch.zeros(0, 1, dtype=torch.long),
                 false_attention_mask=torch.zeros(0, 1, dtype=torch.long),
                 false_owner=torch.zeros(0, dtype=torch.long), false_position=torch.zeros(0, dtype=torch.long))
    assert float(model.training_losses(empty)["false_word_loss"]) == 0.0
    assert "false_word_loss" not in _model(objectives=("lm",)).train().training_losses(batch)
