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

from .. import collective as vdist
from ..data.loader import close_loader
from ..checkpoint import (WEIGHTS, latest_checkpoint, load_checkpoint, model_state, nonfinite,
                          save_checkpoint, save_weights)
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
    eval_every: int = 0               # steps between learning-curve points (0: none; needs an evaluator)
    seed: int = 0
    max_bad_steps: int = 5            # consecutive non-finite losses before the run stops
    progress: bool = True
    grad_checkpointing: bool = False  # recompute each Transformer block in the backward pass
    fsdp: bool = False                # shard parameters, gradients and optimiser state (FSDP2)
    find_unused_parameters: bool = False  # DDP: for models whose losses skip some parameters


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


class LossModule(torch.nn.Module):
    """``forward(batch) = model.training_losses(batch)``: the module DDP and FSDP wrap, so the
    training forward goes through their hooks (gradient synchronisation, parameter gathering)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        return self.model.training_losses(batch)


def enable_grad_checkpointing(model: torch.nn.Module, on: bool = True) -> int:
    """Switch activation checkpointing on every Transformer stack; returns how many."""
    n = 0
    for m in model.modules():
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = on
            n += 1
    return n


class Trainer:
    """Runs ``model.training_losses`` over batches with AdamW, warm-up + cosine, clipping,
    accumulation, autocast, logging to ``metrics.jsonl`` and atomic checkpoints.

    ``batches(start_sample)`` must yield micro-batches starting at the given sample position of
    a deterministic stream: that position is the data state saved in checkpoints.

    Distributed (a process group of W > 1 ranks, e.g. under torchrun): ``batches`` yields this
    rank's slice of each global micro-batch (``start_sample`` stays a global position, and the
    sample count advances by W times the slice); the model is wrapped in DDP (or sharded with
    FSDP2 when ``cfg.fsdp``), its BatchNorm layers normalise over the global batch, the logged
    losses are averaged over the ranks, and only rank 0 writes metrics, checkpoints and the
    exported weights. Every rank loads a checkpoint on resume; each keeps its own RNG state.

    ``evaluator(model) -> dict`` with ``cfg.eval_every`` draws a learning curve: every that many
    steps the model is evaluated (in eval mode, BatchNorm statistics recomputed as for the
    exported weights, then restored) and a line {"step", "samples", "elapsed", metrics...} is
    appended to ``curve.jsonl``. The evaluation's time does not count against a time budget.
    """

    def __init__(self, model: torch.nn.Module, batches: Callable[[int], Iterable[dict]],
                 cfg: TrainConfig, run_dir: str | Path, device: str | torch.device | None = None,
                 evaluator: Callable[[torch.nn.Module], dict] | None = None):
        self.model = model
        self.evaluator = evaluator
        self.batches = batches
        self.cfg = cfg
        vdist.set_run_seed(cfg.seed)  # behind the models' draws over the global batch
        self.run = Path(run_dir)
        self.rank, self.world = vdist.rank(), vdist.world_size()
        self.distributed = self.world > 1
        self.device = torch.device(device) if device is not None else vdist.local_device()
        self.precision = resolve_precision(cfg.precision, self.device)
        self.model.to(self.device)
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(self.model)
        self.engine: torch.nn.Module = LossModule(self.model)
        self._replicated: list[torch.nn.Parameter] = []  # parameters FSDP leaves unsharded
        if cfg.fsdp:
            if not self.distributed:
                raise ValueError("fsdp needs a process group of more than one rank (torchrun)")
            vdist.convert_batchnorm(self.model)
            self._replicated = _fully_shard(self.engine)
        elif self.distributed:
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP
            vdist.convert_batchnorm(self.model)
            # buffers stay in step by themselves (BatchNorm statistics are global), so DDP need
            # not broadcast them every forward (the keyword's name depends on the torch version)
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DDP).parameters
                              else {"broadcast_buffers": False})
            self.engine = DDP(self.engine, device_ids=[self.device] if self.device.type == "cuda" else None,
                              find_unused_parameters=cfg.find_unused_parameters, **no_buffer_sync)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        self.step = 0
        self.samples = 0
        self.elapsed = 0.0
        self.total_steps = cfg.steps
        self.bad_steps = 0
        self.skipped_steps = 0
        self._stop_requested = False
        self._stop_agreed = False  # the stop request as all ranks know it
        self.bad_samples: dict[int, str] = {}  # dataset index -> reason, as batches report them

    # -- state -----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "samples": self.samples, "elapsed": self.elapsed,
                "total_steps": self.total_steps, "skipped_steps": self.skipped_steps,
                "world_size": self.world, "train_config": asdict(self.cfg),
                "bad_samples": {str(k): v for k, v in sorted(self._all_bad_samples().items())}}

    def _take_bad_samples(self, batch: dict) -> dict:
        """Record the bad samples a batch reports (``_bad_samples``: (index, reason) pairs that
        the data source skipped while making it) and drop the entry before the model sees it."""
        for index, reason in batch.pop("_bad_samples", None) or ():
            self.bad_samples[int(index)] = reason
        return batch

    def _all_bad_samples(self) -> dict[int, str]:
        """The bad samples seen by every rank (collective under a process group)."""
        merged: dict[int, str] = {}
        for part in vdist.all_gather_object(self.bad_samples):
            merged.update(part)
        return merged

    def bad_sample_counts(self) -> dict[str, int]:
        """{reason: number of distinct samples} skipped so far (collective under a process group)."""
        counts: dict[str, int] = {}
        for reason in self._all_bad_samples().values():
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's tensors (collective under FSDP; rank 0 gets them)."""
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        return model_state(self.model)

    def checkpoint(self) -> Path | None:
        """Write a checkpoint (rank 0; every rank must call this under a process group)."""
        state = self._state()
        rngs = vdist.all_gather_object(_rng_state())
        if self.distributed:
            state["rng_ranks"] = rngs
        model_tensors = optim_state = None
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_optimizer_state_dict)
            model_tensors = self._full_model_state()
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        path = None
        if self.rank == 0:
            path = save_checkpoint(self.run, self.step, self.model, self.optimizer, state,
                                   self.cfg.keep_last, model_tensors=model_tensors,
                                   optimizer_state=optim_state)
        vdist.barrier()
        return path

    def resume(self) -> bool:
        # rank 0 chooses the checkpoint (the newest whole one), so every rank loads the same
        path = vdist.broadcast_object(latest_checkpoint(self.run) if self.rank == 0 else None)
        if path is None:
            return False
        if self.cfg.fsdp:
            state = self._load_sharded(path)
        else:
            state = load_checkpoint(path, self.model, self.optimizer, rank=self.rank)
        self.step, self.samples = state["step"], state["samples"]
        self.elapsed, self.total_steps = state["elapsed"], state["total_steps"]
        if self.cfg.steps is not None:  # an explicit step count may extend a finished run
            self.total_steps = self.cfg.steps
        self.skipped_steps = state.get("skipped_steps", 0)
        self.bad_samples = {int(k): v for k, v in state.get("bad_samples", {}).items()}
        if self.rank == 0:
            self._truncate_metrics(self.step)
        vdist.barrier()
        return True

    def _load_sharded(self, path: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        from ..checkpoint import read_checkpoint
        weights, optim, state = read_checkpoint(path, rank=self.rank)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, weights, options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, optim, options=opts)
        return state

    def _truncate_metrics(self, step: int) -> None:
        """Drop the lines of steps after ``step`` from metrics.jsonl and curve.jsonl (written by
        the run before it stopped; the resumed run writes them again)."""
        for name in ("metrics.jsonl", "curve.jsonl"):
            path = self.run / name
            if not path.is_file():
                continue
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
        if self.rank == 0:
            self.run.mkdir(parents=True, exist_ok=True)
        vdist.barrier()
        if resume and self.resume() and self.rank == 0:
            print(f"resumed from step {self.step} ({self.samples} samples)", file=sys.stderr)
        self.model.train()
        previous = ({sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
                    if _main_thread() else {})
        metrics_file = open(self.run / "metrics.jsonl", "a") if self.rank == 0 else None
        bar = _progress(cfg, self.step) if self.rank == 0 else None
        try:
            last = self._loop(metrics_file, bar)
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if bar is not None:
                bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.checkpoint()
        self.recalibrate_batchnorm()
        weights = self._full_model_state()
        if self.rank == 0:
            save_weights(self.run / WEIGHTS, weights)
        vdist.barrier()
        return {"step": self.step, "samples": self.samples, "elapsed": self.elapsed,
                "stopped": self._stop_agreed, **last}

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: int = 8) -> None:
        """Recompute BatchNorm statistics as plain averages over a few batches with the final
        weights: running averages lag behind fast-changing weights, which cost several points of
        accuracy at evaluation. Only the exported weights change; the checkpoints keep the
        training state as it was, so a resumed run is unaffected. (``training_losses`` must not
        change state besides BatchNorm buffers; models with feature queues skip this.) Under a
        process group every rank runs its slices and the statistics are the global batch's. The
        passes run in fp32 whatever the training precision: the statistics are those of the
        activations the exported weights produce in evaluation (fp32)."""
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
        try:
            for _ in range(batches):
                batch = next(data)
                batch.pop("_bad_samples", None)  # calibration reads are not training reads
                batch = to_device(batch, self.device)
                self.engine(batch)  # no gradient: DDP does not prepare a reduction; fp32 (see above)
        finally:
            close_loader(data)
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

    def _sync_step(self, finite: bool, logs: dict, n_batch: int) -> tuple[bool, dict, int]:
        """Under a process group: agree on finiteness and on a stop request, average the logs
        and add up the samples of the step (one small all-reduce)."""
        if not self.distributed:
            self._stop_agreed = self._stop_requested
            return finite, logs, n_batch
        keys = sorted(logs)
        t = torch.tensor([0.0 if finite else 1.0, 1.0 if self._stop_requested else 0.0, n_batch]
                         + [logs[k] for k in keys], dtype=torch.float64, device=self.device)
        t = vdist.all_reduce_sum(t).cpu()
        self._stop_agreed = bool(t[1] > 0)
        return (bool(t[0] == 0), {k: float(v) / self.world for k, v in zip(keys, t[3:])},
                int(t[2]))

    def _sync_elapsed(self) -> None:
        """Rank 0's clock for every rank, so time-budget decisions agree."""
        if self.distributed:
            t = torch.tensor([self.elapsed if self.rank == 0 else 0.0], dtype=torch.float64,
                             device=self.device)
            self.elapsed = float(vdist.all_reduce_sum(t)[0])

    def _micro_step(self, batch: dict, sync: bool) -> tuple[dict, bool]:
        """Forward and backward of one micro-batch; gradient all-reduce only when ``sync``."""
        cfg = self.cfg
        no_sync = getattr(self.engine, "no_sync", None)
        ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        if self.cfg.fsdp:
            self.engine.set_requires_gradient_sync(sync)
        with ctx:
            with autocast(self.device, self.precision):
                losses = self.engine(batch)
            loss = losses["loss"].float()
            finite = bool(torch.isfinite(loss))
            # under a process group every rank runs its backward (the gradient all-reduce is
            # collective); a non-finite step is dropped afterwards by all ranks together
            if finite or self.distributed:
                (loss / cfg.accum_steps).backward()
        return losses, finite

    def _loop(self, metrics_file, bar) -> dict:
        data = iter(self.batches(self.samples))
        try:
            return self._steps(data, metrics_file, bar)
        finally:  # on an error too: workers left to the interpreter's exit would be waited on
            close_loader(data)

    def _steps(self, data, metrics_file, bar) -> dict:
        cfg = self.cfg
        last: dict = {}
        window_samples, window_start = 0, time.perf_counter()
        calib_steps = 25
        mark = None
        while not self._done() and not self._stop_agreed:
            t0 = time.perf_counter()
            lr = lr_at(self.step, cfg.lr, self.total_steps or 10**9, cfg.warmup_steps, cfg.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            logs: dict[str, float] = {}
            n_batch = 0
            finite = True
            for k in range(cfg.accum_steps):
                batch = to_device(self._take_bad_samples(next(data)), self.device)
                n_batch += _batch_size(batch)
                losses, ok = self._micro_step(batch, sync=k == cfg.accum_steps - 1)
                if not ok:
                    finite = False
                    if not self.distributed:
                        break
                for key, v in losses.items():
                    logs[key] = logs.get(key, 0.0) + float(v.detach()) / cfg.accum_steps
            finite, logs, n_batch = self._sync_step(finite, logs, n_batch)
            _average_replicated_grads(self._replicated)
            self.samples += n_batch
            if finite:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip
                                                           if cfg.grad_clip > 0 else float("inf"))
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                    grad_norm = grad_norm.full_tensor()
                self.optimizer.step()
                self._check_weights(lr)
                self.bad_steps = 0
            else:
                self.bad_steps += 1
                self.skipped_steps += 1
                if self.bad_steps >= cfg.max_bad_steps:
                    self.optimizer.zero_grad(set_to_none=True)
                    raise TrainingAborted(f"{self.bad_steps} steps in a row had a non-finite (NaN or infinite) loss; "
                                          f"stopped at step {self.step}; {self._kept()}")
            self.optimizer.zero_grad(set_to_none=True)
            if hasattr(self.model, "after_step"):
                self.model.after_step(self.step)
            self.step += 1
            self.elapsed += time.perf_counter() - t0
            self._sync_elapsed()
            window_samples += n_batch
            # a time budget fixes the schedule's length once the speed is known (the first steps,
            # which warm up allocators and workers, are left out of the estimate)
            if self.step == 5:
                mark = self.elapsed
            # (estimated at step 25, refined every 100 steps as the speed settles)
            if cfg.minutes is not None and cfg.steps is None and (
                    (self.step == calib_steps and self.total_steps is None) or self.step % (4 * calib_steps) == 0):
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
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}",
                                    sps=f"{rate:.0f}")
            if bar is not None:
                bar.total = self.total_steps or cfg.steps
                bar.update(1)
            if self.step % cfg.ckpt_every == 0 and not self.bad_steps:  # not weights whose loss is NaN
                self.checkpoint()
            if self.evaluator is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                self.curve_point()
        if self.bad_steps:  # the weights as they are give a non-finite loss: not a result
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingAborted(f"the loss was non-finite (NaN or infinite) at the last {self.bad_steps} step(s) "
                                  f"(the training diverged; is the learning rate {cfg.lr:g} too "
                                  f"high?): weights not exported; {self._kept()}")
        return last

    def _kept(self) -> str:
        newest = latest_checkpoint(self.run) if self.rank == 0 else None
        return f"last good checkpoint kept: {newest}" if newest else "no checkpoint was written"

    def _check_weights(self, lr: float) -> None:
        """Stop at once when an optimiser step left NaN or infinite weights: no later step can
        repair them, and they must never be checkpointed or exported as a result."""
        local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach()
                 for p in self.model.parameters() if p.is_floating_point()]
        local = [t for t in local if t.numel()]  # an FSDP shard may be empty on this rank
        bad = (~torch.isfinite(torch.stack(torch._foreach_norm(local, float("inf")))).all() if local
               else torch.zeros((), dtype=torch.bool, device=self.device))
        if self.cfg.fsdp:  # each rank holds a shard of the weights (every rank takes part)
            bad = vdist.all_reduce_sum(bad.double()) > 0
        if not bool(bad):
            return
        found = nonfinite({k: (v.to_local() if hasattr(v, "to_local") else v)
                           for k, v in self.model.named_parameters()})
        where = f" (tensor {found[0]}: {found[1]} of {found[2]} values)" if found else ""
        self.optimizer.zero_grad(set_to_none=True)
        raise TrainingAborted(f"step {self.step + 1}: the optimiser step made the weights NaN or "
                              f"infinite{where}; is the learning rate ({self.cfg.lr:g}) too high? Weights not "
                              f"exported; {self._kept()}")

    def curve_point(self) -> None:
        """Evaluate the model now and append the result to ``curve.jsonl`` (rank 0 evaluates;
        under a process group every rank takes part in the BatchNorm recalibration)."""
        norms = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
        self.recalibrate_batchnorm()
        if self.rank == 0:
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    metrics = self.evaluator(self.model)
            finally:
                self.model.train(was_training)
            line = {"step": self.step, "samples": self.samples, "elapsed": round(self.elapsed, 2),
                    **{k: round(float(v), 4) for k, v in metrics.items()}}
            with open(self.run / "curve.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        for m, state in zip(norms, saved):
            m.load_state_dict(state)
        vdist.barrier()

    def _on_stop_signal(self, signum, frame):
        """SIGTERM or a first Ctrl-C: finish the step, write a checkpoint, export, return. A
        second Ctrl-C interrupts at once (the newest periodic checkpoint stays)."""
        if signum == signal.SIGINT and self._stop_requested:
            raise KeyboardInterrupt
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (again to abort)"
        print(f"{name}: writing a checkpoint at the end of this step", file=sys.stderr)
        self._stop_requested = True


def _rng_state() -> dict:
    from ..checkpoint import rng_state
    return rng_state()


def _fully_shard(engine: LossModule) -> list[torch.nn.Parameter]:
    """FSDP2: one parameter group per Transformer block, the rest in the root. Scalar
    parameters (e.g. a temperature), which FSDP cannot shard, stay replicated; their gradients
    are averaged by `_average_replicated_grads`. Returns them."""
    from torch.distributed.fsdp import fully_shard
    scalars = [p for p in engine.parameters() if p.ndim == 0]
    for m in engine.model.modules():
        if hasattr(m, "grad_checkpointing") and hasattr(m, "blocks"):
            for block in m.blocks:
                fully_shard(block)
    fully_shard(engine, ignored_params=set(scalars) or None)
    return scalars


def _average_replicated_grads(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters kept out of FSDP over the ranks."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(vdist.all_reduce_sum(p.grad) / vdist.world_size())


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


__all__ = ["TrainConfig", "Trainer", "TrainingAborted", "LossModule", "enable_grad_checkpointing",
           "resolve_precision", "autocast",
           "cpu_has_native_bf16"]
