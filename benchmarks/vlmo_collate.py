"""The data worker's cost of a vlmo-world image-text batch: every row collated in full against
only the fused rows with negatives and grounding targets (``fused_rows``), one core.

    python benchmarks/vlmo_collate.py [--batch 256] [--rounds 5]

VLMo's image-text stage fuses every 4th row (``fusion_every = 4``); the other rows feed only
the dual passes, which read no negatives and no grounding targets. Rows:
  records      the synthetic world's training records of one batch (the same for both)
  full         ImageTextCollate over every row as it was (negatives, grounding for all)
  fused rows   the same collate with fused_rows=(4, 0)
taken in turn over ``--rounds`` rounds (best round kept), each on another batch of records;
prints seconds per batch and the ratios records+full / records+fused rows (the worker's whole
cost a step) and full / fused rows.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import vlkit  # noqa: E402
from vlkit.train.run import build_tokenizer, make_collate, training_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--every", type=int, default=4, help="fusion_every (vlmo-world: 4)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = build_tokenizer("synthetic", 64)
    model = vlkit.create_model("vlmo", "tiny", vocab_size=tok.vocab_size, fusion_every=args.every,
                               grounding_weight=1.0, relation_weight=1.0)
    source = training_source("image-text", "synthetic", 64, 0, "error", questions=False)
    collates = {"full": make_collate(model, model.task, tok, 1),
                "fused rows": make_collate(model, model.task, tok, 1, fused_rows=(args.every, 0))}
    best = {"records": float("inf"), **{k: float("inf") for k in collates}}
    for r in range(args.rounds):
        first = r * args.batch
        t = time.perf_counter()
        records = [source(first + i) for i in range(args.batch)]
        best["records"] = min(best["records"], time.perf_counter() - t)
        for name, collate in collates.items():
            t = time.perf_counter()
            collate(records, [random.Random(first + i) for i in range(args.batch)])
            best[name] = min(best[name], time.perf_counter() - t)
    print(f"batch {args.batch}, fusion_every {args.every}, one core, best of {args.rounds} rounds")
    print("| work | s a batch |\n|---|---|")
    for name, s in best.items():
        print(f"| {name} | {s:.3f} |")
    whole = (best["records"] + best["full"]) / (best["records"] + best["fused rows"])
    print(f"\nrecords + full / records + fused rows: {whole:.2f}×; "
          f"full / fused rows: {best['full'] / best['fused rows']:.2f}×")


if __name__ == "__main__":
    main()
