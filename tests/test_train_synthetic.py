"""End-to-end training on the synthetic world through the same path as ``vlkit train``."""
import json
import math

import torch

import vlkit
from vlkit.eval.run import evaluate
from vlkit.train.run import RunArgs, train


def test_vit_learns_the_synthetic_world(tmp_path):
    run = tmp_path / "vit"
    result = train(RunArgs(model="vit", out=str(run), steps=60, batch_size=64, progress=False,
                           overrides={"depth": 1}))
    assert result["step"] == 60
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.8  # from ln(48) = 3.87: colour is learned first
    pipe = vlkit.load(run)
    assert pipe.model.cfg.class_names[0] == "red circle" and len(pipe.model.cfg.class_names) == 48
    res = evaluate(pipe, "synthetic", "test", ["classification", "retrieval"])
    assert res["unsupported"] == ["retrieval"]
    # chance is 1/48; colour alone gives about 1/6
    assert res["metrics"]["classification.top1_seen"] > 0.08
    assert res["metrics"]["classification.top1_heldout"] == 0.0  # never-seen classes are never predicted right
    top = pipe.classify([torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()], top_k=3)[0]
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]


def test_clip_trains_with_hard_negatives_on_the_synthetic_world(tmp_path):
    run = tmp_path / "clip"
    train(RunArgs(model="clip", out=str(run), steps=6, batch_size=16, progress=False, hard_negatives=True,
                  overrides={"vision.depth": 1, "text.depth": 1}))
    pipe = vlkit.load(run)
    assert pipe.model.cfg.hard_negatives
    assert pipe.tokenizer is not None and pipe.model.cfg.text.eot_token_id == pipe.tokenizer.eos_token_id
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) >= 1 and all(math.isfinite(l) and l > 0 for l in losses)


def test_learning_curve_and_minimal_pair_groups(tmp_path):
    run = tmp_path / "clip"
    ov = {"vision.depth": 1, "text.depth": 1}
    train(RunArgs(model="clip", out=str(run), steps=4, batch_size=16, progress=False, groups=4,
                  eval_every=2, eval_size=20, overrides=ov))
    saved = json.loads((run / "config.json").read_text())
    assert saved["groups"] == 4
    curve = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [2, 4] and [c["samples"] for c in curve] == [32, 64]
    for c in curve:
        assert 0.0 <= c["zeroshot.top1"] <= 1.0 and 0.0 <= c["retrieval.t2i_r1"] <= 1.0
        assert "itm.compositional_acc" in c and "caption.bleu4" not in c
    # the curve's evaluation leaves training alone: the same run without it ends on equal weights
    plain = tmp_path / "plain"
    train(RunArgs(model="clip", out=str(plain), steps=4, batch_size=16, progress=False, groups=4,
                  overrides=ov))
    a, b = vlkit.load(run).model.state_dict(), vlkit.load(plain).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a group that does not divide the batch is refused
    import pytest
    with pytest.raises(ValueError, match="group size"):
        train(RunArgs(model="clip", out=str(tmp_path / "bad"), steps=1, batch_size=18, progress=False,
                      groups=4, overrides=ov))
