"""A seeded synthetic world of coloured shapes, with true captions and hard false ones.

Every image holds 1-3 objects: a shape (SHAPES) of a colour (COLORS) and a size (SIZES), on a
tinted background with a mild gradient and noise. Colours are distinct within an image, so
"the red circle" or "the red object" always names exactly one object. A sample carries:

* ``captions``: several true captions from varied templates (``caption`` is the first);
* ``negatives``: false captions ``{"caption", "kind", "source"}``, each a minimal edit of
  ``captions[source]`` in the same template, of kinds ``attribute_swap`` (two objects exchange
  colour -- or shape; the size word moves with the colour, so size words alone do not give the
  swap away), ``relation_flip`` (left<->right, above<->below, same objects),
  ``attribute_change`` (a colour or shape replaced by one absent from the image) and
  ``count_change`` (the stated number of objects -- "two objects: ..." -- or of shapes -- "two
  circles and one star" -- changed, listed items added or removed to match). A negative and
  its source are texts of one template, and false totals are drawn with the frequencies of
  true ones, so the text alone does not tell them apart (a bag-of-bigrams classifier trained
  on captions vs negatives scored 49-52% per kind on source/negative pairs);
* ``qa``: questions of types color / shape / count / exists (one yes and one no per image) /
  relation (yes or no with equal probability);
* ``label`` ("red circle") for single-object images; ``objects`` with centres in [0, 1];
* phrase grounding (``vlkit.data.grounding``): ``captions_grounding[i]`` for ``captions[i]`` and
  ``grounding`` in each ``qa`` entry, spans of the text that name objects;
* ``false_captions``: captions ``{"caption", "false_from"}`` false of the image from the word
  at character ``false_from`` on, given the words before it. False for every image: the "shapes" caption with a
  repeated shape named once per object ("one circle, one circle and one star": a count names
  each shape once), and each "list" or "count" caption of two or more objects with its last
  phrase replaced by its first ("a blue circle, a gray cross and a blue circle": an image's
  colours are distinct; false at the colour, or at "an" before "orange", the one colour it
  admits). False of this image: one phrase with the other size, and one with a shape the
  image lacks (``_phrase_false_captions``). Made without random draws, so every other field is
  as it would be without them.

Captions and negatives come from one small grammar (see ``_render``); every caption is checked
true and every negative false against the objects before it is emitted.

Geometry: objects never overlap. For every pair of objects, the axis with the larger centre
distance separates their bounding squares by a gap, and exceeds the other axis by a margin; the
relation of a pair is read off that axis ("left of" / "right of" on x, "above" / "below" on
y), so a flipped relation is clearly false.

Held-out combinations (``HELDOUT_COMBINATIONS``) never occur in the train split, neither in an
image nor in any caption, negative or question; val and test draw objects from all 48.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import zlib
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "gray")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
NEGATIVE_KINDS = ("attribute_swap", "relation_flip", "attribute_change", "count_change")
QA_TYPES = ("color", "shape", "count", "exists", "relation")

# (colour, shape) pairs never seen in training. Each colour appears once; star and triangle
# twice, every other shape once, so every colour and every shape is still seen in training.
HELDOUT_COMBINATIONS = (
    ("red", "star"), ("green", "triangle"), ("blue", "cross"), ("yellow", "diamond"),
    ("purple", "circle"), ("orange", "square"), ("white", "star"), ("gray", "triangle"),
)
_HELDOUT = frozenset(HELDOUT_COMBINATIONS)

COLOR_RGB = {
    "red": (220, 40, 40), "green": (40, 180, 70), "blue": (45, 90, 235),
    "yellow": (240, 220, 40), "purple": (150, 65, 205), "orange": (245, 140, 25),
    "white": (245, 245, 245), "gray": (135, 135, 135),
}
# side of an object's bounding square as a fraction of the image side (uniform in the range)
SIZE_EXTENT = {"small": (0.24, 0.28), "large": (0.38, 0.42)}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

_PAD = 0.02            # free border around objects (fraction of the side)
_GAP = 0.03            # bounding squares separated at least this much along the major axis
_AXIS_MARGIN = 0.08    # major-axis distance exceeds the minor-axis one by at least this much
_MIN_BG_DIST = 110.0   # RGB distance between the background and every object colour ...
_MIN_BG_LUMA = 40.0    # ... and luminance difference (yellow on light grey is not "visible")
_COLOR_JITTER = 12     # brightness jitter of an object's colour (plus +-4 per channel)
_NOISE_STD = 6.0       # per-pixel Gaussian noise
_GRADIENT = 12.0       # max background ramp (per axis), in grey levels


def class_names(include_heldout: bool = True) -> list[str]:
    """'colour shape' names, colours outer and shapes inner (48 with held-out pairs, 40 without)."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES if include_heldout or (c, s) not in _HELDOUT]


def is_heldout(color: str, shape: str) -> bool:
    return (color, shape) in _HELDOUT


def patch_labels(objects: Sequence[dict], grid: int, classes: dict[str, int], background: int,
                 flipped: bool = False) -> list[int]:
    """The object class under each patch of a ``grid`` x ``grid`` tiling, row-major: for every
    patch, the object whose bounding square covers the largest part of it, if that part is at
    least a quarter of the patch or of the object's square; else ``background``. ``objects`` as
    in a record (centres and extents as fractions of the side); ``flipped`` for an image that
    was mirrored left-right. Objects never overlap, so the choice is rarely contested."""
    labels = [background] * (grid * grid)
    best = [0.0] * (grid * grid)
    cell = 1.0 / grid
    for o in objects:
        name = f"{o['color']} {o['shape']}"
        if name not in classes:
            raise ValueError(f"object {name!r} is not one of the {len(classes)} classes")
        x = 1.0 - o["x"] if flipped else o["x"]
        half = o["extent"] / 2
        need = 0.25 * min(cell * cell, o["extent"] ** 2)
        for r in range(grid):
            oy = min((r + 1) * cell, o["y"] + half) - max(r * cell, o["y"] - half)
            if oy <= 0:
                continue
            for c in range(grid):
                ox = min((c + 1) * cell, x + half) - max(c * cell, x - half)
                area = ox * oy if ox > 0 else 0.0
                k = r * grid + c
                if area >= need and area > best[k]:
                    labels[k], best[k] = classes[name], area
    return labels


