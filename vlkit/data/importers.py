"""Importers of the field's annotation files into a vlkit dataset folder (DESIGN.md's "Dataset
on disk": ``images/`` and ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl``).

- COCO captions (``captions_train2014.json``): ``{"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}``; one record per image, all its captions in
  ``captions`` and the first as ``caption``.
- Karpathy splits (``dataset_coco.json``, ``dataset_flickr30k.json``, as ALBEF, BLIP and LAVIS
  use them): ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``; each
  image goes to its own split, ``restval`` joining ``train``.
- VQA v2: a questions file ``{"questions": [{"image_id", "question", "question_id"}]}`` and an
  annotations file ``{"annotations": [{"question_id", "multiple_choice_answer", "answers",
  "answer_type"}]}``; one record per image, its questions in ``qa`` with ``answer`` (the
  majority answer), ``answers`` (the annotators' ten) and ``type`` (``VQA_TYPES``).

Images are hard-linked into ``images/`` by default (a copy where the file system cannot link):
the folder is self-contained, so the readers' check that images lie inside the dataset holds,
it costs no space, and it survives the original files being moved or deleted. ``copy`` makes
the dataset independent of later in-place edits of the originals; ``symlink`` points at them
(reading it then needs ``--allow-outside-paths``). A new dataset is built in a hidden folder
beside ``out`` and renamed into place when whole; a split added to an existing dataset links its
images first and writes its ``SPLIT.jsonl`` last, by a rename.
"""
from __future__ import annotations

import filecmp
import json
import os
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .jsonl import IMAGE_EXTENSIONS

SPLITS = ("train", "val", "test")
LINKS = ("auto", "hardlink", "copy", "symlink")
# VQA v2 answer_type -> the qa "type" (vqa.<type>_acc): count matches the synthetic world's
VQA_TYPES = {"yes/no": "yes_no", "number": "count", "other": "other"}
MANIFEST = "import.json"


class ImportFormatError(ValueError):
    """An annotation file or image folder that cannot be imported; the message names it."""


@dataclass
class Sample:
    source: Path   # the image file to take
    dest: str      # its path inside the dataset, "images/..."
    record: dict   # the JSONL record without "image"


# -- reading the annotation files -----------------------------------------------------------------

def _read_json(path: str | Path, key: str) -> list:
    """The list under ``key`` of a JSON file, or an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotation file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ImportFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        raise ImportFormatError(f"{path}: expected an object with a \"{key}\" list")
    return obj[key]


def _get(item, field: str, kind, where: str):
    value = item.get(field) if isinstance(item, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ImportFormatError(f"{where}: needs a \"{field}\" ({want}), got {json.dumps(item)[:80]}")
    return value


def _texts(values) -> list[str]:
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _image_dest(name: str, where: str) -> str:
    """``images/NAME`` for an image named in an annotation file; a name that would leave the
    folder (absolute, ``..``) is refused."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise ImportFormatError(f"{where}: image name {name!r} must be a relative path inside --images")
    return "images/" + "/".join(parts)


def coco_samples(captions_json: str | Path, images: str | Path, skipped: Counter) -> list[Sample]:
    """One sample per COCO image with at least one caption (others counted in ``skipped``)."""
    files = {}
    for i, im in enumerate(_read_json(captions_json, "images")):
        where = f"{captions_json}: images[{i}]"
        files[_get(im, "id", (int, str), where)] = _get(im, "file_name", str, where)
    captions: dict = {}
    for i, ann in enumerate(_read_json(captions_json, "annotations")):
        where = f"{captions_json}: annotations[{i}]"
        image_id = _get(ann, "image_id", (int, str), where)
        if image_id not in files:
            raise ImportFormatError(f"{where}: image_id {image_id!r} is not in \"images\"")
        captions.setdefault(image_id, []).extend(_texts([_get(ann, "caption", str, where)]))
    out = []
    for image_id, name in files.items():
        texts = captions.get(image_id)
        if not texts:
            skipped["no caption"] += 1
            continue
        dest = _image_dest(name, f"{captions_json}: image {image_id}")
        out.append(Sample(Path(images) / name, dest,
                          {"caption": texts[0], "captions": texts, "image_id": image_id}))
    return out


