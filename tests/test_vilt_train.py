"""`vlkit train vilt` on the synthetic world: the collate's VQA targets and word ids, special ids
from the tokenizer, pretraining -> VQA fine-tuning with --init, evaluation and the pipeline."""
import json
import random

import pytest
import torch
from PIL import Image

import vlkit
import vlkit.eval.run as eval_run
from vlkit.cli import main
from vlkit.data.collate import ImageTextCollate, max_text_length
from vlkit.data.transforms import ImageTransform
from vlkit.tokenizers import WordPieceTokenizer, build_wordpiece_vocab
from vlkit.train.run import _text_overrides, init_weights

TINY = ["--set", "dim=32", "--set", "depth=1", "--set", "heads=2", "--set", "mlp_dim=64",
        "--set", "image_size=32", "--set", "patch_size=8"]
TEXTS = ["a red circle left of a blue square", "a green triangle above two yellow stars",
         "what color is the circle?", "how many objects are there?", "is the red circle left of the star?"]


def _image(color=(200, 30, 30)):
    return Image.new("RGB", (20, 20), color)


def test_collate_vqa_targets_word_ids_and_truncation():
    tok = build_wordpiece_vocab(TEXTS * 3, vocab_size=40)  # small: long words split into pieces
    answers = ["red", "two", "three", "yes"]
    collate = ImageTextCollate(ImageTransform(16), tok, max_length=8, word_ids=True, answers=answers)
    records = [
        {"image": _image(), "caption": TEXTS[0],
         "qa": [{"question": "what color is the circle?", "answer": "red", "type": "color"}]},
        {"image": _image(), "caption": TEXTS[1],  # three annotators: "two" twice, "three" once
         "qa": [{"question": "how many objects are there?", "answers": ["two", "three", "two"]}]},
        {"image": _image(), "caption": "a circle",
         "qa": [{"question": "what color is the circle?", "answer": "purple"}]},  # not in the vocabulary
    ]
    batch = collate(records)
    assert batch["input_ids"].shape == (3, 8)  # captions cut to max_length, [SEP] kept
    assert batch["input_ids"][0, -1] == tok.sep_token_id
    expected = tok([r["caption"] for r in records], max_length=8, return_word_ids=True)
    assert torch.equal(batch["word_ids"], expected["word_ids"])
    assert (batch["word_ids"][batch["attention_mask"] == 0] == -1).all()
    words = batch["word_ids"][0][batch["word_ids"][0] >= 0].tolist()
    assert len(words) > len(set(words))  # some word is several pieces: whole-word masking has work
    torch.testing.assert_close(batch["vqa_targets"], torch.tensor(
        [[1.0, 0, 0, 0], [0, 2 / 3, 1 / 3, 0], [0, 0, 0, 0]]))
    questions = tok([r["qa"][0]["question"] for r in records], max_length=8)  # cut alike
    assert torch.equal(batch["question_input_ids"], questions["input_ids"])
    assert batch["question_attention_mask"].shape == batch["question_input_ids"].shape
    plain = ImageTextCollate(ImageTransform(16), tok)(records)
    assert set(plain) == {"pixel_values", "input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="'qa'"):
        collate([{"image": _image(), "caption": "a circle"}])
    with pytest.raises(ValueError, match="'answer'"):
        collate([{"image": _image(), "caption": "a circle", "qa": [{"question": "what?"}]}])


def test_flip_swaps_left_right_in_caption_and_question_alike():
    tok = build_wordpiece_vocab(TEXTS * 3, vocab_size=200)
    collate = ImageTextCollate(ImageTransform(16, train=True, hflip=True, scale=(1.0, 1.0)), tok,
                               answers=["yes", "no"])
    rec = {"image": _image(), "caption": TEXTS[0],
           "qa": [{"question": TEXTS[4], "answer": "yes"}]}
    seen = set()
    for seed in range(12):
        b = collate([rec], [random.Random(seed)])
        caption, question = tok.decode(b["input_ids"][0]), tok.decode(b["question_input_ids"][0])
        assert ("left" in caption) == ("left" in question) != ("right" in question)
        seen.add("left" in question)
    assert seen == {True, False}  # both flipped and unflipped samples were drawn


def test_special_ids_and_vocab_size_come_from_the_tokenizer(tmp_path):
    # a BERT-ordered vocabulary: [PAD]=0, [UNK]=3, [CLS]=4, [SEP]=5, [MASK]=6
    vocab = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = WordPieceTokenizer.from_vocab_file(tmp_path / "vocab.txt")
    cls = vlkit.models.model_class("vilt")
    probe = cls.make_config("tiny")
    out = _text_overrides(cls, probe, tok)
    assert out == {"vocab_size": 10, "pad_token_id": 0, "mask_token_id": 6,
                   "special_token_ids": (0, 3, 4, 5, 6)}
    model = vlkit.create_model("vilt", "tiny", dim=32, depth=1, heads=2, mlp_dim=64, **out)
    assert model.text_embed.word.weight.shape[0] == 10 and model.mlm_head.decoder.out_features == 10
    assert max_text_length(model.cfg) == 40


def test_objectives_choose_the_losses():
    model = vlkit.create_model("vilt", "tiny", dim=32, depth=1, heads=2, mlp_dim=64, vocab_size=50,
                               num_answers=3, answer_names=["a", "b", "c"], objectives=("vqa",))
    ids = torch.randint(5, 50, (2, 6))
    batch = {"pixel_values": torch.randn(2, 3, 64, 64), "input_ids": ids,
             "attention_mask": torch.ones_like(ids), "question_input_ids": ids,
             "question_attention_mask": torch.ones_like(ids), "vqa_targets": torch.eye(3)[:2]}
    losses = model.training_losses(batch)
    assert set(losses) == {"vqa_loss", "loss"}
    with pytest.raises(ValueError, match="objectives"):
        vlkit.create_model("vilt", "tiny", objectives=("itc",))


def _clip_run(folder):
    from vlkit.checkpoint import WEIGHTS, atomic_save_tensors, model_state, save_run_config
    clip = vlkit.create_model("clip", "tiny", **{"vision.depth": 1, "text.depth": 1})
    folder.mkdir()
    save_run_config(folder, "clip", clip.config_dict())
    atomic_save_tensors(folder / WEIGHTS, model_state(clip))
    return folder


def test_pretrain_then_vqa_with_init_then_eval(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_run, "SYNTHETIC_TEST_PAIRS", 120)  # a shorter test split
    pre, vqa = tmp_path / "pre", tmp_path / "vqa"
    common = ["--steps", "2", "--batch-size", "8", "--no-eval", "--no-progress"]
    assert main(["train", "vilt", "--out", str(pre), *common, *TINY, "--set", "whole_word_mask=true",
                 "--hard-negatives"]) == 0
    cfg = json.loads((pre / "config.json").read_text())["config"]
    tok = vlkit.load(pre).tokenizer
    assert cfg["mask_token_id"] == tok.mask_token_id and cfg["vocab_size"] == tok.vocab_size
    assert set(cfg["special_token_ids"]) == tok.special_token_ids | {tok.pad_token_id}
    assert cfg["num_answers"] == 0 and cfg["whole_word_mask"]
    capsys.readouterr()

    # VQA fine-tuning: architecture and tokenizer from the pretraining run, a fresh VQA head
    assert main(["train", "vilt", "--vqa", "--init", str(pre), "--out", str(vqa), *common]) == 0
    err = capsys.readouterr().err
    assert "freshly initialised: vqa_head.0.bias" in err and "itm_head" not in err
    saved = json.loads((vqa / "config.json").read_text())
    names = saved["config"]["answer_names"]
    assert saved["config"]["num_answers"] == len(names)
    assert {"yes", "no", "red", "circle", "two"} <= set(names)
    assert saved["config"]["objectives"] == ["vqa"] and saved["config"]["dim"] == 32 and saved["vqa"]
    model = vlkit.models.build_model("vilt", saved["config"])
    fresh = init_weights(model, str(pre))
    assert fresh and all(k.startswith("vqa_head.") for k in fresh)
    source = vlkit.load(pre).model.state_dict()
    assert set(model.state_dict()) - set(source) == set(fresh)
    for key, value in source.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0, msg=key)

    # evaluation of the VQA run: ITM (its pretrained head), VQA, retrieval on a subset
    assert main(["eval", str(vqa), "--tasks", "itm,vqa,retrieval", "--retrieval-size", "8"]) == 0
    res = json.loads((vqa / "eval.json").read_text())
    for name in ("itm.compositional_acc", "itm.relation_flip_acc", "itm.attribute_swap_acc", "vqa.acc",
                 "vqa.count_acc", "vqa.exists_acc", "retrieval.i2t_r1", "retrieval.t2i_r5"):
        assert 0.0 <= res["metrics"][name] <= 1.0, name
    assert res["unsupported"] == [] and res["retrieval_images"] == 8
    assert res["metrics"]["retrieval.i2t_r10"] == 1.0  # 8 candidates: all within the top 10
    assert eval_run.evaluate(vlkit.load(pre), tasks=["vqa"])["unsupported"] == ["vqa"]

    # the pipeline of the run folder
    pipe = vlkit.load(vqa)
    world = eval_run.load_records("synthetic", "test", 32)[0][:2]
    images = [r["image"] for r in world]
    probs = pipe.match(images, [r["caption"] for r in world])
    assert probs.shape == (2,) and ((probs > 0) & (probs < 1)).all()
    answers = pipe.answer(images, ["how many objects are there?", "what shape is the red object?"])
    assert len(answers) == 2 and set(answers) <= set(names)
    ranked = pipe.retrieve(world[0]["caption"], images, k=2)
    assert len(ranked) == 2 and ranked[0][1] >= ranked[1][1]

    # rejected: another architecture (shape mismatch), another model
    assert main(["train", "vilt", "--vqa", "--init", str(pre), "--out", str(tmp_path / "x"), *common,
                 "--set", "dim=48"]) == 2
    assert "shape mismatch" in capsys.readouterr().err
    clip = _clip_run(tmp_path / "clip")
    assert main(["train", "vilt", "--vqa", "--init", str(clip), "--out", str(tmp_path / "y"), *common]) == 2
    assert "a clip checkpoint cannot initialise vilt" in capsys.readouterr().err