class _Obj:
    __slots__ = ("shape", "color", "size", "x", "y", "extent")

    def __init__(self, shape, color, size, x, y, extent):
        self.shape, self.color, self.size = shape, color, size
        self.x, self.y, self.extent = x, y, extent


def _scene_key(objs) -> tuple:
    return tuple(sorted((o.shape, o.color, round(o.x, 6), round(o.y, 6)) for o in objs))


def relation_of(a: _Obj, b: _Obj) -> str:
    """Where a is relative to b, on the axis of larger centre distance (y grows downwards)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _luma(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _contrast_ok(bg, color) -> bool:
    """Background far from an object colour both in RGB and in luminance."""
    d2 = (bg[0] - color[0]) ** 2 + (bg[1] - color[1]) ** 2 + (bg[2] - color[2]) ** 2
    return d2 >= _MIN_BG_DIST ** 2 and abs(_luma(bg) - _luma(color)) >= _MIN_BG_LUMA


def _pair_ok(a: _Obj, b: _Obj) -> bool:
    adx, ady = abs(a.x - b.x), abs(a.y - b.y)
    major, minor = (adx, ady) if adx >= ady else (ady, adx)
    return major >= (a.extent + b.extent) / 2 + _GAP and major - minor >= _AXIS_MARGIN


# ----------------------------------------------------------------------------- caption grammar
# An NP is (object index, determiner "a"|"the", size or None, colour, shape).
# A clause is one of
#   ("list", [np, ...])                 "a red circle, a blue square and a green star"
#   ("there", np)                       "there is a red circle"
#   ("rel", npA, rel, npB|None, is_form, long_form)
#                                       "a red circle (is) (to the) left of a blue square|it"
#   ("count", n, [np, ...])             "two objects: a red circle and a blue square"
#   ("shapes", [(count, shape), ...])   "two circles and one square" (exact, exhaustive)
# A caption is a list of clauses joined by "; ". "it" is the last NP of the previous clause.

def _np_text(np_) -> str:
    _, det, size, color, shape = np_
    first = size or color
    if det == "a" and first[0] in "aeiou":
        det = "an"
    return f"{det} {size} {color} {shape}" if size else f"{det} {color} {shape}"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("s") else shape + "s"


def _rel_text(rel: str, long_form: bool) -> str:
    if long_form and rel in ("left of", "right of"):
        return "to the " + rel
    return rel


def _clause_text(cl) -> str:
    kind = cl[0]
    if kind == "list":
        return _join([_np_text(n) for n in cl[1]])
    if kind == "there":
        return "there is " + _np_text(cl[1])
    if kind == "rel":
        _, a, rel, b, is_form, long_form = cl
        verb = " is " if is_form else " "
        return _np_text(a) + verb + _rel_text(rel, long_form) + " " + (_np_text(b) if b else "it")
    if kind == "count":
        n = cl[1]
        return f"{NUMBER_WORDS[n]} object{'' if n == 1 else 's'}: " + _join([_np_text(x) for x in cl[2]])
    if kind == "shapes":
        return _join([f"{NUMBER_WORDS[c]} {s if c == 1 else _plural(s)}" for c, s in cl[1]])
    raise ValueError(kind)


def _render(caption) -> str:
    return "; ".join(_clause_text(cl) for cl in caption)


def _grounding(caption, objs) -> list[list]:
    """The phrase grounding of a caption structure's text (see ``vlkit.data.grounding``):
    ``[start, end, [object indices]]`` for each noun phrase without its determiner ("small red
    circle"), each "it" (the phrase it stands for) and each shape of a "shapes" clause ("circles":
    every object of that shape); and the words of each relation ("to the left of") twice, with the
    roles "subject" and "object" and the objects it relates. Spans index ``_render(caption)``."""
    spans, pos, prev = [], 0, None

    def np_span(np_, at):
        det = _np_text(np_).split(" ", 1)[0]
        return [at + len(det) + 1, at + len(_np_text(np_)), [np_[0]]]

    for k, cl in enumerate(caption):
        if k:
            pos += 2  # "; "
        text, kind = _clause_text(cl), cl[0]
        if kind in ("list", "count"):
            at = pos + (text.index(": ") + 2 if kind == "count" else 0)
            for i, np_ in enumerate(cl[1] if kind == "list" else cl[2]):
                spans.append(np_span(np_, at))
                at += len(_np_text(np_)) + (2 if i < len(cl[-1]) - 2 else 5)  # ", " / " and "
        elif kind == "there":
            spans.append(np_span(cl[1], pos + len("there is ")))
        elif kind == "rel":
            _, a, rel, b, is_form, long_form = cl
            spans.append(np_span(a, pos))
            tail = pos + len(text)
            if b is not None:
                spans.append(np_span(b, tail - len(_np_text(b))))
            elif prev is not None:
                spans.append([tail - 2, tail, [prev[0]]])
            other = b if b is not None else prev
            if other is not None:  # the relation words, from the first object to the second
                at = pos + len(_np_text(a)) + (4 if is_form else 1)
                end = at + len(_rel_text(rel, long_form))
                spans += [[at, end, [a[0]], "subject"], [at, end, [other[0]], "object"]]
        elif kind == "shapes":
            at = pos
            for i, (count, shape) in enumerate(cl[1]):
                word = shape if count == 1 else _plural(shape)
                at += len(NUMBER_WORDS[count]) + 1
                spans.append([at, at + len(word), [j for j, o in enumerate(objs) if o.shape == shape]])
                at += len(word) + (2 if i < len(cl[1]) - 2 else 5)
        cur = _last_np(cl)
        prev = cur if cur is not None else prev
        pos += len(text)
    return spans


def _false_captions(captions) -> list[dict]:
    """Captions false for every image from one word on (``false_captions``), made from the
    record's "shapes", "list" and "count" captions without a random draw:

    * the "shapes" caption with each shape named once per object ("one circle, one circle and one
      star" for "two circles and one star"), false at the second naming of a shape: a count
      names each shape once;
    * a "list" or "count" caption of two or more objects with its last phrase replaced by its
      first ("a blue circle, a gray cross and a blue circle"), false at the repeated colour: the
      list names distinct objects, and an image's colours are distinct.
    """
    out = []
    for cap in captions:
        if len(cap) != 1:
            continue
        cl = cap[0]
        if cl[0] == "shapes" and any(c > 1 for c, _ in cl[1]):
            items = [shape for c, shape in cl[1] for _ in range(c)]
            text = _join([f"one {shape}" for shape in items])
            seen, at = set(), 0
            for shape in items:
                at = text.index(f"one {shape}", at) + len("one ")
                if shape in seen:
                    out.append({"caption": text, "false_from": at})
                    break
                seen.add(shape)
                at += len(shape)
        elif cl[0] in ("list", "count") and len(cl[-1]) > 1:
            nps = list(cl[-1])
            nps[-1] = nps[0]
            text = _render([cl[:-1] + (nps,)])
            last = _np_text(nps[-1])
            at = len(text) - len(last)  # "an": only "orange" follows it, already named
            if not last.startswith("an "):
                at += len("a ") + (len(nps[0][2]) + 1 if nps[0][2] else 0)  # the colour, after a size
            out.append({"caption": text, "false_from": at})
    return out


def _pair_allowed(train: bool):
    """Whether a (colour, shape) pair may be named in a text of this split: training never
    names a held-out combination."""
    return (lambda c, s: (c, s) not in _HELDOUT) if train else (lambda c, s: True)


def _phrase_false_captions(captions, objs, allowed) -> list[dict]:
    """Captions false of this image from one word on, made from its true captions without a random
    draw (``false_captions``; the caption and the phrase are chosen by a checksum of the caption
    texts):

    * one phrase that states a size with the other size ("a small blue circle" for a large one),
      false at the colour, or at the size word where no object of the image has that size: the
      image's colours are distinct;
    * one phrase with a shape the image does not have ("a blue star" for a blue circle), false at
      the shape word; a (colour, shape) pair ``allowed`` refuses (held out of training) is not used.
    """
    texts = [_render(c) for c in captions]
    key = zlib.crc32("|".join(texts).encode())
    present = {o.shape for o in objs}
    sizes = {o.size for o in objs}
    out = []
    for kind in ("size", "shape"):
        # (caption index, phrase index, phrase) of every phrase this kind can change
        spots = []
        for i, cap in enumerate(captions):
            nps = []
            _map_nps(cap, lambda n: nps.append(n) or n)
            for j, n in enumerate(nps):
                if kind == "size" and n[2] is not None:
                    spots.append((i, j, n))
                elif kind == "shape" and any(s not in present and allowed(n[3], s) for s in SHAPES):
                    spots.append((i, j, n))
        if not spots:
            continue
        i, j, n = spots[(key >> (0 if kind == "size" else 16)) % len(spots)]
        if kind == "size":
            other = "small" if n[2] == "large" else "large"
            changed = (n[0], n[1], other, n[3], n[4])
        else:
            shapes = [s for s in SHAPES if s not in present and allowed(n[3], s)]
            changed = (n[0], n[1], n[2], n[3], shapes[key % len(shapes)])
        count = itertools.count()  # the phrases in _map_nps's order, as enumerated above
        new = _map_nps(captions[i], lambda p: changed if next(count) == j else p)
        text = _render(new)
        at = next(k for k, (a, b) in enumerate(zip(texts[i], text)) if a != b)
        at = text.rfind(" ", 0, at) + 1  # the changed word's start
        if kind == "size" and other in sizes:
            at = text.index(" ", at) + 1  # the colour after it
        if not _holds(new, objs):
            out.append({"caption": text, "false_from": at})
    return out


def _find(objs, np_):
    _, _, size, color, shape = np_
    for o in objs:
        if o.color == color and o.shape == shape and (size is None or o.size == size):
            return o
    return None


def _last_np(cl):
    kind = cl[0]
    if kind == "list" or kind == "count":
        return cl[-1][-1]
    if kind == "there":
        return cl[1]
    if kind == "rel":
        return cl[3] if cl[3] is not None else None
    return None


def _relation_holds(cl, prev, objs) -> bool:
    """A "rel" clause holds: its two phrases (the second "it": ``prev``, the last phrase before
    it) name two distinct objects in that relation."""
    _, a_np, rel, b_np, _, _ = cl
    b_np = b_np if b_np is not None else prev
    a, b = _find(objs, a_np), (_find(objs, b_np) if b_np is not None else None)
    return a is not None and b is not None and a is not b and relation_of(a, b) == rel


def _holds(caption, objs) -> bool:
    """Truth of a caption structure for these objects (the grammar's semantics)."""
    prev = None
    for cl in caption:
        kind = cl[0]
        if kind in ("list", "count"):
            nps = cl[1] if kind == "list" else cl[2]
            if kind == "count" and cl[1] != len(objs):
                return False
            found = [_find(objs, n) for n in nps]
            if any(o is None for o in found) or len({id(o) for o in found}) < len(found):
                return False  # a list names distinct objects: "a red circle and a red circle" is false
        elif kind == "there":
            if _find(objs, cl[1]) is None:
                return False
        elif kind == "rel":
            if not _relation_holds(cl, prev, objs):
                return False
        elif kind == "shapes":
            counts = {}
            for o in objs:
                counts[o.shape] = counts.get(o.shape, 0) + 1
            if dict((s, c) for c, s in cl[1]) != counts or len(cl[1]) != len(counts):
                return False
        cur = _last_np(cl)
        prev = cur if cur is not None else prev
    return True


def _map_nps(caption, fn):
    """Copy of a caption structure with every NP replaced by fn(np)."""
    out = []
    for cl in caption:
        kind = cl[0]
        if kind == "list":
            out.append(("list", [fn(n) for n in cl[1]]))
        elif kind == "there":
            out.append(("there", fn(cl[1])))
        elif kind == "rel":
            out.append(("rel", fn(cl[1]), cl[2], fn(cl[3]) if cl[3] else None, cl[4], cl[5]))
        elif kind == "count":
            out.append(("count", cl[1], [fn(n) for n in cl[2]]))
        else:
            out.append(cl)
    return out


def _mentioned(caption) -> set:
    ids = set()
    _map_nps(caption, lambda n: ids.add(n[0]) or n)
    return ids


def _sized(caption) -> bool:
    found = []
    _map_nps(caption, lambda n: found.append(n[2] is not None) or n)
    return any(found)


# ----------------------------------------------------------------------------- reading captions
_NP = (r"(?:a|an|the) (?:(small|large) )?(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")")
_NUM = "(" + "|".join(NUMBER_WORDS) + ")"
_SHAPE_WORD = "(" + "|".join(sorted({*SHAPES, *map(_plural, SHAPES)}, key=len, reverse=True)) + ")"


def _np_of(match, at: int):
    return (None, "a", match.group(at), match.group(at + 1), match.group(at + 2))


def _np_list(text: str):
    nps = []
    for item in re.split(r", | and ", text):
        m = re.fullmatch(_NP, item)
        if m is None:
            return None
        nps.append(_np_of(m, 1))
    return nps


def _parse_clause(text: str):
    m = re.fullmatch(rf"there is {_NP}", text)
    if m:
        return ("there", _np_of(m, 1))
    m = re.fullmatch(rf"{_NP}( is)? (to the )?(left of|right of|above|below) (?:{_NP}|(it))", text)
    if m:
        b = None if m.group(10) else _np_of(m, 7)
        return ("rel", _np_of(m, 1), m.group(6), b, bool(m.group(4)), bool(m.group(5)))
    m = re.fullmatch(rf"{_NUM} objects?: (.+)", text)
    if m:
        nps = _np_list(m.group(2))
        return None if nps is None else ("count", NUMBER_WORDS.index(m.group(1)), nps)
    items = re.split(r", | and ", text)
    counts = [re.fullmatch(rf"{_NUM} {_SHAPE_WORD}", item) for item in items]
    if all(counts):
        return ("shapes", [(NUMBER_WORDS.index(c.group(1)), c.group(2) if c.group(2) in SHAPES else
                            next(s for s in SHAPES if _plural(s) == c.group(2))) for c in counts])
    nps = _np_list(text)
    return None if nps is None else ("list", nps)


def parse_caption(text: str):
    """The grammar's structure of a caption (as ``_render`` writes it; spaces around punctuation
    and a final full stop tolerated), or None when it is not a sentence of the grammar."""
    text = re.sub(r"\s*([;:,])\s*", r"\1 ", text.strip().lower()).rstrip(" .")
    text = re.sub(r"\s+", " ", text)
    if not text:
        return None
    clauses = [_parse_clause(part) for part in text.split("; ")]
    return None if any(c is None for c in clauses) else clauses


def caption_is_true(text: str, objects: Sequence[dict]) -> bool:
    """Whether every colour, shape, size, count and relation a caption states holds of the
    objects (records' ``objects``); a text outside the grammar is not true."""
    caption = parse_caption(text)
    if caption is None:
        return False
    objs = _objs_of(objects)
    return _holds(caption, objs)


def _objs_of(objects: Sequence[dict]) -> list[_Obj]:
    """Records' ``objects`` as the grammar's objects."""
    return [_Obj(o["shape"], o["color"], o.get("size"), o["x"], o["y"], o.get("extent", 0.0)) for o in objects]


def caption_facts(text: str, objects: Sequence[dict]) -> dict | None:
    """What a caption states, checked one fact at a time (None when it is not a sentence of the
    grammar): ``phrases`` noun phrases, ``phrases_true`` of them name an object of the image
    (colour, shape and a stated size); ``relations`` relation phrases, ``relations_true`` of them
    hold between two distinct objects their phrases name. ``caption_is_true`` asks more: every
    fact true together, counts and "it" included."""
    caption = parse_caption(text)
    if caption is None:
        return None
    objs = _objs_of(objects)
    phrases = []
    _map_nps(caption, lambda n: phrases.append(n) or n)
    out = {"phrases": len(phrases), "phrases_true": sum(_find(objs, n) is not None for n in phrases),
           "relations": 0, "relations_true": 0}
    prev = None
    for cl in caption:
        if cl[0] == "rel":
            out["relations"] += 1
            out["relations_true"] += _relation_holds(cl, prev, objs)
        cur = _last_np(cl)
        prev = cur if cur is not None else prev
    return out


# ----------------------------------------------------------------------------- drawing
_STAR = [(math.cos(math.radians(-90 + 36 * k)) * (1.0 if k % 2 == 0 else 0.45),
          math.sin(math.radians(-90 + 36 * k)) * (1.0 if k % 2 == 0 else 0.45)) for k in range(10)]
_TRIANGLE = [(0.0, -1.0), (1.0, 0.85), (-1.0, 0.85)]
_DIAMOND = [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.88 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "cross":
        t = 0.3 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        pts = {"triangle": _TRIANGLE, "diamond": _DIAMOND, "star": _STAR}[shape]
        draw.polygon([(cx + px * r, cy + py * r) for px, py in pts], fill=fill)


# ----------------------------------------------------------------------------- the world
_IMAGE_KEYS = ("image", "heldout", "objects", "label")


def _image_record(objs, image) -> dict:
    """The part of a record that the image fixes: image, held-out flag, objects, label."""
    rec = {"image": image, "heldout": any((o.color, o.shape) in _HELDOUT for o in objs),
           "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "x": round(o.x, 4),
                        "y": round(o.y, 4), "extent": round(o.extent, 4)} for o in objs]}
    if len(objs) == 1:
        rec["label"] = f"{objs[0].color} {objs[0].shape}"
    return rec


def _image_part(rec: dict) -> dict:
    return {k: rec[k] for k in _IMAGE_KEYS if k in rec}


class SyntheticWorld:
    """Deterministic generator: ``sample(index, split)`` depends only on (seed, split, index).

    Each split has its own random stream (the split name is part of every sample's seed), so
    the test set is the same in every run for a given world seed and is disjoint from train's
    stream. ``--data synthetic`` means the default seed, 0.
    """

    def __init__(self, seed: int = 0, image_size: int = 64, max_objects: int = 3,
                 single_object_prob: float = 0.35, group_size: int = 1):
        if not 1 <= max_objects <= 3:
            raise ValueError("max_objects must be 1, 2 or 3")
        if not 1 <= int(group_size) <= 16:
            raise ValueError(f"group_size must be 1 to 16, got {group_size}")
        self.group_size = int(group_size)
        self._group_cache = None  # (key, members) of the last group: its members come in a row
        if image_size < 16:
            raise ValueError("image_size must be at least 16")
        self.seed, self.image_size = int(seed), int(image_size)
        self.max_objects, self.single_object_prob = int(max_objects), float(single_object_prob)
        s = self.image_size
        self._factor = 4 if s <= 256 else 2  # supersampling of object masks: crisp, anti-aliased
        bank_rng = np.random.default_rng([self.seed & 0xFFFFFFFF, s, 7919])
        self._noise = np.rint(bank_rng.normal(0.0, _NOISE_STD, (2 * s, 2 * s, 3))).astype(np.int16)
        self._ramp = np.linspace(-1.0, 1.0, s, dtype=np.float32)  # background gradient along y
        self._ramp3 = np.repeat(self._ramp, 3)                        # ... and along x (per channel)
        self._allowed = {split: self._shapes_by_color(split) for split in ("train", "eval")}
        multi = 1.0 - single_object_prob if max_objects > 1 else 0.0
        self._count_prob = {1: 1.0 - multi}  # how often an image holds k objects
        self._count_prob.update({k: multi / (max_objects - 1) for k in range(2, max_objects + 1)})

    def config(self) -> dict:
        return {"seed": self.seed, "image_size": self.image_size, "max_objects": self.max_objects,
                "single_object_prob": self.single_object_prob, "group_size": self.group_size}

    @staticmethod
    def _shapes_by_color(split):
        return {c: [s for s in SHAPES if split != "train" or (c, s) not in _HELDOUT] for c in COLORS}

    # -- public API
    def sample(self, index: int, split: str = "train", single_object: bool = False,
               image_only: bool = False, questions: bool = True) -> dict:
        """Sample ``index`` of a split. With ``group_size`` G > 1, training samples come in
        minimal-pair groups (see ``_group_member``); val and test are the same for every G.
        ``image_only``: the record's image, objects, label and held-out flag alone, as the full
        record has them (its text is drawn after the image: a classifier's stream skips it).
        ``questions=False``: without ``qa`` (drawn last: every other field as the full record's)."""
        if self.group_size > 1 and split == "train":
            rec = self._group_member(int(index), single_object, questions and not image_only)
            return _image_part(rec) if image_only else rec
        rng = random.Random(f"vlkit-synth:{self.seed}:{split}:{int(index)}:{int(bool(single_object))}")
        train = split == "train"
        objs = self._objects(rng, train, single_object)
        image = self._draw(rng, objs)
        if image_only:
            return _image_record(objs, image)
        captions, cap_texts = self._unique_captions(rng, objs)
        return self._record(rng, objs, image, captions, cap_texts, train, questions)

    def _unique_captions(self, rng, objs) -> tuple[list, list[str]]:
        captions, cap_texts = [], []
        for c in self._captions(rng, objs):
            t = _render(c)
            if t not in cap_texts:
                captions.append(c)
                cap_texts.append(t)
        return captions, cap_texts

    def _group_member(self, index: int, single_object: bool, questions: bool = True) -> dict:
        """Member ``index % G`` of training group ``index // G``: member 0 is a scene, every
        other member the same scene after one edit -- an object's shape or colour changed, two
        objects' colours exchanged, or the scene mirrored along the axis of one of its relations
        (which reverses the relations on that axis). The members share the background, noise and
        caption templates, so they differ only where the edit is. A member keeps only the
        captions false for every other member of its group (all of them in the rare group where
        none is), so each caption singles out its own image within the group. Sampled in
        consecutive indices, a group lands in one batch: its members are each other's hardest
        in-batch negatives, on the image side and on the text side."""
        g, m = divmod(index, self.group_size)
        key = f"vlkit-synth:{self.seed}:train-group{self.group_size}:{g}:{int(bool(single_object))}"
        if self._group_cache is None or self._group_cache[0] != key:
            self._group_cache = (key, self._group(key, single_object))
        members = self._group_cache[1]
        objs, captions, cap_texts = members[m]
        colors = sorted({o.color for member in members for o in member[0]})  # one background for all
        image = self._draw(random.Random(key + ":draw"), objs, colors)
        return self._record(random.Random(f"{key}:member:{m}"), objs, image, captions, cap_texts, True, questions)

    def _group(self, key: str, single_object: bool) -> list[tuple]:
        """(objects, captions, caption texts) of each member of a group."""
        base = self._objects(random.Random(key + ":objects"), True, single_object)
        members, seen = [base], {_scene_key(base)}
        rng = random.Random(key + ":edits")
        for _ in range(8 * self.group_size):  # distinct scenes (a tiny group may run out)
            if len(members) == self.group_size:
                break
            edited = self._edit(rng, base)
            if _scene_key(edited) not in seen:
                seen.add(_scene_key(edited))
                members.append(edited)
        while len(members) < self.group_size:
            members.append(self._edit(rng, base))
        out = []
        for m, objs in enumerate(members):
            captions, texts = self._unique_captions(random.Random(key + ":captions"), objs)
            others = [o for k, o in enumerate(members) if k != m]
            keep = [i for i, c in enumerate(captions) if not any(_holds(c, o) for o in others)]
            if keep:
                captions, texts = [captions[i] for i in keep], [texts[i] for i in keep]
            out.append((objs, captions, texts))
        return out

    def _edit(self, rng: random.Random, objs: list[_Obj]) -> list[_Obj]:
        """A copy of a training scene after one edit (kinds as in ``_group_member``); the
        result never shows a held-out combination and keeps colours distinct."""
        new = [_Obj(o.shape, o.color, o.size, o.x, o.y, o.extent) for o in objs]
        allowed = self._allowed["train"]
        if len(new) == 1:
            kinds, weights = ("shape", "color"), (0.6, 0.4)
        else:
            kinds, weights = ("shape", "color", "swap", "mirror"), (0.25, 0.15, 0.3, 0.3)
        while True:  # "shape" always succeeds (every colour allows several shapes)
            kind = rng.choices(kinds, weights)[0]
            if kind == "shape":
                o = rng.choice(new)
                o.shape = rng.choice([s for s in allowed[o.color] if s != o.shape])
                return new
            if kind == "color":
                o = rng.choice(new)
                used = {p.color for p in new}
                options = [c for c in COLORS if c not in used and o.shape in allowed[c]]
                if options:
                    o.color = rng.choice(options)
                    return new
            elif kind == "swap":
                a, b = rng.sample(new, 2)
                if a.shape != b.shape and a.shape in allowed[b.color] and b.shape in allowed[a.color]:
                    a.color, b.color = b.color, a.color
                    return new
            else:  # mirror along the axis on which the first two objects are related
                a, b = new[0], new[1]
                on_x = abs(a.x - b.x) >= abs(a.y - b.y)
                for o in new:
                    if on_x:
                        o.x = 1.0 - o.x
                    else:
                        o.y = 1.0 - o.y
                return new

    def _record(self, rng, objs, image, captions, cap_texts, train: bool, questions: bool = True) -> dict:
        negatives = self._negatives(rng, objs, captions, cap_texts, train)
        rec = {
            "image": image,
            "caption": cap_texts[0],
            "captions": cap_texts,
            "captions_grounding": [_grounding(c, objs) for c in captions],
            "negatives": negatives,
        }
        false = _false_captions(captions)
        false += _phrase_false_captions(captions, objs, _pair_allowed(train))
        if false:
            rec["false_captions"] = false
        if questions:  # the last draw: leaving it out changes nothing before it
            rec["qa"] = self._qa(rng, objs, train)
        rec.update(_image_record(objs, image))
        return rec

    def records(self, split: str, n: int, single_object: bool = False) -> list[dict]:
        """The fixed first n samples of a split."""
        return [self.sample(i, split, single_object) for i in range(n)]

    # -- scene
    def _objects(self, rng: random.Random, train: bool, single: bool) -> list[_Obj]:
        if single or self.max_objects == 1 or rng.random() < self.single_object_prob:
            n = 1
        else:
            n = rng.randint(2, self.max_objects)
        allowed = self._allowed["train" if train else "eval"]
        colors = rng.sample(COLORS, n)
        sizes = [rng.choice(SIZES) for _ in range(n)]
        order = sorted(range(n), key=lambda i: sizes[i] != "large")  # place large ones first
        for _ in range(50):
            placed: list[_Obj] = []
            for i in order:
                lo, hi = SIZE_EXTENT[sizes[i]]
                e = rng.uniform(lo, hi)
                m = e / 2 + _PAD
                for _ in range(40):
                    o = _Obj(None, None, sizes[i], rng.uniform(m, 1 - m), rng.uniform(m, 1 - m), e)
                    if all(_pair_ok(o, p) for p in placed):
                        placed.append(o)
                        break
                else:
                    break
            if len(placed) == n:
                break
        else:  # practically unreachable; fall back to a fixed layout of small objects
            placed = [_Obj(None, None, "small", x, y, 0.26) for x, y in
                      ((0.2, 0.2), (0.8, 0.2), (0.5, 0.8))[:n]]
        for o, c in zip(placed, [colors[i] for i in order]):
            o.color, o.shape = c, rng.choice(allowed[c])
        rng.shuffle(placed)
        return placed

    def _draw(self, rng: random.Random, objs: list[_Obj], colors=None) -> Image.Image:
        """The image of ``objs``; the background contrasts with ``colors`` (default: theirs)."""
        s, f = self.image_size, self._factor
        cols = [COLOR_RGB[o.color] for o in objs]
        far = [COLOR_RGB[c] for c in colors] if colors is not None else cols
        for _ in range(30):  # a background shade far from every object colour present
            g = rng.uniform(0.0, 235.0)
            bg = tuple(min(255, max(0, int(g + rng.uniform(-12.0, 12.0)))) for _ in range(3))
            if all(_contrast_ok(bg, c) for c in far):
                break
        else:
            bg = (24, 24, 28)  # dark slate: contrasts with every colour
        canvas = Image.new("RGB", (s, s), bg)
        for o, col in zip(objs, cols):
            shade = rng.randint(-_COLOR_JITTER, _COLOR_JITTER)  # brightness, then a slight tint
            fill = tuple(min(255, max(0, v + shade + rng.randint(-4, 4))) for v in col)
            # anti-aliased coverage mask of the object's box, drawn f times larger, box-filtered
            cx, cy, r = o.x * s, o.y * s, o.extent * s / 2
            x0, y0 = max(0, int(cx - r) - 1), max(0, int(cy - r) - 1)
            x1, y1 = min(s, int(cx + r) + 2), min(s, int(cy + r) + 2)
            mask = Image.new("L", ((x1 - x0) * f, (y1 - y0) * f), 0)
            _draw_shape(ImageDraw.Draw(mask), o.shape, (cx - x0) * f, (cy - y0) * f, r * f, 255)
            canvas.paste(fill, (x0, y0, x1, y1), mask.reduce(f) if f > 1 else mask)
        ox, oy = rng.randrange(s), rng.randrange(s)
        gx, gy = rng.uniform(-_GRADIENT, _GRADIENT), rng.uniform(-_GRADIENT, _GRADIENT)
        a = np.asarray(canvas, dtype=np.int16) + self._noise[oy:oy + s, ox:ox + s]
        rows = a.reshape(s, 3 * s)  # the same memory, so the ramps broadcast along fast axes
        rows += (gx * self._ramp3).astype(np.int16)[None, :]
        rows += (gy * self._ramp).astype(np.int16)[:, None]
        np.clip(a, 0, 255, out=a)
        return Image.fromarray(a.astype(np.uint8), "RGB")

    # -- captions
    @staticmethod
    def _np(objs, i, sized: bool, det: str = "a"):
        o = objs[i]
        return (i, det, o.size if sized else None, o.color, o.shape)

    def _rel(self, rng, objs, i, j, sized, is_form):
        return ("rel", self._np(objs, i, sized), relation_of(objs[i], objs[j]),
                self._np(objs, j, sized), is_form, rng.random() < 0.5)

    def _captions(self, rng: random.Random, objs: list[_Obj]) -> list:
        n = len(objs)
        ids = list(range(n))
        shapes = {}
        for o in objs:
            shapes[o.shape] = shapes.get(o.shape, 0) + 1
        shape_clause = ("shapes", [(c, s) for s, c in sorted(shapes.items(), key=lambda kv: rng.random())])
        rb = lambda: rng.random() < 0.5  # noqa: E731
        if n == 1:
            return [[("list", [self._np(objs, 0, True)])],
                    [("list", [self._np(objs, 0, False)])],
                    [("count", 1, [self._np(objs, 0, rb())])],
                    [("there", self._np(objs, 0, rb()))],
                    [shape_clause]]
        a, b = rng.sample(ids, 2)
        caps = []
        if n == 2:
            caps.append([self._rel(rng, objs, a, b, True, False)])
        else:
            c = next(i for i in ids if i not in (a, b))
            x = rng.choice((a, b))
            second = ("rel", self._np(objs, c, False), relation_of(objs[c], objs[x]),
                      self._np(objs, x, False, "the"), True, rng.random() < 0.5)
            caps.append([self._rel(rng, objs, a, b, True, False), second])
        p, q = rng.sample(ids, 2)
        caps.append([self._rel(rng, objs, p, q, rb(), True)])
        p, q = rng.sample(ids, 2)
        caps.append([("there", self._np(objs, q, rb())),
                     ("rel", self._np(objs, p, False), relation_of(objs[p], objs[q]), None, True,
                      rng.random() < 0.5)])
        order = rng.sample(ids, n)
        sized = rb()
        caps.append([("list", [self._np(objs, i, sized) for i in order])])
        order = rng.sample(ids, n)
        sized = rb()
        caps.append([("count", n, [self._np(objs, i, sized) for i in order])])
        caps.append([shape_clause])
        return caps

    # -- negatives
    def _negatives(self, rng, objs, captions, texts, train: bool) -> list[dict]:
        """False captions, each a minimal edit of captions[source] (recorded as "source").

        Sources are spread evenly over the templates (least used first), so a template is
        about as likely to appear in a negative as in a reference caption: the template alone
        says nothing about truth.
        """
        n = len(objs)
        allowed = _pair_allowed(train)
        seen = set(texts)
        used = [0] * len(captions)
        found = {}

        def try_kind(kind, make, want=2):
            got = []
            for k in sorted(range(len(captions)), key=lambda k: (used[k], rng.random())):
                if len(got) == want:
                    break
                cap = make(captions[k])
                if cap is None or _holds(cap, objs):
                    continue
                text = _render(cap)
                if text in seen:
                    continue
                seen.add(text)
                used[k] += 1
                got.append({"caption": text, "kind": kind, "source": k})
            found[kind] = got

        # the most constrained kinds pick their templates first
        try_kind("count_change", lambda cap: self._recount(rng, objs, cap, allowed))
        if n >= 2:
            try_kind("relation_flip", lambda cap: self._flip(rng, cap))
            try_kind("attribute_swap", lambda cap: self._swap(rng, objs, cap, allowed))
        try_kind("attribute_change", lambda cap: self._change(rng, objs, cap, allowed))
        return [neg for kind in NEGATIVE_KINDS for neg in found.get(kind, ())]

    @staticmethod
    def _flip(rng, cap):
        rels = [i for i, cl in enumerate(cap) if cl[0] == "rel"]
        if not rels:
            return None
        i = rng.choice(rels)
        cl = cap[i]
        return cap[:i] + [(cl[0], cl[1], OPPOSITE[cl[2]], cl[3], cl[4], cl[5])] + cap[i + 1:]

    @staticmethod
    def _swap(rng, objs, cap, allowed):
        ids = sorted(_mentioned(cap))
        pairs = [(i, j) for i in ids for j in ids if i < j]
        rng.shuffle(pairs)
        for i, j in pairs:
            a, b = objs[i], objs[j]
            if a.shape != b.shape:
                # the (size, colour) units change places; shapes stay with their positions
                if not (allowed(b.color, a.shape) and allowed(a.color, b.shape)):
                    continue
                new = {i: (b.size, b.color, a.shape), j: (a.size, a.color, b.shape)}
                if rng.random() < 0.5:  # or: the shapes change places (same words, other spots)
                    new = {i: (a.size, a.color, b.shape), j: (b.size, b.color, a.shape)}
            elif a.size != b.size and _sized(cap):
                new = {i: (b.size, a.color, a.shape), j: (a.size, b.color, b.shape)}
            else:
                continue
            return _map_nps(cap, lambda np_: (np_[0], np_[1], new[np_[0]][0] if np_[2] else None,
                                              new[np_[0]][1], new[np_[0]][2])
                            if np_[0] in new else np_)
        return None

    @staticmethod
    def _change(rng, objs, cap, allowed):
        if cap[0][0] == "shapes":
            present = {s for _, s in cap[0][1]}
            k = rng.randrange(len(cap[0][1]))
            cnt, _ = cap[0][1][k]
            new = rng.choice([s for s in SHAPES if s not in present])
            items = list(cap[0][1])
            items[k] = (cnt, new)
            return [("shapes", items)]
        ids = sorted(_mentioned(cap))
        if not ids:
            return None
        i = rng.choice(ids)
        o = objs[i]
        present_colors = {p.color for p in objs}
        present_shapes = {p.shape for p in objs}
        if rng.random() < 0.5:
            opts = [(c, o.shape) for c in COLORS if c not in present_colors and allowed(c, o.shape)]
        else:
            opts = [(o.color, s) for s in SHAPES if s not in present_shapes and allowed(o.color, s)]
        if not opts:
            return None
        color, shape = rng.choice(opts)
        return _map_nps(cap, lambda np_: (np_[0], np_[1], np_[2], color, shape) if np_[0] == i else np_)

    def _recount(self, rng, objs, cap, allowed):
        """Change the stated number of objects (count template) or of shapes (shape template).

        The false total is drawn with the frequencies true totals have, and objects are added
        (uniform shapes, absent colours) or removed at random, so a count caption's text is
        distributed alike whether it is true or false.
        """
        if len(cap) != 1 or cap[0][0] not in ("count", "shapes"):
            return None
        n = len(objs)
        opts = [k for k in range(1, self.max_objects + 1) if k != n]
        if not opts:
            return None
        target = rng.choices(opts, [self._count_prob[k] for k in opts])[0]
        cl = cap[0]
        if cl[0] == "count":
            nps = list(cl[2])
            if target < n:
                for _ in range(n - target):
                    del nps[rng.randrange(len(nps))]
            else:
                sized = nps[0][2] is not None
                absent = [c for c in COLORS if c not in {o.color for o in objs}]
                for color in rng.sample(absent, target - n):
                    shape = rng.choice([sh for sh in SHAPES if allowed(color, sh)])
                    extra = (-1, "a", rng.choice(SIZES) if sized else None, color, shape)
                    nps.insert(rng.randint(0, len(nps)), extra)
            return [("count", target, nps)]
        shapes = [s for c, s in cl[1] for _ in range(c)]
        if target < n:
            for _ in range(n - target):
                del shapes[rng.randrange(len(shapes))]
        else:
            shapes += [rng.choice(SHAPES) for _ in range(target - n)]
        counts = {}
        for s in shapes:
            counts[s] = counts.get(s, 0) + 1
        return [("shapes", [(c, s) for s, c in sorted(counts.items(), key=lambda kv: rng.random())])]

    # -- questions
    def _qa(self, rng, objs, train: bool) -> list[dict]:
        n = len(objs)
        qa = []
        shape_count = {}
        for o in objs:
            shape_count[o.shape] = shape_count.get(o.shape, 0) + 1
        unique = [o for o in objs if shape_count[o.shape] == 1]
        if unique:
            o = rng.choice(unique)
            q = f"what color is the {o.shape}?"
            qa.append({"question": q, "answer": o.color, "type": "color",
                       "grounding": [[len(q) - 1 - len(o.shape), len(q) - 1, [objs.index(o)]]]})
        o = rng.choice(objs)
        q = f"what shape is the {o.color} object?"
        qa.append({"question": q, "answer": o.shape, "type": "shape",
                   "grounding": [[len("what shape is the "), len(q) - 1, [objs.index(o)]]]})
        qa.append({"question": "how many objects are there?", "answer": NUMBER_WORDS[n], "type": "count",
                   "grounding": []})
        # exists: one yes and one no per image; the "no" is a near miss (a present colour with
        # another shape, or a present shape with an absent colour)
        o = rng.choice(objs)
        np_ = (objs.index(o), "a", None, o.color, o.shape)
        q = f"is there {_np_text(np_)}?"
        yes = {"question": q, "answer": "yes", "type": "exists",
               "grounding": [[len(q) - 1 - len(o.color) - 1 - len(o.shape), len(q) - 1, [np_[0]]]]}
        present = {(p.color, p.shape) for p in objs}
        colors = {p.color for p in objs}
        shapes = {p.shape for p in objs}
        misses = [(c, s) for c in COLORS for s in SHAPES
                  if (c, s) not in present and (c in colors or s in shapes)
                  and not (train and (c, s) in _HELDOUT)]
        c, s = rng.choice(misses)
        no = {"question": f"is there {_np_text((0, 'a', None, c, s))}?", "answer": "no", "type": "exists",
              "grounding": []}  # names no object
        qa.extend([yes, no] if rng.random() < 0.5 else [no, yes])
        if n >= 2:
            i, j = rng.sample(range(n), 2)
            rel = relation_of(objs[i], objs[j])
            ans = rng.random() < 0.5
            asked = rel if ans else OPPOSITE[rel]
            first = f"{objs[i].color} {objs[i].shape}"
            second = f"{objs[j].color} {objs[j].shape}"
            q = f"is the {first} {_rel_text(asked, rng.random() < 0.5)} the {second}?"
            words = (8 + len(first), len(q) - 6 - len(second))  # the relation asked about
            qa.append({"question": q, "answer": "yes" if ans else "no", "type": "relation",
                       "grounding": [[7, 7 + len(first), [i]],
                                     [len(q) - 1 - len(second), len(q) - 1, [j]],
                                     [*words, [i], "subject"], [*words, [j], "object"]]})
        return qa


# ----------------------------------------------------------------------------- streaming
class SyntheticStream(torch.utils.data.IterableDataset):
    """Endless stream of ``world.sample(start + k, split)`` for k = 0, 1, 2, ...

    Under a DataLoader with W workers, the stream is cut into chunks of ``chunk`` indices and
    worker w takes chunks w, w + W, w + 2W, ... Since the DataLoader takes batches from the
    workers in turn, setting ``chunk`` to the DataLoader's batch size gives exactly the same
    order of samples as with no workers (chunk=1 does the same for batch_size=1).
    ``transform(record)``, if given, is applied to each record (e.g. to make tensors).
    """

    def __init__(self, world: SyntheticWorld, split: str = "train", start: int = 0,
                 single_object: bool = False, chunk: int = 1, transform=None):
        super().__init__()
        self.world, self.split, self.start = world, split, int(start)
        self.single_object, self.chunk, self.transform = single_object, max(1, int(chunk)), transform

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        k = w
        while True:
            base = self.start + k * self.chunk
            for index in range(base, base + self.chunk):
                rec = self.world.sample(index, self.split, self.single_object)
                yield self.transform(rec) if self.transform is not None else rec
            k += nw


# ----------------------------------------------------------------------------- on disk
def record_to_json(rec: dict, image_path: str) -> dict:
    """A sample as one JSONL object of the on-disk format (image replaced by its path)."""
    out = {"image": image_path}
    out.update({k: v for k, v in rec.items() if k != "image"})
    return out


def is_synthetic_world(folder) -> bool:
    """True when ``folder`` holds a dataset ``write_dataset`` wrote (its world.json says so)."""
    try:
        with open(os.path.join(folder, "world.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == "vlkit.data.synthetic"


def write_dataset(out_dir, num: int = 1000, seed: int = 0, image_size: int = 64,
                  splits: Sequence[str] = ("train", "val", "test"),
                  fractions: Sequence[float] = (0.8, 0.1, 0.1), sizes: dict | None = None,
                  max_objects: int = 3, single_object_prob: float = 0.35) -> dict:
    """Write ``out_dir/images/<split>_<index>.png`` and ``<split>.jsonl`` for each split,
    plus ``world.json``. Sizes are ``sizes[split]`` if given, else ``num`` shared by
    ``fractions`` (one per split). Returns {split: number written}."""
    world = SyntheticWorld(seed, image_size, max_objects, single_object_prob)
    if sizes is None:
        if len(fractions) != len(splits):
            raise ValueError("give one fraction per split")
        counts = [int(round(num * f)) for f in fractions]
        counts[0] += num - sum(counts) if abs(sum(fractions) - 1.0) < 1e-9 else 0
        sizes = dict(zip(splits, counts))
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    written = {}
    for split in splits:
        n = int(sizes.get(split, 0))
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            for i in range(n):
                rec = world.sample(i, split)
                rel = f"images/{split}_{i:06d}.png"
                rec["image"].save(os.path.join(out_dir, rel), compress_level=1)
                fh.write(json.dumps(record_to_json(rec, rel)) + "\n")
        written[split] = n
    meta = dict(world.config(), heldout=[list(p) for p in HELDOUT_COMBINATIONS], splits=written,
                generator="vlkit.data.synthetic")
    with open(os.path.join(out_dir, "world.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    return written


DEFAULT_SEED = 0  # the built-in world's seed (``--data synthetic``): the same world and test split everywhere


def synthetic_world(image_size: int, group_size: int = 1) -> "SyntheticWorld":
    """The built-in world of ``--data synthetic`` at an image size."""
    return SyntheticWorld(seed=DEFAULT_SEED, image_size=image_size, group_size=group_size)
