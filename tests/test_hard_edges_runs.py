"""Run folders and options, tried as users run them: the `vlkit` command in a subprocess with a
timeout. A refusal is exit 2 with one line on stderr naming the file or option, no traceback,
and no file changed that the user did not ask to change (the folders are hashed before and
after). Covered: user files never overwritten (train --out, shard, synth, eval --out, explain
--out), one writer per run folder (a lock that a killed process does not leave stuck), and
options that do what they say (--resume, --preset/--set with --resume, --set typed by the config
field, numeric options checked)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 240
TINY = ["--set", "vision.image_size=32", "--set", "vision.dim=32", "--set", "vision.depth=1",
        "--set", "vision.heads=2", "--set", "vision.mlp_dim=64", "--set", "text.dim=32",
        "--set", "text.depth=1", "--set", "text.heads=2", "--set", "text.mlp_dim=64",
        "--set", "embed_dim=16"]
TRAIN = ["--steps", "1", "--batch-size", "8", "--workers", "0", "--no-progress", "--no-eval", *TINY]


def vlkit(*args, cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlkit", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def tree(path: Path) -> dict:
    """{relative path: sha256 (files) or "dir"} of everything under ``path`` (hidden files too)."""
    path = Path(path)
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def refused(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one line on stderr holding each of ``needles``, no traceback."""
    err = res.stderr.strip()
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert err.count("\n") == 0, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hard_edges_runs")


@pytest.fixture(scope="module")
def world(work) -> Path:
    res = vlkit("synth", "--out", "world", "--num", "50", "--image-size", "32", cwd=work)
    assert res.returncode == 0, res.stderr
    return work / "world"


