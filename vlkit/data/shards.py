"""Webdataset-format shards: plain tar files written and read with Python's ``tarfile``.

A shard folder holds ``{split}-000000.tar``, ``{split}-000001.tar``, ...; each sample is two
consecutive members sharing a key: ``KEY.json`` (the dataset record, the JSONL line's bytes
unchanged, its "image" field still the original relative path) and ``KEY.<ext>`` (the original
image file's bytes, under its own extension). Members carry no owner, time or mode variation,
so writing the same dataset twice gives identical shards.

Readers
- `ShardDataset`: random access to every sample of a split (an index of member offsets is
  built from the tar headers; records are parsed and checked up front, images read on access),
  with the same bad-sample handling as `JsonlDataset` (``on_bad_sample``, ``max_skip_rate``).
- `ShardSource`: sample ``i`` of an endless, seeded stream over a `ShardDataset` in which each
  epoch visits the shards in a shuffled order and the samples of each shard in a shuffled
  order (shard and sample shuffling; reads stay within one shard at a time). Being addressed
  by position, it gives training its exact resume and per-rank slices (`vlkit train`).
- `ShardStream`: a streaming ``IterableDataset`` (webdataset style) that splits the shards
  between ranks and DataLoader workers, reads each tar front to back and shuffles samples in
  a seeded buffer; for pipelines that need no positional resume.
"""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .jsonl import (DatasetError, JsonlDataset, _error, _SkipCounter, check_caption,
                    check_optional_fields)
from .transforms import ImageError, load_image

SHARD_FORMAT = "{split}-{index:06d}.tar"


def shard_paths(root, split: str = "train") -> list[Path]:
    """The split's shards in order (``{split}-000000.tar``, ...)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{split}-*.tar")
                  if p.stem[len(split) + 1:].isdigit())


def is_shard_folder(root, split: str = "train") -> bool:
    return bool(shard_paths(root, split))


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def shard_folder_strangers(out) -> list[str]:
    """What a shard output folder holds besides shards (``*-NNNNNN.tar``) and vlkit's hidden
    staging folders: ``vlkit shard`` refuses such a folder rather than mix shards into it."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if not p.name.startswith(".") and not (
                      p.is_file() and p.suffix == ".tar" and p.stem.rpartition("-")[2].isdigit()))


def write_shard_splits(dataset, out, splits, shard_size: int = 1000,
                       on_bad_sample: str = "error", allow_outside: bool = False) -> dict:
    """Write each of ``splits`` of the JSONL dataset folder ``dataset`` as tar shards into
    ``out``: every split is written to a staging folder inside ``out`` first, and only when all
    of them were read through without an error do their shards replace the old ones of the same
    splits (shards of other splits stay). An error leaves ``out`` as it was.
    Returns {split: write_shards' result}."""
    import shutil
    import tempfile
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".shards-staging-", dir=out))
    try:
        results = {split: write_shards(dataset, stage, split, shard_size, on_bad_sample, allow_outside)
                   for split in splits}
        for split, res in results.items():
            if not res["samples"]:
                raise ValueError(f"{Path(dataset) / (split + '.jsonl')}: no samples to shard "
                                 f"({res['skipped'] or 'the file is empty'})")
        for split, res in results.items():  # the data checked out: replace the old shards
            old = shard_paths(out, split)
            new = [out / Path(p).name for p in res["shards"]]
            for p in res["shards"]:
                os.replace(p, out / Path(p).name)
            for p in old:
                if p not in new:
                    p.unlink()
            res["shards"] = [str(p) for p in new]
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return results


