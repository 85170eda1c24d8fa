"""VLMo's image-text training step (forward + backward of ``training_losses``) with its text rows
padded to the batch's longest caption (``length_groups = 1``) against the rows run in groups of
similar length (``length_groups`` 2, 3, 4), side by side in one process on the same batches:
a vlmo-world run's weights and options, synthetic-world batches made as ``vlkit train`` makes
them, bf16 autocast where the CPU has native bf16. The ratio (padded / grouped) > 1 means the
grouped step is faster.

    python benchmarks/vlmo_length_groups.py RUN [--batches 3] [--repeats 3]

RUN: a vlmo-world run folder, e.g. runs/vlmo (its attention forcing clock set back to 0).
"""
from __future__ import annotations

import argparse
import time

import torch

import vlkit
from vlkit.data.loader import SyntheticSource
from vlkit.data.synthetic import synthetic_world
from vlkit.tokenizers.loading import load_tokenizer
from vlkit.train.loop import autocast, resolve_precision
from vlkit.train.run import make_collate

GROUPS = (1, 2, 3, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = vlkit.load(args.run).model
    model.cfg.objectives = ("itc", "itm", "mlm")
    model.cfg.fusion_every, model.cfg.hard_negatives = 4, True  # the recipe's image-text stage
    forcing = getattr(model, "attention_forcing", None)
    if forcing is not None:  # timed as at the stage's start, attention forcing on
        forcing.steps_done.zero_()
    model.train()
    tok = load_tokenizer(f"{args.run}/tokenizer")
    world = synthetic_world(model.image_spec()["size"], 1)
    source = SyntheticSource(world, "train")
    collate = make_collate(model, model.task, tok, 1)
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    times = {g: [] for g in GROUPS}
    for b in range(args.batches):
        batch = collate([source(b * args.batch_size + i) for i in range(args.batch_size)])
        for r in range(args.repeats + 1):
            for g in GROUPS:
                model.cfg.length_groups = g
                t = time.perf_counter()
                with autocast(device, precision):
                    loss = model.training_losses(batch)["loss"]
                if forcing is not None:
                    forcing.steps_done.zero_()
                loss.backward()
                model.zero_grad(set_to_none=True)
                if r:  # the first round warms up
                    times[g].append(time.perf_counter() - t)
        lengths = batch["attention_mask"].sum(1).float()
        print(f"batch {b}: caption tokens mean {lengths.mean():.1f}, longest {int(lengths.max())}")
    print(f"\nVLMo image-text step, {torch.get_num_threads()} threads, {precision}, batch {args.batch_size}")
    print("| length_groups | median s | padded / grouped |")
    print("|---|---|---|")
    med = {g: sorted(v)[len(v) // 2] for g, v in times.items()}
    for g in GROUPS:
        print(f"| {g} | {med[g]:.3f} | {med[1] / med[g]:.2f} |")


if __name__ == "__main__":
    main()
