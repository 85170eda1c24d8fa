"""Hard edges of data, weights and scores, tried as users meet them: the ``vlkit`` command run
as a subprocess with a timeout (an error in a DataLoader worker used to print its message and
then hang at interpreter exit, which a test calling ``main()`` inside pytest never sees).

Every failure must end with exit 2 and one ``vlkit: error:`` line naming the file or field, no
traceback, no file changed that the user did not ask to change -- and never a hang, a NaN model
exported or scored, or a file outside the dataset read. Unit tests cover what needs no process.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

TIMEOUT = 180  # seconds: far above a healthy run here (10-40 s); a hang fails instead of stalling
TINY = ["--set", "vision.dim=32", "--set", "vision.depth=1", "--set", "vision.heads=2",
        "--set", "vision.mlp_dim=64", "--set", "text.dim=32", "--set", "text.depth=1",
        "--set", "text.heads=2", "--set", "text.mlp_dim=64", "--set", "embed_dim=16"]


# ---- helpers ------------------------------------------------------------------------------------

def vlkit(*args, timeout: int = TIMEOUT, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m vlkit ARGS`` (or ``python -c CODE ARGS``) in a fresh interpreter; a run past
    ``timeout`` is killed and fails the test as a hang."""
    env = dict(os.environ, VLKIT_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, *(["-c", code] if code else ["-m", "vlkit"]), *map(str, args)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"vlkit {' '.join(map(str, args))} hung (no exit within {timeout} s); "
                    f"stderr: {e.stderr}")


def one_error_line(res: subprocess.CompletedProcess, *names: str) -> str:
    """Assert exit 2 with exactly one ``vlkit: error:`` line, holding each of ``names``, and no
    traceback; returns the line."""
    err = res.stderr
    assert res.returncode == 2, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("vlkit: error:")]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def train_args(data, out, *extra) -> list:
    return ["train", "clip", "--data", data, "--out", out, "--steps", "2", "--batch-size", "8",
            "--no-eval", "--precision", "fp32", *TINY, *extra]


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A 50-record synthetic dataset (40 train, 5 val, 5 test), as ``vlkit synth --num 50``."""
    from vlkit.data.synthetic import write_dataset
    root = tmp_path_factory.mktemp("world") / "ds"
    write_dataset(root, num=50)
    return root


@pytest.fixture
def ds(world, tmp_path) -> Path:
    """A private copy of the dataset for a test to break."""
    return Path(shutil.copytree(world, tmp_path / "ds"))


@pytest.fixture(scope="module")
def good_run(world, tmp_path_factory) -> Path:
    """A tiny CLIP run trained for one step (in this process: a healthy run needs no subprocess)."""
    from vlkit.cli import main
    run = tmp_path_factory.mktemp("runs") / "good"
    assert main(["train", "clip", "--data", str(world), "--out", str(run), "--steps", "1",
                 "--batch-size", "8", "--no-eval", "--workers", "0", "--precision", "fp32",
                 "--no-progress", *TINY]) == 0
    return run


@pytest.fixture
def run_copy(good_run, tmp_path) -> Path:
    return Path(shutil.copytree(good_run, tmp_path / "run"))


# ---- 1. an error in a DataLoader worker ends the process (exit 2, one line), never hangs --------

def _no_images(ds):
    shutil.rmtree(ds / "images")
    return "train.jsonl"


def _text_named_png(ds):
    (ds / "images" / "train_000003.png").write_text("this is not a picture\n")
    return "train_000003.png"


def _zero_bytes(ds):
    (ds / "images" / "train_000003.png").write_bytes(b"")
    return "train_000003.png"


def _truncated(ds):
    p = ds / "images" / "train_000003.png"
    p.write_bytes(p.read_bytes()[:200])
    return "train_000003.png"


def _bomb(ds):
    (ds / "images" / "train_000003.png").write_bytes(png_header_only(30_000, 30_000))
    return "train_000003.png"


@pytest.mark.parametrize("breakage", [_no_images, _text_named_png, _zero_bytes, _truncated, _bomb])
def test_a_bad_image_read_in_a_loader_worker_ends_the_run_in_one_line(ds, tmp_path, breakage):
    named = breakage(ds)
    before = snapshot(ds)
    res = vlkit(*train_args(ds, tmp_path / "run", "--workers", "1"))
    one_error_line(res, str(ds), named)
    assert snapshot(ds) == before
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_too_many_bad_samples_in_skip_mode_end_the_run_in_one_line(ds, tmp_path):
    """120 lines, a third of their images missing: the workers' TooManyBadSamples ends the run."""
    records = lines_of(ds / "train.jsonl") * 3
    for i, rec in enumerate(records[:40]):
        if i % 3 == 0:
            (ds / rec["image"]).unlink(missing_ok=True)
    write_lines(ds / "train.jsonl", records)
    res = vlkit(*train_args(ds, tmp_path / "run", "--workers", "2", "--on-bad-sample", "skip",
                            "--max-skip-rate", "0.1"))
    one_error_line(res, str(ds / "train.jsonl"), "max_skip_rate")


