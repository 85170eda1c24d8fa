"""Training beyond one process (2 gloo processes on the CPU) and exact resume after SIGKILL.

The 2-process runs go through the same entry point torchrun uses (`vlkit train` with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment) and are checked against one
process training on the same global batch.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import vlkit
from vlkit import collective as vdist
from vlkit.checkpoint import checkpoint_dirs
from vlkit.train.loop import TrainConfig, Trainer

WORLD = 2
TINY = ["--set", "vision.dim=32", "--set", "vision.depth=1", "--set", "vision.heads=2",
        "--set", "vision.mlp_dim=64", "--set", "text.dim=32", "--set", "text.depth=1",
        "--set", "text.heads=2", "--set", "text.mlp_dim=64", "--set", "embed_dim=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small JSONL dataset: the vocabulary is learned from 48 records, not the world's 1800."""
    from vlkit.data.synthetic import write_dataset
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, num=48, seed=0, image_size=64)
    return root


def _train_args(out, data, steps=12, *extra):
    return ["train", "clip", "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--batch-size", "8",
            "--no-eval", "--no-progress", "--workers", "0", "--precision", "fp32",
            "--ckpt-every", "5", *TINY, *extra]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run):
    return [json.loads(line)["loss"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a, b):
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


# --------------------------------------------------------------------------------------------
# what each of the two processes runs
# --------------------------------------------------------------------------------------------
def _batches(local, rank, world, seed=0):
    """A deterministic stream of ViT batches addressed by sample position, sliced by rank."""
    def make(start):
        pos = start
        while True:
            g = torch.Generator().manual_seed(seed + pos)
            x = torch.randn(local * world, 3, 16, 16, generator=g)
            y = torch.randint(0, 4, (local * world,), generator=g)
            sl = slice(rank * local, (rank + 1) * local)
            yield {"pixel_values": x[sl], "labels": y[sl]}
            pos += local * world
    return make


def _bn_vit():
    torch.manual_seed(0)  # a conv stem with BatchNorm: the global-batch statistics are tested
    return vlkit.create_model("vit", "tiny", image_size=16, patch_size=4, dim=16, depth=1, heads=2,
                              mlp_dim=32, num_classes=4)


def _accum_cfg(**kw):
    base = dict(steps=4, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, ckpt_every=3,
                progress=False, accum_steps=2, precision="fp32")
    return TrainConfig(**{**base, **kw})


def _worker(rank, world, ports, out_dir, data):
    from vlkit.cli import main
    torch.set_num_threads(1)
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ports[0])}
    os.environ.update(env)
    out = Path(out_dir)
    assert main(_train_args(out / "ddp", data)) == 0  # what torchrun runs
    # the trainer alone: gradient accumulation (no_sync on the first micro-batch) and BatchNorm
    # over the global batch, replicated (DDP) and sharded (FSDP2, with activation checkpointing)
    os.environ["MASTER_PORT"] = str(ports[1])  # a fresh rendezvous for the second group
    assert vdist.init_from_env()
    try:
        trainer = Trainer(_bn_vit(), _batches(4, rank, world), _accum_cfg(), out / "accum")
        assert type(trainer.engine).__name__ == "DistributedDataParallel"
        trainer.fit()
        trainer = Trainer(_bn_vit(), _batches(4, rank, world),
                          _accum_cfg(fsdp=True, grad_checkpointing=True), out / "fsdp")
        trainer.fit()
        # resume of the sharded run: every rank loads the full checkpoint and re-shards it
        trainer = Trainer(_bn_vit(), _batches(4, rank, world),
                          _accum_cfg(steps=6, fsdp=True, grad_checkpointing=True), out / "fsdp")
        trainer.fit(resume=True)
    finally:
        vdist.destroy()


def _albef_args(out, data):
    """ALBEF with every random draw of training (ITM negatives, MLM masks) in play, the dataset's
    negative captions included; no dropout (its masks are drawn per process by design);
    distillation fully on after two steps; the queue wraps around within the run."""
    return ["train", "albef", "--data", str(data), "--out", str(out), "--steps", "12",
            "--batch-size", "8", "--lr", "3e-3", "--no-eval", "--no-progress", "--workers", "0",
            "--precision", "fp32", "--ckpt-every", "6", "--hard-negatives", *ALBEF_TINY,
            "--set", "dropout=0.0", "--set", "alpha_ramp_steps=2", "--set", "mlm_prob=0.3"]


def _cli_worker(rank, world, ports, out_dir, data, args_of):
    """One process of `vlkit train` as torchrun starts it, with the arguments ``args_of(out, data)``."""
    from vlkit.cli import main
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(ports[0])})
    assert main(args_of(Path(out_dir), data)) == 0