def karpathy_samples(path: str | Path, images: str | Path, skipped: Counter) -> dict[str, list[Sample]]:
    """{split: samples} of a Karpathy-split file; ``restval`` joins ``train``."""
    out: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for i, im in enumerate(_read_json(path, "images")):
        where = f"{path}: images[{i}]"
        split = _get(im, "split", str, where)
        split = "train" if split == "restval" else split
        if split not in out:
            raise ImportFormatError(f"{where}: split {split!r} is not train, val, test or restval")
        name = _get(im, "filename", str, where)
        if im.get("filepath"):
            name = f"{_get(im, 'filepath', str, where)}/{name}"
        texts = _texts(s.get("raw") if isinstance(s, dict) else None
                       for s in _get(im, "sentences", list, where))
        if not texts:
            skipped["no caption"] += 1
            continue
        record = {"caption": texts[0], "captions": texts}
        for key in ("cocoid", "imgid"):
            if key in im:
                record[key] = im[key]
        out[split].append(Sample(Path(images) / name, _image_dest(name, where), record))
    return out


def _files_by_id(images: Path) -> dict[int, str]:
    """COCO image files of a folder by the number their name ends with
    (``COCO_val2014_000000000042.jpg`` and ``000000000042.jpg`` are image 42)."""
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images}: no such folder")
    found: dict[int, str] = {}
    for entry in os.scandir(images):
        match = re.search(r"(\d+)$", Path(entry.name).stem)
        if match and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
            image_id = int(match.group(1))
            if image_id in found:
                raise ImportFormatError(f"--images {images}: {found[image_id]} and {entry.name} are both "
                                        f"image {image_id}")
            found[image_id] = entry.name
    return found


def vqa_samples(questions_json: str | Path, annotations_json: str | Path, images: str | Path,
                skipped: Counter, captions_json: str | Path | None = None) -> tuple[list[Sample], bool]:
    """(samples, captioned): one sample per image with its questions in ``qa``. Captions come
    from a COCO captions file of the same images; without one (``captioned`` False) each
    record's caption is its first question, as the format needs a caption."""
    answers = {}
    for i, ann in enumerate(_read_json(annotations_json, "annotations")):
        where = f"{annotations_json}: annotations[{i}]"
        qid = _get(ann, "question_id", (int, str), where)
        answer_type = _get(ann, "answer_type", str, where)
        if answer_type not in VQA_TYPES:
            raise ImportFormatError(f"{where}: answer_type {answer_type!r} is not one of {', '.join(VQA_TYPES)}")
        given = [a.get("answer") if isinstance(a, dict) else a for a in _get(ann, "answers", list, where)]
        answers[qid] = {"answer": _get(ann, "multiple_choice_answer", str, where).strip(),
                        "answers": [a.strip() for a in given if isinstance(a, str)],
                        "type": VQA_TYPES[answer_type]}
    qa: dict = {}
    for i, q in enumerate(_read_json(questions_json, "questions")):
        where = f"{questions_json}: questions[{i}]"
        qid = _get(q, "question_id", (int, str), where)
        if qid not in answers:
            raise ImportFormatError(f"{where}: question_id {qid!r} has no entry in {annotations_json}")
        entry = {"question": _get(q, "question", str, where).strip(), "question_id": qid, **answers[qid]}
        if entry["question"] and entry["answer"]:
            qa.setdefault(_get(q, "image_id", (int, str), where), []).append(entry)
        else:
            skipped["empty question or answer"] += 1
    captioned = captions_json is not None
    if captioned:
        by_id = {s.record["image_id"]: s for s in coco_samples(captions_json, images, skipped)}
    else:
        names = _files_by_id(Path(images))
    out = []
    for image_id, entries in qa.items():
        if captioned:
            if image_id not in by_id:
                raise ImportFormatError(f"{captions_json}: no captions of image {image_id}, which "
                                        f"{questions_json} asks about")
            sample = by_id[image_id]
            sample.record["qa"] = entries
        else:
            name = names.get(int(image_id)) if str(image_id).isdigit() else None
            if name is None:  # reported with the other missing files
                name = f"<image {image_id}>"
            record = {"caption": entries[0]["question"], "image_id": image_id, "qa": entries}
            sample = Sample(Path(images) / name, f"images/{name}", record)
        out.append(sample)
    return out, captioned


