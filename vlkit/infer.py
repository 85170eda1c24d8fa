"""Inference over a user's images: the ``vlkit zero-shot``, ``caption``, ``vqa`` and ``match``
commands.

``expand_images`` turns files, folders (searched recursively for image extensions) and glob
patterns into a list of image paths; ``ImageBatches`` reads them in batches (with a progress
bar on large inputs); each task function runs one ``Pipeline`` call per batch and returns a
result dict (``{"command", "model", "images", "skipped", "results", ...}``) that
``format_table`` prints as an aligned table and ``--json`` prints as it is.

Bad inputs: a path or pattern that matches nothing is an error naming it; a file that is not
an image is ignored inside a folder or pattern (by its extension) and an error when named
alone; an image that cannot be read is an error naming it, or with ``skip_bad`` skipped and
counted (``result["skipped"]``: each path with its reason).
"""
from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .data.jsonl import IMAGE_EXTENSIONS
from .data.transforms import ImageError, load_image
from .pipeline import Pipeline, Unsupported

PROGRESS_MIN_IMAGES = 64  # fewer images than this: no progress bar
DEFAULT_BATCH_SIZE = 32
_GLOB_CHARS = "*?["


# ---- inputs -------------------------------------------------------------------------------

class ImageList(list):
    """Image paths (str) in input order, each once; ``skipped`` holds (path, reason) for the
    files found unreadable (with ``skip_bad``)."""

    def __init__(self, paths=(), skipped=()):
        super().__init__(paths)
        self.skipped: list[tuple[str, str]] = list(skipped)


def _is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _folder_images(folder: str) -> list[str]:
    """The image files under ``folder`` (recursively, by extension), sorted; hidden entries
    (".name") are left out."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and _is_image_name(f)]
    return found


def _expand_one(item: str) -> list[str]:
    """One command-line input -> image paths; nothing found is a ValueError naming it."""
    if os.path.isdir(item):
        found = _folder_images(item)
        if not found:
            raise ValueError(f"{item}: no images in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return found
    if os.path.exists(item):  # a file named alone is read whatever its extension
        return [item]
    if any(c in item for c in _GLOB_CHARS):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise ValueError(f"{item}: no file matches this pattern")
        found = [p for m in matches for p in (_folder_images(m) if os.path.isdir(m) else [m])
                 if os.path.isdir(m) or _is_image_name(p)]
        if not found:
            raise ValueError(f"{item}: matches {len(matches)} files, none of them an image "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        return found
    raise ValueError(f"{item}: no such file or folder")


def check_image(path: str) -> None:
    """An ImageError naming ``path`` unless it opens as an image (its header is read, not its
    pixels: a truncated file is found when it is loaded)."""
    from PIL import Image
    try:
        if not os.path.isfile(path):  # a FIFO or device would block
            raise ImageError(f"{path}: not a regular file", "unreadable file")
        if os.path.getsize(path) == 0:
            raise ImageError(f"{path}: empty file (0 bytes)", "empty image file")
        with Image.open(path):
            pass
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except OSError as e:
        if e.errno is not None:  # the operating system's: no permission, a folder, an I/O error
            raise ImageError(f"{path}: cannot be read ({e.strerror})", "unreadable file") from None
        raise ImageError(f"{path}: corrupt image ({e})") from None
    except (SyntaxError, ValueError, EOFError) as e:  # PIL's parsers on a damaged header
        raise ImageError(f"{path}: corrupt image ({e})") from None


def expand_images(inputs: str | Sequence[str], skip_bad: bool = False) -> ImageList:
    """Files, folders (recursively: files with an image extension) and glob patterns
    (``photos/**/*.jpg``) -> an ``ImageList`` of paths, in input order, each once. An input
    that matches nothing is a ValueError naming it. Every file's header is checked: one that is
    not an image is an ``ImageError`` naming it, or with ``skip_bad`` left out and listed in
    ``.skipped``."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise ValueError("no images given")
    out, seen = ImageList(), set()
    for item in items:
        for path in _expand_one(os.fspath(item)):
            key = os.path.realpath(path)
            if key in seen:
                continue
            seen.add(key)
            try:
                check_image(path)
            except ImageError as e:
                if not skip_bad:
                    raise
                out.skipped.append((path, e.reason))
                continue
            out.append(path)
    if not out:
        raise ValueError(f"none of the {len(out.skipped)} images could be read "
                         f"(first: {out.skipped[0][0]}, {out.skipped[0][1]})")
    return out


