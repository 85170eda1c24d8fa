"""Evaluation metrics: retrieval recall, zero-shot, compositional matching, VQA, BLEU-4, CIDEr-D.

Pure functions of tensors / strings, no dependencies beyond torch. Accuracies and recalls are
fractions in [0, 1]; CIDEr-D keeps coco-caption's x10 scale.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Callable, Sequence

import torch

__all__ = ["retrieval_recall", "retrieval_recall_from_scores", "zero_shot_accuracy",
           "compositional_accuracy", "vqa_accuracy", "bleu4", "cider", "cider_scores",
           "NonFiniteScores", "check_scores"]


class NonFiniteScores(ValueError):
    """Scores (similarities, logits, probabilities) with NaN or infinite values: a NaN compares
    false with everything, so ranks and argmaxes over it are meaningless (a broken model would
    score perfect recall); every metric refuses them."""


def check_scores(scores: torch.Tensor, what: str) -> torch.Tensor:
    """``scores`` unchanged if all finite, else a `NonFiniteScores` error naming ``what``."""
    scores = torch.as_tensor(scores)
    if scores.is_floating_point():
        bad = int((~torch.isfinite(scores)).sum())
        if bad:
            raise NonFiniteScores(f"{what}: {bad} of {scores.numel()} scores are NaN or infinite "
                                  "(the model's outputs are not finite: diverged or corrupt "
                                  "weights?); refusing to score them")
    return scores


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor,
                     text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k both ways with scores image_emb @ text_emb^T (pass normalised embeddings).

    text_to_image[j] is the index of the image described by caption j (an image may have many
    captions). image->text is a hit when ANY of the image's captions is in the top k;
    text->image when the caption's image is. Ties are counted against the query (a correct
    item ranks after every wrong item with an equal score), so collapsed embeddings score 0,
    not 1. Scores are built `chunk_size` images at a time: memory O(chunk_size * n_texts).
    Images without any caption are left out of image->text.
    Returns {"i2t_r1", "i2t_r5", ..., "t2i_r1", ...}.
    """
    text_emb = text_emb.to(image_emb.device)

    def score_fn(i0: int, i1: int) -> torch.Tensor:
        return image_emb[i0:i1] @ text_emb.T

    return retrieval_recall_from_scores(score_fn, image_emb.shape[0], text_emb.shape[0],
                                        text_to_image, ks, chunk_size)


@torch.no_grad()
def retrieval_recall_from_scores(score_fn: Callable[[int, int], torch.Tensor], n_images: int,
                                 n_texts: int, text_to_image: torch.Tensor,
                                 ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024
                                 ) -> dict[str, float]:
    """Like `retrieval_recall` for any scorer: score_fn(i0, i1) -> (i1 - i0, n_texts) scores of
    images i0..i1-1 against every text. It must be deterministic: it is called twice per chunk
    (pass 1: image->text ranks and each caption's own score; pass 2: text->image ranks)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    t2i = torch.as_tensor(text_to_image).long().flatten()
    if t2i.numel() != n_texts:
        raise ValueError(f"text_to_image has {t2i.numel()} entries for {n_texts} texts")
    if n_texts and (t2i.min() < 0 or t2i.max() >= n_images):
        raise ValueError("text_to_image holds an index outside [0, n_images)")
    i2t_rank = torch.zeros(n_images, dtype=torch.long)
    t2i_rank = torch.zeros(n_texts, dtype=torch.long)
    pos = None  # (n_texts,) score of each caption with its own image
    for pass_ in (1, 2):
        for i0 in range(0, n_images, chunk_size):
            s = check_scores(score_fn(i0, min(i0 + chunk_size, n_images)), "retrieval").float()  # (m, n_texts)
            m, dev = s.shape[0], s.device
            if pos is None:
                pos = torch.empty(n_texts, device=dev)
            tt = t2i.to(dev)
            mine = (tt >= i0) & (tt < i0 + m)  # captions whose image is in this chunk
            j = mine.nonzero().squeeze(1)
            if pass_ == 1:
                correct = tt[None, :] == torch.arange(i0, i0 + m, device=dev)[:, None]
                best = s.masked_fill(~correct, float("-inf")).amax(1)  # best correct caption
                i2t_rank[i0:i0 + m] = ((s >= best[:, None]) & ~correct).sum(1).cpu()
                pos[j] = s[tt[j] - i0, j]
            else:
                beats = s >= pos[None, :]  # images scoring at least the caption's own image
                beats[tt[j] - i0, j] = False
                t2i_rank += beats.sum(0).cpu()
    has_caption = torch.bincount(t2i, minlength=n_images) > 0
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank[has_caption] < k).double().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = (t2i_rank < k).double().mean().item()
    return out


# --------------------------------------------------------------------------------------------
# Classification-style accuracies
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                       groups: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Top-1 of argmax_c image_emb @ class_emb^T against labels; one "top1_<name>" per group
    mask (BoolTensor over images). Empty groups are left out."""
    pred = check_scores(image_emb @ class_emb.to(image_emb.device).T, "zero-shot").argmax(1).cpu()
    hit = (pred == torch.as_tensor(labels).cpu().long()).double()
    out = {"top1": hit.mean().item()}
    for name, mask in (groups or {}).items():
        mask = torch.as_tensor(mask, dtype=torch.bool).cpu()
        if mask.any():
            out[f"top1_{name}"] = hit[mask].mean().item()
    return out


