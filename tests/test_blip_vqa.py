"""BLIP's VQA training: the answer decoder's LM loss scores the answer's tokens only (hand-computed),
training on a handful of the world's questions lowers it until ranking the training answers and
generating agree, and ``vlkit train blip --vqa`` + ``vlkit eval --tasks vqa`` end to end."""
import json
import math
import random

import pytest
import torch

import vlkit
from vlkit.losses.vqa import answer_lm_loss, answer_log_likelihood

SMALL = dict(dim=32, heads=2, mlp_dim=64, layers=2, max_text_len=40, embed_dim=16, queue_size=8,
             **{"vision.dim": 32, "vision.depth": 1, "vision.heads": 2, "vision.mlp_dim": 64})
SETS = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]


def _model(**kw):
    torch.manual_seed(0)
    return vlkit.create_model("blip", "tiny", **{**SMALL, "vocab_size": 60, **kw}).eval()


def _vqa_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(9, 60, (3, 6), generator=g)
    q[:, 0], q[:, -1] = 2, 3
    q_mask = torch.ones_like(q)
    q_mask[1, 4:] = 0
    a = torch.tensor([[2, 11, 3, 0], [2, 12, 13, 3], [2, 14, 3, 0]])
    return {"pixel_values": torch.randn(3, 3, 64, 64, generator=g), "input_ids": q, "attention_mask": q_mask,
            "question_input_ids": q, "question_attention_mask": q_mask,
            "answer_input_ids": a, "answer_attention_mask": (a != 0).long()}


def _vqa_loss(model, batch):
    with torch.no_grad():
        return model.training_losses(batch)["vqa_loss"]


def test_answer_loss_scores_the_answer_tokens_and_end_token_only():
    """A hand-computed case: logits of a 3-word vocabulary, one answer "[CLS] 1 [SEP] [PAD]"."""
    logits = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0], [9.0, -9.0, 0.0]]])
    ids, mask = torch.tensor([[0, 1, 2, 0]]), torch.tensor([[1, 1, 1, 0]])
    # scored: position 0 predicts token 1, position 1 predicts token 2 (the end token); not the
    # begin token, not the padding (positions 2 and 3 predict nothing that counts)
    nll1 = -math.log(math.exp(2) / (2 + math.exp(2)))
    nll2 = -math.log(math.exp(0) / (math.exp(1) + 2))
    assert float(answer_log_likelihood(logits, ids, mask)[0]) == pytest.approx(-(nll1 + nll2), abs=1e-5)
    assert float(answer_lm_loss(logits, ids, mask, 0.0)) == pytest.approx((nll1 + nll2) / 2, abs=1e-5)
    lp = logits[0, :2].log_softmax(-1)  # label smoothing 0.1: 0.9 NLL + 0.1 mean over the vocabulary
    smooth = 0.9 * (nll1 + nll2) / 2 - 0.1 * float(lp.mean(-1).mean())
    assert float(answer_lm_loss(logits, ids, mask, 0.1)) == pytest.approx(smooth, abs=1e-5)