def load_images(paths: Sequence[str], skip_bad: bool = False) -> tuple[list, list[str], list[tuple[str, str]]]:
    """(PIL images, their paths, skipped (path, reason)): each image decoded as RGB; one that
    cannot be is an ``ImageError`` naming it, or with ``skip_bad`` skipped."""
    images, kept, skipped = [], [], []
    for path in paths:
        try:
            images.append(load_image(path))
        except ImageError as e:
            if not skip_bad:
                raise
            skipped.append((path, e.reason))
            continue
        kept.append(path)
    return images, kept, skipped


@dataclass
class ImageBatches:
    """The images of ``paths`` in batches of (paths, PIL images), with a tqdm bar on stderr when
    ``progress`` and there are at least ``PROGRESS_MIN_IMAGES``; images skipped while reading
    are added to ``skipped``."""
    paths: ImageList
    batch_size: int = DEFAULT_BATCH_SIZE
    skip_bad: bool = False
    progress: bool = True
    desc: str = "images"
    skipped: list = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size!r}")
        self.skipped = list(getattr(self.paths, "skipped", []))

    def _bar(self):
        if not self.progress or len(self.paths) < PROGRESS_MIN_IMAGES or os.environ.get("VLKIT_NO_PROGRESS"):
            return None
        from tqdm import tqdm
        return tqdm(total=len(self.paths), desc=self.desc, unit="img", file=sys.stderr, mininterval=0.5)

    def __iter__(self) -> Iterator[tuple[list[str], list]]:
        bar = self._bar()
        try:
            for i in range(0, len(self.paths), self.batch_size):
                chunk = self.paths[i:i + self.batch_size]
                images, kept, skipped = load_images(chunk, self.skip_bad)
                self.skipped += skipped
                if images:
                    yield kept, images
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()


# ---- tasks --------------------------------------------------------------------------------

def _lacks(pipe: Pipeline, parts: dict[str, str]) -> list[str]:
    """The descriptions of the ``{attribute: description}`` the pipeline's model lacks."""
    return [what for name, what in parts.items() if not hasattr(pipe.model, name)]


def _result(command: str, pipe: Pipeline, batches: ImageBatches, results: list, **extra) -> dict:
    return {"command": command, "model": pipe.source, "model_name": pipe.model.model_name, **extra,
            "images": len({r["image"] for r in results}),
            "skipped": [{"image": p, "reason": r} for p, r in batches.skipped], "results": results}


def _names(values: Sequence[str] | str, what: str) -> list[str]:
    """Comma-separated text or a list -> stripped, non-empty, distinct names."""
    items = values.split(",") if isinstance(values, str) else list(values)
    names = [str(v).strip() for v in items]
    if not names or any(not n for n in names):
        raise ValueError(f"{what}: give non-empty names separated by commas, got {values!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{what}: {twice[0]!r} is given twice")
    return names


def zero_shot(pipe: Pipeline, batches: ImageBatches, labels, templates: Sequence[str] | None = None,
              top_k: int = 5) -> dict:
    """The ``top_k`` likeliest of ``labels`` for each image (``Pipeline.zero_shot``)."""
    labels = _names(labels, "--labels")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k!r}")
    lacking = _lacks(pipe, {"encode_image": "image embeddings", "encode_text": "text embeddings"})
    if lacking:
        raise Unsupported(f"{pipe.source}: {pipe.model.model_name} cannot classify zero-shot: it has no "
                          f"{' and no '.join(lacking)} (zero-shot compares the two)")
    k = min(top_k, len(labels))
    results = []
    for paths, images in batches:
        probs = pipe.zero_shot(images, labels, templates)  # (B, C)
        values, index = probs.topk(k, dim=-1)
        for path, vs, ix in zip(paths, values.tolist(), index.tolist()):
            results.append({"image": path, "top": [{"label": labels[j], "probability": p} for p, j in zip(vs, ix)]})
    return _result("zero-shot", pipe, batches, results, labels=labels,
                   templates=list(templates) if templates else None)


