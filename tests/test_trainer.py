import json
import os

import pytest
import torch
from safetensors.torch import load_file

import vlkit
from vlkit.checkpoint import checkpoint_dirs, latest_checkpoint
from vlkit.train.loop import TrainConfig, Trainer, TrainingAborted
from vlkit.train.optim import lr_at, param_groups


class Crash(RuntimeError):
    pass


def _batches(batch_size, crash_at=None):
    """A deterministic stream: batch contents depend only on the sample position."""
    def make(start):
        pos = start
        while True:
            if crash_at is not None and pos >= crash_at:
                raise Crash(f"simulated crash at sample {pos}")
            g = torch.Generator().manual_seed(pos)
            yield {"pixel_values": torch.randn(batch_size, 3, 16, 16, generator=g),
                   "labels": torch.randint(0, 4, (batch_size,), generator=g)}
            pos += batch_size
    return make


def _model():
    torch.manual_seed(0)
    return vlkit.create_model("vit", "tiny", image_size=16, patch_size=8, stem="patch", dim=32, depth=2,
                              heads=2, mlp_dim=64, num_classes=4, drop_path=0.2, dropout=0.1)


def _cfg(**kw):
    base = dict(steps=12, batch_size=8, lr=1e-3, warmup_steps=3, log_every=1, ckpt_every=5,
                keep_last=2, progress=False, accum_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_with_the_same_losses_and_weights(tmp_path):
    full = Trainer(_model(), _batches(8), _cfg(), tmp_path / "full")
    full.fit()
    # the same run, crashing in step 8 (after the step-5 checkpoint), then resumed
    crashed = Trainer(_model(), _batches(8, crash_at=8 * 2 * 7 + 8), _cfg(), tmp_path / "resumed")
    with pytest.raises(Crash):
        crashed.fit()
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000005"
    torch.manual_seed(1234)  # a resumed process starts with other RNG state: the checkpoint restores it
    resumed = Trainer(_model(), _batches(8), _cfg(), tmp_path / "resumed")
    resumed.fit(resume=True)
    assert resumed.step == 12
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert len(a) == len(b) == 12
    assert a == b
    wa = load_file(str(tmp_path / "full" / "model.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(checkpoint_dirs(tmp_path / "full")) == 2  # keep-last-N


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    Trainer(_model(), _batches(8), _cfg(steps=10), tmp_path).fit()
    newest = checkpoint_dirs(tmp_path)[-1]
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="unusable"):
        assert latest_checkpoint(tmp_path) == checkpoint_dirs(tmp_path)[-2]
    # a torn checkpoint (no manifest) is also passed over
    os.remove(checkpoint_dirs(tmp_path)[-2] / "manifest.json")
    with pytest.warns(UserWarning):
        assert latest_checkpoint(tmp_path) is None


def test_non_finite_losses_abort_with_checkpoint_intact(tmp_path):
    model = _model()
    steps = {"n": 0}
    original = model.training_losses

    def flaky(batch):
        out = original(batch)
        steps["n"] += 1
        if steps["n"] > 6:
            out["loss"] = out["loss"] * float("nan")
        return out

    model.training_losses = flaky
    trainer = Trainer(model, _batches(8), _cfg(steps=20, accum_steps=1, max_bad_steps=3, ckpt_every=5), tmp_path)
    with pytest.raises(TrainingAborted, match="non-finite"):
        trainer.fit()
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_schedule_and_weight_decay_groups():
    assert lr_at(0, 1.0, 100, 10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, 10) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 100, 10) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    model = vlkit.create_model("clip", "tiny")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in nd and "vision.embed.pos_embed" in nd and "text.embed.word.weight" in nd
    assert all(not n.endswith(".bias") for n in d) and not any("norm" in n for n in d)
    assert "vision.encoder.blocks.0.attn.q.weight" in d


def test_cpu_optimizer_is_fused_and_steps_like_the_default():
    from vlkit.train.optim import make_optimizer
    torch.manual_seed(0)
    model = _model()
    twin = _model()
    twin.load_state_dict(model.state_dict())
    opt = make_optimizer(model, 1e-2)
    assert all(g["fused"] for g in opt.param_groups)
    ref = torch.optim.AdamW(param_groups(twin, 0.05), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=True)
    x = torch.randn(4, 3, 16, 16)
    for _ in range(3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m.train(False)
            m(x).logits.square().mean().backward()
            o.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_batchnorm_statistics_are_recomputed_for_the_exported_weights(tmp_path):
    torch.manual_seed(0)
    model = vlkit.create_model("vit", "tiny", image_size=16, patch_size=4, dim=16, heads=2, mlp_dim=32,
                               num_classes=4)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms  # the conv stem has BatchNorm
    Trainer(model, _batches(8), _cfg(steps=4, ckpt_every=100), tmp_path).fit()
    exported = load_file(str(tmp_path / "model.safetensors"))
    last = load_file(str(checkpoint_dirs(tmp_path)[-1] / "model.safetensors"))
    key = next(k for k in exported if k.endswith("running_mean"))
    assert not torch.equal(exported[key], last[key])  # recomputed after the checkpoint
    assert all(torch.equal(exported[k], last[k]) for k in exported if "running" not in k and "num_batches" not in k)
    # the recomputed mean is the plain average over the calibration batches: recompute it here
    stem = norms[0]
    feats = []
    make = _batches(8)(4 * 2 * 8)
    for _ in range(8):
        x = next(make)["pixel_values"]
        feats.append(model.vision.embed.patch_embed.proj[0](x).mean(dim=(0, 2, 3)))
    torch.testing.assert_close(stem.running_mean, torch.stack(feats).mean(0), atol=1e-5, rtol=1e-4)
    assert stem.momentum == 0.1


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_process_group_ends_with_a_checkpoint(tmp_path, sig):
    """A scheduler's SIGTERM (or Ctrl-C) reaches the data workers too; the run must still end
    with a checkpoint of its last step and exported weights, not with a worker-death error."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlkit", "train", "vit", "--steps", "100000", "--batch-size", "8",
           "--workers", "2", "--ckpt-every", "100000", "--out", str(run), "--no-progress",
           "--set", "depth=1", "--set", "dim=32", "--set", "mlp_dim=64"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        os.killpg(proc.pid, getattr(signal, sig))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "writing a checkpoint" in err
    assert "evaluation skipped" in out and not (run / "eval.json").exists()
    newest = latest_checkpoint(run)
    assert newest is not None and int(newest.name.split("-")[1]) > 0
    assert (run / "model.safetensors").exists()