def write_shards(dataset, out, split: str = "train", shard_size: int = 1000,
                 on_bad_sample: str = "error", allow_outside: bool = False) -> dict:
    """Write the JSONL dataset folder ``dataset``'s split as tar shards into ``out`` (see
    ``write_shard_splits`` for a rewrite that keeps the old shards until the new are whole).

    Returns {"shards": [paths], "samples": n, "skipped": {reason: n}}. Lines that fail the
    dataset's checks, and records whose image file is missing or empty, are an error naming
    file and line, or skipped and counted with ``on_bad_sample="skip"`` (images are not
    decoded here; the reader checks them). Image paths that lead out of the dataset folder are
    refused like bad lines unless ``allow_outside`` (see `vlkit.data.jsonl.check_inside`)."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    ds = JsonlDataset(dataset, split, on_bad_sample=on_bad_sample, allow_outside=allow_outside)
    with open(ds.path, "rb") as fh:
        raw_lines = fh.read().splitlines()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in shard_paths(out, split):  # a rewrite leaves no stale shard behind
        old.unlink()
    skipped = Counter(ds.skipped)
    shards: list[Path] = []
    tar, n = None, 0

    def close():
        if tar is not None:
            tar.close()
            os.replace(tmp, shards[-1])

    for i, rec in enumerate(ds.records):
        lineno = ds.lines[i]
        path = ds.image_path(i)
        try:
            if not os.path.isfile(path):
                raise _error("missing image", f"{ds.path}:{lineno}: image {path} not found")
            with open(path, "rb") as f:
                image = f.read()
            if not image:
                raise _error("empty image file", f"{ds.path}:{lineno}: image {path} is empty (0 bytes)")
        except DatasetError as e:
            if on_bad_sample == "error":
                raise
            skipped[e.reason] += 1
            continue
        if n % shard_size == 0:
            close()
            shards.append(out / SHARD_FORMAT.format(split=split, index=len(shards)))
            tmp = shards[-1].with_name(f".{shards[-1].name}.tmp{os.getpid()}")
            tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        key = f"{n:09d}"
        ext = os.path.splitext(path)[1].lower().lstrip(".") or "img"
        for name, data in ((f"{key}.json", raw_lines[lineno - 1].strip()), (f"{key}.{ext}", image)):
            info, fileobj = _member(name, data)
            tar.addfile(info, fileobj)
        n += 1
    close()
    return {"shards": [str(p) for p in shards], "samples": n, "skipped": dict(skipped)}


def _key_ext(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    key, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), key), ext.lower()


def _samples_of(members, value=lambda m: m) -> Iterator[tuple[str, dict]]:
    """Group consecutive tar members by key: (key, {ext: value(member)}). ``value`` runs as each
    member is met (a streamed tar must have a member's bytes read before it moves on)."""
    key, group = None, {}
    for m in members:
        if not m.isfile():
            continue
        k, ext = _key_ext(m.name)
        if k != key and group:
            yield key, group
            group = {}
        key = k
        group[ext] = value(m)
    if group:
        yield key, group


class ShardDataset(_SkipCounter, Dataset):
    """Every sample of a split's shards, by index (shard order, then order within a shard).

    ``ds[i]`` is the record with "image" replaced by the PIL image and "image_path" set to
    ``SHARD#MEMBER``. Records are checked as `JsonlDataset` checks lines (bad JSON, no image
    field, missing or empty caption, and a sample without an image member)."""

    def __init__(self, root, split: str = "train", on_bad_sample: str = "error",
                 max_skip_rate: float | None = None, min_samples: int = 100):
        self._init_skips(on_bad_sample, max_skip_rate, min_samples)
        self.root, self.split = Path(root), split
        self.shards = shard_paths(root, split)
        self._source = str(self.root / SHARD_FORMAT.format(split=split, index=0)).replace("000000", "*")
        if not self.shards:
            raise DatasetError(f"{root}: no {split}-NNNNNN.tar shards")
        self.records: list[dict] = []
        self.index: list[tuple[int, str, int, int]] = []  # (shard, member name, offset, size)
        self.shard_ranges: list[range] = []  # the sample indices of each shard
        for s, path in enumerate(self.shards):
            first = len(self.records)
            try:
                with tarfile.open(path, "r:") as tar:
                    for key, group in _samples_of(tar.getmembers()):
                        self.total += 1
                        try:
                            rec, image = self._check(tar, path, key, group)
                        except DatasetError as e:
                            if self.on_bad_sample == "error":
                                raise
                            self.skipped[e.reason] += 1
                            continue
                        self.records.append(rec)
                        self.index.append((s, image.name, image.offset_data, image.size))
            except tarfile.TarError as e:
                raise DatasetError(f"{path}: not a readable tar shard ({e})") from None
            self.shard_ranges.append(range(first, len(self.records)))
        self._files: dict[int, object] = {}
        self._pid = os.getpid()
        self._finish_scan()

    def _check(self, tar, path, key, group) -> tuple[dict, tarfile.TarInfo]:
        where = f"{path}#{key}"
        if "json" not in group:
            raise _error("bad json", f"{where}: sample has no .json record")
        raw = tar.extractfile(group["json"]).read()
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise _error("bad encoding", f"{where}.json: not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise _error("bad json", f"{where}.json: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise _error("bad json", f"{where}.json: expected a JSON object")
        check_caption(rec.get("caption"), f"{where}.json")
        check_optional_fields(rec, f"{where}.json")
        images = [m for ext, m in group.items() if ext != "json"]
        if not images:
            raise _error("missing image", f"{where}: sample has no image member")
        return rec, images[0]

    def __len__(self) -> int:
        return len(self.records)

    def _file(self, s: int):
        if os.getpid() != self._pid:  # a forked DataLoader worker opens its own handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(s)
        if f is None:
            for old in list(self._files.values()):  # one open shard at a time per process
                old.close()
            self._files = {s: open(self.shards[s], "rb")}
            f = self._files[s]
        return f

    def image_bytes(self, i: int) -> bytes:
        s, _, offset, size = self.index[i]
        f = self._file(s)
        f.seek(offset)
        return f.read(size)

    def _read(self, i: int) -> dict:
        s, name, _, _ = self.index[i]
        where = f"{self.shards[s]}#{name}"
        try:
            image = load_image(io.BytesIO(self.image_bytes(i)), name=where)
        except (ImageError, OSError) as e:
            raise _error(getattr(e, "reason", "corrupt image"), f"cannot read image {where}: {e}") from None
        rec = dict(self.records[i])
        rec["image"], rec["image_path"] = image, where
        return rec

    def __getitem__(self, i: int) -> dict:
        return self._get(i, self._read)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


class ShardSource:
    """Sample ``i`` of an endless stream over a `ShardDataset`: epoch ``i // N`` visits the
    shards in a seeded shuffled order and each shard's samples in a seeded shuffled order."""

    def __init__(self, dataset: ShardDataset, seed: int = 0, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError(f"{dataset.root}: the shards hold no usable sample")
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self._epoch, self._order = -1, None

    @property
    def bad_samples(self) -> dict[int, str]:
        return self.dataset.bad_samples

    def epoch_order(self, epoch: int) -> list[int]:
        """The dataset indices in the order epoch ``epoch`` reads them."""
        rng = random.Random(self.seed * 100_003 + epoch)
        shards = list(range(len(self.dataset.shard_ranges)))
        if self.shuffle:
            rng.shuffle(shards)
        order = []
        for s in shards:
            samples = list(self.dataset.shard_ranges[s])
            if self.shuffle:
                rng.shuffle(samples)
            order.extend(samples)
        return order

    def __call__(self, i: int) -> dict:
        epoch, offset = divmod(i, len(self.dataset))
        if epoch != self._epoch:
            self._order, self._epoch = self.epoch_order(epoch), epoch
        return self.dataset[self._order[offset]]


class ShardStream(IterableDataset):
    """Stream samples (record dicts with "image" a PIL image) from a split's shards.

    Each epoch shuffles the shard list (seeded by ``seed`` and the epoch); shard ``k`` of that
    list goes to the reader ``k % (world * workers)``, where a reader is one DataLoader worker
    of one rank, so every shard is read once per epoch by exactly one reader. Samples pass a
    shuffle buffer of ``buffer`` entries (seeded per epoch and reader). ``epochs=None`` streams
    for ever. Bad samples follow ``on_bad_sample`` ("error" raises `DatasetError` naming the
    shard and member; "skip" drops them and counts them in ``self.skipped`` of that reader).
    """

    def __init__(self, root, split: str = "train", seed: int = 0, buffer: int = 1000,
                 rank: int = 0, world: int = 1, epochs: int | None = 1, decode: bool = True,
                 on_bad_sample: str = "error"):
        self.shards = self._list_shards(root, split)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.seed, self.buffer, self.rank, self.world = seed, max(1, buffer), rank, world
        self.epochs, self.decode, self.on_bad_sample = epochs, decode, on_bad_sample
        self.skipped: Counter = Counter()

    def _list_shards(self, root, split: str) -> list:
        shards = shard_paths(root, split)
        if not shards:
            raise DatasetError(f"{root}: no {split}-NNNNNN.tar shards")
        return shards

    def _open(self, path):
        """A readable binary file of the shard (read front to back, never seeked)."""
        return open(path, "rb")

    def _samples(self, path) -> Iterator[dict]:
        with self._open(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:  # front to back
            for key, group in _samples_of(tar, lambda m: tar.extractfile(m).read()):
                yield from self._decode(path, key, group)

    def _decode(self, path, key, group: dict) -> Iterator[dict]:
        where = f"{path}#{key}"
        try:
            if "json" not in group:
                raise _error("bad json", f"{where}: sample has no .json record")
            try:
                rec = json.loads(group["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _error("bad json", f"{where}.json: unreadable record ({e})") from None
            if not isinstance(rec, dict):
                raise _error("bad json", f"{where}.json: expected a JSON object")
            check_caption(rec.get("caption"), f"{where}.json")
            check_optional_fields(rec, f"{where}.json")
            exts = [e for e in group if e != "json"]
            if not exts:
                raise _error("missing image", f"{where}: sample has no image member")
            data = group[exts[0]]
            name = f"{where}.{exts[0]}"
            if self.decode:
                try:
                    rec["image"] = load_image(io.BytesIO(data), name=name)
                except ImageError as e:
                    raise _error(e.reason, str(e)) from None
            else:
                rec["image"] = data
            rec["image_path"], rec["__key__"] = name, key
        except DatasetError as e:
            if self.on_bad_sample == "error":
                raise
            self._skip(e)
            return
        yield rec

    def _skip(self, error: DatasetError) -> None:
        """Count a bad sample skipped under ``on_bad_sample="skip"``."""
        self.skipped[error.reason] += 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world * workers
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = list(self.shards)
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            mine = order[reader::readers]
            rng = random.Random((self.seed * 100_003 + epoch) * 1_000 + reader)
            buf: list[dict] = []
            for path in mine:
                for rec in self._samples(path):
                    if len(buf) < self.buffer:
                        buf.append(rec)
                        continue
                    j = rng.randrange(len(buf))
                    buf[j], rec = rec, buf[j]
                    yield rec
            rng.shuffle(buf)
            yield from buf
            epoch += 1


__all__ = ["write_shards", "shard_paths", "is_shard_folder", "ShardDataset", "ShardSource",
           "ShardStream"]
