"""Records (dicts in the dataset format) -> model batches of tensors."""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from .answers import vqa_soft_scores
from .transforms import as_pil


def max_text_length(cfg) -> int | None:
    """The longest token sequence a model's text embeddings take (``max_text_len``, or a nested
    text config's ``context_length``); None when the config has neither."""
    for owner in (cfg, getattr(cfg, "text", None)):
        for name in ("max_text_len", "context_length"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


class ClassificationCollate:
    """{"image", "label"} records -> {"pixel_values": (B,3,H,W), "labels": (B,)}.

    With ``patch_grid`` (the synthetic world's records, which list their ``objects``) also
    ``patch_labels`` (B, grid*grid): the class of the object under each patch, or the
    background class ``len(classes)``. Records without a label (images of several objects)
    are then allowed and get label -100 (no image-level loss)."""

    def __init__(self, transform, classes: list[str], patch_grid: int = 0):
        self.transform = transform
        self.index = {name: i for i, name in enumerate(classes)}
        self.patch_grid = int(patch_grid)
        if self.patch_grid and tuple(getattr(transform, "scale", (1.0, 1.0))) != (1.0, 1.0) \
                and getattr(transform, "train", False):
            raise ValueError("patch labels need the whole image: a transform without random crops "
                             "(scale=(1, 1))")

    def __call__(self, records: list[dict], rngs: list[random.Random] | None = None) -> dict:
        from .synthetic import patch_labels
        pixels, labels, dense = [], [], []
        for j, rec in enumerate(records):
            label = rec.get("label")
            if self.patch_grid and label is None:
                labels.append(-100)
            elif label not in self.index:
                raise ValueError(f"record {rec.get('image', j)!r}: label {label!r} is not one of "
                                 f"the {len(self.index)} classes")
            else:
                labels.append(self.index[label])
            rng = rngs[j] if rngs else None
            if not self.patch_grid:
                pixels.append(self.transform(rec["image"], None, rng)[0])
            else:
                image, _, flipped = self.transform(rec["image"], None, rng, return_flip=True)
                pixels.append(image)
                if "objects" not in rec:
                    raise ValueError(f"record {rec.get('image', j)!r}: patch labels need its 'objects'")
                dense.append(patch_labels(rec["objects"], self.patch_grid, self.index, len(self.index),
                                          flipped))
        out = {"pixel_values": torch.stack(pixels), "labels": torch.tensor(labels)}
        if self.patch_grid:
            out["patch_labels"] = torch.tensor(dense)
        return out


def check_negative_weights(weights: dict[str, float] | None) -> dict[str, float] | None:
    if not weights:
        return None
    for kind, w in weights.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise ValueError(f"negative_weights[{kind!r}] must be a finite number >= 0, got {w!r}")
    return {str(k): float(w) for k, w in weights.items()}


def draw_negatives(pool: list[dict], n: int, rng: random.Random,
                   weights: dict[str, float] | None = None) -> list[dict]:
    """Up to ``n`` of ``pool`` without replacement: uniformly, or with ``weights`` by kind
    (weighted sampling without replacement: each item's key u ** (1 / w), the largest kept)."""
    if weights is None:
        return rng.sample(pool, min(n, len(pool)))
    keyed = []
    for i, neg in enumerate(pool):
        w = weights.get(neg.get("kind"), 1.0)
        if w > 0:
            keyed.append((rng.random() ** (1.0 / w), i))
    keyed.sort(reverse=True)
    return [pool[i] for _, i in keyed[:n]]


class ImageTextCollate:
    """Image-caption records -> pixels + tokenised captions.

    In training one reference caption is drawn per image (from ``captions`` when present). With
    ``negatives > 0`` up to that many of the record's ``negatives`` captions are added per image
    as ``neg_input_ids`` / ``neg_attention_mask`` with ``neg_owner`` (the image each belongs to)
    -- drawn without replacement, uniformly or, with ``negative_weights`` ({kind: weight}, kinds
    not named weigh 1, weight 0 never drawn), in proportion to the weight of each one's ``kind``
    and ``neg_edits_caption`` (False where the negative names a ``source`` other than the
    caption drawn for its image: it edits another caption of the image).
    With ``paired=True`` (the default) the reference caption drawn for an image is the ``source``
    of its first drawn negative when the negative names one, so the batch holds the minimal pair
    itself (caption and its one-word edit on the same image) rather than an edit of a caption
    the model does not see next to it; without a source the caption is drawn as usual.
    A horizontal flip swaps left/right in the caption, its negatives and its question alike.
    Every text is truncated to ``max_length`` tokens (the tokenizer's own limit when None).

    ``word_ids=True`` adds the captions' ``word_ids`` (B, L): the word each token belongs to,
    -1 for special and padding positions (for whole-word masking).

    ``answers`` (an answer vocabulary) turns on VQA: one of each record's ``qa`` entries is drawn
    and batched as ``question_input_ids`` / ``question_attention_mask`` with ``vqa_targets``
    (B, len(answers)), the soft scores min(1, k/3) of the entry's annotator ``answers`` list, or
    1 at its single ``answer``; an answer outside the vocabulary scores nothing. With
    ``answer_tokens`` (a model that writes its answers with a decoder, BLIP) the entry's answer
    (the first of its ``answers``) is tokenised too, as ``answer_input_ids`` /
    ``answer_attention_mask``, flipped with the image as the question is.

    ``grounding_grid`` (rows, columns of the model's patch grid) adds phrase-grounding targets
    (``vlkit.data.grounding``): ``grounding`` (B, L, rows * columns) for the captions, from the
    records' ``captions_grounding``, and ``question_grounding`` for the questions, from each
    ``qa`` entry's ``grounding``; a text without grounding gets zero rows (no supervision).
    ``grounding_roles`` and ``question_grounding_roles`` (B, 2, L, rows * columns) hold the
    subjects and objects of the relation phrases (entries with a role).

    ``fused_rows=(n, offset)``: for a model that fuses only every n-th row of the global batch
    (VLMo's ``fusion_every``), with this process's rows starting at global row ``offset``: the
    other rows get no negatives and all-zero grounding targets (they feed only the unimodal
    passes), which spares drawing their negatives' text and grounding. Their captions are
    chosen as before (the same random draws), so the fused rows' batch is the one the full
    collate makes.

    ``false_words=True`` adds the records' ``false_captions`` (texts false of the image from
    the word at character ``false_from`` on, given the words before it; fused rows only) as
    ``false_input_ids`` / ``false_attention_mask`` with ``false_owner`` (the image each belongs
    to) and ``false_position`` (the index of that word's first token). A ``false_from`` that is
    not the start of a word inside the text, or a word cut off by ``max_length``, is an error
    naming the record.
    """

    def __init__(self, transform, tokenizer, max_length: int | None = None, negatives: int = 0,
                 random_caption: bool = True, word_ids: bool = False,
                 answers: Sequence[str] | None = None, paired: bool = True,
                 grounding_grid: tuple[int, int] | None = None,
                 negative_weights: dict[str, float] | None = None, answer_tokens: bool = False,
                 fused_rows: tuple[int, int] = (1, 0), false_words: bool = False):
        self.transform, self.tokenizer = transform, tokenizer
        self.false_words = bool(false_words)
        every, offset = fused_rows
        if not (_is_index(every) and every >= 1 and _is_index(offset) and offset >= 0):
            raise ValueError(f"fused_rows: (every n-th row, offset) with n >= 1 and offset >= 0, got {fused_rows!r}")
        self.fused_rows = (every, offset)
        self.answer_tokens = answer_tokens
        self.negative_weights = check_negative_weights(negative_weights)
        self.grounding_grid = tuple(grounding_grid) if grounding_grid else None
        if self.grounding_grid and getattr(transform, "train", False) and \
                tuple(getattr(transform, "scale", (1.0, 1.0))) != (1.0, 1.0):
            raise ValueError("grounding: the boxes are fractions of the whole image, so training "
                             "images must not be cropped (an ImageTransform with scale=(1.0, 1.0))")
        self.paired = paired
        self.max_length, self.negatives, self.random_caption = max_length, negatives, random_caption
        self.word_ids = word_ids
        self.answers = list(answers) if answers is not None else None
        if self.answers is not None and not self.answers:
            raise ValueError("answers: the VQA answer vocabulary is empty")
        self.answer_index = {a: i for i, a in enumerate(self.answers or [])}

    def __call__(self, records: list[dict], rngs: list[random.Random] | None = None) -> dict:
        pixels, captions, negs, owners, questions, annotated, edits = [], [], [], [], [], [], []
        false, false_owners = [], []  # (text, text before its false word, record name)
        written = []
        grounded = []  # (record, caption as written, question as written or None, flipped, fused row)
        every, offset = self.fused_rows
        for j, rec in enumerate(records):
            rng = rngs[j] if rngs else random.Random(0)
            fused = (offset + j) % every == 0
            options = rec.get("captions") or [rec["caption"]]
            caption = rng.choice(options) if self.random_caption else rec["caption"]
            chosen = []
            if self.negatives:
                drawn = draw_negatives(list(rec.get("negatives") or []), self.negatives, rng,
                                       self.negative_weights)
                chosen = [n["caption"] for n in drawn]
                for n in drawn:
                    source = n.get("source")
                    if _is_index(source) and not 0 <= source < len(options):
                        raise ValueError(f"record {rec.get('image_path', j)!r}: negative "
                                         f"{n['caption']!r} names source caption {source}, "
                                         f"but the record has {len(options)} captions")
                source = drawn[0].get("source") if drawn and self.paired else None
                if _is_index(source):
                    caption = options[source]
                shown = options.index(caption) if caption in options else None
                if not fused:  # drawn for the caption's choice alone
                    drawn, chosen = [], []
                edits.extend(not _is_index(n.get("source")) or n["source"] == shown for n in drawn)
            asked = []
            if self.answers is not None:
                question, answers = _draw_question(rec, j, rng)
                asked = [question, answers[0]] if self.answer_tokens else [question]
                annotated.append(answers)
            image = rec["image"]
            if self.grounding_grid is not None:
                image = as_pil(image)
                if image.width != image.height:
                    raise ValueError(f"record {rec.get('image_path', j)!r}: grounding needs square "
                                     f"images (boxes are fractions of the side), got {image.size}")
            falsified = [f for f in rec.get("false_captions") or () if fused] if self.false_words else []
            marked = [t for f in falsified for t in _false_split(f, rec.get("image_path", j))]
            pixel, texts, flipped = self.transform(image, [caption] + chosen + asked + marked, rng,
                                                   return_flip=True)
            if marked:
                texts, cut = texts[:len(texts) - len(marked)], texts[len(texts) - len(marked):]
                false.extend((cut[k], cut[k + 1], rec.get("image_path", j)) for k in range(0, len(cut), 2))
                false_owners.extend([j] * (len(cut) // 2))
            grounded.append((rec, caption, asked[0] if asked else None, flipped, fused))
            pixels.append(pixel)
            captions.append(texts[0])
            negs.extend(texts[1:1 + len(chosen)])
            owners.extend([j] * len(chosen))
            questions.extend(texts[1 + len(chosen):][:1])
            written.extend(texts[2 + len(chosen):])  # the answer, with answer_tokens
        batch = {"pixel_values": torch.stack(pixels)}
        batch.update(self._tokens(captions, self.word_ids))
        if self.negatives:
            if negs:
                t = self._tokens(negs)
                batch["neg_input_ids"], batch["neg_attention_mask"] = t["input_ids"], t["attention_mask"]
            else:
                batch["neg_input_ids"] = torch.zeros(0, 1, dtype=torch.long)
                batch["neg_attention_mask"] = torch.zeros(0, 1, dtype=torch.long)
            batch["neg_owner"] = torch.tensor(owners, dtype=torch.long)
            batch["neg_edits_caption"] = torch.tensor(edits, dtype=torch.bool)
        if self.false_words:
            batch.update(self._false_tokens(false, false_owners))
        if self.answers is not None:
            t = self._tokens(questions)
            batch["question_input_ids"] = t["input_ids"]
            batch["question_attention_mask"] = t["attention_mask"]
            batch["vqa_targets"] = vqa_soft_scores(annotated, self.answer_index)
            if self.answer_tokens:
                t = self._tokens(written)
                batch["answer_input_ids"], batch["answer_attention_mask"] = t["input_ids"], t["attention_mask"]
        if self.grounding_grid is not None:
            t = self._grounding(grounded, captions, batch["input_ids"].shape[1], False)
            batch["grounding"], batch["grounding_roles"] = t[:, 0], t[:, 1:]
            if self.answers is not None:
                t = self._grounding(grounded, questions, batch["question_input_ids"].shape[1], True)
                batch["question_grounding"], batch["question_grounding_roles"] = t[:, 0], t[:, 1:]
        return batch

    def _grounding(self, grounded, read: list[str], length: int, question: bool) -> torch.Tensor:
        """(B, 3, length, cells) targets of the batch's captions (or questions) as the model reads
        them: names, then the subjects and objects of relation phrases."""
        from .grounding import grounding_targets
        rows = []
        for j, ((rec, caption, asked, flipped, fused), text) in enumerate(zip(grounded, read)):
            where = f"record {rec.get('image_path', j)!r}" if isinstance(rec.get("image_path"), str) \
                else f"record {j} of the batch"
            written = asked if question else caption
            spans = _spans_of(rec, written, question, where) if fused else []  # no spans: zero targets
            rows.append(grounding_targets(self.tokenizer, written, text, spans, rec.get("objects") or [],
                                          self.grounding_grid, length, flipped,
                                          max_length=self.max_length or self.tokenizer.max_length,
                                          where=f"{where}, text {written!r}", roles=True))
        return torch.stack(rows)

    def _false_tokens(self, false: list[tuple], owners: list[int]) -> dict:
        """``false_*`` of the batch: the texts' tokens and where each one's false word begins."""
        if not false:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return {"false_input_ids": empty, "false_attention_mask": empty.clone(),
                    "false_owner": torch.zeros(0, dtype=torch.long), "false_position": torch.zeros(0, dtype=torch.long)}
        t = self._tokens([text for text, _, _ in false])
        before = self.tokenizer([b for _, b, _ in false], max_length=None, padding="longest", truncation=False)
        positions = []
        for k, (text, _, name) in enumerate(false):
            n = int(before["attention_mask"][k].sum()) - 1  # [CLS] + the words before, without [SEP]
            if n >= int(t["attention_mask"][k].sum()) - 1 or \
                    not torch.equal(before["input_ids"][k, :n], t["input_ids"][k, :n]):
                raise ValueError(f"record {name!r}: false caption {text!r}: its false word is cut off "
                                 f"by max_length or does not start a token")
            positions.append(n)
        return {"false_input_ids": t["input_ids"], "false_attention_mask": t["attention_mask"],
                "false_owner": torch.tensor(owners, dtype=torch.long),
                "false_position": torch.tensor(positions, dtype=torch.long)}

    def _tokens(self, texts: list[str], word_ids: bool = False) -> dict:
        out = self.tokenizer(texts, max_length=self.max_length, padding="longest", truncation=True,
                             return_word_ids=word_ids)
        keys = ("input_ids", "attention_mask", "word_ids") if word_ids else ("input_ids", "attention_mask")
        return {k: out[k] for k in keys}


def false_caption_parts(entry) -> tuple[str, str] | None:
    """A ``false_captions`` entry as (its text, the text before its false word); None unless it
    is {"caption": str, "false_from": the offset of a word's first character inside it}."""
    text = entry.get("caption") if isinstance(entry, dict) else None
    at = entry.get("false_from") if isinstance(entry, dict) else None
    if not isinstance(text, str) or not _is_index(at) or not 0 < at < len(text) \
            or text[at - 1] != " " or text[at] == " ":
        return None
    return text, text[:at].rstrip()


def _false_split(entry, name) -> tuple[str, str]:
    parts = false_caption_parts(entry)
    if parts is None:
        raise ValueError(f"record {name!r}: false_captions entry {entry!r} needs a caption and "
                         "false_from, the offset of a word's first character inside it")
    return parts


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _spans_of(rec: dict, text: str, question: bool, where: str) -> list:
    """The grounding spans a record gives for one of its captions or questions ([] if none)."""
    if question:
        for entry in rec.get("qa") or []:
            if isinstance(entry, dict) and entry.get("question") == text:
                return entry.get("grounding") or []
        return []
    options = rec.get("captions") or [rec.get("caption")]
    table = rec.get("captions_grounding")
    if table is None or text not in options:
        return []
    if not isinstance(table, list) or len(table) != len(options):
        raise ValueError(f"{where}: 'captions_grounding' must be a list parallel to 'captions' "
                         f"({len(options)} captions)")
    return table[options.index(text)] or []


def _draw_question(rec: dict, j: int, rng: random.Random) -> tuple[str, list[str]]:
    """(question, annotator answers) of one of the record's ``qa`` entries. A single ``answer``
    counts as full agreement (three annotators), so its soft score is 1."""
    image = rec.get("image_path") or rec.get("image")
    where = f"record {image!r}" if isinstance(image, str) else f"record {j} of the batch"
    qa = rec.get("qa")
    if not qa:
        raise ValueError(f"{where}: no 'qa' questions (VQA training needs a 'qa' list in every record)")
    entry = rng.choice(qa)
    question = entry.get("question") if isinstance(entry, dict) else None
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: a 'qa' entry has no 'question' text")
    answers = entry.get("answers")
    if answers is None:
        answer = entry.get("answer")
        if not isinstance(answer, str):
            raise ValueError(f"{where}: the 'qa' entry {question!r} has no 'answer' (or 'answers' list)")
        answers = [answer] * 3
    elif not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' of the 'qa' entry {question!r} must be a list of strings")
    return question, answers


def select_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The part of an ``ImageTextCollate`` batch that belongs to the images ``rows`` (1-D
    indices): every per-image entry indexed by them, and the dataset negatives (``neg_*``) of
    those images alone, their ``neg_owner`` renumbered to the new rows."""
    b = batch["pixel_values"].shape[0]
    rows = rows.to(torch.long)
    out = {}
    if "neg_owner" in batch:
        owner = batch["neg_owner"]
        new_index = torch.full((b,), -1, dtype=torch.long)
        new_index[rows.cpu()] = torch.arange(rows.numel())
        mapped = new_index[owner.cpu()]
        kept = (mapped >= 0).nonzero().flatten()
        for key, value in batch.items():
            if key.startswith("neg_"):
                out[key] = value[kept.to(value.device)]
        out["neg_owner"] = mapped[kept].to(owner.device)
    for key, value in batch.items():
        if key.startswith("neg_"):
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == b:
            out[key] = value[rows.to(value.device)]
        elif isinstance(value, list) and len(value) == b:
            out[key] = [value[i] for i in rows.tolist()]
        else:
            raise ValueError(f"select_rows: batch entry {key!r} is not one value per image "
                             f"({b} images)")
    return out