def generation_options(beam: int | None = None, top_p: float | None = None, temperature: float | None = None,
                       seed: int | None = None, max_new_tokens: int | None = None,
                       rerank: int | None = None) -> dict:
    """``Pipeline.caption`` keyword arguments: the model's default decoding (greedy unless its
    config says otherwise) when none is given, beam search with ``beam``, nucleus sampling with
    ``top_p`` (and ``temperature``, ``seed``), the best of ``rerank`` beams (or samples, with
    ``top_p``) by the model's score."""
    if beam is not None and top_p is not None:
        raise ValueError("--beam and --top-p choose different decodings: give one of them")
    if rerank is not None and beam is not None:
        raise ValueError("--rerank K draws its own K beams: give it or --beam, not both")
    if top_p is None and (temperature is not None or seed is not None):
        raise ValueError("--temperature and --seed apply to sampling: give --top-p too")
    opts: dict = {}
    if beam is not None:
        if beam < 1:
            raise ValueError(f"--beam must be at least 1, got {beam}")
        opts["num_beams"] = beam
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {top_p:g}")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"--temperature must be above 0, got {temperature:g}")
        opts.update(do_sample=True, top_p=top_p, temperature=1.0 if temperature is None else temperature)
        if seed is not None:
            opts["generator"] = torch.Generator().manual_seed(seed)
    if rerank is not None:
        if rerank < 0:
            raise ValueError(f"--rerank must be at least 0 (0: none), got {rerank}")
        opts["rerank"] = rerank
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        opts["max_new_tokens"] = max_new_tokens
    return opts


def _decoding(opts: dict, pipe: Pipeline) -> str:
    k = pipe.caption_rerank(opts.get("rerank"), opts)
    if opts.get("do_sample"):
        sampling = f"nucleus sampling (top-p {opts['top_p']:g}, temperature {opts['temperature']:g})"
        return f"the best of {k} samples by the model's score, {sampling}" if k else sampling
    if k:
        return f"the best of {k} beams by the model's score"
    return f"beam search ({opts['num_beams']} beams)" if opts.get("num_beams", 1) > 1 else "greedy"


def caption(pipe: Pipeline, batches: ImageBatches, prompt: str | None = None, **opts) -> dict:
    """A caption of each image (``Pipeline.caption``); ``opts`` from ``generation_options``."""
    if not hasattr(pipe.model, "generate"):
        raise Unsupported(f"{pipe.source} has no decoder: {pipe.model.model_name} models cannot write captions "
                          "(BLIP can)")
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt: empty text")
    generator = opts.get("generator")
    if generator is not None and pipe.device.type != "cpu":  # sampling draws on the model's device
        opts["generator"] = torch.Generator(pipe.device).manual_seed(generator.initial_seed())
    results = []
    for paths, images in batches:
        texts = pipe.caption(images, prompt=prompt, **opts)
        results += [{"image": p, "caption": t} for p, t in zip(paths, texts)]
    return _result("caption", pipe, batches, results, decoding=_decoding(opts, pipe), prompt=prompt)