def _hold_lock(folder: Path, cwd: Path) -> subprocess.Popen:
    """A process holding ``folder``'s run lock until it is killed."""
    code = ("import sys, time; from vlkit.train.runfolder import acquire; acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=cwd, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(scope="module")
def finished(work, world) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished 1-step clip run, trained into a folder whose lock was left by a killed
    process (the stale lock must not block it)."""
    run = work / "finished"
    holder = _hold_lock(run, work)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    res = vlkit("train", "clip", "--data", world, "--out", run, *TRAIN, cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    return run, res


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- 4: user files are never overwritten ------------------------------------------------------

@pytest.mark.parametrize("kind", ["hf_model", "dataset", "file"])
def test_train_out_on_someone_elses_folder_is_refused(kind, work, world, tmp_path):
    if kind == "hf_model":
        out = tmp_path / "bert"
        out.mkdir()
        (out / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
        (out / "model.safetensors").write_bytes(b"someone's weights")
        needle = "not a vlkit run"
    elif kind == "dataset":
        out = _copy(world, tmp_path / "data")
        needle = "not a vlkit run"
    else:
        out = tmp_path / "notes.txt"
        out.write_text("mine")
        needle = "not a folder"
    before = tree(out)
    refused(vlkit("train", "clip", "--data", world, "--out", out, *TRAIN, cwd=tmp_path), str(out), needle)
    assert tree(out) == before


def test_finished_run_is_refused_even_without_its_checkpoints(finished, tmp_path):
    run = _copy(finished[0], tmp_path / "run")
    before = tree(run)
    refused(vlkit("train", "clip", "--out", run, *TRAIN, cwd=tmp_path), "already holds a run", "--resume")
    shutil.rmtree(run / "checkpoints")
    before = tree(run)
    refused(vlkit("train", "clip", "--out", run, *TRAIN, cwd=tmp_path), "finished run", "model.safetensors")
    # nothing to resume from either: --resume is refused, not a silent start from step 0
    refused(vlkit("train", "clip", "--out", run, *TRAIN, "--resume", cwd=tmp_path), "--resume",
            "nothing to resume")
    assert tree(run) == before


def test_shard_keeps_the_old_shards_until_the_new_data_checked_out(world, tmp_path):
    shards = tmp_path / "shards"
    assert vlkit("shard", world, "--out", shards, "--shard-size", "16", cwd=tmp_path).returncode == 0
    bad = _copy(world, tmp_path / "bad")
    with open(bad / "train.jsonl", "a") as f:
        f.write(json.dumps({"image": "images/missing.png", "caption": "a red circle"}) + "\n")
    before = tree(shards)
    refused(vlkit("shard", bad, "--out", shards, "--shard-size", "8", cwd=tmp_path), "missing.png")
    assert tree(shards) == before
    # a folder holding anything but shards (here: the dataset itself) is refused
    data_before = tree(world)
    refused(vlkit("shard", world, "--out", world, cwd=tmp_path), "not shards")
    assert tree(world) == data_before
    # a rewrite that checks out replaces the split's shards, leaving none of the old behind
    assert vlkit("shard", world, "--out", shards, "--shard-size", "30", cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in shards.iterdir()) == ["train-000000.tar", "train-000001.tar"]


def test_synth_refuses_a_non_empty_folder_and_overwrites_only_a_synthetic_world(world, tmp_path):
    data = _copy(world, tmp_path / "data")
    before = tree(data)
    refused(vlkit("synth", "--out", data, "--num", "10", cwd=tmp_path), "not empty", "--overwrite")
    assert tree(data) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.png").write_bytes(b"not really a png")
    before_mine = tree(mine)
    refused(vlkit("synth", "--out", mine, "--num", "10", "--overwrite", cwd=tmp_path), "not a synthetic world")
    refused(vlkit("synth", "--out", tmp_path / "huge", "--image-size", "100000", cwd=tmp_path), "--image-size")
    assert tree(mine) == before_mine
    res = vlkit("synth", "--out", data, "--num", "10", "--image-size", "32", "--overwrite", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len((data / "train.jsonl").read_text().splitlines()) == 8
    assert len(list((data / "images").iterdir())) == 10  # the old world's 50 images are gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_eval_and_explain_do_not_write_over_other_files(finished, world, tmp_path):
    data = _copy(world, tmp_path / "data")
    before = tree(data)
    refused(vlkit("eval", finished[0], "--data", data, "--out", data / "train.jsonl", cwd=tmp_path),
            "train.jsonl", "not a vlkit evaluation result")
    image = data / "images" / "test_000000.png"
    refused(vlkit("explain", finished[0], image, "a red circle", "--out", image, cwd=tmp_path),
            "test_000000.png", "own input")
    assert tree(data) == before


@pytest.mark.parametrize("command", ["train", "synth", "shard", "eval"])
def test_an_out_below_a_file_is_one_line(command, finished, world, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    argv = {"train": ["train", "clip", "--data", world, *TRAIN, "--out", notes / "run"],
            "synth": ["synth", "--num", "10", "--out", notes / "world"],
            "shard": ["shard", world, "--out", notes / "shards"],
            "eval": ["eval", finished[0], "--data", world, "--out", notes / "eval.json"]}[command]
    refused(vlkit(*argv, cwd=tmp_path), "notes.txt is a file, not a folder")
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_run_stopped_before_its_first_checkpoint_starts_again(finished, tmp_path):
    from vlkit.train.runfolder import check_out_folder, clear_progress, is_vlkit_run
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished[0] / "config.json", run / "config.json")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert is_vlkit_run(run) and check_out_folder(run, resume=False) is True
    clear_progress(run)
    assert not (run / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="nothing to resume"):
        check_out_folder(run, resume=True)


# ---- 5: one writer per run folder ---------------------------------------------------------------

def test_a_stale_lock_left_by_a_killed_process_does_not_block(finished):
    run, res = finished
    assert "no longer running" in res.stderr and "taken over" in res.stderr
    assert (run / "model.safetensors").is_file()
    assert (run / ".vlkit.lock").read_text() == ""  # released at the end


def test_a_live_holder_blocks_a_second_writer(finished, world, tmp_path):
    run = _copy(finished[0], tmp_path / "run")
    fresh = tmp_path / "fresh"
    holders = [_hold_lock(run, tmp_path), _hold_lock(fresh, tmp_path)]
    try:
        before, before_fresh = tree(run), tree(fresh)
        pids = [str(h.pid) for h in holders]
        refused(vlkit("train", "clip", "--data", world, "--out", fresh, *TRAIN, cwd=tmp_path),
                "in use", f"PID {pids[1]}")
        refused(vlkit("train", "clip", "--data", world, "--out", run, *TRAIN, "--resume", "--steps", "2",
                      cwd=tmp_path), "in use", f"PID {pids[0]}")
        refused(vlkit("eval", run, "--data", world, cwd=tmp_path), "in use", f"PID {pids[0]}")
        assert tree(run) == before and tree(fresh) == before_fresh
    finally:
        for h in holders:
            h.kill()
            h.wait(timeout=30)


def test_under_torchrun_rank_0_holds_the_lock_and_every_rank_stops(world, tmp_path):
    run = tmp_path / "run"
    holder = _hold_lock(run, tmp_path)
    try:
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "-m", "vlkit", "train", "clip", "--data", str(world), "--out", str(run),
                              *map(str, TRAIN)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=TIMEOUT)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert res.returncode != 0
    assert res.stderr.count(f"in use by another vlkit process (PID {holder.pid}") == 2, res.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == [".vlkit.lock"]


def test_a_lock_file_that_is_a_link_is_refused_not_written_through(tmp_path):
    from vlkit.train.runfolder import LOCK, acquire
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / LOCK).symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        acquire(tmp_path / "r")
    assert target.read_text() == "keep me"


def test_lock_is_reentrant_and_released(tmp_path):
    from vlkit.train.runfolder import LOCK, _held, acquire, release, run_lock
    with run_lock(tmp_path / "r"):
        acquire(tmp_path / "r")
        release(tmp_path / "r")
        assert json.loads((tmp_path / "r" / LOCK).read_text())["pid"] == os.getpid()
    assert not _held and (tmp_path / "r" / LOCK).read_text() == ""


# ---- 7: options that do what they say ---------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps: must be at least 1, got 0"),
    (["--steps", "-5"], "--steps: must be at least 1, got -5"),
    (["--minutes", "-1"], "--minutes must be above 0"),
    (["--ckpt-every", "-1"], "--ckpt-every must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--lr", "inf"], "--lr: expected a finite number"),
    (["--workers", "-1"], "--workers must be at least 0"),
    (["--max-skip-rate", "1.5", "--on-bad-sample", "skip"], "--max-skip-rate must be between 0 and 1"),
    (["--max-skip-rate", "0.5"], "--max-skip-rate applies with --on-bad-sample skip"),
    (["--eval-size", "10"], "--eval-size"),
    (["--steps", "abc"], "--steps: invalid int value"),
    (["--set", "hard_negatives=maybe"], "hard_negatives: expected true or false"),
    (["--set", "embed_dim=abc"], "embed_dim: expected int"),
    (["--groups", "4"], "--groups"),
    (["--set", "embed_dim=16", "--set", "embed_dim=32"], "--set embed_dim given twice"),
])
def test_bad_options_are_one_line_and_write_nothing(argv, needle, world, tmp_path):
    out = tmp_path / "run"
    base = ["train", "clip", "--data", world, "--out", out, "--steps", "1", "--no-eval"]
    refused(vlkit(*base, *argv, cwd=tmp_path), needle)
    assert not out.exists()


def test_resume_keeps_the_run_and_refuses_changes(finished, world, tmp_path):
    run = _copy(finished[0], tmp_path / "run")
    before = tree(run)
    for extra, needle in ((["--preset", "small"], "--preset small with --resume"),
                          (["--set", "loss=siglip"], "--set loss with --resume"),
                          (["--batch-size", "16"], "--batch-size 16 with --resume"),
                          (["--init", finished[0]], "--init with --resume")):
        refused(vlkit("train", "clip", "--data", world, "--out", run, *TRAIN, "--resume", *extra,
                      cwd=tmp_path), needle)
    assert tree(run) == before
    # the same --set as the run's own is accepted; the run's data, batch size and preset carry over
    res = vlkit("train", "clip", "--out", run, "--steps", "2", "--workers", "0",
                "--no-progress", "--no-eval", "--resume", *TINY, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "clip (tiny, " in res.stderr and f" on {world}," in res.stderr and "batch 8" in res.stderr
    assert "resumed from step 1" in res.stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # vlkit eval without --data evaluates on the run's own data, not the synthetic world
    res = vlkit("eval", run, "--tasks", "retrieval", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"evaluating on {world}" in res.stderr and json.loads((run / "eval.json").read_text())["metrics"]


# ---- unit level: config coercion and option checks -----------------------------------------------

def test_merge_config_coerces_to_the_field_type():
    from vlkit.models import model_class
    cls = model_class("clip")
    for text, want in (("False", False), ("false", False), ("0", False), ("true", True), ("1", True)):
        assert cls.make_config("tiny", hard_negatives=text).hard_negatives is want
    got = cls.make_config("tiny", **{"embed_dim": "24", "vision.dim": "48", "vision.mean": "[0.1, 0.2, 0.3]",
                                      "loss_chunk_size": "null", "text.eot_token_id": "7"})
    assert got.embed_dim == 24 and got.vision.dim == 48 and got.vision.mean == (0.1, 0.2, 0.3)
    assert got.loss_chunk_size is None and got.text.eot_token_id == 7
    assert cls.make_config("tiny", **{"vision": '{"dim": 64}', "vision.depth": "1"}).vision.depth == 1
    assert cls.make_config("tiny", embed_dim=24.0).embed_dim == 24
    assert isinstance(cls.make_config("tiny", **{"vision.drop_path": 0}).vision.drop_path, float)
    vilt = model_class("vilt")
    assert vilt.make_config("tiny", objectives="itm,mlm").objectives == ("itm", "mlm")
    assert vilt.make_config("tiny", objectives='["vqa"]').objectives == ("vqa",)
    for field, value, message in (("hard_negatives", "maybe", "clip.hard_negatives: expected true or false"),
                                  ("hard_negatives", 2, "expected true or false"),
                                  ("embed_dim", "abc", "clip.embed_dim: expected int"),
                                  ("embed_dim", 2.5, "expected int"),
                                  ("embed_dim", True, "expected int"),
                                  ("embed_dim", None, "expected int"),
                                  ("vision.dim", "x", "clip.vision.dim: expected int"),
                                  ("vision.mean", "a,b,c", "clip.vision.mean[0]: expected float"),
                                  ("logit_scale_init", "nan", "expected a finite number"),
                                  ("vision", "dim=3", "clip.vision: expected a ViTConfig")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            cls.make_config("tiny", **{field: value})


def test_run_args_are_checked_and_typed():
    from vlkit.train.run import RunArgs, validate_run_args
    ok = validate_run_args(RunArgs(model="clip", steps="3", lr="1e-3", batch_size=8))
    assert ok.steps == 3 and ok.lr == 1e-3
    assert validate_run_args(RunArgs(model="clip", steps=0)).steps == 0  # Python: the untrained model exported
    for kw, message in (({"steps": -1}, "--steps must be at least 0"),
                        ({"minutes": 0}, "--minutes must be above 0"),
                        ({"eval_every": 0}, "--eval-every must be at least 1"),
                        ({"eval_size": 0}, "--eval-size must be at least 1"),
                        ({"groups": 0}, "--groups must be at least 1"),
                        ({"seed": -1}, "--seed must be at least 0"),
                        ({"max_skip_rate": -0.1}, "--max-skip-rate"),
                        ({"steps": None}, "give --steps or --minutes"),
                        ({"precision": "fp8"}, "--precision"),
                        ({"on_bad_sample": "ignore"}, "--on-bad-sample"),
                        ({"preset": "huge"}, "unknown preset 'huge'"),
                        ({"init": "x", "preset": "tiny"}, "--preset with --init"),
                        ({"init": "x", "resume": True}, "--init with --resume"),
                        ({"data": "/no/such/folder"}, "--data /no/such/folder"),
                        ({"overrides": {"nosuch": 1}}, "unknown clip config field"),
                        ({"steps": "ten"}, "--steps: expected int"),
                        ({"overrides": {"text.vocab_size": "9"}}, "--set text.vocab_size: vlkit train sets it")):
        with pytest.raises(ValueError, match=message):
            validate_run_args(RunArgs(model="clip", **{"steps": 1, **kw}))
    # --resume: the run's own preset, data, seed and budget where none is given; changes refused
    from vlkit.train.run import resolve_resume
    saved = {"model": "clip", "config": {}, "preset": "tiny", "data": "synthetic", "groups": 1,
             "negatives": 0, "train": {"steps": 7, "minutes": None, "seed": 3, "batch_size": 8, "lr": 1e-3}}
    got = resolve_resume(validate_run_args(RunArgs(model="clip", resume=True, out="x")), saved)
    assert (got.steps, got.minutes, got.seed, got.preset, got.data) == (7, None, 3, "tiny", "synthetic")
    assert resolve_resume(validate_run_args(RunArgs(model="clip", resume=True, out="x", steps=9)), saved).steps == 9
    for kw, message in (({"seed": 4}, "--seed 4 with --resume"), ({"lr": 0.1}, "--lr 0.1 with --resume"),
                        ({"groups": 2}, "--groups 2 with --resume"), ({"preset": "small"}, "--preset small"),
                        ({"vqa": True}, "--vqa with --resume"), ({"model": "vit"}, "holds a clip run")):
        with pytest.raises(ValueError, match=message):
            resolve_resume(validate_run_args(RunArgs(**{"model": "clip", "resume": True, "out": "x", **kw})), saved)
    with pytest.raises(ValueError, match="--set class_names: vlkit train sets it from the class names"):
        validate_run_args(RunArgs(model="vit", steps=1, overrides={"class_names": "a,b"}))
    with pytest.raises(ValueError, match="--hard-negatives"):
        validate_run_args(RunArgs(model="vit", steps=1, hard_negatives=True))
