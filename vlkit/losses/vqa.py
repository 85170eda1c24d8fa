"""VQA as multi-label classification over an answer vocabulary (ViLT, ALBEF-style heads), and
VQA as answers written by a decoder (BLIP: ``answer_lm_loss``, ``answer_log_likelihood``).

Targets are the standard VQA soft scores (``vlkit.data.answers.vqa_soft_scores``). The loss is binary cross-entropy with logits averaged over all entries, times the
number of answers (as ViLT, after BAN: equivalent to summing over answers, averaging over
questions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .captioning import caption_labels, lm_loss, sequence_log_likelihood

__all__ = ["vqa_loss", "batch_vqa_loss", "answer_lm_loss", "answer_log_likelihood"]


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits (mean over all N*A entries) times A, the number of answers."""
    if logits.shape != targets.shape:
        raise ValueError(f"VQA logits {tuple(logits.shape)} do not fit targets {tuple(targets.shape)}")
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


def batch_vqa_loss(model, batch: dict, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """The VQA loss of a batch with ``vqa_targets``: its question tokens (the caption tokens when
    it has none) through ``model.vqa_logits``, against the soft targets."""
    if getattr(model, "vqa_head", None) is None:
        raise ValueError(f"the batch has vqa_targets but this {type(model).__name__} has no VQA head "
                         "(num_answers=0)")
    q_ids = batch.get("question_input_ids", input_ids)
    q_mask = batch.get("question_attention_mask", attention_mask)
    return vqa_loss(model.vqa_logits(pixel_values, q_ids, q_mask), batch["vqa_targets"])


# -- answers written by a decoder (BLIP) ----------------------------------------------------------

def answer_lm_loss(logits: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor,
                   label_smoothing: float = 0.1, global_batch: bool = False) -> torch.Tensor:
    """LM loss of decoded answers: logits (B, L, V) of the decoder's input (the answer's ids
    (B, L), tokenised [CLS] ... [SEP], its first token the begin token); the answer's tokens and
    its end token scored, the begin token and padding not (``captioning.lm_loss``, whose
    ``global_batch`` this passes on)."""
    return lm_loss(logits, caption_labels(answer_ids, answer_mask, 1), label_smoothing, global_batch)


def answer_log_likelihood(logits: torch.Tensor, answer_ids: torch.Tensor,
                          answer_mask: torch.Tensor) -> torch.Tensor:
    """(B,) log-likelihood of each decoded answer, the same tokens as ``answer_lm_loss`` scored,
    without smoothing (candidate answers ranked)."""
    return sequence_log_likelihood(logits, caption_labels(answer_ids, answer_mask, 1))