def _spawn(tmp_path, data, timeout=150, worker=_worker, extra=()):
    ports = [_free_port(), _free_port()]
    ctx = mp.spawn(worker, args=(WORLD, ports, str(tmp_path), str(data), *extra), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("distributed workers timed out")


def test_two_processes_match_one_process(tmp_path, monkeypatch, data):
    monkeypatch.setenv("VLKIT_NO_PROGRESS", "1")
    two, one = tmp_path / "two", tmp_path / "one"
    _spawn(two, data)
    from vlkit.cli import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_train_args(one / "ddp", data)) == 0
        Trainer(_bn_vit(), _batches(8, 0, 1), _accum_cfg(), one / "accum").fit()
        Trainer(_bn_vit(), _batches(8, 0, 1), _accum_cfg(), one / "fsdp").fit()
        Trainer(_bn_vit(), _batches(8, 0, 1), _accum_cfg(steps=6), one / "fsdp").fit(resume=True)
    finally:
        torch.set_num_threads(threads)

    # CLIP through `vlkit train`: rank 0 alone wrote the metrics (one line per logged step)
    assert len(_losses(two / "ddp")) == len(_losses(one / "ddp")) == 2
    assert _losses(two / "ddp") == pytest.approx(_losses(one / "ddp"), abs=1e-5)
    assert _max_diff(one / "ddp", two / "ddp") <= 1e-5
    state = json.loads((checkpoint_dirs(two / "ddp")[-1] / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples"] == 12 * 8 and len(state["rng_ranks"]) == 2
    assert state["step"] == 12 and (two / "ddp" / "config.json").is_file()
    # accumulation, BatchNorm statistics (in the exported weights) included
    assert len(_losses(two / "accum")) == 4
    assert _losses(two / "accum") == pytest.approx(_losses(one / "accum"), abs=1e-5)
    assert any("running_mean" in k for k in load_file(str(two / "accum" / "model.safetensors")))
    assert _max_diff(one / "accum", two / "accum") <= 1e-5
    # FSDP: 4 steps, then resumed to 6, against the same in one process
    assert len(_losses(two / "fsdp")) == 6
    assert _losses(two / "fsdp") == pytest.approx(_losses(one / "fsdp"), abs=1e-5)
    assert _max_diff(one / "fsdp", two / "fsdp") <= 1e-5


def _train_two_and_one(tmp_path, monkeypatch, data, args_of, keys):
    """A momentum model trained by ``args_of`` (12 steps of 8, logged at 10 and 12, α = 0.4 after
    two steps, a queue of 32) in 2 processes and in 1: the logged ``keys``, the queue pointer and
    ids, the step count and every weight (momentum copies and feature queues included) agree."""
    monkeypatch.setenv("VLKIT_NO_PROGRESS", "1")
    two, one = tmp_path / "two", tmp_path / "one"
    _spawn(two, data, worker=_cli_worker, extra=(args_of,))
    from vlkit.cli import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args_of(one, data)) == 0
    finally:
        torch.set_num_threads(threads)
    metrics = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (one, two)]
    assert [m["step"] for m in metrics[0]] == [m["step"] for m in metrics[1]] == [10, 12]
    for key in ("loss", *keys, "alpha"):
        assert [m[key] for m in metrics[1]] == pytest.approx([m[key] for m in metrics[0]], abs=1e-5), key
    assert metrics[0][-1]["alpha"] == pytest.approx(0.4)  # distillation in play
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert int(wa["queue.ptr"]) == int(wb["queue.ptr"]) == 12 * 8 % 32
    assert torch.equal(wa["queue.ids"], wb["queue.ids"]) and torch.equal(wa["steps_done"], wb["steps_done"])
    assert any(k.startswith("momentum.") for k in wa)
    assert _max_diff(one, two) <= 1e-5  # the weights, momentum copies and feature queues


def test_two_processes_match_one_process_albef(tmp_path, monkeypatch, data):
    """ITM negatives and MLM masks are drawn for the global batch, ITC columns hold the global
    momentum batch, the queues fill in rank order, and the ITM and MLM means are over the global
    batch: 2 processes train as 1 does."""
    _train_two_and_one(tmp_path, monkeypatch, data, _albef_args, ("itc_loss", "itm_loss", "mlm_loss"))


BLIP_TINY = ["--set", "vision.dim=32", "--set", "vision.depth=1", "--set", "vision.heads=2",
             "--set", "vision.mlp_dim=64", "--set", "dim=32", "--set", "layers=1", "--set", "heads=2",
             "--set", "mlp_dim=64", "--set", "embed_dim=16", "--set", "queue_size=32"]


