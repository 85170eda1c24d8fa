"""The inference commands (zero-shot, caption, vqa, match) on tiny runs: image inputs from
files, folders and globs with a non-image file and a corrupt image among them, --json checked
against the Pipeline's own results, tables, errors; and fine-tuning with ``vlkit train --init``
on a ``vlkit synth`` folder and on one JSONL file, and a vocabulary learned from a user's
captions."""
import json
import shutil

import pytest
import torch

import vlkit
from vlkit.cli import main
from vlkit.infer import ImageBatches, expand_images, load_images
from vlkit.train.run import RunArgs, train

BLIP = dict(dim=32, heads=2, mlp_dim=64, layers=2, max_text_len=40, embed_dim=16, queue_size=8,
            **{"vision.dim": 32, "vision.depth": 1, "vision.heads": 2, "vision.mlp_dim": 64})
CLIP = {"vision": {"image_size": 32, "patch_size": 16, "dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64},
        "embed_dim": 16, "text": {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "context_length": 48}}
VILT = {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "image_size": 32, "patch_size": 16}


def _run(root, data, model, overrides, **kw):
    run = root / model
    train(RunArgs(model=model, data=str(data), out=str(run), steps=1, batch_size=4, progress=False,
                  overrides=overrides, **kw))
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = tmp_path_factory.mktemp("world") / "world"
    assert main(["synth", "--out", str(data), "--num", "16", "--image-size", "64"]) == 0
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world):
    """Tiny runs trained for one step on the small world (its vocabulary is quick to learn)."""
    root = tmp_path_factory.mktemp("runs")
    return {"blip": _run(root, world, "blip", BLIP), "clip": _run(root, world, "clip", CLIP),
            "vilt": _run(root, world, "vilt", VILT, vqa=True)}


