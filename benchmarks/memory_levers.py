"""Memory levers of CLIP training: activation checkpointing per Transformer block and patch
dropout (FLIP), alone and together, against plain training.

Each configuration runs in a fresh subprocess (a process's peak memory cannot be reset). On the
CPU the peak is the resident set size (``resource.getrusage``'s ru_maxrss) minus the resident
size once the model, batch and optimiser are built, so the figure is the memory training adds
(activations, gradients and AdamW state; only the activations differ between rows); on CUDA it is ``torch.cuda.max_memory_allocated`` over the timed
steps. Step time is the median over the timed steps (forward + backward + AdamW).

    python benchmarks/memory_levers.py [--batch 32] [--image-size 128] [--depth 4] [--steps 5]
        [--patch-dropout 0.5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = [("plain", False, False), ("grad checkpointing", True, False),
           ("patch dropout", False, True), ("both", True, True)]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> dict:
    import torch

    import vlkit
    from vlkit.train.loop import enable_grad_checkpointing
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = vlkit.create_model("clip", "tiny", **{
        "vision.image_size": args.image_size, "vision.depth": args.depth, "text.depth": args.depth,
        "vision.stem": "patch",  # a linear patch projection: the Transformer holds the activations
        "vision.patch_dropout": args.patch_dropout if args.drop else 0.0}).to(device)
    if args.ckpt:
        enable_grad_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g),
             "input_ids": torch.randint(5, 500, (args.batch, 24), generator=g),
             "attention_mask": torch.ones(args.batch, 24, dtype=torch.long)}
    batch = {k: v.to(device) for k, v in batch.items()}

    def step():
        loss = model.training_losses(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    step()  # warm-up (allocates the optimiser state, the same in every configuration)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"step_s": statistics.median(times), "extra_mib": peak - base, "device": device.type}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--patch-dropout", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--drop", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    common = [f"--batch={args.batch}", f"--image-size={args.image_size}", f"--depth={args.depth}",
              f"--steps={args.steps}", f"--patch-dropout={args.patch_dropout}", f"--threads={args.threads}"]
    rows = []
    for name, ckpt, drop in CONFIGS:
        cmd = [sys.executable, __file__, "--child", *common] + (["--ckpt"] if ckpt else []) \
            + (["--drop"] if drop else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    dev = rows[0][1]["device"]
    print(f"CLIP tiny, {args.depth}+{args.depth} layers, {args.image_size} px "
          f"({(args.image_size // 16) ** 2} patches), batch {args.batch}, patch dropout "
          f"{args.patch_dropout}, {dev}, {args.threads} thread(s)")
    print(f"{'configuration':20s} {'step memory MiB':>16s} {'x plain':>8s} {'step s':>8s} {'x plain':>8s}")
    m0, t0 = rows[0][1]["extra_mib"], rows[0][1]["step_s"]
    for name, r in rows:
        print(f"{name:20s} {r['extra_mib']:16.1f} {r['extra_mib'] / m0:8.2f} {r['step_s']:8.3f} "
              f"{r['step_s'] / t0:8.2f}")


if __name__ == "__main__":
    main()