def compositional_accuracy(pos_scores, neg_scores, kinds: Sequence[str]) -> dict[str, float]:
    """Each row is one (true caption, false caption) pair; a hit iff pos > neg (ties wrong).
    Returns "compositional_acc" and "<kind>_acc" per negative kind."""
    pos = torch.as_tensor(pos_scores, dtype=torch.float64).flatten().cpu()
    neg = torch.as_tensor(neg_scores, dtype=torch.float64).flatten().cpu()
    if not (pos.numel() == neg.numel() == len(kinds)):
        raise ValueError("pos_scores, neg_scores and kinds must have the same length")
    check_scores(torch.cat([pos, neg]), "compositional matching")
    hit = (pos > neg).tolist()
    out = {"compositional_acc": sum(hit) / len(hit) if hit else float("nan")}
    out.update(_accuracy_by_group(hit, kinds))
    return out


def _accuracy_by_group(hits: Sequence[bool], groups: Sequence[str]) -> dict[str, float]:
    """{"<group>_acc": fraction of hits} for each group name, in sorted order."""
    by_group: dict[str, list[bool]] = defaultdict(list)
    for h, g in zip(hits, groups):
        by_group[g].append(h)
    return {f"{g}_acc": sum(by_group[g]) / len(by_group[g]) for g in sorted(by_group)}


def _norm_answer(s: str) -> str:
    return " ".join(s.lower().split())  # lower-case, strip, collapse inner whitespace


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str | Sequence[str]],
                 types: Sequence[str] | None = None) -> dict[str, float]:
    """Exact match after normalisation (lower-case, strip). An answer may be a list of accepted
    strings (a hit if any matches). Returns "acc" and "<type>_acc" per question type."""
    if len(predictions) != len(answers) or (types is not None and len(types) != len(answers)):
        raise ValueError("predictions, answers and types must have the same length")
    hits = []
    for p, a in zip(predictions, answers):
        accepted = {_norm_answer(a)} if isinstance(a, str) else {_norm_answer(x) for x in a}
        hits.append(_norm_answer(p) in accepted)
    out = {"acc": sum(hits) / len(hits) if hits else float("nan")}
    if types is not None:
        out.update(_accuracy_by_group(hits, types))
    return out


# --------------------------------------------------------------------------------------------
# Captioning: BLEU-4 and CIDEr-D
# --------------------------------------------------------------------------------------------
def _tokenize(s: str) -> list[str]:
    """Lower-case word tokens, punctuation dropped (close to coco-caption's PTB tokenisation)."""
    return re.findall(r"[^\W_]+(?:'[^\W_]+)?", s.lower())


def _ngrams(words: list[str], n_max: int = 4) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1)
                   for i in range(len(words) - n + 1))


def _check(candidates, references):
    if len(candidates) != len(references):
        raise ValueError("one list of references per candidate is needed")
    if any(isinstance(r, str) for r in references):
        raise ValueError("references must be a list of lists of strings")


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (Papineni et al.): clipped n-gram precisions (n = 1..4) pooled over the
    corpus, geometric mean, brevity penalty with the closest reference length (shorter on a
    tie), as coco-caption. 0 when any precision is 0. In [0, 1]."""
    _check(candidates, references)
    match, total = [0] * 4, [0] * 4
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        c = _tokenize(cand)
        rs = [_tokenize(r) for r in refs]
        cand_len += len(c)
        ref_len += min((len(r) for r in rs), key=lambda L: (abs(L - len(c)), L)) if rs else 0
        max_ref: Counter = Counter()
        for r in rs:
            max_ref |= _ngrams(r)  # element-wise max of counts
        for g, cnt in _ngrams(c).items():
            total[len(g) - 1] += cnt
            match[len(g) - 1] += min(cnt, max_ref[g])
    if cand_len == 0 or min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return bp * math.exp(log_p)


def cider_scores(candidates: Sequence[str], references: Sequence[Sequence[str]],
                 sigma: float = 6.0) -> list[float]:
    """Per-candidate CIDEr-D as coco-caption's CiderScorer (Vedantam et al. 2015): tf-idf
    n-gram vectors (n = 1..4) with document frequency counted over the corpus' reference sets
    and log(#images) as the idf numerator, candidate counts clipped by the reference's,
    Gaussian length penalty exp(-delta^2 / (2 sigma^2)), mean over n and references, x10.
    (Lengths are counted as coco-caption does, in bigrams.)"""
    _check(candidates, references)
    cands = [_ngrams(_tokenize(c)) for c in candidates]
    refs = [[_ngrams(_tokenize(r)) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update(set(g for r in rs for g in r))
    log_n = math.log(float(len(refs))) if refs else 0.0

    def vec(counts: Counter):
        v = [dict() for _ in range(4)]
        norm = [0.0] * 4
        for g, tf in counts.items():
            n = len(g) - 1
            w = tf * (log_n - math.log(max(1.0, df[g])))
            v[n][g] = w
            norm[n] += w * w
        length = sum(tf for g, tf in counts.items() if len(g) == 2)  # coco-caption quirk
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for c, rs in zip(cands, refs):
        vc, nc, lc = vec(c)
        total = 0.0
        for r in rs:
            vr, nr, lr = vec(r)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vc[n].items())
                if nc[n] != 0 and nr[n] != 0:
                    val /= nc[n] * nr[n]
                total += val * penalty / 4
        scores.append(10.0 * total / len(rs) if rs else 0.0)
    return scores


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D: the mean of `cider_scores` (coco-caption scale, about 0..10)."""
    s = cider_scores(candidates, references)
    return sum(s) / len(s) if s else 0.0