# -- splits ---------------------------------------------------------------------------------------

def parse_ratio(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> train/val/test fractions (non-negative, summing to 1)."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1) > 1e-6:
        raise ImportFormatError(f"--split-ratio takes three fractions TRAIN,VAL,TEST summing to 1, got {text!r}")
    return parts


def split_samples(samples: list[Sample], ratio, seed: int = 0) -> dict[str, list[Sample]]:
    """The samples shuffled with ``seed`` and cut by ``ratio`` into train/val/test."""
    order = list(samples)
    random.Random(seed).shuffle(order)
    n_val, n_test = round(len(order) * ratio[1]), round(len(order) * ratio[2])
    n_train = len(order) - n_val - n_test
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


# -- writing the dataset --------------------------------------------------------------------------

def _check_images(splits: dict[str, list[Sample]], images: Path, skip_missing: bool,
                  skipped: Counter) -> dict[str, list[Sample]]:
    """Samples whose image file exists and has an image extension; the others are an error
    naming them, or with ``skip_missing`` left out and counted."""
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images}: no such folder")
    missing, kept = [], {}
    for split, samples in splits.items():
        kept[split] = []
        for s in samples:
            if not s.source.is_file():
                missing.append(s.source)
            elif s.source.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ImportFormatError(f"{s.source}: not an image file (extension {s.source.suffix!r})")
            else:
                kept[split].append(s)
    if missing and not skip_missing:
        names = ", ".join(str(p) for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ImportFormatError(f"{len(missing)} image file(s) missing: {names} (--skip-missing to leave "
                                "their records out)")
    if missing:
        skipped["missing image"] += len(missing)
    return kept


def _place(source: Path, target: Path, link: str) -> str:
    """Put ``source`` at ``target`` by ``link``; returns how ("hardlink", "copy", "symlink")."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if link in ("auto", "hardlink"):
        try:
            os.link(source, target)
            return "hardlink"
        except OSError:
            if link == "hardlink":
                raise
    if link == "symlink":
        os.symlink(source.resolve(), target)
        return "symlink"
    shutil.copy2(source, target)
    return "copy"


def _place_images(root: Path, splits: dict[str, list[Sample]], link: str) -> Counter:
    """Every sample's image under ``root``; an image already there (from an earlier import) is
    kept when it is the same file, and is an error when it differs."""
    how: Counter = Counter()
    for samples in splits.values():
        for s in samples:
            target = root / s.dest
            if target.exists() or target.is_symlink():
                if os.path.samefile(target, s.source) or filecmp.cmp(target, s.source, shallow=False):
                    how["already there"] += 1
                    continue
                raise ImportFormatError(f"{target}: already in the dataset and differs from {s.source}")
            how[_place(s.source, target, link)] += 1
    return how


def _jsonl(samples: list[Sample]) -> bytes:
    lines = [json.dumps({"image": s.dest, **s.record}, ensure_ascii=False) for s in samples]
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _is_dataset(folder: Path) -> bool:
    return (folder / "images").is_dir() and any((folder / f"{s}.jsonl").is_file() for s in SPLITS)


def write_import(out: str | Path, splits: dict[str, list[Sample]], images: str | Path, manifest: dict,
                 link: str = "auto", skip_missing: bool = False, skipped: Counter | None = None) -> dict:
    """Write ``splits`` ({split: samples}) as a dataset folder ``out`` (see the module doc) and
    return the report: records per split, images placed by how, skipped by reason. ``out`` is
    a new or empty folder, or a dataset folder that lacks these splits (they are added)."""
    if link not in LINKS:
        raise ImportFormatError(f"--link must be one of {', '.join(LINKS)}, got {link!r}")
    skipped = Counter() if skipped is None else skipped
    splits = {k: v for k, v in _check_images(splits, Path(images), skip_missing, skipped).items() if v}
    if not splits:
        raise ImportFormatError(f"nothing to import: no record with a caption and an image ({dict(skipped)})")
    out = Path(out).resolve()
    adding = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir():
        raise ImportFormatError(f"--out {out}: is a file, not a folder")
    if adding and not _is_dataset(out):
        raise ImportFormatError(f"--out {out}: the folder is not empty and is not a dataset; give a new folder")
    clash = [f"{s}.jsonl" for s in splits if (out / f"{s}.jsonl").exists()]
    if adding and clash:
        raise ImportFormatError(f"--out {out}: already has {', '.join(clash)}; give a new folder or another --split")
    report = {"records": {k: len(v) for k, v in splits.items()}, "skipped": dict(skipped)}
    if adding:
        report["images"] = dict(_place_images(out, splits, link))
        for split, samples in splits.items():
            _write_file(out / f"{split}.jsonl", _jsonl(samples))
    else:
        report["images"] = _write_new(out, splits, link)
    _write_manifest(out, {**manifest, **report})
    return report


def _write_new(out: Path, splits: dict[str, list[Sample]], link: str) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.import-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        (stage / "images").mkdir(parents=True)
        how = _place_images(stage, splits, link)
        for split, samples in splits.items():
            (stage / f"{split}.jsonl").write_bytes(_jsonl(samples))
        if out.is_dir():
            out.rmdir()  # empty (checked by the caller)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dict(how)


def _write_manifest(out: Path, entry: dict) -> None:
    """``import.json``: one entry per import into the folder."""
    path = out / MANIFEST
    try:
        entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    except (OSError, ValueError):
        entries = []
    _write_file(path, (json.dumps((entries if isinstance(entries, list) else []) + [entry], indent=1)
                       + "\n").encode("utf-8"))


def import_dataset(kind: str, files: list[str], images: str, out: str, split: str | None = None,
                   split_ratio: str | None = None, seed: int = 0, link: str = "auto",
                   skip_missing: bool = False, captions: str | None = None) -> dict:
    """``vlkit import KIND FILES... --images DIR --out DATASET``: read, split, write; the report
    of `write_import` plus ``notes`` for the user."""
    skipped: Counter = Counter()
    notes = []
    if kind == "karpathy":
        if split or split_ratio:
            raise ImportFormatError("a Karpathy file names each image's split: give no --split or --split-ratio")
        splits = karpathy_samples(files[0], images, skipped)
    else:
        if split and split_ratio:
            raise ImportFormatError("give --split NAME or --split-ratio, not both")
        if kind == "coco":
            samples = coco_samples(files[0], images, skipped)
        elif kind == "vqa":
            samples, captioned = vqa_samples(files[0], files[1], images, skipped, captions)
            if not captioned:
                notes.append("no --captions: each record's caption is its first question (fine for VQA "
                             "training and evaluation; give --captions CAPTIONS.json for retrieval or captioning)")
        else:
            raise ImportFormatError(f"unknown annotation format {kind!r} (coco, karpathy, vqa)")
        if split_ratio:  # images checked first: a missing one must not leave a hole in a split
            samples = _check_images({"all": samples}, Path(images), skip_missing, skipped)["all"]
            splits = split_samples(samples, parse_ratio(split_ratio), seed)
        else:
            if (split or "train") not in SPLITS:
                raise ImportFormatError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
            splits = {split or "train": samples}
    manifest = {"format": kind, "annotations": [str(Path(f).resolve()) for f in files],
                "images_from": str(Path(images).resolve()), "link": link}
    report = write_import(out, splits, images, manifest, link, skip_missing, skipped)
    report["notes"] = notes
    return report
