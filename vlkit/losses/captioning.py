"""Language modelling of captions (BLIP's decoder): the next-token loss and sequence scores.

Labels are token ids aligned with the decoder's input, -100 where a token is not scored (the
begin token, a prompt, padding); position t's logits predict the label at t + 1.

- ``lm_loss``: cross-entropy with label smoothing (BLIP: 0.1) averaged over every scored token
  of the batch (or, ``global_batch``, of every process's batch).
- ``unlikelihood_loss``: -log(1 - p(token)) averaged over rows, for tokens known to be false
  where they stand (a word that makes a text false of its image).
- ``sequence_log_likelihood``: (B,) sum of log p(token) over each row's scored tokens, without
  smoothing (captions ranked or filtered by their likelihood).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..collective import global_mean_scale
from .mlm import IGNORE_INDEX

__all__ = ["lm_loss", "unlikelihood_loss", "sequence_log_likelihood", "caption_labels"]


def _shifted(logits: torch.Tensor, labels: torch.Tensor):
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"LM logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}")
    return logits[:, :-1].float(), labels[:, 1:]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1,
            global_batch: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored tokens; logits (B, L, V), labels (B, L).
    ``global_batch``: this process's share of the mean over every process's scored tokens
    (``collective.global_mean_scale``; every process must call it)."""
    z, y = _shifted(logits, labels)
    hit = y != IGNORE_INDEX
    scale = global_mean_scale(int(hit.sum()), logits.device) if global_batch else 1.0
    if not bool(hit.any()):
        return logits.sum() * 0.0
    loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing)
    return loss * scale if global_batch else loss


def unlikelihood_loss(logits: torch.Tensor, tokens: torch.Tensor, global_batch: bool = False) -> torch.Tensor:
    """Mean over rows of -log(1 - p(tokens[i])) under logits (N, V): the probability of each false
    token pushed toward 0, the rest of the distribution left to the other losses. ``global_batch``:
    this process's share of the mean over every process's rows (every process must call it)."""
    z = logits.float()
    n = z.shape[0]
    scale = global_mean_scale(n, z.device) if global_batch else 1.0
    if n == 0:
        return logits.sum() * 0.0
    others = z.scatter(-1, tokens[:, None], float("-inf")).logsumexp(-1)
    loss = (z.logsumexp(-1) - others).mean()  # -log(1 - p) = log sum_all - log sum_others
    return loss * scale if global_batch else loss


def sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum over each row's scored tokens of log p(token | the tokens before it)."""
    z, y = _shifted(logits, labels)
    hit = y != IGNORE_INDEX
    logp = z.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (logp * hit).sum(-1)


def caption_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, unscored: int) -> torch.Tensor:
    """Labels of a decoder input: the ids, -100 at padding and at the first ``unscored``
    positions (the begin token and the prompt)."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :unscored] = IGNORE_INDEX
    return labels
