"""Records (dicts in the dataset format) -> model batches of tensors."""
from __future__ import annotations

import random

import torch


class ClassificationCollate:
    """{"image", "label"} records -> {"pixel_values": (B,3,H,W), "labels": (B,)}."""

    def __init__(self, transform, classes: list[str]):
        self.transform = transform
        self.index = {name: i for i, name in enumerate(classes)}

    def __call__(self, records: list[dict], rngs: list[random.Random] | None = None) -> dict:
        pixels, labels = [], []
        for j, rec in enumerate(records):
            label = rec.get("label")
            if label not in self.index:
                raise ValueError(f"record {rec.get('image', j)!r}: label {label!r} is not one of "
                                 f"the {len(self.index)} classes")
            pixels.append(self.transform(rec["image"], None, rngs[j] if rngs else None)[0])
            labels.append(self.index[label])
        return {"pixel_values": torch.stack(pixels), "labels": torch.tensor(labels)}


class ImageTextCollate:
    """Image-caption records -> pixels + tokenised captions.

    In training one reference caption is drawn per image (from ``captions`` when present). With
    ``negatives > 0`` up to that many of the record's ``negatives`` captions are added per image
    as ``neg_input_ids`` / ``neg_attention_mask`` with ``neg_owner`` (the image each belongs to).
    A horizontal flip swaps left/right in the caption and its negatives alike.
    """

    def __init__(self, transform, tokenizer, max_length: int | None = None, negatives: int = 0,
                 random_caption: bool = True):
        self.transform, self.tokenizer = transform, tokenizer
        self.max_length, self.negatives, self.random_caption = max_length, negatives, random_caption

    def __call__(self, records: list[dict], rngs: list[random.Random] | None = None) -> dict:
        pixels, captions, negs, owners = [], [], [], []
        for j, rec in enumerate(records):
            rng = rngs[j] if rngs else random.Random(0)
            options = rec.get("captions") or [rec["caption"]]
            caption = rng.choice(options) if self.random_caption else rec["caption"]
            chosen = []
            if self.negatives:
                pool = [n["caption"] for n in rec.get("negatives") or []]
                chosen = rng.sample(pool, min(self.negatives, len(pool)))
            pixel, texts = self.transform(rec["image"], [caption] + chosen, rng)
            pixels.append(pixel)
            captions.append(texts[0])
            negs.extend(texts[1:])
            owners.extend([j] * len(chosen))
        batch = {"pixel_values": torch.stack(pixels)}
        batch.update(self._tokens(captions))
        if self.negatives:
            if negs:
                t = self._tokens(negs)
                batch["neg_input_ids"], batch["neg_attention_mask"] = t["input_ids"], t["attention_mask"]
            else:
                batch["neg_input_ids"] = torch.zeros(0, 1, dtype=torch.long)
                batch["neg_attention_mask"] = torch.zeros(0, 1, dtype=torch.long)
            batch["neg_owner"] = torch.tensor(owners, dtype=torch.long)
        return batch

    def _tokens(self, texts: list[str]) -> dict:
        out = self.tokenizer(texts, max_length=self.max_length, padding="longest")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
