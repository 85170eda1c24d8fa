"""Evaluation: retrieval, zero-shot, compositional matching, VQA and captioning metrics."""
from vlkit.eval.metrics import (bleu4, cider, cider_scores, compositional_accuracy,
                                retrieval_recall, retrieval_recall_from_scores, vqa_accuracy,
                                zero_shot_accuracy)

__all__ = ["bleu4", "cider", "cider_scores", "compositional_accuracy", "retrieval_recall",
           "retrieval_recall_from_scores", "vqa_accuracy", "zero_shot_accuracy"]