def test_vision_init_starts_vilt_from_a_vit_run(tmp_path):
    import vlkit
    from vlkit.train.run import RunArgs, train
    vit = tmp_path / "vit"
    train(RunArgs(model="vit", out=str(vit), steps=2, batch_size=8, progress=False,
                  overrides={"depth": 1, "dim": 48, "heads": 2, "mlp_dim": 96}))
    source = vlkit.load(vit).model.vision
    run = tmp_path / "vilt"
    train(RunArgs(model="vilt", out=str(run), steps=0, batch_size=8, progress=False,
                  overrides={"depth": 2, "vision_init": str(vit)}))
    model = vlkit.load(run).model
    assert (model.cfg.dim, model.cfg.depth, model.cfg.patch_size) == (48, 2, source.cfg.patch_size)
    ref = source.state_dict()
    own = model.state_dict()
    assert torch.equal(own["image_embed.pos_embed"], ref["embed.pos_embed"])
    for key in ref:
        if "running_" in key or "num_batches" in key:
            continue  # BatchNorm statistics: recomputed on ViLT's batches when the run ends
        if key.startswith("encoder.blocks.0.") or key.startswith("embed.patch_embed."):
            mine = key.replace("embed.", "image_embed.", 1) if key.startswith("embed.") else key
            assert torch.equal(own[mine], ref[key]), key
    assert not torch.equal(own["encoder.blocks.1.mlp.fc1.weight"], ref["encoder.blocks.0.mlp.fc1.weight"])
