"""Does a trained fusion model read a spatial relation off the image? A probe of its MLM head.

For the first relation word ("left", "right", "above", "below") of a caption of each of the
synthetic world's first N test images, the word is replaced by [MASK] and the model's MLM head
chooses among the four (chance 0.25; 0.5 is the axis alone, which the text gives away: "of"
follows left and right only). With ``--visible`` it also reports the choice when the word is
left in place, and when it is flipped to its opposite (how often the head puts the true word
back: what ``match_score="itm+edit"`` relies on to reject a relation flip).

    python benchmarks/relation_probe.py RUN [--images 300] [--heads] [--positions]

Works for ViLT and ALBEF runs (any run whose pipeline has ``mlm_logits``).

``--heads`` (runs trained with ``relation_weight``) also prints where the two relation heads
look from the relation words, over the training split's relation phrases: the mass the subject
head and the object head put on the subject's patches and on the object's, with the words shown
and masked. Heads that put the same mass on both objects have found the objects the caption
names but not which one is the subject: the relation's direction cannot be read yet.

``--positions`` (runs trained with grounding) measures how well a linear map reads each object
patch's row and column off its token, at the input of every layer of a ViLT (for ALBEF: the
image tokens the fusion layers attend to): ridge regression fitted on half of the object
patches of the first N training images, R^2 and mean error (in patches) on the other half. A
relation head can only tell left from right through what this map finds.
"""
from __future__ import annotations

import argparse

import torch

import vlkit
from vlkit.data.synthetic import synthetic_world

WORDS = ("left", "right", "above", "below")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--heads", action="store_true", help="where the relation heads look")
    p.add_argument("--positions", action="store_true",
                   help="how linearly the image tokens encode their patch's position")
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
    if args.heads:
        relation_head_mass(pipe, args.images, args.batch_size)
    if args.positions:
        position_readout(pipe, args.images)


def training_batches(pipe, images: int, batch_size: int):
    """The first ``images`` training records of the synthetic world, collated with their
    grounding targets in batches of ``batch_size`` (evaluation transform, fixed draws)."""
    import random

    from vlkit.data.collate import ImageTextCollate
    from vlkit.data.transforms import ImageTransform

    spec = pipe.model.image_spec()
    world = synthetic_world(spec["size"])
    records = [world.sample(i, "train") for i in range(images)]
    collate = ImageTextCollate(ImageTransform(spec["size"], spec["mean"], spec["std"], train=False),
                               pipe.tokenizer, max_length=40, grounding_grid=pipe.model.grounding_grid)
    for s in range(0, len(records), batch_size):
        yield collate(records[s:s + batch_size], [random.Random(i) for i in range(s, s + batch_size)])


def fusion_context(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """ALBEF: the image tokens its fusion layers attend to (with the ``fusion_pos`` codes)."""
    tokens = model.forward_features(pixel_values)
    return tokens + model._fusion_pos(tokens) if model.cfg.fusion_pos else tokens


def relation_head_mass(pipe, images: int, batch_size: int) -> None:
    """The relation heads' attention mass on the subject's and the object's patches."""
    from vlkit.objectives.relation import relation_heads

    model = pipe.model
    cfg = model.cfg
    if getattr(cfg, "relation_weight", 0) <= 0:
        raise SystemExit("--heads: this run was not trained with relation_weight")
    first = relation_heads(cfg)
    print(f"relation heads {first} and {first + 1} of layer {cfg.relation_layer}: attention mass "
          "(rows: subject head, object head; columns: on the subject, on the object)")
    for masked in (False, True):
        mass, words = torch.zeros(2, 2), 0
        for batch in training_batches(pipe, images, batch_size):
            roles = batch["grounding_roles"].float()  # (B, 2, L, P)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            rel = (roles.sum(-1) > 0).all(1)  # (B, L): the relation words
            if masked:
                ids = ids.masked_fill(rel, cfg.mask_token_id)
            with torch.no_grad():
                if hasattr(model, "fusion_layers"):  # ALBEF: the fusion layers' cross-attention
                    _, maps = model.fusion_layers.forward_with_maps_of(
                        model.text_features(ids, mask), [cfg.relation_layer], mask=model._self_mask(mask),
                        context=fusion_context(model, batch["pixel_values"]))
                    att = maps[cfg.relation_layer]["cross"][..., 1:]
                else:  # ViLT: the text rows of the joint self-attention over the patches
                    x, joint = model.embed(batch["pixel_values"], ids, mask)
                    _, maps = model.encoder.forward_with_maps_of(x, [cfg.relation_layer],
                                                                 mask=model._joint_mask(joint, ids.shape[1]))
                    att = maps[cfg.relation_layer]["self"][:, :, :ids.shape[1], ids.shape[1] + 1:]
            for h in range(2):
                for r in range(2):
                    mass[h, r] += (att[:, first + h] * roles[:, r]).sum(-1)[rel].sum()
            words += int(rel.sum())
        m = mass / max(words, 1)
        print(f"  words {'masked' if masked else 'shown '}: subject head {m[0, 0]:.2f} / {m[0, 1]:.2f}, "
              f"object head {m[1, 0]:.2f} / {m[1, 1]:.2f}  ({words} relation tokens)")


def position_readout(pipe, images: int) -> None:
    """R^2 of a ridge regression from object patches' tokens to their (row, column)."""
    model = pipe.model
    grid = model.grounding_grid
    if grid is None:
        raise SystemExit("--positions: this run was not trained with grounding (no object boxes)")
    batch = next(training_batches(pipe, images, images))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    objects = batch["grounding"].sum(1) > 0  # (B, P): patches some word names
    with torch.no_grad():
        if hasattr(model, "fusion_layers"):  # ALBEF: the image tokens the fusion layers read
            stages = [("fusion input", fusion_context(model, batch["pixel_values"])[:, 1:])]
        else:  # ViLT: the patch tokens at the input of each layer
            x, joint = model.embed(batch["pixel_values"], ids, mask)
            n, stages = ids.shape[1], []
            attn_mask = model._joint_mask(joint, n)
            for i, block in enumerate(model.encoder.blocks):
                stages.append((f"layer {i} input", x[:, n + 1:]))
                x = block(x, mask=attn_mask)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    where = torch.stack([rows.flatten(), cols.flatten()], 1).float()  # (P, 2)
    target = where.expand(objects.shape[0], -1, -1)[objects]
    half = target.shape[0] // 2
    print(f"patch position read linearly off the image tokens ({target.shape[0]} object patches, "
          "fit on half, R^2 and mean error in patches on the rest; rows / columns):")
    for name, states in stages:
        x = states[objects].float()
        x = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
        a = x[:half]
        w = torch.linalg.solve(a.T @ a + 0.1 * torch.eye(a.shape[1]), a.T @ target[:half])
        err = x[half:] @ w - target[half:]
        r2 = 1 - err.pow(2).sum(0) / (target[half:] - target[half:].mean(0)).pow(2).sum(0)
        mae = err.abs().mean(0)
        print(f"  {name:14s} R^2 {r2[0]:.3f} / {r2[1]:.3f}   error {mae[0]:.2f} / {mae[1]:.2f}")


if __name__ == "__main__":
    main()
