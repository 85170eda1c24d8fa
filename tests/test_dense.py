"""Per-patch object labels for the ViT (``dense_weight``): the labels, the collate and the loss."""
import random

import pytest
import torch

import vlkit
from vlkit.data.collate import ClassificationCollate
from vlkit.data.loader import SyntheticSource
from vlkit.data.synthetic import SyntheticWorld, class_names, patch_labels
from vlkit.data.transforms import ImageTransform

CLASSES = {name: i for i, name in enumerate(class_names())}
BG = len(CLASSES)


def test_patch_labels_cover_the_object_and_mirror_with_the_image():
    obj = {"color": "red", "shape": "circle", "x": 0.3, "y": 0.6, "extent": 0.25}
    labels = patch_labels([obj], 4, CLASSES, BG)
    red = CLASSES["red circle"]
    # x in [0.175, 0.425] -> columns 0 and 1; y in [0.475, 0.725] -> rows 1 (barely) and 2
    grid = [labels[r * 4:(r + 1) * 4] for r in range(4)]
    assert grid[2][:2] == [red, red]
    assert grid[0] == [BG] * 4 and grid[3] == [BG] * 4
    assert all(v == BG for row in grid for v in row[2:])
    assert grid[1][:2] == [BG, BG]  # a sliver of 0.025 x 0.075 is under a quarter of either area
    flipped = patch_labels([obj], 4, CLASSES, BG, flipped=True)
    assert [flipped[r * 4:(r + 1) * 4] for r in range(4)] == [row[::-1] for row in grid]
    with pytest.raises(ValueError, match="pink circle"):
        patch_labels([dict(obj, color="pink")], 4, CLASSES, BG)


def test_collate_labels_follow_the_flip_and_allow_unlabelled_images():
    world = SyntheticWorld(image_size=64)
    recs = [world.sample(i) for i in range(6)]
    assert any("label" not in r for r in recs)
    train = ImageTransform(64, train=True, scale=(1.0, 1.0), hflip=True)
    plain = ImageTransform(64)
    collate = ClassificationCollate(train, list(CLASSES), patch_grid=4)
    seen = set()
    for seed in range(6):
        rngs = [random.Random(seed * 100 + j) for j in range(len(recs))]
        batch = collate(recs, rngs)
        for j, rec in enumerate(recs):
            image = plain(rec["image"])[0]
            flipped = not torch.allclose(batch["pixel_values"][j], image)
            assert not flipped or torch.allclose(batch["pixel_values"][j], image.flip(-1))
            seen.add(flipped)
            want = patch_labels(rec["objects"], 4, CLASSES, BG, flipped)
            assert batch["patch_labels"][j].tolist() == want
            assert batch["labels"][j].item() == (CLASSES[rec["label"]] if "label" in rec else -100)
    assert seen == {True, False}
    with pytest.raises(ValueError, match="random crops"):
        ClassificationCollate(ImageTransform(64, train=True, scale=(0.5, 1.0)), list(CLASSES), patch_grid=4)


def test_mixed_source_is_fixed_by_position():
    world = SyntheticWorld(image_size=32)
    src = SyntheticSource(world, "train", single_object=0.5)
    singles = [len(src(i)["objects"]) == 1 for i in range(40)]
    assert singles == [len(src(i)["objects"]) == 1 for i in range(40)]
    assert 10 <= sum(singles) <= 36  # half are single-object by draw; the rest sometimes are
    with pytest.raises(ValueError, match="share"):
        SyntheticSource(world, "train", single_object=1.5)


def _dense_vit():
    torch.manual_seed(0)
    return vlkit.create_model("vit", "tiny", num_classes=len(CLASSES), class_names=list(CLASSES),
                              dense_weight=1.0)


def test_dense_loss_learns_and_survives_unlabelled_batches():
    model = _dense_vit()
    assert model.patch_grid == 4
    world = SyntheticWorld(image_size=64)
    recs = [world.sample(i) for i in range(16)]
    collate = ClassificationCollate(ImageTransform(64), list(CLASSES), patch_grid=4)
    batch = collate(recs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        out = model.training_losses(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["patch_loss"].item()
    assert out["patch_loss"].item() < 0.5 * first
    assert out["patch_object_acc"].item() > 0.5
    unlabelled = dict(batch, labels=torch.full_like(batch["labels"], -100))
    out = model.training_losses(unlabelled)
    assert torch.isfinite(out["loss"]) and out["class_loss"].item() == 0.0
    with pytest.raises(ValueError, match="patch_labels"):
        model.training_losses({k: v for k, v in batch.items() if k != "patch_labels"})
    with pytest.raises(ValueError, match="patch_dropout"):
        vlkit.create_model("vit", "tiny", num_classes=4, dense_weight=1.0, patch_dropout=0.5)