def _blip_args(out, data):
    """BLIP with every random draw of training (ITM negatives) in play and the dataset's negative
    captions included, 0 to 3 an image (only two kinds drawn, which not every record has), so the
    processes hold different numbers of ITM pairs; no dropout; distillation fully on after two
    steps; the queue wraps around within the run."""
    return ["train", "blip", "--data", str(data), "--out", str(out), "--steps", "12",
            "--batch-size", "8", "--lr", "3e-3", "--no-eval", "--no-progress", "--workers", "0",
            "--precision", "fp32", "--ckpt-every", "6", "--hard-negatives", "--negatives", "3",
            "--negative-weights", "attribute_change=0,count_change=0", *BLIP_TINY,
            "--set", "dropout=0.0", "--set", "alpha_ramp_steps=2"]


def test_two_processes_match_one_process_blip(tmp_path, monkeypatch, data):
    """ITM negatives are drawn for the global batch, ITC columns hold the global momentum batch,
    the queues fill in rank order, and the ITC, ITM and LM means are over the global batch (the
    dataset's negative captions counted where they are): 2 processes train as 1 does."""
    _train_two_and_one(tmp_path, monkeypatch, data, _blip_args, ("itc_loss", "itm_loss", "lm_loss"))


def test_rank_slices_partition_each_global_batch():
    from vlkit.data.loader import BatchStream, rank_slice
    assert [list(rank_slice(10, 17, r, 3)) for r in range(3)] == [[10, 11], [12, 13], [14, 15, 16]]
    seen = []
    for r in range(2):
        stream = BatchStream(lambda i: i, lambda recs, rngs: recs, 4, start=8, rank=r, world=2)
        it = iter(stream)
        seen.append([next(it), next(it)])
    assert seen == [[[8, 9], [12, 13]], [[10, 11], [14, 15]]]
    with pytest.raises(ValueError, match="rank 2"):
        BatchStream(lambda i: i, None, 4, rank=2, world=2)


def test_global_batchnorm_without_process_group_is_batchnorm():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    model = vdist.convert_batchnorm(torch.nn.Sequential(bn))
    assert isinstance(model[0], vdist.GlobalBatchNorm) and model[0].weight is bn.weight
    ref = torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(model(x), ref(x))
    torch.testing.assert_close(model[0].running_var, ref.running_var)
    assert set(model.state_dict()) == {f"0.{k}" for k in ref.state_dict()}


# --------------------------------------------------------------------------------------------
# SIGKILL at a random checkpoint, then --resume: bit-identical to an uninterrupted run
# --------------------------------------------------------------------------------------------
STEPS, EVERY = 12, 2
RESUME_MODELS = ["clip"]
if "albef" in vlkit.list_models():
    RESUME_MODELS.append("albef")


ALBEF_TINY = ["--set", "vision.dim=32", "--set", "vision.depth=1", "--set", "vision.heads=2",
              "--set", "vision.mlp_dim=64", "--set", "dim=32", "--set", "text_layers=1",
              "--set", "fusion_layers=1", "--set", "heads=2", "--set", "mlp_dim=64",
              "--set", "embed_dim=16", "--set", "queue_size=32"]


def _cmd(model, out, data, *extra):
    tiny = TINY if model == "clip" else ALBEF_TINY
    return [sys.executable, "-m", "vlkit", "train", model, "--data", str(data), "--out", str(out),
            "--steps", str(STEPS),
            "--batch-size", "8", "--no-eval", "--no-progress", "--workers", "1", "--precision", "fp32",
            "--ckpt-every", str(EVERY), *tiny, *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", VLKIT_NO_PROGRESS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.parametrize("model", RESUME_MODELS)
def test_sigkill_then_resume_is_bit_identical(tmp_path, model, data):
    rng = random.Random()
    kill_after = rng.randint(1, STEPS // EVERY - 2)  # checkpoint writes before the kill
    ref = subprocess.Popen(_cmd(model, tmp_path / "ref", data), env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    victim = tmp_path / "victim"
    proc = subprocess.Popen(_cmd(model, victim, data), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    def written():  # the newest checkpoint's step (older ones are pruned: keep-last-3)
        dirs = checkpoint_dirs(victim)
        return int(dirs[-1].name.split("-")[1]) if dirs else 0
    while written() < kill_after * EVERY and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoints appeared"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.03))  # a random moment after that checkpoint: mid-step or mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (victim / "model.safetensors").exists()
    killed_at = int(checkpoint_dirs(victim)[-1].name.split("-")[1])
    assert killed_at < STEPS
    resumed = subprocess.run(_cmd(model, victim, data, "--resume"), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, timeout=120)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert b"resumed from step" in resumed.stderr
    assert ref.wait(timeout=120) == 0, ref.stderr.read().decode()[-2000:]
    wa = load_file(str(tmp_path / "ref" / "model.safetensors"))
    wb = load_file(str(victim / "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"killed after checkpoint {killed_at}: {different[:5]}"
    last_a = load_file(str(checkpoint_dirs(tmp_path / "ref")[-1] / "optimizer.safetensors"))
    last_b = load_file(str(checkpoint_dirs(victim)[-1] / "optimizer.safetensors"))
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    assert _losses(tmp_path / "ref") == _losses(victim)
