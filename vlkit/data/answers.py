"""VQA answers as data: the answer vocabulary of a training set and the soft-score targets.

Targets are the standard VQA soft scores: an answer given by k of the annotators scores
min(1, k/3) (the loss over them is ``vlkit.losses.vqa.vqa_loss``).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = ["vqa_soft_scores", "build_answer_vocab"]


def vqa_soft_scores(answers_per_question: Sequence[Sequence[str]],
                    answer_to_index: Mapping[str, int]) -> torch.Tensor:
    """(N, A) float targets: entry (q, a) = min(1, count of answer a among question q's
    annotator answers / 3). Answers outside the vocabulary are dropped."""
    out = torch.zeros(len(answers_per_question), len(answer_to_index))
    for q, answers in enumerate(answers_per_question):
        for answer, count in Counter(answers).items():
            index = answer_to_index.get(answer)
            if index is not None:
                out[q, index] = min(1.0, count / 3.0)
    return out


def build_answer_vocab(answers: Iterable[str], min_count: int = 1) -> list[str]:
    """Answers seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
    counts = Counter(answers)
    kept = [a for a, c in counts.items() if c >= min_count]
    return sorted(kept, key=lambda a: (-counts[a], a))