# ---- 3. skip mode: the rate is over all the samples, not over the few images read so far --------

def test_one_missing_image_among_120_lines_does_not_stop_skip_mode(ds, tmp_path):
    from vlkit.data.jsonl import JsonlDataset
    records = lines_of(ds / "train.jsonl") * 3
    write_lines(ds / "train.jsonl", records)
    (ds / records[0]["image"]).unlink()  # the first image read is the bad one
    data = JsonlDataset(ds, "train", on_bad_sample="skip", max_skip_rate=0.1)
    assert len(data) == 120
    for i in range(len(data)):
        assert data[i]["image"].size[0] > 0
    assert dict(data.skipped) == {"missing image": 3}  # the file is named on 3 lines
    assert data.known_bad_rate() == pytest.approx(3 / 120)
    # as the user runs it
    res = vlkit(*train_args(ds, tmp_path / "run", "--on-bad-sample", "skip", "--max-skip-rate", "0.1"))
    assert res.returncode == 0, res.stderr
    assert "TooManyBadSamples" not in res.stderr and "max_skip_rate" not in res.stderr


def test_the_skip_limit_still_stops_a_mostly_bad_dataset(ds):
    from vlkit.data.jsonl import JsonlDataset, TooManyBadSamples
    records = lines_of(ds / "train.jsonl") * 3
    write_lines(ds / "train.jsonl", records)
    for rec in records[:20]:
        (ds / rec["image"]).unlink(missing_ok=True)  # 20 of 40 files: half the samples
    data = JsonlDataset(ds, "train", on_bad_sample="skip", max_skip_rate=0.1)
    with pytest.raises(TooManyBadSamples, match="more than the allowed 10.0%"):
        for i in range(len(data)):
            data[i]


# ---- 6. image paths stay inside the dataset folder unless --allow-outside-paths ------------------

def _point_outside(ds: Path, split: str, how: str) -> tuple[Path, int]:
    """Make line 2 of ``split``.jsonl name a picture outside the dataset; returns (file, line)."""
    outside = ds.parent / "private.png"
    Image.new("RGB", (32, 32), "red").save(outside)
    records = lines_of(ds / f"{split}.jsonl")
    if how == "dotdot":
        records[1]["image"] = "../private.png"
    elif how == "absolute":
        records[1]["image"] = str(outside)
    else:  # a symbolic link inside images/ to the file outside
        (ds / "images" / "link.png").symlink_to(outside)
        records[1]["image"] = "images/link.png"
    write_lines(ds / f"{split}.jsonl", records)
    return ds / f"{split}.jsonl", 2


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_training_refuses_an_image_outside_the_dataset(ds, tmp_path, how):
    jsonl, line = _point_outside(ds, "train", how)
    before = snapshot(ds)
    res = vlkit(*train_args(ds, tmp_path / "run"))
    one_error_line(res, f"{jsonl}:{line}", "outside the dataset", "--allow-outside-paths")
    assert snapshot(ds) == before


def test_shard_refuses_an_image_outside_the_dataset_and_writes_nothing(ds, tmp_path):
    jsonl, line = _point_outside(ds, "train", "absolute")
    res = vlkit("shard", ds, "--out", tmp_path / "shards")
    one_error_line(res, f"{jsonl}:{line}", "outside the dataset")
    assert not list((tmp_path / "shards").glob("*.tar")) if (tmp_path / "shards").exists() else True
    # the explicit opt-out packs it
    res = vlkit("shard", ds, "--out", tmp_path / "shards", "--allow-outside-paths")
    assert res.returncode == 0, res.stderr
    assert "40 samples" in res.stdout