def vqa(pipe: Pipeline, batches: ImageBatches, question: str, candidates=None) -> dict:
    """The answer to ``question`` about each image (``Pipeline.answer``), or the best of
    ``candidates``."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    if not (hasattr(pipe.model, "answer_tokens") or hasattr(pipe.model, "vqa_logits")):
        has_head = hasattr(type(pipe.model), "vqa_logits") or hasattr(type(pipe.model), "answer_tokens")
        raise Unsupported(f"{pipe.source}: this {pipe.model.model_name} cannot answer questions: it has no "
                          + ("VQA head (train one with vlkit train --vqa)" if has_head else
                             "VQA head or answer decoder"))
    candidates = _names(candidates, "--candidates") if candidates is not None else None
    results = []
    for paths, images in batches:
        answers = pipe.answer(images, [question] * len(images), candidates=candidates)
        results += [{"image": p, "answer": a} for p, a in zip(paths, answers)]
    return _result("vqa", pipe, batches, results, question=question, candidates=candidates)


MATCH_SCORES = {"itm_probability": "ITM probability", "cosine_similarity": "cosine similarity"}


def match(pipe: Pipeline, batches: ImageBatches, captions: Sequence[str]) -> dict:
    """How well each caption fits each image: the ITM head's match probability
    (``Pipeline.match``), or for a dual encoder without one the cosine similarity of the
    image and text embeddings (``score`` says which)."""
    captions = list(captions)
    if not captions or any(not isinstance(c, str) or not c.strip() for c in captions):
        raise ValueError("give one or more non-empty captions")
    if hasattr(pipe.model, "match"):
        kind = "itm_probability"
    elif not _lacks(pipe, {"encode_image": "", "encode_text": ""}):
        kind = "cosine_similarity"
        texts = pipe.embed_texts(captions)  # (C, E)
    else:
        raise Unsupported(f"{pipe.source}: {pipe.model.model_name} cannot match images and texts: it has "
                          "no ITM head and no image and text embeddings")
    results = []
    for paths, images in batches:
        if kind == "itm_probability":  # pairs zipped: each image with every caption
            scores = pipe.match([im for im in images for _ in captions], captions * len(images))
            scores = scores.view(len(images), len(captions))
        else:
            scores = pipe.embed_images(images) @ texts.T  # (B, C)
        for path, row in zip(paths, scores.tolist()):
            results += [{"image": path, "caption": c, "score": s} for c, s in zip(captions, row)]
    return _result("match", pipe, batches, results, score=kind)


TASKS = {"zero-shot": zero_shot, "caption": caption, "vqa": vqa, "match": match}


# ---- output -------------------------------------------------------------------------------

def _rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the result's table."""
    command, results = result["command"], result["results"]
    if command == "zero-shot":
        k = max((len(r["top"]) for r in results), default=1)
        header = ["image"] + [h for i in range(k) for h in (f"top-{i + 1}", "p")]
        return header, [[r["image"]] + [x for t in r["top"] for x in (t["label"], f"{t['probability']:.3f}")]
                        for r in results]
    if command == "caption":
        return ["image", "caption"], [[r["image"], r["caption"]] for r in results]
    if command == "vqa":
        return ["image", "answer"], [[r["image"], r["answer"]] for r in results]
    return (["image", MATCH_SCORES[result["score"]], "caption"],
            [[r["image"], f"{r['score']:.3f}", r["caption"]] for r in results])


def format_table(result: dict) -> str:
    """The result as a table with aligned columns (the last one unpadded), then a footer line:
    the number of images and any that were skipped."""
    header, rows = _rows(result)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]).rstrip() for row in [header, *rows]]
    notes = [f"{result['images']} image{'s' if result['images'] != 1 else ''}"]
    if result["command"] == "vqa":
        notes.insert(0, f"question: {result['question']}")
    if result["command"] == "caption":
        notes.append(result["decoding"])
    if result["skipped"]:
        reasons: dict = {}
        for s in result["skipped"]:
            reasons.setdefault(s["reason"], []).append(s["image"])
        notes.append(f"{len(result['skipped'])} skipped (" + "; ".join(
            f"{reason}: {', '.join(paths)}" for reason, paths in reasons.items()) + ")")
    return "\n".join(lines + ["", "; ".join(notes)])


def run(command: str, model: str, inputs: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE,
        skip_bad: bool = False, progress: bool = True, **options) -> dict:
    """One inference command: the inputs expanded (before the model loads, so a wrong path
    fails fast), the model loaded (``vlkit.load``), the task run in batches."""
    from .pipeline import load
    paths = expand_images(inputs, skip_bad=skip_bad)
    batches = ImageBatches(paths, batch_size, skip_bad, progress, desc=command)
    return TASKS[command](load(model), batches, **options)


__all__ = ["expand_images", "check_image", "load_images", "ImageList", "ImageBatches", "zero_shot",
           "caption", "vqa", "match", "generation_options", "format_table", "run"]
