"""Peak memory and time of the InfoNCE forms on CPU: plain, chunked, and local-loss.

    python benchmarks/contrastive_memory.py                       # B = 4096 16384 65536
    python benchmarks/contrastive_memory.py --batch 4096 16384 --chunk 1024 --world 8

Each (form, B) runs in its own subprocess, one forward + backward of the loss on random
L2-normalised (B, D) features with a learnable temperature; memory is the growth of the
process' peak resident set (ru_maxrss) over the peak after the features were allocated, so
it counts the logits, the autograd buffers and the feature gradients, not torch itself.
Forms:
  plain    the (B, B) logit matrix, as open_clip on one process
  chunked  the streamed custom autograd function (chunk_size rows of logits at a time)
  local    "plain over gathered": what one rank of a world of W holds with local_loss=True,
           its B/W rows against the gathered global batch of B (two (B/W, B) blocks)
A form whose estimated peak exceeds --max-gib is not run and reported with the reason.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FORMS = ("plain", "chunked", "local")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def estimate_gib(form: str, b: int, d: int, chunk: int, world: int) -> float:
    """Rough peak of the loss in GiB (float32): logits-sized buffers alive at once
    (measured: about 4 for plain, 4 per (B/W, B) direction for local, 5 chunks for chunked),
    plus features and their gradients."""
    feats = 6 * b * d * 4
    if form == "plain":
        return (4 * b * b * 4 + feats) / 2**30
    if form == "local":
        return (4 * (b // world) * b * 4 + feats) / 2**30
    return (5 * min(chunk, b) * b * 4 + feats) / 2**30


def worker(form: str, b: int, d: int, chunk: int, world: int, repeats: int) -> dict:
    import resource

    import torch

    sys.path.insert(0, REPO)
    from vlkit.losses.contrastive import local_contrastive_loss

    torch.manual_seed(0)
    img = torch.randn(b, d)
    img.div_(img.norm(dim=1, keepdim=True)).requires_grad_(True)
    txt = torch.randn(b, d)
    txt.div_(txt.norm(dim=1, keepdim=True)).requires_grad_(True)
    logit_scale = torch.tensor(2.659, requires_grad=True)  # log(1 / 0.07)

    def step() -> float:
        for t in (img, txt, logit_scale):
            t.grad = None
        if form == "plain":
            loss = local_contrastive_loss(img, txt, logit_scale)
        elif form == "chunked":
            loss = local_contrastive_loss(img, txt, logit_scale, chunk_size=chunk)
        else:  # rank 0 of `world`: its b // world rows against the gathered batch
            loss = local_contrastive_loss(img, txt, logit_scale, row_start=0,
                                          n_rows=b // world)
        loss.backward()
        return loss.item()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"form": form, "batch": b, "loss": loss, "time_s": min(times),
            "peak_mib": (peak - base) / 1024, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--world", type=int, default=8, help="ranks simulated by the local form")
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per form (min reported)")
    ap.add_argument("--max-gib", type=float, default=12.0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--worker", nargs=2, metavar=("FORM", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        row = worker(args.worker[0], int(args.worker[1]), args.dim, args.chunk, args.world,
                     args.repeats)
        print(json.dumps(row))
        return 0

    rows = []
    for b in args.batch:
        for form in args.forms:
            est = estimate_gib(form, b, args.dim, args.chunk, args.world)
            row = {"form": form, "batch": b, "est_gib": est}
            if est > args.max_gib:
                row["skipped"] = f"not run: estimated peak {est:.0f} GiB > {args.max_gib:g} GiB"
                if form == "plain":
                    logits_gib = b * b * 4 / 2**30
                    row["skipped"] += f" (the {b}x{b} float32 logits alone: {logits_gib:.0f} GiB)"
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", form, str(b),
                       "--dim", str(args.dim), "--chunk", str(args.chunk), "--world",
                       str(args.world), "--repeats", str(args.repeats)]
                try:
                    res = subprocess.run(cmd, capture_output=True, text=True,
                                         timeout=args.timeout)
                    if res.returncode != 0:
                        row["skipped"] = f"failed (exit {res.returncode}): " + \
                            res.stderr.strip().splitlines()[-1][:80]
                    else:
                        row.update(json.loads(res.stdout.strip().splitlines()[-1]))
                except subprocess.TimeoutExpired:
                    row["skipped"] = f"timed out after {args.timeout:g} s"
            rows.append(row)
            print(f"# done {form} B={b}", file=sys.stderr, flush=True)

    print(f"InfoNCE forward+backward on CPU, D={args.dim}, chunk={args.chunk}, "
          f"local = one rank of W={args.world}; memory = peak RSS growth")
    print(f"{'B':>6} {'form':<8} {'time s':>9} {'peak MiB':>10} {'mem/plain':>10} "
          f"{'time/plain':>10} {'loss':>9}")
    for b in args.batch:
        plain = next((r for r in rows if r["batch"] == b and r["form"] == "plain"
                      and "skipped" not in r), None)
        for r in (r for r in rows if r["batch"] == b):
            if "skipped" in r:
                print(f"{b:>6} {r['form']:<8} {r['skipped']}")
                continue
            mem_ratio = f"{r['peak_mib'] / plain['peak_mib']:.3f}" if plain else "n/a"
            time_ratio = f"{r['time_s'] / plain['time_s']:.2f}" if plain else "n/a"
            print(f"{b:>6} {r['form']:<8} {r['time_s']:>9.2f} {r['peak_mib']:>10.1f} "
                  f"{mem_ratio:>10} {time_ratio:>10} {r['loss']:>9.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