def test_eval_refuses_an_image_outside_the_dataset(ds, good_run, tmp_path):
    jsonl, line = _point_outside(ds, "test", "dotdot")
    res = vlkit("eval", good_run, "--data", ds, "--tasks", "retrieval", "--out", tmp_path / "e.json")
    one_error_line(res, f"{jsonl}:{line}", "outside the dataset")
    assert not (tmp_path / "e.json").exists()


def test_outside_paths_are_skipped_and_counted_in_skip_mode_or_read_when_allowed(ds):
    from vlkit.data.jsonl import OUTSIDE, DatasetError, JsonlDataset
    _point_outside(ds, "train", "symlink")
    with pytest.raises(DatasetError, match="outside the dataset"):
        JsonlDataset(ds, "train")
    data = JsonlDataset(ds, "train", on_bad_sample="skip")
    assert dict(data.skipped) == {OUTSIDE: 1} and len(data) == 39
    data = JsonlDataset(ds, "train", allow_outside=True)
    assert len(data) == 40 and data[1]["image"].size == (32, 32)


def test_a_symlinked_dataset_folder_is_still_inside_itself(world, tmp_path):
    from vlkit.data.jsonl import JsonlDataset
    (tmp_path / "alias").symlink_to(world)
    data = JsonlDataset(tmp_path / "alias", "train")
    assert len(data) == 40 and data[0]["image"].size[0] > 0


# ---- 2. non-finite weights and scores ----------------------------------------------------------

def test_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_exports_nothing(ds, tmp_path):
    run = tmp_path / "run"
    res = vlkit(*train_args(ds, run, "--lr", "1e6", "--ckpt-every", "1", "--steps", "3"))
    line = one_error_line(res, "NaN or infinite", "learning rate")
    assert not (run / "model.safetensors").exists()
    from vlkit.checkpoint import latest_checkpoint, read_weights
    kept = latest_checkpoint(run)
    assert kept is not None and str(kept) in line
    state = json.loads((kept / "state.json").read_text())
    assert state["skipped_steps"] == 0  # written after a step with a finite loss
    read_weights(kept / "model.safetensors")  # finite, whole


def _poison(run: Path, key_part: str = "proj") -> str:
    """Write a NaN into one tensor of the run's weights (a file as a careless tool would write
    it: no checksum); returns the tensor's name."""
    from safetensors.torch import load_file, save_file
    path = run / "model.safetensors"
    state = load_file(str(path))
    key = next(k for k in sorted(state) if key_part in k and state[k].is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(path))
    return key


def test_eval_refuses_nan_weights_naming_file_and_tensor(run_copy, world, tmp_path):
    key = _poison(run_copy)
    before = snapshot(run_copy)
    res = vlkit("eval", run_copy, "--data", world, "--out", tmp_path / "e.json")
    one_error_line(res, str(run_copy / "model.safetensors"), key, "NaN")
    assert snapshot(run_copy) == before and not (tmp_path / "e.json").exists()


def test_init_refuses_nan_weights(run_copy, world, tmp_path):
    key = _poison(run_copy)
    res = vlkit(*train_args(world, tmp_path / "new", "--init", run_copy))
    one_error_line(res, str(run_copy / "model.safetensors"), key)


def test_corrupted_bytes_inside_the_weights_are_caught_by_their_checksum(run_copy, world, tmp_path):
    path = run_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 4000, len(data) - 3990):  # inside the tensor data, not the header
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    res = vlkit("eval", run_copy, "--data", world, "--out", tmp_path / "e.json")
    one_error_line(res, str(path), "checksum")


