"""Readers of datasets on disk.

`JsonlDataset` reads the DESIGN.md format: a folder with `images/` and `<split>.jsonl`, one
JSON object a line, at least {"image": "images/000001.png", "caption": "..."} with the image
path relative to the folder; optional fields (captions, negatives, qa, label, objects,
heldout, ...) are passed through untouched.

Bad samples: with on_bad_sample="error" (default) the first bad line or image raises
`DatasetError` naming the file and line (and the image path); with "skip" it is skipped and
counted in `.skipped` (a Counter of reasons), which `.summary()` reports in one line. Lines
are checked when the dataset is built; images when they are read. Under "skip", a sample
whose image cannot be read is replaced by the next readable one (wrapping around), so a
DataLoader never sees a hole. Each DataLoader worker counts its own skips.

`FolderDataset` reads a plain folder of images with same-name `.txt` captions.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Callable

from torch.utils.data import Dataset

from .transforms import ImageError, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset line or sample that cannot be used; the message names file and line."""


class _SkipCounter:
    """Shared bookkeeping of bad samples for both readers."""

    def _init_skips(self, on_bad_sample: str):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.on_bad_sample = on_bad_sample
        self.skipped: Counter = Counter()
        self.total = 0
        self._bad: set[int] = set()

    def summary(self) -> str:
        """One line, e.g. 'skipped 3 of 100 samples: 2 missing image, 1 empty caption'."""
        n = sum(self.skipped.values())
        head = f"skipped {n} of {self.total} samples"
        if not n:
            return head
        return head + ": " + ", ".join(f"{c} {reason}" for reason, c in self.skipped.most_common())

    def _get(self, i: int, read: Callable[[int], dict]) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        i %= n
        if self.on_bad_sample == "error":
            return read(i)
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                return read(j)
            except DatasetError as e:
                self._bad.add(j)
                self.skipped[e.reason] += 1
        raise DatasetError(f"{self._source}: no readable sample left ({self.summary()})")


def _error(reason: str, message: str) -> DatasetError:
    e = DatasetError(message)
    e.reason = reason
    return e


class JsonlDataset(_SkipCounter, Dataset):
    """Records of `root/<split>.jsonl` (or of the .jsonl file `root` itself).

    `ds[i]` is the record dict with "image" replaced by the PIL image (from `image_loader`)
    and "image_path" added (the resolved path).
    """

    def __init__(self, root, split: str = "train", on_bad_sample: str = "error",
                 image_loader: Callable = load_image):
        self._init_skips(on_bad_sample)
        root = os.fspath(root)
        if root.endswith(".jsonl") and os.path.isfile(root):
            self.path, self.root = root, os.path.dirname(os.path.abspath(root))
        else:
            self.path, self.root = os.path.join(root, f"{split}.jsonl"), root
        self._source = self.path
        self.split, self.image_loader = split, image_loader
        if not os.path.isfile(self.path):
            raise DatasetError(f"{self.path}: no such dataset file")
        self.records: list[dict] = []
        self.lines: list[int] = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                self.total += 1
                try:
                    rec = self._parse(line, lineno)
                except DatasetError as e:
                    if self.on_bad_sample == "error":
                        raise
                    self.skipped[e.reason] += 1
                    continue
                self.records.append(rec)
                self.lines.append(lineno)

    def _parse(self, line: str, lineno: int) -> dict:
        where = f"{self.path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error("bad json", f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise _error("bad json", f"{where}: expected a JSON object, got {type(rec).__name__}")
        image = rec.get("image")
        if not isinstance(image, str) or not image.strip():
            raise _error("no image field", f"{where}: record has no \"image\" path")
        caption = rec.get("caption")
        if caption is None:
            raise _error("missing caption", f"{where}: record has no \"caption\"")
        if not isinstance(caption, str) or not caption.strip():
            raise _error("empty caption", f"{where}: empty caption")
        return rec

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, i: int) -> str:
        p = self.records[i]["image"]
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def _read(self, i: int) -> dict:
        path = self.image_path(i)
        where = f"{self.path}:{self.lines[i]}"
        if not os.path.exists(path):
            raise _error("missing image", f"{where}: image {path} not found")
        try:
            image = self.image_loader(path)
        except (ImageError, OSError) as e:
            raise _error("corrupt image", f"{where}: cannot read image {path}: {e}") from None
        rec = dict(self.records[i])
        rec["image"], rec["image_path"] = image, path
        return rec

    def __getitem__(self, i: int) -> dict:
        return self._get(i, self._read)


class FolderDataset(_SkipCounter, Dataset):
    """A folder of images, each with a same-name .txt caption (`cat.jpg` + `cat.txt`).

    Items are {"image": PIL image, "caption": str, "image_path": str}, sorted by file name.
    An image without a caption file or with an empty one is an error, or skipped and counted.
    """

    def __init__(self, root, on_bad_sample: str = "error", image_loader: Callable = load_image):
        self._init_skips(on_bad_sample)
        self.root = self._source = os.fspath(root)
        self.image_loader = image_loader
        if not os.path.isdir(self.root):
            raise DatasetError(f"{self.root}: no such folder")
        self.items: list[tuple[str, str]] = []
        for name in sorted(os.listdir(self.root)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            self.total += 1
            path = os.path.join(self.root, name)
            txt = os.path.join(self.root, stem + ".txt")
            try:
                if not os.path.isfile(txt):
                    raise _error("missing caption", f"{path}: no caption file {txt}")
                with open(txt, encoding="utf-8", errors="replace") as fh:
                    caption = fh.read().strip()
                if not caption:
                    raise _error("empty caption", f"{txt}: empty caption")
            except DatasetError as e:
                if self.on_bad_sample == "error":
                    raise
                self.skipped[e.reason] += 1
                continue
            self.items.append((path, caption))

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, i: int) -> dict:
        path, caption = self.items[i]
        try:
            image = self.image_loader(path)
        except (ImageError, OSError) as e:
            raise _error("corrupt image", f"cannot read image {path}: {e}") from None
        return {"image": image, "caption": caption, "image_path": path}

    def __getitem__(self, i: int) -> dict:
        return self._get(i, self._read)
