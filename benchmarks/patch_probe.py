"""How well a ViT run's per-patch head (``vlkit train vit --set dense_weight=1``) names the object
under each patch token, on the synthetic world's test images.

Prints, over the patches an object covers (``vlkit.data.synthetic.patch_labels``): the share whose
predicted class is right, whose predicted colour is right and whose predicted shape is right,
and the accuracy on background patches.

    python benchmarks/patch_probe.py RUN [--images 400]
"""
from __future__ import annotations

import argparse

import torch

from vlkit.data.collate import ClassificationCollate
from vlkit.data.synthetic import SHAPES, SyntheticWorld, class_names
from vlkit.data.transforms import ImageTransform
from vlkit.pipeline import load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.run).model.eval()
    if getattr(model, "patch_head", None) is None:
        raise SystemExit(f"{args.run}: this ViT has no per-patch head (train it with --set dense_weight=1)")
    names = class_names()
    if list(model.cfg.class_names) != names:
        raise SystemExit(f"{args.run}: its classes are not the synthetic world's")
    size = model.image_spec()["size"]
    records = SyntheticWorld(image_size=size).records("test", args.images)
    collate = ClassificationCollate(ImageTransform(size, model.cfg.mean, model.cfg.std), names,
                                    patch_grid=model.patch_grid)
    batch = collate(records)
    with torch.no_grad():
        pred = model.patch_head(model(batch["pixel_values"]).features[:, 1:]).argmax(-1)
    target = batch["patch_labels"]
    background = len(names)
    on_object = target != background
    named = on_object & (pred != background)
    n = int(on_object.sum())
    k = len(SHAPES)  # class index = colour * len(SHAPES) + shape
    share = {
        "object class": ((pred == target) & on_object).sum().item() / n,
        "its colour": (named & (pred // k == target // k)).sum().item() / n,
        "its shape": (named & (pred % k == target % k)).sum().item() / n,
        "background": ((pred == target) & ~on_object).sum().item() / max(1, int((~on_object).sum())),
    }
    print(f"{args.run}: {n} object patches in {len(records)} test images")
    for name, value in share.items():
        print(f"  {name:14s} {value:.3f}")


if __name__ == "__main__":
    main()
