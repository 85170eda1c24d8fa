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

from .collate import false_caption_parts
from .transforms import ImageError, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset line or sample that cannot be used; the message names file and line."""


class TooManyBadSamples(DatasetError):
    """More of the samples are bad than the dataset's ``max_skip_rate`` allows."""


class _SkipCounter:
    """Shared bookkeeping of bad samples for the readers.

    ``skipped`` counts bad samples by reason (each bad line or image once), ``bad_samples``
    maps the index of each sample whose image proved bad to its reason (in the order found),
    and ``skipped_at_start`` holds the counts of lines dropped while the dataset was built.
    With ``max_skip_rate`` set, a `TooManyBadSamples` error stops the reader once the estimated
    fraction of bad samples exceeds it, after ``min_samples`` lines (or images) are checked."""

    def _init_skips(self, on_bad_sample: str, max_skip_rate: float | None = None,
                    min_samples: int = 100):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if max_skip_rate is not None and not 0 <= max_skip_rate <= 1:
            raise ValueError(f"max_skip_rate must lie in [0, 1], got {max_skip_rate}")
        self.on_bad_sample = on_bad_sample
        self.max_skip_rate, self.min_samples = max_skip_rate, min_samples
        self.skipped: Counter = Counter()
        self.skipped_at_start: Counter = Counter()
        self.total = 0
        self.bad_samples: dict[int, str] = {}
        self._seen: bytearray | None = None
        self._checked = 0  # distinct samples whose image was read (or found bad)

    def _finish_scan(self) -> None:
        self.skipped_at_start = Counter(self.skipped)
        self._check_rate()

    def skip_rate(self) -> float:
        """Estimated fraction of bad samples: bad lines, then bad images among those checked."""
        lines_bad = sum(self.skipped_at_start.values())
        line_rate = lines_bad / self.total if self.total else 0.0
        image_rate = len(self.bad_samples) / self._checked if self._checked else 0.0
        return line_rate + (1 - line_rate) * image_rate

    def known_bad_rate(self) -> float:
        """The bad samples found so far (lines and images) over all samples: a lower bound of
        the true rate, exact once every image was read."""
        bad = sum(self.skipped_at_start.values()) + len(self.bad_samples)
        return bad / self.total if self.total else 0.0

    def _check_rate(self) -> None:
        """Stop when the bad samples found so far already exceed the allowed share of all the
        samples (once the dataset has ``min_samples``), or when the rate estimated from the
        images read exceeds it (once ``min_samples`` images were read: a few images read are
        no estimate -- one missing image among the first read is not 100% bad)."""
        if self.max_skip_rate is None or self.on_bad_sample != "skip":
            return
        rate = None
        if self.total >= self.min_samples and self.known_bad_rate() > self.max_skip_rate:
            rate = self.known_bad_rate()
        elif self._checked >= self.min_samples and self.skip_rate() > self.max_skip_rate:
            rate = self.skip_rate()
        if rate is not None:
            raise TooManyBadSamples(
                f"{self._source}: {rate:.1%} of the samples are bad, more than the allowed "
                f"{self.max_skip_rate:.1%} (max_skip_rate); {self.summary()}")

    def _mark(self, j: int) -> None:
        if self._seen is None:
            self._seen = bytearray(len(self))
        if not self._seen[j]:
            self._seen[j] = 1
            self._checked += 1

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
            if j in self.bad_samples:
                continue
            try:
                rec = read(j)
            except DatasetError as e:
                self.bad_samples[j] = e.reason
                self.skipped[e.reason] += 1
                self._mark(j)
                self._check_rate()
                continue
            self._mark(j)
            return rec
        raise DatasetError(f"{self._source}: no readable sample left ({self.summary()})")


def _error(reason: str, message: str) -> DatasetError:
    e = DatasetError(message)
    e.reason = reason
    return e


OUTSIDE = "image outside the dataset"


def check_inside(root: str, image: str, where: str) -> None:
    """Refuse an image path that leads out of the dataset folder ``root``: an absolute path,
    ``..`` components, or a symbolic link (of the path or of any folder on it) resolving
    elsewhere. A dataset is often someone else's: its lines must not make vlkit read (train on,
    pack into shards) any file the user can read. ``--allow-outside-paths`` (``allow_outside``)
    turns the check off for datasets that really keep their images elsewhere."""
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, image))
    if os.path.commonpath([base, path]) != base:
        raise _error(OUTSIDE, f"{where}: image {image!r} lies outside the dataset folder {root} "
                              "(--allow-outside-paths to read it anyway)")


