"""CLIP tiny training throughput: one process against two DDP processes (gloo on the CPU).

Rows: 1 process with 1 thread, 1 process with 2 threads, and 2 processes with 1 thread each
(the same global batch, split in two; gradients all-reduced by DDP, features gathered by the
contrastive loss). Each run goes through the shared Trainer on a fixed stream of random batches
(no data loading), for ``--warmup`` steps and then ``--steps`` timed ones; samples/s is taken
from the trainer's own clock (rank 0's). Printed: the rates and the ratio to the 2-thread
single process.

    python benchmarks/distributed_speed.py [--batch 64] [--steps 20] [--warmup 5]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _batches(batch: int, rank: int, world: int, image_size: int = 64, length: int = 16):
    def make(start):
        local = batch // world
        g = torch.Generator().manual_seed(0)
        fixed = {"pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g),
                 "input_ids": torch.randint(5, 500, (batch, length), generator=g),
                 "attention_mask": torch.ones(batch, length, dtype=torch.long)}
        sl = slice(rank * local, (rank + 1) * local)
        while True:
            yield {k: v[sl] for k, v in fixed.items()}
    return make


def _run(rank: int, world: int, threads: int, port: int, args, out: str) -> None:
    import vlkit
    from vlkit import collective as vdist
    from vlkit.train.loop import TrainConfig, Trainer
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        vdist.init_from_env()
    try:
        torch.manual_seed(0)
        model = vlkit.create_model("clip", "tiny")
        cfg = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, log_every=1,
                          ckpt_every=10**9, progress=False, precision="fp32", warmup_steps=1)
        Trainer(model, _batches(args.batch, rank, world), cfg, out).fit()
    finally:
        vdist.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, threads: int, args) -> float:
    with tempfile.TemporaryDirectory() as out:
        if world == 1:
            ctx = mp.get_context("spawn")
            p = ctx.Process(target=_run, args=(0, 1, threads, 0, args, out))
            p.start()
            p.join()
            if p.exitcode:
                raise RuntimeError(f"benchmark process failed ({p.exitcode})")
        else:
            mp.spawn(_run, args=(world, threads, _free_port(), args, out), nprocs=world)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    t0 = next(r["elapsed"] for r in rows if r["step"] == args.warmup)
    t1 = rows[-1]["elapsed"]
    return args.steps * args.batch / (t1 - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = [("1 process x 1 thread", measure(1, 1, args)),
            ("1 process x 2 threads", measure(1, 2, args)),
            ("2 processes x 1 thread", measure(2, 1, args))]
    ref = rows[1][1]
    print(f"CLIP tiny training, global batch {args.batch}, fp32, CPU ({os.cpu_count()} cores), "
          f"{args.steps} timed steps")
    print(f"{'setup':24s} {'samples/s':>10s} {'x 1 proc 2 thr':>15s}")
    for name, rate in rows:
        print(f"{name:24s} {rate:10.1f} {rate / ref:15.2f}")


if __name__ == "__main__":
    main()