@pytest.fixture()
def photos(world, tmp_path):
    """photos/a.png, photos/b.png, photos/sub/c.png, a note (photos/notes.txt) and a file
    with an image's name that is not one (photos/broken.png)."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = sorted((world / "images").glob("*.png"))
    for src, name in zip(images, ["a.png", "b.png", "sub/c.png"]):
        shutil.copy(src, folder / name)
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return folder


def _cli(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _json(argv, capsys) -> dict:
    rc, out, err = _cli(argv + ["--json"], capsys)
    assert rc == 0, err
    return json.loads(out)


# -- image inputs -------------------------------------------------------------------------------
def test_expand_images_folders_globs_and_bad_files(photos, monkeypatch):
    monkeypatch.chdir(photos.parent)
    with pytest.raises(ValueError, match="broken.png: corrupt image"):
        expand_images(["photos"])
    paths = expand_images(["photos", "photos/a.png"], skip_bad=True)  # a.png once; notes.txt ignored
    assert list(paths) == ["photos/a.png", "photos/b.png", "photos/sub/c.png"]
    assert paths.skipped == [("photos/broken.png", "corrupt image")]
    assert list(expand_images("photos/**/c.png")) == ["photos/sub/c.png"]
    assert list(expand_images(["photos/*.png"], skip_bad=True)) == ["photos/a.png", "photos/b.png"]
    assert list(expand_images(["photos/*"], skip_bad=True)) == ["photos/a.png", "photos/b.png", "photos/sub/c.png"]
    for bad, message in [("photos/*.jpg", "photos/\\*.jpg: no file matches"),
                         ("photos/nope.png", "photos/nope.png: no such file"),
                         ("photos/notes.txt", "notes.txt: not a readable image"),
                         ("photos/*.txt", "none of them an image")]:
        with pytest.raises(ValueError, match=message):
            expand_images([bad])
    (photos / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no images in this folder"):
        expand_images(["photos/empty"])
    # a truncated image passes the header check and is caught when decoded
    (photos / "cut.png").write_bytes((photos / "a.png").read_bytes()[:80])
    found = expand_images(["photos"], skip_bad=True)
    with pytest.raises(ValueError, match="cut.png: corrupt or truncated"):
        load_images(found)
    batches = ImageBatches(found, batch_size=2, skip_bad=True)
    assert [p for paths, _ in batches for p in paths] == ["photos/a.png", "photos/b.png", "photos/sub/c.png"]
    assert [r for _, r in batches.skipped] == ["corrupt image", "truncated image"]


# -- the commands, checked against the Pipeline ---------------------------------------------------
def test_zero_shot_json_table_and_skips(runs, photos, capsys):
    labels = ["red circle", "blue square", "green star"]
    argv = ["zero-shot", str(runs["clip"]), str(photos), "--labels", ",".join(labels), "--skip-bad",
            "--batch-size", "2", "--top-k", "2", "--template", "a picture of a {}"]
    res = _json(argv, capsys)
    paths = [str(photos / n) for n in ("a.png", "b.png", "sub/c.png")]
    assert [r["image"] for r in res["results"]] == paths and res["images"] == 3
    assert res["skipped"] == [{"image": str(photos / "broken.png"), "reason": "corrupt image"}]
    probs = vlkit.load(runs["clip"]).zero_shot(paths, labels, ["a picture of a {}"])
    for r, row in zip(res["results"], probs):
        best = row.topk(2)
        assert [t["label"] for t in r["top"]] == [labels[i] for i in best.indices.tolist()]
        assert [t["probability"] for t in r["top"]] == pytest.approx(best.values.tolist(), abs=1e-5)
    rc, out, _ = _cli(argv, capsys)
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["image", "top-1", "p", "top-2", "p"]
    assert len({line.index("top-1") if i == 0 else line.index(res["results"][i - 1]["top"][0]["label"])
                for i, line in enumerate(lines[:4])}) == 1  # the label column is aligned
    assert lines[-1] == f"3 images; 1 skipped (corrupt image: {photos / 'broken.png'})"
    rc, _, err = _cli([a for a in argv if a != "--skip-bad"], capsys)  # without --skip-bad the corrupt image stops the command
    assert rc == 2 and err.startswith(f"vlkit: error: {photos / 'broken.png'}: corrupt image") \
        and err.count("\n") == 1
    rc, _, err = _cli(["zero-shot", str(runs["vilt"]), str(photos / "a.png"), "--labels", "a,b"], capsys)
    assert rc == 2 and "vilt cannot classify zero-shot: it has no image embeddings and no text embeddings" in err


def test_caption_decodings_and_models_without_a_decoder(runs, photos, capsys):
    pipe, paths = vlkit.load(runs["blip"]), [str(photos / "a.png"), str(photos / "b.png")]
    res = _json(["caption", str(runs["blip"]), *paths, "--max-new-tokens", "5"], capsys)
    assert [r["caption"] for r in res["results"]] == pipe.caption(paths, max_new_tokens=5)
    assert res["decoding"] == "greedy"
    beam = _json(["caption", str(runs["blip"]), *paths, "--beam", "3", "--max-new-tokens", "5",
                  "--prompt", "there is"], capsys)
    assert [r["caption"] for r in beam["results"]] == pipe.caption(paths, prompt="there is", num_beams=3,
                                                                    max_new_tokens=5)
    sample = ["caption", str(runs["blip"]), *paths, "--top-p", "0.9", "--temperature", "1.5", "--seed", "3",
              "--max-new-tokens", "5"]
    assert _json(sample, capsys)["results"] == _json(sample, capsys)["results"]  # seeded: reproducible
    assert [r["caption"] for r in _json(sample, capsys)["results"]] == pipe.caption(
        paths, do_sample=True, top_p=0.9, temperature=1.5, generator=torch.Generator().manual_seed(3),
        max_new_tokens=5)
    ranked = _json(["caption", str(runs["blip"]), *paths, "--rerank", "3", "--max-new-tokens", "5"], capsys)
    assert [r["caption"] for r in ranked["results"]] == pipe.caption(paths, rerank=3, max_new_tokens=5)
    assert ranked["decoding"] == "the best of 3 beams by the model's score"
    rc, out, _ = _cli(["caption", str(runs["blip"]), paths[0], "--max-new-tokens", "3"], capsys)
    assert rc == 0 and out.splitlines()[0].split() == ["image", "caption"] and out.endswith("1 image; greedy\n")
    for argv, message in [(["caption", str(runs["clip"]), paths[0]], f"{runs['clip']} has no decoder"),
                          (["caption", str(runs["blip"]), paths[0], "--beam", "2", "--top-p", "0.9"],
                           "--beam and --top-p"),
                          (["caption", str(runs["blip"]), paths[0], "--beam", "2", "--rerank", "4"],
                           "--rerank K draws its own K beams"),
                          (["caption", str(runs["blip"]), paths[0], "--seed", "1"], "give --top-p too")]:
        rc, _, err = _cli(argv, capsys)
        assert rc == 2 and message in err and err.count("\n") == 1


def test_vqa_generated_and_chosen_answers(runs, photos, capsys):
    q, image = "what color is the circle?", str(photos / "a.png")
    res = _json(["vqa", str(runs["blip"]), str(photos / "sub"), q], capsys)
    assert res["results"] == [{"image": str(photos / "sub" / "c.png"),
                               "answer": vlkit.load(runs["blip"]).answer([str(photos / "sub" / "c.png")], [q])[0]}]
    chosen = _json(["vqa", str(runs["blip"]), image, q, "--candidates", "red,blue,green"], capsys)
    assert chosen["results"][0]["answer"] == vlkit.load(runs["blip"]).answer([image], [q], ["red", "blue", "green"])[0]
    vilt = vlkit.load(runs["vilt"])  # a classifier head: the best-scoring candidate it knows
    names = list(vilt.model.cfg.answer_names)
    logits = vilt.model.vqa_logits(vilt.pixels([image]), **vilt.tokens([q]))[0]
    picked = _json(["vqa", str(runs["vilt"]), image, q, "--candidates", ",".join(names[:3])], capsys)
    assert picked["results"][0]["answer"] == names[int(logits[:3].argmax())]
    assert _json(["vqa", str(runs["vilt"]), image, q], capsys)["results"][0]["answer"] == names[int(logits.argmax())]
    rc, _, err = _cli(["vqa", str(runs["vilt"]), image, q, "--candidates", "purple,elephant"], capsys)
    assert rc == 2 and "'elephant' is not among vilt's" in err
    rc, _, err = _cli(["vqa", str(runs["clip"]), image, q], capsys)
    assert rc == 2 and "cannot answer questions" in err
    rc, out, _ = _cli(["vqa", str(runs["vilt"]), image, q], capsys)
    assert rc == 0 and out.splitlines()[-1] == f"question: {q}; 1 image"


def test_match_itm_probability_and_cosine_similarity(runs, photos, capsys):
    images, captions = [str(photos / "a.png"), str(photos / "b.png")], ["a red circle", "two blue squares"]
    res = _json(["match", str(runs["blip"]), str(photos / "*.png"), *captions, "--skip-bad"], capsys)
    assert res["score"] == "itm_probability" and len(res["skipped"]) == 1
    expected = vlkit.load(runs["blip"]).match([i for i in images for _ in captions], captions * 2)
    assert [(r["image"], r["caption"]) for r in res["results"]] == [(i, c) for i in images for c in captions]
    assert [r["score"] for r in res["results"]] == pytest.approx(expected.tolist(), abs=1e-5)
    clip = vlkit.load(runs["clip"])
    cos = _json(["match", str(runs["clip"]), images[0], *captions], capsys)
    assert cos["score"] == "cosine_similarity"
    assert [r["score"] for r in cos["results"]] == pytest.approx(
        (clip.embed_images(images[:1]) @ clip.embed_texts(captions).T)[0].tolist(), abs=1e-5)
    rc, out, _ = _cli(["match", str(runs["clip"]), images[0], *captions], capsys)
    assert rc == 0 and out.splitlines()[0].split() == ["image", "cosine", "similarity", "caption"]
    rc, out, _ = _cli(["match", str(runs["vilt"]), images[0], captions[0]], capsys)
    assert rc == 0 and "ITM probability" in out.splitlines()[0]


def test_progress_bar_on_many_images_only(runs, photos, capsys, monkeypatch):
    monkeypatch.delenv("VLKIT_NO_PROGRESS", raising=False)
    many = photos.parent / "many"
    many.mkdir()
    for i in range(64):
        shutil.copy(photos / "a.png", many / f"{i:02d}.png")
    argv = ["zero-shot", str(runs["clip"]), str(many), "--labels", "a,b", "--batch-size", "64"]
    rc, out, err = _cli(argv, capsys)
    assert rc == 0 and "64/64" in err and out.splitlines()[-1] == "64 images"
    assert "64/64" not in _cli(argv + ["--no-progress"], capsys)[2]
    assert "1/1" not in _cli(argv[:2] + [str(photos / "a.png")] + argv[3:], capsys)[2]


# -- fine-tuning on a user's data ---------------------------------------------------------------------
def test_finetune_from_init_on_a_folder_and_on_one_jsonl_file(runs, world, tmp_path, capsys):
    init = vlkit.load(runs["blip"])
    out = tmp_path / "tuned"
    rc, stdout, err = _cli(["train", "blip", "--data", str(world), "--init", str(runs["blip"]), "--out", str(out),
                            "--steps", "2", "--batch-size", "4", "--no-progress"], capsys)
    assert rc == 0 and "architecture and tokenizer from it" in err, err
    assert "trained 2 steps" in stdout and "caption.bleu4" in stdout  # evaluated on the folder's test split
    saved = json.loads((out / "config.json").read_text())
    assert saved["init"] == str(runs["blip"]) and saved["data"] == str(world)
    tuned = vlkit.load(out)
    assert tuned.tokenizer.vocab_size == init.tokenizer.vocab_size
    before, after = init.model.state_dict(), tuned.model.state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    # one JSONL file elsewhere, its image paths relative to it
    mine = tmp_path / "mine"
    (mine / "pics").mkdir(parents=True)
    lines = []
    for i, line in enumerate((world / "train.jsonl").read_text().splitlines()[:6]):
        rec = json.loads(line)
        shutil.copy(world / rec["image"], mine / "pics" / f"{i}.png")
        caption = rec["caption"] + (" ♫" if i == 0 else "")  # a word the --init vocabulary lacks
        lines.append(json.dumps({"image": f"pics/{i}.png", "caption": caption}))
    (mine / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out2 = tmp_path / "tuned2"
    rc, stdout, err = _cli(["train", "blip", "--data", str(mine / "captions.jsonl"), "--init", str(out),
                            "--out", str(out2), "--steps", "2", "--batch-size", "4", "--no-progress"], capsys)
    assert rc == 0, err
    assert "trained 2 steps (8 samples)" in stdout and "one JSONL file, with no test split" in stdout
    unknown = 1 / sum(len(json.loads(line)["caption"].split()) for line in lines)
    assert f"note: {unknown:.0%} of the words of the training texts are unknown to the tokenizer" in err
    assert json.loads((out2 / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert _json(["caption", str(out2), str(mine / "pics"), "--max-new-tokens", "3"], capsys)["images"] == 6
    rc, _, err = _cli(["train", "blip", "--data", str(mine / "nope.jsonl"), "--out", str(tmp_path / "x"),
                       "--steps", "1"], capsys)
    assert rc == 2 and "nope.jsonl: no such folder or .jsonl file" in err


def test_training_from_scratch_learns_the_vocabulary_of_the_captions(world, tmp_path, capsys):
    mine = tmp_path / "zoo"
    mine.mkdir()
    images = sorted((world / "images").glob("train_*.png"))[:8]
    animals = ["zebra", "giraffe", "pelican", "walrus"]
    lines = [json.dumps({"image": p.name, "caption": f"a {animals[i % 4]} next to a {animals[(i + 1) % 4]}"})
             for i, p in enumerate(images)]
    for p in images:
        shutil.copy(p, mine / p.name)
    (mine / "zoo.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "scratch"
    rc, _, err = _cli(["train", "clip", "--data", str(mine / "zoo.jsonl"), "--out", str(run), "--steps", "1",
                       "--batch-size", "4", "--no-progress", "--set", "vision.image_size=32",
                       "--set", "vision.patch_size=16"], capsys)
    assert rc == 0, err
    tok = vlkit.load(run).tokenizer
    for word in animals:  # whole words of the captions, not pieces or [UNK]
        assert tok.token_to_id(word) is not None
        assert tok.decode(tok.encode(f"a {word}")) == f"a {word}"
    assert tok.token_to_id("circle") is None  # nothing from the synthetic world's vocabulary