def test_vqa_loss_reads_the_question_only_as_the_decoders_context():
    model = _model(objectives=("vqa",))
    batch = _vqa_batch()
    loss = _vqa_loss(model, batch)
    with torch.no_grad():  # the decoder over the grounded encoder's question states, smoothed as captions
        states = model.ground(batch["question_input_ids"], batch["question_attention_mask"],
                              model.forward_features(batch["pixel_values"]))
        logits = model.answer_logits(states, batch["question_attention_mask"], batch["answer_input_ids"],
                                     batch["answer_attention_mask"])
    assert float(loss) == pytest.approx(float(answer_lm_loss(logits, batch["answer_input_ids"],
                                                             batch["answer_attention_mask"], 0.1)), abs=1e-6)
    assert set(model.training_losses(batch)) == {"vqa_loss", "loss"}  # VQA alone: no ITC, ITM or LM
    unscored = {k: v.clone() for k, v in batch.items()}
    unscored["answer_input_ids"][:, 0] = 7  # the begin token: [DEC] replaces it
    unscored["answer_input_ids"][0, 3] = 9  # answer padding
    unscored["question_input_ids"][1, 4:] = 9  # question padding: the decoder skips it
    assert torch.equal(_vqa_loss(model, unscored), loss)
    asked = {k: v.clone() for k, v in batch.items()}
    asked["question_input_ids"][0, 2] = 50  # the question itself: a new context
    assert not torch.allclose(_vqa_loss(model, asked), loss)
    answered = {k: v.clone() for k, v in batch.items()}
    answered["answer_input_ids"][1, 3] = 4  # an end token of another id is scored
    assert not torch.allclose(_vqa_loss(model, answered), loss)
    hf = _model(objectives=("vqa",), hf_compat=True, tie_decoder=False, retrieval_heads=False)
    hf_loss = _vqa_loss(hf, batch)  # Hugging Face's VQA model: [CLS] kept, question padding attended to
    assert torch.isfinite(hf_loss) and not torch.equal(_vqa_loss(hf, unscored), hf_loss)
    with pytest.raises(ValueError, match="objectives"):
        _model(objectives=("vqa", "mlm"))
    with pytest.raises(ValueError, match="nothing to train"):  # VQA alone, and no questions
        model.training_losses({k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")})


def _world(n=4):
    from vlkit.data.synthetic import synthetic_world
    from vlkit.train.run import answer_vocabulary, build_tokenizer
    records = synthetic_world(64).records("train", n)
    tok = build_tokenizer("synthetic", 64, records=records, extra_special_tokens=("[DEC]", "[ENC]"))
    ids = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, eot_token_id=tok.eos_token_id,
               dec_token_id=tok.token_to_id("[DEC]"), enc_token_id=tok.token_to_id("[ENC]"))
    return records, tok, ids, answer_vocabulary(records)


def test_collate_adds_the_answer_tokens_for_a_model_that_decodes_answers():
    from vlkit.train.run import make_collate
    records, tok, ids, answers = _world()
    model = _model(**ids, answer_names=answers)
    batch = make_collate(model, "fusion", tok, 0)(records, [random.Random(i) for i in range(len(records))])
    for j, rec in enumerate(records):
        question = tok.decode(batch["question_input_ids"][j].tolist())
        truth = {tok.decode(tok.encode(q["question"])): q["answer"] for q in rec["qa"]}
        assert tok.decode(batch["answer_input_ids"][j].tolist()) == truth[question]
        n = int(batch["answer_attention_mask"][j].sum())
        assert batch["answer_input_ids"][j, n - 1] == tok.eos_token_id and batch["answer_input_ids"][j, 0] == 2
    vilt = vlkit.create_model("vilt", "tiny", vocab_size=tok.vocab_size, num_answers=len(answers),
                              answer_names=answers)
    assert "answer_input_ids" not in make_collate(vilt, "fusion", tok, 0)(records)  # a classifier: scores only


def test_a_few_steps_lower_the_loss_and_ranking_agrees_with_generation():
    """Overfit to one batch of the world's questions: the loss falls, and the answer ranked first
    among the training answers is the one greedy decoding writes (and the true one)."""
    from vlkit.train.run import make_collate
    records, tok, ids, answers = _world(6)
    model = _model(**ids, answer_names=answers, objectives=("vqa",)).train()
    batch = make_collate(model, "fusion", tok, 0)(records, [random.Random(i) for i in range(len(records))])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(80):
        loss = model.training_losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    q, q_mask, px = batch["question_input_ids"], batch["question_attention_mask"], batch["pixel_values"]
    c = tok(answers, padding="longest")
    with torch.no_grad():
        ranked = [answers[i] for i in model.answer_scores(px, q, q_mask, c["input_ids"], c["attention_mask"])
                  .argmax(-1).tolist()]
        written = [tok.decode(row.tolist()) for row in model.answer_tokens(px, q, q_mask, max_new_tokens=4)]
    truth = [tok.decode(row.tolist()) for row in batch["answer_input_ids"]]
    assert ranked == written == truth


def test_vlkit_train_vqa_and_eval_end_to_end(tmp_path):
    from vlkit.cli import main
    from vlkit.data.synthetic import write_dataset
    from vlkit.eval.run import vqa_candidates
    data, pre, run = tmp_path / "data", tmp_path / "pre", tmp_path / "vqa"
    write_dataset(data, sizes={"train": 8, "val": 2, "test": 4})
    common = ["--data", str(data), "--batch-size", "4", "--no-eval"]
    # pretrained as blip-world is: an objective that reads the grounded encoder and the decoder
    objectives = ["--set", "grounding_weight=1.0", "--set", "decoder_grounding=true"]
    assert main(["train", "blip", "--steps", "2", "--out", str(pre), *common, *SETS, *objectives]) == 0
    assert vqa_candidates(vlkit.load(pre).model) is None  # no training answers: it generates
    assert main(["train", "blip", "--init", str(pre), "--vqa", "--steps", "3", "--out", str(run), *common]) == 0
    saved = json.loads((run / "config.json").read_text())
    answers = saved["config"]["answer_names"]
    assert saved["vqa"] and saved["config"]["objectives"] == ["vqa"] and "yes" in answers
    assert saved["config"]["grounding_weight"] == 0.0 and saved["config"]["decoder_grounding"] is False
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all("vqa_loss" in m and "lm_loss" not in m for m in metrics)
    pipe = vlkit.load(run)
    assert vqa_candidates(pipe.model) == answers
    assert main(["eval", str(run), "--data", str(data), "--tasks", "vqa", "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    types = {q["type"] for line in (data / "test.jsonl").read_text().splitlines() for q in json.loads(line)["qa"]}
    assert set(result["metrics"]) == {"vqa.acc"} | {f"vqa.{t}_acc" for t in types}
    assert 0.0 <= result["metrics"]["vqa.acc"] <= 1.0
    # a pretraining-only BLIP writes captions: VQA is reported unsupported for it, not scored near 0
    assert main(["eval", str(pre), "--data", str(data), "--tasks", "vqa", "--out", str(tmp_path / "g.json")]) == 0
    pre_eval = json.loads((tmp_path / "g.json").read_text())
    assert "vqa.acc" not in pre_eval["metrics"] and "vqa" in pre_eval["unsupported"]
    # ... while a VQA layout without retrieval heads (Hugging Face's BlipForQuestionAnswering) generates
    from vlkit.eval.run import SUPPORT
    assert SUPPORT["vqa"](_model(hf_compat=True, tie_decoder=False, retrieval_heads=False))


def test_vqa_with_an_image_width_other_than_the_text_width():
    """A BLIP whose image tower is narrower than its text stack (blip-world's: a 128-wide ViT
    stage under a 192-wide text stack): fine-tuned for VQA (answer_names, as --vqa sets) it maps the question states to the image width
    the decoder's cross-attention reads, and trains and scores answers; without, answering is a
    clear error rather than a shape mismatch deep in the decoder."""
    narrow = {"vision.dim": 16, "vision.mlp_dim": 32}
    model = _model(objectives=("vqa",), answer_names=["yes", "no"], **narrow)
    assert model.question_proj is not None and model.question_proj.weight.shape == (16, 32)
    batch = _vqa_batch()
    loss = _vqa_loss(model, batch)
    assert torch.isfinite(loss)
    with torch.no_grad():
        model.question_proj.weight.normal_(0, 1.0)
    assert not torch.allclose(_vqa_loss(model, batch), loss)  # the answers read through it
    a = batch["answer_input_ids"]
    scores = model.answer_scores(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], a, (a != 0).long())
    assert scores.shape == (3, 3) and torch.isfinite(scores).all()
    assert _model(objectives=("vqa",), answer_names=["yes"]).question_proj is None  # equal widths
    plain = _model(**narrow)
    assert plain.question_proj is None
    with pytest.raises(ValueError, match="differs from its image width"):
        plain.answer_scores(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], a, (a != 0).long())


def test_vqa_alone_turns_off_the_objectives_of_the_run_it_starts_from():
    """--vqa (VQA trained alone) from a run with the compositional objectives: their options go
    back to off (and the model's ``objective_fields``), except what the user set; with objectives
    given, nothing is touched."""
    from vlkit.models.blip import BLIPConfig
    from vlkit.train.run import _vqa_overrides
    probe = BLIPConfig(grounding_weight=1.0, relation_weight=1.0, geometry_weight=1.0, edit_weight=1.0,
                       edit_pass="itm", match_score="itm+edit", attention_forcing_steps=250, decoder_grounding=True,
                       false_word_weight=1.0)
    records = [{"qa": [{"question": "what color is the circle?", "answer": "red"}]}]
    out = _vqa_overrides(probe, records, "blip", set(), ("decoder_grounding", "false_word_weight"))
    assert out["decoder_grounding"] is False  # fields of BLIP's own that serve the objectives
    assert out["false_word_weight"] == 0.0
    from vlkit.models.blip import BLIP
    assert "false_word_weight" in BLIP.objective_fields
    assert out["objectives"] == ("vqa",) and out["answer_names"] == ["red"]
    assert (out["grounding_weight"], out["relation_weight"], out["geometry_weight"], out["edit_weight"],
            out["edit_pass"], out["match_score"], out["attention_forcing_steps"]) == (0.0, 0.0, 0.0, 0.0, "separate", "itm", 0)
    kept = _vqa_overrides(probe, records, "blip", {"grounding_weight"})
    assert "grounding_weight" not in kept and kept["edit_weight"] == 0.0
    both = _vqa_overrides(probe, records, "blip", {"objectives"})
    assert "objectives" not in both and "edit_weight" not in both


def test_blip_vqa_world_recipe_fine_tunes_the_blip_stage():
    from vlkit.train.recipe import load_recipe
    stages = load_recipe("blip-vqa-world")["stage"]
    assert [s["name"] for s in stages] == ["vit", "blip", "vqa"]
    assert stages[-1]["vqa"] is True and stages[-1]["init"] == "stage:blip" and "preset" not in stages[-1]
    # its first two stages are blip-world's, option for option (caption_rerank decodes, trains nothing)
    pretraining = load_recipe("blip-world")["stage"]
    pretraining[-1]["config"].pop("caption_rerank")
    assert stages[:2] == pretraining
