"""End-to-end training on the synthetic world through the same path as ``vlkit train``."""
import json

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
    assert all(l == l for l in losses)  # finite
