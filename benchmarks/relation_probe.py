"""Does a trained fusion model read a spatial relation off the image? A probe of its MLM head.

For the first relation word ("left", "right", "above", "below") of a caption of each of the
synthetic world's first N test images, the word is replaced by [MASK] and the model's MLM head
chooses among the four (chance 0.25; 0.5 is the axis alone, which the text gives away: "of"
follows left and right only). With ``--visible`` it also reports the choice when the word is
left in place, and when it is flipped to its opposite (how often the head puts the true word
back: what ``match_score="itm+edit"`` relies on to reject a relation flip).

    python benchmarks/relation_probe.py RUN [--images 300]

Works for ViLT and ALBEF runs (any run whose pipeline has ``mlm_logits``).
"""
from __future__ import annotations

import argparse

import torch

import vlkit
from vlkit.train.run import synthetic_world

WORDS = ("left", "right", "above", "below")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args()
    pipe = vlkit.load(args.run)
    model, tok = pipe.model.eval(), pipe.tokenizer
    ids_of = {w: tok.token_to_id(w) for w in WORDS}
    if any(i is None for i in ids_of.values()):
        raise SystemExit(f"{args.run}: the tokenizer lacks one of {WORDS} as a single token")
    candidates = torch.tensor([ids_of[w] for w in WORDS])
    world = synthetic_world(model.image_spec()["size"])
    images, texts = [], []
    for i in range(args.images):
        rec = world.sample(i, "test")
        for caption in rec["captions"]:
            if any(w in caption.split() for w in WORDS):
                images.append(rec["image"])
                texts.append(caption)
                break
    right = {"masked": 0, "visible": 0, "flipped": 0}
    for s in range(0, len(texts), args.batch_size):
        pixels = pipe.pixels(images[s:s + args.batch_size])
        t = tok(texts[s:s + args.batch_size], max_length=40, padding="longest", truncation=True)
        ids, mask = t["input_ids"], t["attention_mask"]
        at = torch.isin(ids, candidates).float().argmax(1)  # the first relation word of each row
        rows = torch.arange(ids.shape[0])
        truth = ids[rows, at]
        opposite = torch.tensor([ids_of[OPPOSITE[tok.id_to_token(int(i))]] for i in truth])
        for name, shown in (("masked", tok.token_to_id("[MASK]")), ("visible", truth), ("flipped", opposite)):
            x = ids.clone()
            x[rows, at] = shown
            with torch.no_grad():
                logits = model.mlm_logits(pixels, x, mask)[rows, at][:, candidates]
            right[name] += int((candidates[logits.argmax(-1)] == truth).sum())
    n = len(texts)
    print(f"{args.run}: {n} captions with a relation; the true relation word chosen (of 4):")
    for name, k in right.items():
        print(f"  {name:8s} {k / n:.3f}")


if __name__ == "__main__":
    main()