def test_a_nan_score_never_counts_as_a_hit():
    from vlkit.eval.metrics import (NonFiniteScores, compositional_accuracy, retrieval_recall,
                                    zero_shot_accuracy)
    emb = torch.full((4, 8), float("nan"))
    with pytest.raises(NonFiniteScores, match="retrieval"):
        retrieval_recall(emb, emb, torch.arange(4))
    with pytest.raises(NonFiniteScores, match="zero-shot"):
        zero_shot_accuracy(emb, torch.randn(3, 8), torch.zeros(4))
    with pytest.raises(NonFiniteScores):
        compositional_accuracy([0.5, float("nan")], [0.1, 0.2], ["a", "b"])
    with pytest.raises(NonFiniteScores):
        compositional_accuracy([0.5, 0.4], [float("inf"), 0.2], ["a", "b"])


def test_weights_are_refused_when_saved_or_read_with_nan(tmp_path):
    from vlkit.checkpoint import WeightsError, read_weights, save_weights
    good = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64)}
    save_weights(tmp_path / "w.safetensors", good)
    assert torch.equal(read_weights(tmp_path / "w.safetensors")["a"], good["a"])
    with pytest.raises(WeightsError, match=r"w2.safetensors: tensor a holds 1 NaN"):
        save_weights(tmp_path / "w2.safetensors", {"a": torch.tensor([1.0, float("nan")])})
    assert not list(tmp_path.glob("*w2*"))  # nothing written, no temporary file left


# ---- 8. one line naming the file or field, not a traceback -------------------------------------

@pytest.mark.parametrize("damage, words", [
    ("truncated", ["not a readable safetensors file"]),
    ("random", ["not a readable safetensors file"]),
    ("empty", ["empty file"]),
])
def test_an_unreadable_weights_file_is_one_line_naming_it(run_copy, world, tmp_path, damage, words):
    path = run_copy / "model.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "random":
        path.write_bytes(os.urandom(5000))
    else:
        path.write_bytes(b"")
    res = vlkit("eval", run_copy, "--data", world, "--out", tmp_path / "e.json")
    one_error_line(res, str(path), *words)


@pytest.mark.parametrize("field, value, words", [
    ("embed_dim", "abc", ["embed_dim", "expected int", "str"]),
    ("vision", None, ["vision", "NoneType"]),
    ("vision.depth", [1], ["vision.depth", "expected int"]),
    ("vision.dim", -8, ["config.json"]),
])
def test_a_bad_run_config_is_one_line_naming_file_and_field(run_copy, world, tmp_path, field, value, words):
    path = run_copy / "config.json"
    cfg = json.loads(path.read_text())
    *parents, last = field.split(".")
    node = cfg["config"]
    for p in parents:
        node = node[p]
    node[last] = value
    path.write_text(json.dumps(cfg))
    res = vlkit("eval", run_copy, "--data", world, "--out", tmp_path / "e.json")
    one_error_line(res, str(path), *words)


@pytest.mark.parametrize("fields, file, named", [
    # sizes left out read as transformers' defaults (4.x writes only the fields that differ from
    # them): the folder is a ViT-B without weights, and the error says so
    ({}, "", "no model.safetensors"),
    ({"hidden_size": "32", "num_hidden_layers": 1, "num_attention_heads": 2,
      "intermediate_size": 64}, "config.json", "dim"),  # a string: it was a TypeError inside torch
])
def test_a_broken_hugging_face_folder_is_one_line(tmp_path, world, fields, file, named):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 32, **fields}))
    res = vlkit("eval", hf, "--data", world, "--out", tmp_path / "e.json")
    one_error_line(res, str(hf / file) if file else str(hf), named)


def test_eval_out_naming_a_folder_fails_before_any_work(good_run, world, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    res = vlkit("eval", good_run, "--data", world, "--out", folder)
    one_error_line(res, str(folder), "is a folder")
    assert snapshot(folder) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}