def check_optional_fields(rec: dict, where: str) -> None:
    """The optional fields that training and evaluation read (DESIGN.md's dataset format) must
    have their shapes, or the line is bad (reason "bad field"), named with file, line and field:
    ``captions`` a list of non-empty strings, ``negatives`` a list of {"caption": str,
    "kind": str}, ``qa`` a list of {"question": str, "answer": str (or "answers": [str]),
    "type": str (optional)}, ``label`` a non-empty string, ``false_captions`` a list of
    {"caption": str, "false_from": the offset of a word's first character in it}. A string
    where a list belongs would be read letter by letter."""
    def bad(field: str, want: str, got) -> DatasetError:
        return _error("bad field", f"{where}: \"{field}\" must be {want}, got "
                                   f"{type(got).__name__} {json.dumps(got)[:40]}")

    def text(value) -> bool:
        return isinstance(value, str) and bool(value.strip())
    captions = rec.get("captions")
    if captions is not None:
        if not isinstance(captions, list) or not all(text(c) for c in captions):
            raise bad("captions", "a list of non-empty strings", captions)
    negatives = rec.get("negatives")
    if negatives is not None:
        if not isinstance(negatives, list):
            raise bad("negatives", "a list", negatives)
        for i, n in enumerate(negatives):
            if not isinstance(n, dict) or not text(n.get("caption")) or not text(n.get("kind")):
                raise bad(f"negatives[{i}]", 'an object with "caption" and "kind" strings', n)
    false = rec.get("false_captions")
    if false is not None:
        if not isinstance(false, list):
            raise bad("false_captions", "a list", false)
        for i, f in enumerate(false):
            if false_caption_parts(f) is None:
                raise bad(f"false_captions[{i}]", 'an object with a "caption" string and "false_from", '
                                                  "the offset of a word's first character in it", f)
    qa = rec.get("qa")
    if qa is not None:
        if not isinstance(qa, list):
            raise bad("qa", "a list", qa)
        for i, q in enumerate(qa):
            answers = q.get("answers") if isinstance(q, dict) else None
            ok = isinstance(q, dict) and text(q.get("question")) and (
                isinstance(q.get("answer"), str) or (isinstance(answers, list) and answers
                                                     and all(isinstance(a, str) for a in answers)))
            if not ok or (isinstance(q, dict) and q.get("type") is not None and not text(q.get("type"))):
                raise bad(f"qa[{i}]", 'an object with "question" and "answer" strings '
                                      '(or an "answers" list)', q)
    label = rec.get("label")
    if label is not None and not text(label):
        raise bad("label", "a non-empty string", label)


def check_caption(caption, where: str) -> None:
    """A caption must be a non-empty string; the message says which of the two it is not."""
    if caption is None:
        raise _error("missing caption", f"{where}: record has no \"caption\"")
    if not isinstance(caption, str):
        raise _error("caption not a string", f"{where}: \"caption\" must be a string, got "
                                             f"{type(caption).__name__} {json.dumps(caption)[:40]}")
    if not caption.strip():
        raise _error("empty caption", f"{where}: empty caption")


class JsonlDataset(_SkipCounter, Dataset):
    """Records of `root/<split>.jsonl` (or of the .jsonl file `root` itself).

    `ds[i]` is the record dict with "image" replaced by the PIL image (from `image_loader`)
    and "image_path" added (the resolved path).
    """

    def __init__(self, root, split: str = "train", on_bad_sample: str = "error",
                 image_loader: Callable = load_image, max_skip_rate: float | None = None,
                 min_samples: int = 100, allow_outside: bool = False):
        self._init_skips(on_bad_sample, max_skip_rate, min_samples)
        self.allow_outside = allow_outside
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
        with open(self.path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                self.total += 1
                try:
                    rec = self._parse(self._decode(raw, lineno), lineno)
                except DatasetError as e:
                    if self.on_bad_sample == "error":
                        raise
                    self.skipped[e.reason] += 1
                    continue
                self.records.append(rec)
                self.lines.append(lineno)
        self._finish_scan()

    def _decode(self, raw: bytes, lineno: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _error("bad encoding", f"{self.path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                                         f"at offset {e.start})") from None

    def _parse(self, line: str, lineno: int) -> dict:
        where = f"{self.path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error("bad json", f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise _error("bad json", f"{where}: expected a JSON object, got {type(rec).__name__}")
        image = rec.get("image")
        if image is not None and not isinstance(image, str):
            raise _error("no image field", f"{where}: \"image\" must be a path (a string), "
                                           f"got {type(image).__name__}")
        if not isinstance(image, str) or not image.strip():
            raise _error("no image field", f"{where}: record has no \"image\" path")
        if "\0" in image:
            raise _error("no image field", f"{where}: \"image\" path holds a NUL character")
        if not self.allow_outside:
            check_inside(self.root, image, where)
        check_caption(rec.get("caption"), where)
        check_optional_fields(rec, where)
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
            raise _error(getattr(e, "reason", "corrupt image"),
                         f"{where}: cannot read image {path}: {e}") from None
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

    def __init__(self, root, on_bad_sample: str = "error", image_loader: Callable = load_image,
                 allow_outside: bool = False):
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
                if not allow_outside:  # a symbolic link out of the folder
                    check_inside(self.root, name, path)
                    check_inside(self.root, stem + ".txt", txt)
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
        self._finish_scan()

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, i: int) -> dict:
        path, caption = self.items[i]
        try:
            image = self.image_loader(path)
        except (ImageError, OSError) as e:
            raise _error(getattr(e, "reason", "corrupt image"), f"cannot read image {path}: {e}") from None
        return {"image": image, "caption": caption, "image_path": path}

    def __getitem__(self, i: int) -> dict:
        return self._get(i, self._read)
