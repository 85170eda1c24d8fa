"""The training loop every model shares; a model plugs in through ``training_losses(batch)``."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .checkpoint import (WEIGHTS, atomic_save_tensors, latest_checkpoint, load_checkpoint,
                         model_state, save_checkpoint)
from .optim import lr_at, make_optimizer


@dataclass
class TrainConfig:
    steps: int | None = None          # optimiser steps; with ``minutes``, whichever ends first
    minutes: float | None = None      # wall-clock budget for training (not counting set-up)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    accum_steps: int = 1              # micro-batches per optimiser step
    precision: str = "auto"           # auto (bf16 where the hardware has it), bf16, fp32
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 3
    seed: int = 0
    max_bad_steps: int = 5            # consecutive non-finite losses before the run stops
    progress: bool = True


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); emulated bf16
    is many times slower than fp32, so autocast is only worth it with native support."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r} (auto, bf16, fp32)")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


class TrainingAborted(RuntimeError):
    pass


class Trainer:
    """Runs ``model.training_losses`` over batches with AdamW, warm-up + cosine, clipping,
    accumulation, autocast, logging to ``metrics.jsonl`` and atomic checkpoints.

    ``batches(start_sample)`` must yield micro-batches starting at the given sample position of
    a deterministic stream: that position is the data state saved in checkpoints.
    """

    def __init__(self, model: torch.nn.Module, batches: Callable[[int], Iterable[dict]],
                 cfg: TrainConfig, run_dir: str | Path, device: str | torch.device | None = None):
        self.model = model
        self.batches = batches
        self.cfg = cfg
        self.run = Path(run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(cfg.precision, self.device)
        self.model.to(self.device)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        self.step = 0
        self.samples = 0
        self.elapsed = 0.0
        self.total_steps = cfg.steps
        self.bad_steps = 0
        self.skipped_steps = 0
        self._stop_requested = False

    # -- state -----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "samples": self.samples, "elapsed": self.elapsed,
                "total_steps": self.total_steps, "skipped_steps": self.skipped_steps,
                "train_config": asdict(self.cfg)}

    def checkpoint(self) -> Path:
        return save_checkpoint(self.run, self.step, self.model, self.optimizer, self._state(),
                               self.cfg.keep_last)

    def resume(self) -> bool:
        path = latest_checkpoint(self.run)
        if path is None:
            return False
        state = load_checkpoint(path, self.model, self.optimizer)
        self.step, self.samples = state["step"], state["samples"]
        self.elapsed, self.total_steps = state["elapsed"], state["total_steps"]
        if self.cfg.steps is not None:  # an explicit step count may extend a finished run
            self.total_steps = self.cfg.steps
        self.skipped_steps = state.get("skipped_steps", 0)
        self._truncate_metrics(self.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        path = self.run / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
        path.write_text("".join(f"{line}\n" for line in keep))

    # -- loop --------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        cfg = self.cfg
        if cfg.steps is None and cfg.minutes is None:
            raise ValueError("give a number of steps or minutes to train for")
        self.run.mkdir(parents=True, exist_ok=True)
        if resume and self.resume():
            print(f"resumed from step {self.step} ({self.samples} samples)", file=sys.stderr)
        self.model.train()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        metrics_file = open(self.run / "metrics.jsonl", "a")
        bar = _progress(cfg, self.step)
        try:
            last = self._loop(metrics_file, bar)
        finally:
            metrics_file.close()
            if bar is not None:
                bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        self.checkpoint()
        self.recalibrate_batchnorm()
        atomic_save_tensors(self.run / WEIGHTS, model_state(self.model))
        return {"step": self.step, "samples": self.samples, "elapsed": self.elapsed, **last}

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: int = 8) -> None:
        """Recompute BatchNorm statistics as plain averages over a few batches with the final
        weights: running averages lag behind fast-changing weights, which cost several points of
        accuracy at evaluation. Only the exported weights change; the checkpoints keep the
        training state as it was, so a resumed run is unaffected. (``training_losses`` must not
        change state besides BatchNorm buffers; models with feature queues skip this.)"""
        norms = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms or getattr(self.model, "has_queues", False):
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        was_training = self.model.training
        self.model.train()
        data = iter(self.batches(self.samples))
        for _ in range(batches):
            batch = to_device(next(data), self.device)
            with autocast(self.device, self.precision):
                self.model.training_losses(batch)
        self.model.train(was_training)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum

    def _done(self) -> bool:
        cfg = self.cfg
        if cfg.steps is not None and self.step >= cfg.steps:
            return True
        if cfg.minutes is not None and self.elapsed >= cfg.minutes * 60:
            return True
        return self.total_steps is not None and self.step >= self.total_steps

    def _loop(self, metrics_file, bar) -> dict:
        cfg = self.cfg
        data = iter(self.batches(self.samples))
        last: dict = {}
        window_samples, window_start = 0, time.perf_counter()
        calib_steps = 25
        mark = None
        while not self._done() and not self._stop_requested:
            t0 = time.perf_counter()
            lr = lr_at(self.step, cfg.lr, self.total_steps or 10**9, cfg.warmup_steps, cfg.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            logs: dict[str, float] = {}
            n_batch = 0
            finite = True
            for _ in range(cfg.accum_steps):
                batch = to_device(next(data), self.device)
                n_batch += _batch_size(batch)
                with autocast(self.device, self.precision):
                    losses = self.model.training_losses(batch)
                loss = losses["loss"].float()
                if not torch.isfinite(loss):
                    finite = False
                    break
                (loss / cfg.accum_steps).backward()
                for k, v in losses.items():
                    logs[k] = logs.get(k, 0.0) + float(v.detach()) / cfg.accum_steps
            self.samples += n_batch
            if finite:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip
                                                           if cfg.grad_clip > 0 else float("inf"))
                self.optimizer.step()
                self.bad_steps = 0
            else:
                self.bad_steps += 1
                self.skipped_steps += 1
                if self.bad_steps >= cfg.max_bad_steps:
                    self.optimizer.zero_grad(set_to_none=True)
                    raise TrainingAborted(f"{self.bad_steps} steps in a row had a non-finite loss; "
                                          f"stopped at step {self.step}, last checkpoint kept")
            self.optimizer.zero_grad(set_to_none=True)
            if hasattr(self.model, "after_step"):
                self.model.after_step(self.step)
            self.step += 1
            self.elapsed += time.perf_counter() - t0
            window_samples += n_batch
            # a time budget fixes the schedule's length once the speed is known (the first steps,
            # which warm up allocators and workers, are left out of the estimate)
            if self.step == 5:
                mark = self.elapsed
            # (estimated at step 25, refined at step 100 once workers and caches are warm)
            if cfg.minutes is not None and cfg.steps is None and (
                    (self.step == calib_steps and self.total_steps is None) or self.step == 4 * calib_steps):
                per_step = (self.elapsed - mark) / (self.step - 5) if mark is not None else \
                    self.elapsed / self.step
                remaining = cfg.minutes * 60 - self.elapsed
                self.total_steps = max(self.step + 1, self.step + int(remaining / per_step))
            if finite:
                last = {k: round(v, 6) for k, v in logs.items()}
            if self.step % cfg.log_every == 0 or self._done():
                now = time.perf_counter()
                rate = window_samples / max(now - window_start, 1e-9)
                window_samples, window_start = 0, now
                record = {"step": self.step, "lr": lr, **last, "samples_per_s": round(rate, 1),
                          "elapsed": round(self.elapsed, 2)}
                if finite:
                    record["grad_norm"] = round(float(grad_norm), 4)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}",
                                    sps=f"{rate:.0f}")
            if bar is not None:
                bar.total = self.total_steps or cfg.steps
                bar.update(1)
            if self.step % cfg.ckpt_every == 0:
                self.checkpoint()
        return last

    def _on_sigterm(self, signum, frame):
        print("SIGTERM: writing a checkpoint at the end of this step", file=sys.stderr)
        self._stop_requested = True


def _batch_size(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return 0


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress or os.environ.get("VLKIT_NO_PROGRESS"):
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", mininterval=1.0,
                dynamic_ncols=True, file=sys.stderr)


__all__ = ["TrainConfig", "Trainer", "TrainingAborted", "resolve_precision", "autocast",
           "cpu_has_native_bf16"]