ENOSPC_AT_SECOND_CHECKPOINT = """
import errno, sys
import vlkit.checkpoint as ck
real, calls = ck.save_weights, []
def full_disk(path, tensors):
    calls.append(path)
    if len(calls) == 2:  # the second checkpoint: half a file, then the disk is full
        open(path, "wb").write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real(path, tensors)
ck.save_weights = full_disk
from vlkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_during_a_checkpoint_keeps_the_old_one(ds, tmp_path):
    run = tmp_path / "run"
    res = vlkit(*train_args(ds, run, "--ckpt-every", "1"), code=ENOSPC_AT_SECOND_CHECKPOINT)
    one_error_line(res, "No space left on device")
    from vlkit.checkpoint import checkpoint_dirs, latest_checkpoint
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000001"]
    assert latest_checkpoint(run) is not None
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("caption, kind", [(5, "int"), (["a", "b"], "list")])
def test_a_caption_that_is_not_a_string_says_so(ds, tmp_path, caption, kind):
    records = lines_of(ds / "train.jsonl")
    records[2]["caption"] = caption
    write_lines(ds / "train.jsonl", records)
    before = snapshot(ds)
    res = vlkit("shard", ds, "--out", tmp_path / "shards")
    line = one_error_line(res, f"{ds / 'train.jsonl'}:3", "must be a string", kind)
    assert "empty caption" not in line
    assert snapshot(ds) == before


def test_pipeline_calls_refuse_bad_arguments_with_a_clear_error(good_run):
    import vlkit as vk
    from vlkit.data.transforms import ImageError
    pipe = vk.load(good_run)
    img = Image.new("RGB", (40, 40), "blue")
    with pytest.raises(ValueError, match="no labels given"):
        pipe.zero_shot([img], [])
    with pytest.raises(TypeError, match="a list of strings"):
        pipe.zero_shot([img], "red circle")  # would be 10 one-letter classes
    with pytest.raises(ValueError, match="k must be a whole number >= 1"):
        pipe.retrieve(img, ["a red circle", "a blue square"], k=-1)
    with pytest.raises(ValueError, match="k must be a whole number >= 1"):
        pipe.retrieve(img, ["a red circle"], k=0)
    with pytest.raises(ValueError, match="no candidates given"):
        pipe.retrieve(img, [], k=1)
    with pytest.raises(ImageError, match="0x0 pixels"):
        pipe.embed_images([Image.new("RGB", (0, 0))])
    with pytest.raises(TypeError, match="texts must be strings"):
        pipe.embed_texts([None])
    assert pipe.retrieve(img, ["a", "b", "c"], k=5)[0][0] in (0, 1, 2)  # k above the count: all


def test_pipeline_refuses_non_finite_outputs(good_run):
    import vlkit as vk
    from vlkit.eval.metrics import NonFiniteScores
    pipe = vk.load(good_run)
    with torch.no_grad():
        pipe.model.image_proj.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteScores, match="image embeddings"):
        pipe.embed_images([Image.new("RGB", (40, 40))])


# ---- found beyond the list -------------------------------------------------------------

@pytest.mark.parametrize("field, value, named", [
    ("captions", "a red circle", "captions"),  # a string: it was read letter by letter
    ("negatives", [{"caption": "a blue square"}], "negatives[0]"),  # no kind: a KeyError in eval
    ("qa", [{"question": "what colour?"}], "qa[0]"),  # no answer: a KeyError in eval
    ("label", 3, "label"),
    ("false_captions", [{"caption": "one circle and one circle", "false_from": 17}], "false_captions[0]"),  # mid-word
])
def test_optional_fields_of_the_wrong_shape_are_bad_lines(ds, good_run, tmp_path, field, value, named):
    from vlkit.data.jsonl import DatasetError, JsonlDataset
    records = lines_of(ds / "test.jsonl")
    records[1][field] = value
    write_lines(ds / "test.jsonl", records)
    with pytest.raises(DatasetError, match=re.escape(f'test.jsonl:2: "{named}" must be')):
        JsonlDataset(ds, "test")
    skipping = JsonlDataset(ds, "test", on_bad_sample="skip")
    assert dict(skipping.skipped) == {"bad field": 1}
    if field == "negatives":  # as the user meets it
        res = vlkit("eval", good_run, "--data", ds, "--tasks", "itm", "--out", tmp_path / "e.json")
        one_error_line(res, f"{ds / 'test.jsonl'}:2", named)


def test_a_fifo_named_as_an_image_is_refused_not_read(ds):
    from vlkit.data.jsonl import DatasetError, JsonlDataset
    records = lines_of(ds / "train.jsonl")
    fifo = ds / records[0]["image"]
    fifo.unlink()
    os.mkfifo(fifo)  # opening it for reading would wait for a writer for ever
    data = JsonlDataset(ds, "train")
    with pytest.raises(DatasetError, match="not a regular file"):
        data[0]
