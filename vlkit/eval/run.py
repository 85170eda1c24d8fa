"""``vlkit eval``: every task a model supports on a dataset's split, with DESIGN.md's metric names.

Tasks: classification (image classifier head), retrieval, zeroshot, itm (compositional
matching against the data's negatives), vqa, caption. A task the model cannot do is listed under
``unsupported``; a task the data has nothing for is listed under ``no_data``.

Dual encoders (``encode_image`` / ``encode_text``) retrieve by embedding similarity over the whole
split. Fusion models, which score a pair only by running it through the model
(``score(pixel_values, input_ids, attention_mask)``), retrieve among the first
``FUSION_RETRIEVAL_SIZE`` images of the split, each with its first caption, scoring all N x N
pairs; ``retrieval_size`` sets N for either kind (the result records it as ``retrieval_images``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import metrics as M
from .zeroshot import class_embeddings

ALL_TASKS = ("classification", "retrieval", "zeroshot", "itm", "vqa", "caption")
SYNTHETIC_TEST_PAIRS = 1000
SYNTHETIC_TEST_SINGLE = 1000
FUSION_RETRIEVAL_SIZE = 100  # images (and as many captions) when every pair costs a forward pass
RERANK_K = 16  # ITC candidates re-scored by ITM per query (models with both)


def load_records(data: str, split: str, image_size: int, allow_outside: bool = False):
    """(image-text records, single-object records) of a split (image paths inside the dataset
    folder unless ``allow_outside``)."""
    if data == "synthetic":
        from ..data.synthetic import synthetic_world
        world = synthetic_world(image_size)
        return (world.records(split, SYNTHETIC_TEST_PAIRS),
                world.records(split, SYNTHETIC_TEST_SINGLE, single_object=True))
    from ..data.jsonl import JsonlDataset
    ds = JsonlDataset(data, split, allow_outside=allow_outside)
    records = [ds[i] for i in range(len(ds))]
    return records, [r for r in records if r.get("label")]


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def _embed_images(pipe, records, batch_size=128):
    return torch.cat([pipe.embed_images([r["image"] for r in chunk]) for chunk in _batches(records, batch_size)])


def _is_dual(model) -> bool:
    return hasattr(model, "encode_image") and hasattr(model, "encode_text")


@torch.no_grad()
def _pair_scores(pipe, images, texts, batch_size=128) -> torch.Tensor:
    """Score of zipped (image, text) pairs: the model's ``score`` (an ITM log-probability, or an
    embedding similarity), else the ITM match probability."""
    model = pipe.model
    out = []
    for i in range(0, len(texts), batch_size):
        img, txt = images[i:i + batch_size], texts[i:i + batch_size]
        if hasattr(model, "score"):
            t = pipe.tokens(txt)
            out.append(model.score(pipe.pixels(img), t["input_ids"], t["attention_mask"]).float().cpu())
        else:
            out.append(pipe.match(img, txt).cpu())
    return torch.cat(out)


@torch.no_grad()
def _score_matrix(pipe, images, texts, batch_size=128) -> torch.Tensor:
    """(n_images, n_texts) scores of every image with every text by a fusion model's ``score``."""
    model = pipe.model
    pixels = torch.cat([pipe.pixels(chunk) for chunk in _batches(images, batch_size)])
    tokens = pipe.tokens(texts)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    n_texts = len(texts)
    flat = torch.empty(len(images) * n_texts)
    for start in range(0, flat.numel(), batch_size):
        pair = torch.arange(start, min(start + batch_size, flat.numel()))
        i, j = (pair // n_texts).to(pixels.device), (pair % n_texts).to(ids.device)
        flat[pair] = model.score(pixels[i], ids[j], mask[j]).float().cpu()
    return flat.view(len(images), n_texts)


def eval_classification(pipe, singles):
    names = pipe.model.cfg.class_names
    labels = torch.tensor([names.index(r["label"]) for r in singles])
    preds = []
    for chunk in _batches(singles, 256):
        logits = M.check_scores(pipe.model(pipe.pixels([r["image"] for r in chunk])).logits, "classification")
        preds.append(logits.argmax(-1).cpu())
    correct = (torch.cat(preds) == labels).float()
    out = {"classification.top1": correct.mean().item()}
    held = torch.tensor([bool(r.get("heldout")) for r in singles])
    if held.any():
        out["classification.top1_seen"] = correct[~held].mean().item() if (~held).any() else float("nan")
        out["classification.top1_heldout"] = correct[held].mean().item()
    return out


def retrieval_images(model, n_records: int, size: int | None) -> int | None:
    """How many images retrieval uses when not the whole split (see the module docstring)."""
    if size is None and not _is_dual(model):
        size = FUSION_RETRIEVAL_SIZE
    return None if size is None else min(size, n_records)


def eval_retrieval(pipe, records, size: int | None = None, rerank_k: int = RERANK_K):
    """Recall@1/5/10 both ways. A model with embeddings and an ITM head (ALBEF) is scored
    as DESIGN.md says, ITC top ``rerank_k`` re-ranked by ITM (``retrieval.*``), and by ITC alone
    (``retrieval_itc.*``); ``rerank_k=0`` reports ITC alone as ``retrieval.*``."""
    size = retrieval_images(pipe.model, len(records), size)
    if size is not None:  # the first images, each with its first caption
        records = records[:size]
        texts, owner = [r["caption"] for r in records], list(range(len(records)))
    else:
        texts, owner = [], []
        for i, r in enumerate(records):
            for c in r.get("captions") or [r["caption"]]:
                texts.append(c)
                owner.append(i)
    if _is_dual(pipe.model):
        img = _embed_images(pipe, records)
        txt = torch.cat([pipe.embed_texts(chunk) for chunk in _batches(texts, 256)])
        res = M.retrieval_recall(img, txt, torch.tensor(owner))
        if rerank_k and hasattr(pipe.model, "match"):
            out = {f"retrieval_itc.{k}": v for k, v in res.items()}
            out.update({f"retrieval.{k}": v for k, v in _reranked(pipe, records, texts, owner, rerank_k).items()})
            return out
    else:
        scores = _score_matrix(pipe, [r["image"] for r in records], texts)
        res = M.retrieval_recall_from_scores(lambda i0, i1: scores[i0:i1], len(records), len(texts),
                                             torch.tensor(owner))
    return {f"retrieval.{k}": v for k, v in res.items()}


def _reranked(pipe, records, texts, owner, k: int) -> dict:
    """Recall of ITC top-k re-ranked by ITM, each direction from its own re-scored matrix."""
    from .rerank import rerank
    px = torch.cat([pipe.pixels([r["image"] for r in chunk]) for chunk in _batches(records, 256)])
    tok = pipe.tokens(texts)
    scores = rerank(pipe.model, px, tok["input_ids"], tok["attention_mask"], k=k)
    n_img, n_txt, owner = len(records), len(texts), torch.tensor(owner)
    i2t = M.retrieval_recall_from_scores(lambda i0, i1: scores["i2t"][i0:i1], n_img, n_txt, owner)
    t2i_scores = scores["t2i"].T  # (images, texts): column j is text j's re-ranked scores
    t2i = M.retrieval_recall_from_scores(lambda i0, i1: t2i_scores[i0:i1], n_img, n_txt, owner)
    return {**{k_: v for k_, v in i2t.items() if k_.startswith("i2t")},
            **{k_: v for k_, v in t2i.items() if k_.startswith("t2i")}}


def eval_zeroshot(pipe, singles, labels=None):
    if labels is None:
        labels = sorted({r["label"] for r in singles})
        try:
            from ..data.synthetic import class_names
            if set(labels) <= set(class_names()):
                labels = class_names()
        except ImportError:
            pass
    classes = class_embeddings(pipe, labels)
    img = _embed_images(pipe, singles)
    target = torch.tensor([labels.index(r["label"]) for r in singles])
    held = torch.tensor([bool(r.get("heldout")) for r in singles])
    groups = {"seen": ~held, "heldout": held} if held.any() else None
    res = M.zero_shot_accuracy(img, classes, target, groups)
    return {f"zeroshot.{k}": v for k, v in res.items()}


def eval_itm(pipe, records):
    images, neg, kinds, pos_of = [], [], [], []
    pos_pairs: dict = {}  # (record, true caption) -> index: each true pair is scored once
    for i, r in enumerate(records):
        captions = r.get("captions") or [r["caption"]]
        for n in r.get("negatives") or []:
            # a negative is scored against the true caption it was edited from, where the data
            # says which, so that wording differences do not count
            source = n.get("source", 0)
            pos = captions[source] if isinstance(source, int) and source < len(captions) else r["caption"]
            pos_of.append(pos_pairs.setdefault((i, pos), len(pos_pairs)))
            images.append(r["image"])
            neg.append(n["caption"])
            kinds.append(n["kind"])
    if not kinds:
        return None
    unique = list(pos_pairs)
    pos_scores = _pair_scores(pipe, [records[i]["image"] for i, _ in unique], [c for _, c in unique])
    res = M.compositional_accuracy(pos_scores[torch.tensor(pos_of)], _pair_scores(pipe, images, neg), kinds)
    return {f"itm.{k}": v for k, v in res.items()}


RANKED_PAIRS = 8192  # (question, candidate answer) pairs scored in one pass of a decoder


def vqa_candidates(model) -> list[str] | None:
    """The answers a model that writes its answers (BLIP: ``answer_tokens``) picks from, ranked by
    their likelihood: the answers it was trained on (its config's ``answer_names``). None when it
    has none (it generates its answers) or answers with a classifier head."""
    if not hasattr(model, "answer_tokens"):
        return None
    return list(getattr(model.cfg, "answer_names", None) or []) or None


def eval_vqa(pipe, records):
    """Exact-match accuracy, overall and by question type. A model that writes its answers
    ranks the answers it was trained on (``vqa_candidates``), or generates when it has none."""
    images, questions, answers, types = [], [], [], []
    for r in records:
        for qa in r.get("qa") or []:
            images.append(r["image"])
            questions.append(qa["question"])
            answers.append(qa["answer"] if "answer" in qa else qa["answers"])
            types.append(qa.get("type") or "other")
    if not questions:
        return None
    preds, candidates = [], vqa_candidates(pipe.model)
    options = {} if candidates is None else {"candidates": candidates}
    size = 128 if candidates is None else max(1, min(128, RANKED_PAIRS // len(candidates)))
    for i in range(0, len(questions), size):
        preds.extend(pipe.answer(images[i:i + size], questions[i:i + size], **options))
    res = M.vqa_accuracy(preds, answers, types)
    return {f"vqa.{k}": v for k, v in res.items()}


def eval_caption(pipe, records, beams: int = 1, rerank: int | None = None):
    """BLEU-4 and CIDEr-D of captions against all reference captions, decoded greedily,
    by beam search (``beams`` > 1) or as the best of ``rerank`` beams by the model's score
    (``Pipeline.caption``; None: the model's default decoding). On the synthetic world, its
    check of every caption and ``caption.facts``: the facts (noun phrases and relations) a
    caption states, on average (an ungrammatical one states none)."""
    options = {"num_beams": beams} if beams > 1 else {}
    if rerank is not None:
        options["rerank"] = rerank
    preds = []
    for chunk in _batches(records, 64):
        preds.extend(pipe.caption([r["image"] for r in chunk], **options))
    refs = [r.get("captions") or [r["caption"]] for r in records]
    out = {"caption.bleu4": M.bleu4(preds, refs), "caption.cider": M.cider(preds, refs)}
    if all(r.get("objects") for r in records):  # the synthetic world's: read with its grammar
        from ..data.synthetic import caption_facts, caption_is_true
        out["caption.correct"] = sum(caption_is_true(p, r["objects"]) for p, r in zip(preds, records)) / len(records)
        facts = [caption_facts(p, r["objects"]) for p, r in zip(preds, records)]
        out["caption.grammatical"] = sum(f is not None for f in facts) / len(records)
        out["caption.facts"] = sum(f["phrases"] + f["relations"] for f in facts if f is not None) / len(records)
        for key in ("phrases", "relations"):  # of the facts stated in the grammatical captions
            stated = sum(f[key] for f in facts if f is not None)
            if stated:
                out[f"caption.{key}_true"] = sum(f[f"{key}_true"] for f in facts if f is not None) / stated
    return out


def _writes_answers(model) -> bool:
    """A model that decodes its answers (BLIP) and was made for VQA: trained on answers (its
    config's ``answer_names``) or a VQA layout with no retrieval heads (Hugging Face's
    ``BlipForQuestionAnswering``). A pretraining-only BLIP writes captions, not answers: VQA is
    unsupported for it rather than scored near zero."""
    if not hasattr(model, "answer_tokens"):
        return False
    cfg = model.cfg
    return bool(getattr(cfg, "answer_names", None)) or not getattr(cfg, "retrieval_heads", True)


SUPPORT = {  # task -> what the model needs
    "classification": lambda m: getattr(m, "head", None) is not None,
    "retrieval": lambda m: _is_dual(m) or hasattr(m, "score"),
    "zeroshot": lambda m: hasattr(m, "encode_image") and hasattr(m, "encode_text"),
    "itm": lambda m: hasattr(m, "match") or hasattr(m, "score"),
    "vqa": lambda m: hasattr(m, "answer") or hasattr(m, "vqa_logits") or _writes_answers(m),
    "caption": lambda m: hasattr(m, "generate"),
}


RUNNERS = {"classification": eval_classification, "zeroshot": eval_zeroshot,
           "retrieval": eval_retrieval, "itm": eval_itm, "vqa": eval_vqa, "caption": eval_caption}


def evaluate(pipe, data: str = "synthetic", split: str = "test", tasks=ALL_TASKS,
             retrieval_size: int | None = None, records: tuple[list, list] | None = None,
             rerank_k: int = RERANK_K, allow_outside: bool = False, caption_beams: int = 1,
             caption_rerank: int | None = None) -> dict:
    """Metrics of ``tasks`` on a split; ``retrieval_size``: see the module docstring.
    ``records``: (image-text records, single-object records) to use instead of loading the split.
    ``caption_beams``: captions by beam search of that width (recorded when > 1);
    ``caption_rerank`` K: the best of K beams by the model's score (0: none; None: with
    ``caption_beams`` 1, the model's default decoding, e.g. BLIP's ``caption_rerank``; recorded
    when K > 0)."""
    if isinstance(caption_beams, bool) or not isinstance(caption_beams, int) or caption_beams < 1:
        raise ValueError(f"caption_beams must be a whole number >= 1, got {caption_beams!r}")
    if caption_rerank and caption_beams > 1:
        raise ValueError(f"caption_rerank={caption_rerank} draws its own beams: leave caption_beams at 1")
    # how many beams the captions are ranked over (checks caption_rerank)
    ranked = pipe.caption_rerank(caption_rerank, {"num_beams": caption_beams} if caption_beams > 1 else {})
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(ALL_TASKS)}")
    records, singles = records if records is not None else \
        load_records(data, split, pipe.model.image_spec()["size"], allow_outside)
    out: dict = {"metrics": {}, "unsupported": [], "no_data": [], "data": data, "split": split,
                 "model": pipe.model.model_name}
    for task in tasks:
        if not SUPPORT[task](pipe.model):
            out["unsupported"].append(task)
            continue
        if task in ("classification", "zeroshot"):  # single-object (labelled) images
            res = RUNNERS[task](pipe, singles) if singles else None
        elif task == "retrieval":
            res = eval_retrieval(pipe, records, retrieval_size, rerank_k) if records else None
            images = retrieval_images(pipe.model, len(records), retrieval_size)
            if res is not None and images is not None:
                out["retrieval_images"] = images
        elif task == "caption":
            res = eval_caption(pipe, records, caption_beams, caption_rerank) if records else None
            if res is not None and caption_beams > 1:
                out["caption_beams"] = caption_beams
            if res is not None and ranked:
                out["caption_rerank"] = ranked
        else:
            res = RUNNERS[task](pipe, records)
        if res is None:
            out["no_data"].append(task)
        else:
            out["metrics"].update({k: round(float(v), 4) for k, v in res.items()})
    return out


def default_tasks(model) -> list[str]:
    return [t for t in ALL_TASKS if SUPPORT[t](model)]


def write_eval(result: dict, path: str | Path) -> None:
    from ..checkpoint import atomic_write_json
    atomic_write_json(path, result)


def print_metrics(result: dict, file=None) -> None:
    file = file or sys.stdout
    for k, v in sorted(result["metrics"].items()):
        print(f"{k:34s} {v:.4f}", file=file)
    if result.get("caption_beams"):
        print(f"captions by beam search over {result['caption_beams']} beams", file=file)
    if result.get("caption_rerank"):
        print(f"captions: the best of {result['caption_rerank']} beams by the model's score", file=file)
    if result.get("retrieval_images"):
        print(f"retrieval among {result['retrieval_images']} images, each with its first caption", file=file)
    if result["unsupported"]:
        print(f"unsupported by {result['model']}: {', '.join(result['unsupported'])}", file=file)
    if result["no_data"]:
        print(f"no data for: {', '.join(result['no_data'])}", file=file)


__all__ = ["evaluate", "default_tasks", "write_eval", "print_metrics", "ALL_TASKS"]
