"""Phrase grounding targets: which image patches each text token names.

A text's grounding is a list of ``[start, end, [object, ...]]`` entries: the characters
``text[start:end]`` name the listed objects of the record (indices into ``objects``). The
synthetic world writes them for every true caption (``captions_grounding``, parallel to
``captions``) and question (``qa[k]["grounding"]``); a dataset of one's own can carry the same
fields, with objects given by a ``box`` ``[x0, y0, x1, y1]`` (fractions of the image side) or by
a square's centre ``x``, ``y`` and side ``extent``.

An entry may carry a fourth element, a role: ``[start, end, [object], "subject"]`` and
``[start, end, [object], "object"]`` over the same span mark a relation phrase ("left of") and
the two objects it relates, so a model can be taught to look, from the relation words, at the
first object with one head and at the second with another (``relation_weight`` of ViLT and
ALBEF). The synthetic world writes them for every relation clause and relation question.

``grounding_targets`` turns one text's entries into a (tokens, patches) 0/1 matrix for a model's
patch grid (with ``roles=True``, three: names, subjects, objects): a token covered by a span marks the patches its objects cover. A patch is covered by
an object when the object's box takes at least a quarter of the patch or a quarter of the box
(small objects still own the patch they sit in). Horizontal flips mirror the boxes; the text may
have had "left"/"right" swapped (``swap_left_right``), which changes no word boundary, so spans
are mapped to words on the text they were written for and to tokens on the text the model reads.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["object_box", "object_cells", "grounding_targets", "check_grounding", "ROLES"]

ROLES = ("subject", "object")  # the optional fourth element of an entry


def object_box(obj: dict, where: str = "object") -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in fractions of the image side, from ``box`` or ``x``/``y``/``extent``."""
    if "box" in obj:
        box = obj["box"]
        if not (isinstance(box, (list, tuple)) and len(box) == 4):
            raise ValueError(f"{where}: 'box' must be [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
    elif all(k in obj for k in ("x", "y", "extent")):
        half = float(obj["extent"]) / 2
        x0, y0, x1, y1 = obj["x"] - half, obj["y"] - half, obj["x"] + half, obj["y"] + half
    else:
        raise ValueError(f"{where}: needs a 'box' [x0, y0, x1, y1] or 'x', 'y' and 'extent' "
                         "(fractions of the image side) to be grounded")
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"{where}: empty box {(x0, y0, x1, y1)}")
    return x0, y0, x1, y1


def object_cells(box, grid: tuple[int, int], flipped: bool = False) -> list[int]:
    """Row-major indices of the patches of a ``grid`` (rows, columns) tiling that the box
    covers (at least a quarter of the patch, or of the box)."""
    gh, gw = grid
    x0, y0, x1, y1 = box
    if flipped:
        x0, x1 = 1.0 - x1, 1.0 - x0
    ch, cw = 1.0 / gh, 1.0 / gw
    need = 0.25 * min(ch * cw, (x1 - x0) * (y1 - y0))
    cells = []
    for r in range(gh):
        oy = min((r + 1) * ch, y1) - max(r * ch, y0)
        if oy <= 0:
            continue
        for c in range(gw):
            ox = min((c + 1) * cw, x1) - max(c * cw, x0)
            if ox > 0 and ox * oy >= need:
                cells.append(r * gw + c)
    return cells


def check_grounding(spans, text: str, num_objects: int, where: str) -> None:
    """A clear error for a malformed grounding list of ``text``."""
    if not isinstance(spans, (list, tuple)):
        raise ValueError(f"{where}: grounding must be a list of [start, end, [objects]], got {spans!r}")
    for entry in spans:
        ok = isinstance(entry, (list, tuple)) and len(entry) in (3, 4) and \
            all(isinstance(v, int) and not isinstance(v, bool) for v in entry[:2]) and \
            isinstance(entry[2], (list, tuple))
        if not ok:
            raise ValueError(f"{where}: grounding entry {entry!r} is not [start, end, [objects]] "
                             "or [start, end, [objects], role]")
        if len(entry) == 4 and entry[3] not in ROLES:
            raise ValueError(f"{where}: grounding entry {entry!r}: the role must be one of {ROLES}")
        start, end, objs = entry[:3]
        if not 0 <= start < end <= len(text):
            raise ValueError(f"{where}: span [{start}, {end}) lies outside the text {text!r}")
        bad = [o for o in objs if not (isinstance(o, int) and 0 <= o < num_objects)]
        if bad:
            raise ValueError(f"{where}: grounding of {text[start:end]!r} names objects {bad}, "
                             f"but the record has {num_objects}")


def grounding_targets(tokenizer, written: str, read: str, spans: Sequence, objects: Sequence[dict],
                      grid: tuple[int, int], length: int, flipped: bool = False,
                      max_length: int | None = None, where: str = "record",
                      roles: bool = False) -> torch.Tensor:
    """(length, rows * columns) float 0/1 targets for the tokens of ``read`` as the tokenizer
    frames it (begin token first, then at most ``max_length - 2`` text tokens as the tokenizer
    truncates; rows up to ``length``, the batch's padded length). ``spans`` index
    ``written``; ``read`` is the same text as the model gets it (``written`` itself, or with
    "left"/"right" swapped after a flip), with the same words. Entries with a role are left
    out, unless ``roles``: then the result is (3, length, cells), the names, the subjects and the
    objects of relation phrases."""
    check_grounding(spans, written, len(objects), where)
    out = torch.zeros(1 + len(ROLES), length, grid[0] * grid[1])
    if not roles:
        spans = [e for e in spans if len(e) == 3]
    if not spans:
        return out if roles else out[0]
    src = tokenizer.backend.encode(written, add_special_tokens=False)
    dst = tokenizer.backend.encode(read, add_special_tokens=False) if read != written else src
    if len([w for w in set(src.word_ids) if w is not None]) != \
            len([w for w in set(dst.word_ids) if w is not None]):
        raise ValueError(f"{where}: {read!r} does not have the words of {written!r}")
    kept = len(dst.ids) if max_length is None else min(len(dst.ids), max_length - 2)
    cells = {}
    for entry in spans:
        start, end, objs = entry[:3]
        channel = out[1 + ROLES.index(entry[3])] if len(entry) == 4 else out[0]
        words = {w for w, (a, b) in zip(src.word_ids, src.offsets) if w is not None and a < end and b > start}
        marked = set()
        for o in objs:
            if o not in cells:
                cells[o] = object_cells(object_box(objects[o], f"{where}: object {o}"), grid, flipped)
            marked.update(cells[o])
        if not marked:
            continue
        for k, w in enumerate(dst.word_ids):
            if w in words and k < kept and k + 1 < length:  # +1: the begin token
                channel[k + 1, sorted(marked)] = 1.0
    return out if roles else out[0]
