"""``vlkit index`` / ``vlkit search``: an image index built, searched exactly, continued after a
stop, added to without embedding an image twice, unreadable files skipped and listed, and a
model with other weights refused."""
import json
import os

import numpy as np
import pytest
import torch

import vlkit
from vlkit.cli import main
from vlkit.index import build_index, faiss_available, open_index, search_index


@pytest.fixture(scope="module")
def clip_run(untrained_run):
    return untrained_run("clip")


@pytest.fixture(scope="module")
def pipe(clip_run):
    return vlkit.load(clip_run)


def _images(folder, n, seed=0, sub=""):
    """``n`` synthetic-world pictures under ``folder`` (in ``sub`` for the second half)."""
    from vlkit.data.synthetic import SyntheticWorld
    records = SyntheticWorld(seed=seed, image_size=32).records("test", n)
    paths = []
    for i, r in enumerate(records):
        path = folder / (sub if sub and i >= n // 2 else "") / f"{seed}-{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        r["image"].save(path)
        paths.append(path)
    return paths


class Counting:
    """A pipeline that counts the images it embeds and can stop (raise ``stop``) at a call."""

    def __init__(self, pipe, stop_at=None, stop=KeyboardInterrupt):
        self.pipe, self.stop_at, self.stop, self.calls, self.images = pipe, stop_at, stop, 0, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def embed_images(self, images):
        self.calls += 1
        if self.calls == self.stop_at:
            raise self.stop("stopped")
        self.images += len(images)
        return self.pipe.embed_images(images)


def test_index_and_search_from_the_command_line(clip_run, pipe, tmp_path, capsys):
    photos = tmp_path / "photos"
    paths = _images(photos, 6, sub="nested")
    (photos / "notes.txt").write_text("not an image")
    (photos / "broken.png").write_bytes(paths[0].read_bytes()[:80])
    outside = tmp_path / "outside.png"
    outside.write_bytes(paths[1].read_bytes())
    (photos / "escape.png").symlink_to(outside)
    (photos / ".hidden.png").write_bytes(paths[1].read_bytes())
    idx = tmp_path / "idx"
    assert main(["index", str(clip_run), str(photos), "--out", str(idx), "--batch-size", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "indexed 6 new images" in out and "holds 6" in out
    assert "skipped 3 unreadable files" in out
    for name, why in (("notes.txt", "not a readable image"), ("broken.png", "truncated"), ("escape.png", "leads out")):
        assert any(name in line and why in line for line in out.splitlines()), (name, out)
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["roots"] == [str(photos.resolve())] and manifest["count"] == 6
    assert sorted(s["path"] for s in manifest["skipped"]) == ["broken.png", "escape.png", "notes.txt"]
    assert manifest["model"]["source"] == str(clip_run.resolve()) and len(manifest["model"]["fingerprint"]) == 64
    index = open_index(idx)
    assert sorted(rel for _, rel in index.entries) == sorted(str(p.relative_to(photos)) for p in paths)
    assert index.embeddings.dtype == np.float32 and index.embeddings.shape == (6, 16)

    # exact search: the same ranking and scores as embedding everything and taking the top 3
    assert main(["search", str(idx), "a red circle above a square", "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    ordered = [index.path(i) for i in range(len(index))]
    scores = (pipe.embed_texts(["a red circle above a square"]) @ pipe.embed_images(ordered).T)[0]
    top = scores.topk(3)
    assert [r["path"] for r in res["results"]] == [str(ordered[i]) for i in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor([r["score"] for r in res["results"]]), top.values, atol=1e-5, rtol=0)
    assert main(["search", str(idx), "a red circle above a square", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "path"] and lines[1].split()[2] == res["results"][0]["path"]


def test_numpy_and_faiss_give_the_same_results(pipe, tmp_path):
    _images(tmp_path / "photos", 8)
    report = build_index(pipe, [tmp_path / "photos"], tmp_path / "photos" / "idx", batch_size=8, progress=False)
    assert report["count"] == 8 and report["skipped"] == []  # the index inside the folder is not indexed
    index = open_index(tmp_path / "photos" / "idx")
    numpy = search_index(index, pipe, "a blue square", k=5, backend="numpy")
    assert [r["rank"] for r in numpy] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(numpy, numpy[1:]))
    assert len(search_index(index, pipe, "a blue square", k=50, backend="numpy")) == 8  # k beyond the index
    if not faiss_available():
        with pytest.raises(ImportError):
            search_index(index, pipe, "a blue square", k=5, backend="faiss")
        return
    faiss = search_index(index, pipe, "a blue square", k=5, backend="faiss")
    assert [r["path"] for r in faiss] == [r["path"] for r in numpy]
    np.testing.assert_allclose([r["score"] for r in faiss], [r["score"] for r in numpy], atol=1e-5)


def test_a_stopped_run_continues_where_it_stopped(pipe, tmp_path):
    photos = tmp_path / "photos"
    _images(photos, 7)
    idx = tmp_path / "idx"
    killed = Counting(pipe, stop_at=4, stop=RuntimeError)  # a crash: the chunk being filled is lost
    with pytest.raises(RuntimeError):
        build_index(killed, [photos], idx, batch_size=2, chunk_size=4, progress=False)
    assert open_index(idx).embeddings.shape == (4, 16)  # the first chunk was committed
    (idx / "chunks" / "000001.npy").write_bytes(b"half-written")  # a chunk whose commit never happened
    stopped = Counting(pipe, stop_at=2)  # Ctrl-C: what was embedded is committed first
    with pytest.raises(KeyboardInterrupt):
        build_index(stopped, [photos], idx, batch_size=2, chunk_size=4, progress=False)
    assert stopped.images == 2 and len(open_index(idx)) == 6
    again = Counting(pipe)
    report = build_index(again, [photos], idx, batch_size=2, chunk_size=4, progress=False)
    assert again.images == 1 and report["added"] == 1 and report["already"] == 6 and report["count"] == 7
    whole = tmp_path / "whole"
    build_index(pipe, [photos], whole, batch_size=7, progress=False)
    resumed, straight = open_index(idx), open_index(whole)
    assert resumed.entries == straight.entries
    np.testing.assert_allclose(resumed.embeddings, straight.embeddings, atol=1e-5)
    (idx / "chunks" / "000000.json").write_text('[[0, "a.png"], [7, "b.png"], [0, "c.png"], [0, 3]]')
    with pytest.raises(ValueError, match="000000.json: each entry must be"):
        open_index(idx)


def test_adding_embeds_only_the_new_images(clip_run, tmp_path, monkeypatch, capsys):
    from vlkit.pipeline import Pipeline
    seen = []
    original = Pipeline.embed_images

    def counted(self, images):
        seen.append(len(images))
        return original(self, images)
    monkeypatch.setattr(Pipeline, "embed_images", counted)
    first, second = tmp_path / "first", tmp_path / "second"
    _images(first, 5)
    (first / "notes.txt").write_text("not an image")
    _images(second, 3, seed=1)
    idx = str(tmp_path / "idx")
    assert main(["index", str(clip_run), str(first), "--out", idx, "--batch-size", "2", "--no-progress"]) == 0
    assert sum(seen) == 5 and len(seen) == 3
    assert "skipped 1 unreadable file " in capsys.readouterr().out
    seen.clear()
    assert main(["index", str(clip_run), str(second), "--out", idx, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert seen == [3] and "indexed 3 new images" in out and "skipped" not in out  # first's own
    seen.clear()
    _images(first / "later", 1, seed=2)
    assert main(["index", str(clip_run), str(first), str(second), "--out", idx, "--no-progress"]) == 0
    assert seen == [1]
    assert main(["index", str(clip_run), str(first), "--out", idx, "--no-progress"]) == 0
    assert seen == [1]  # nothing new: nothing embedded
    index = open_index(idx)
    assert len(index) == 9 and len(index.roots) == 2 and len(set(index.entries)) == 9
    assert ("indexed 0 new images" in capsys.readouterr().out)


def test_an_index_refuses_a_model_with_other_weights(clip_run, pipe, tmp_path, capsys):
    from safetensors.torch import load_file

    from vlkit.checkpoint import save_weights
    _images(tmp_path / "photos", 3)
    idx = tmp_path / "idx"
    assert main(["index", str(clip_run), str(tmp_path / "photos"), "--out", str(idx), "--no-progress"]) == 0
    other = tmp_path / "other"
    os.makedirs(other)
    for name in ("config.json", "tokenizer"):
        os.symlink(clip_run / name, other / name)
    state = load_file(str(clip_run / "model.safetensors"))
    state["logit_scale"] = state["logit_scale"] + 1.0
    save_weights(other / "model.safetensors", state)
    capsys.readouterr()
    assert main(["index", str(other), str(tmp_path / "photos"), "--out", str(idx), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "was built with clip from" in err and "other weights" in err and len(err.strip().splitlines()) == 1
    assert main(["search", str(idx), "a red circle", "--model", str(other)]) == 2
    assert "other weights" in capsys.readouterr().err
    assert main(["search", str(idx), "a red circle", "--model", str(clip_run)]) == 0  # the same weights


def test_bad_inputs_are_one_line(clip_run, tmp_path, capsys):
    from vlkit.pipeline import Pipeline
    (tmp_path / "photos").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("someone's file")
    cases = [
        (["index", str(clip_run), str(tmp_path / "nope"), "--out", str(tmp_path / "i")], "no such folder"),
        (["index", str(clip_run), str(tmp_path / "photos"), "--out", str(tmp_path / "taken")], "not a vlkit image index"),
        (["search", str(tmp_path / "photos"), "a red circle"], "not a vlkit image index"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "taken" / "mine.txt").read_text() == "someone's file"
    empty = tmp_path / "empty"
    assert main(["index", str(clip_run), str(tmp_path / "photos"), "--out", str(empty), "--no-progress"]) == 0
    assert main(["search", str(empty), "a red circle"]) == 2
    assert "holds no images" in capsys.readouterr().err
    vit = Pipeline(vlkit.create_model("vit", "tiny"))
    with pytest.raises(ValueError, match="does not embed images and texts"):
        build_index(vit, [tmp_path / "photos"], tmp_path / "v", progress=False)
