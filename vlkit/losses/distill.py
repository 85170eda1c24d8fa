"""Momentum distillation (ALBEF, BLIP): contrastive loss against feature queues with soft
pseudo-targets, MLM with soft targets, and the hard-negative ITM batch.

- ``alpha_at(step, alpha, ramp_steps)``: α ramped linearly from 0 to ``alpha`` over
  ``ramp_steps`` optimiser steps (the paper ramps over the first epoch).
- ``distill_targets``: α·softmax(momentum logits) + (1 − α)·hard targets.
- ``soft_cross_entropy``: −Σ_j t_ij log softmax(z_i)_j, averaged over rows.
- ``itc_queue_loss``: image-to-text logits of the online image features against
  [momentum text features of the batch ; text queue] / τ, and text-to-image alike; the hard
  targets are the diagonal (or, with ids, every column with the row's id, normalised), the soft
  ones come from the momentum features against the same columns. Loss = (i2t + t2i) / 2.
- ``mlm_distill_loss``: (1 − α)·CE(labels) + α·soft CE against softmax(momentum logits), both
  over the masked positions only.
- ``itm_hard_negative_index``: for each image a negative text and for each text a negative
  image, drawn from softmax(similarity) over the non-positives of the (global) batch.
- ``itm_token_pairs``: the ITM batch of a model that grounds texts from token ids (BLIP, VLMo):
  positives, in-batch negatives drawn for the global batch, and the dataset's negative captions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..collective import all_gather_no_grad, all_gather_with_grad
from .matching import pad_cat, sample_hard_negatives
from .mlm import IGNORE_INDEX

__all__ = ["alpha_at", "distill_targets", "soft_cross_entropy", "positive_targets",
           "itc_queue_loss", "mlm_distill_loss", "itm_hard_negative_index", "itm_token_pairs"]


def alpha_at(step: int, alpha: float, ramp_steps: int) -> float:
    """α after ``step`` optimiser steps: alpha * min(1, step / ramp_steps); no ramp when <= 0."""
    if ramp_steps <= 0:
        return float(alpha)
    return float(alpha) * min(1.0, max(0, int(step)) / ramp_steps)


def distill_targets(momentum_logits: torch.Tensor, hard_targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·softmax(momentum_logits) + (1 − α)·hard_targets (rows of both sum to 1)."""
    soft = momentum_logits.detach().float().softmax(dim=-1)
    return alpha * soft + (1.0 - alpha) * hard_targets.float()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ_j targets_ij · log_softmax(logits_i)_j."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def positive_targets(n: int, m: int, ids: torch.Tensor | None = None,
                     column_ids: torch.Tensor | None = None, device=None, offset: int = 0) -> torch.Tensor:
    """(n, m) hard targets: row i's own column ``offset + i`` (the diagonal by default), or (with
    ``ids`` (n,) and ``column_ids`` (m,)) every column whose id equals the row's as well, each row
    normalised to sum 1."""
    if ids is not None:
        device = ids.device
    own = (torch.arange(m, device=device)[None, :]
           == offset + torch.arange(n, device=device)[:, None]).float()  # (n, m)
    if ids is None:
        return own
    pos = (ids[:, None] == column_ids[None, :].to(device)).float()
    pos = torch.maximum(pos, own)  # a row's own pair is always positive
    return pos / pos.sum(dim=1, keepdim=True)


def itc_queue_loss(image_feat: torch.Tensor, text_feat: torch.Tensor,
                   image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
                   image_queue: torch.Tensor, text_queue: torch.Tensor, temp,
                   alpha: float = 0.0, distill: bool = True,
                   ids: torch.Tensor | None = None, queue_ids: torch.Tensor | None = None,
                   row_start: int = 0) -> torch.Tensor:
    """ITC with momentum features and queues.

    image_feat, text_feat (B, E): online, normalised; image_feat_m, text_feat_m (N, E): momentum,
    normalised, of the global batch (N = B in one process), whose rows ``row_start`` to
    ``row_start + B`` are those of image_feat/text_feat; image_queue, text_queue (K, E); temp: τ
    (logits = sims / τ). Columns are [momentum batch ; queue] (N + K). ``ids`` (N,) /
    ``queue_ids`` (K,) mark extra positives (e.g. other captions of the same image).
    ``distill=False`` (or α = 0) uses the hard targets. The loss is the mean over the B rows."""
    text_all = torch.cat([text_feat_m, text_queue.to(text_feat_m.dtype)]).detach()  # (N+K, E)
    image_all = torch.cat([image_feat_m, image_queue.to(image_feat_m.dtype)]).detach()  # (N+K, E)
    sim_i2t = image_feat @ text_all.T / temp  # (B, N+K)
    sim_t2i = text_feat @ image_all.T / temp  # (B, N+K)
    b, cols = sim_i2t.shape
    rows = slice(row_start, row_start + b)
    column_ids = None if ids is None else torch.cat([ids, queue_ids.to(ids.device)])
    hard = positive_targets(b, cols, None if ids is None else ids[rows], column_ids,
                            device=sim_i2t.device, offset=row_start)
    if distill and alpha > 0:
        with torch.no_grad():
            t_i2t = distill_targets(image_feat_m[rows] @ text_all.T / temp, hard, alpha)
            t_t2i = distill_targets(text_feat_m[rows] @ image_all.T / temp, hard, alpha)
    else:
        t_i2t = t_t2i = hard
    return (soft_cross_entropy(sim_i2t, t_i2t) + soft_cross_entropy(sim_t2i, t_t2i)) / 2


def mlm_distill_loss(logits: torch.Tensor, labels: torch.Tensor,
                     momentum_logits: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """(1 − α)·CE(logits, labels) + α·soft CE(logits, softmax(momentum_logits)) over the
    positions with labels != -100; logits (B, L, V), labels (B, L). 0 (with a gradient path)
    when nothing is masked."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"MLM logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}")
    hit = labels != IGNORE_INDEX
    if not bool(hit.any()):
        return logits.sum() * 0.0
    z = logits[hit].float()  # (M, V)
    loss = F.cross_entropy(z, labels[hit])
    if momentum_logits is None or alpha <= 0:
        return loss
    soft = momentum_logits[hit].detach().float().softmax(dim=-1)
    return (1.0 - alpha) * loss + alpha * soft_cross_entropy(z, soft)


def itm_hard_negative_index(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, row_start: int = 0,
                            ids: torch.Tensor | None = None, column_ids: torch.Tensor | None = None,
                            hard: bool = True, generator: torch.Generator | None = None):
    """(text index per image (B,), image index per text (B,)) into the columns of the (global)
    batch. sim_i2t (B, N): local images against all N texts; sim_t2i (B, N) alike. The local row
    i is column ``row_start + i``; with ids, every column of the same id is a positive too. The
    positives are never drawn. ``hard=False`` draws uniformly among the non-positives."""
    b, n = sim_i2t.shape
    cols = torch.arange(n, device=sim_i2t.device)
    own = (row_start + torch.arange(b, device=sim_i2t.device))[:, None]
    positive = cols[None, :] == own  # (B, N)
    if ids is not None:
        positive = positive | (ids[:, None] == column_ids[None, :])
    if not hard:
        sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
    neg_text = sample_hard_negatives(sim_i2t, generator, positive_mask=positive)
    neg_image = sample_hard_negatives(sim_t2i, generator, positive_mask=positive)
    return neg_text, neg_image


def itm_token_pairs(g: dict, image_tokens: torch.Tensor, image_feat: torch.Tensor, text_feat: torch.Tensor,
                    logit_scale, generator: torch.Generator | None = None, hard: bool = True,
                    negatives: dict | None = None, pad_id: int = 0):
    """The ITM pairs of this process's B rows, for a model that grounds texts from token ids:
    B positives, B (text, negative image), B (image, negative text), then with ``negatives`` (a
    batch holding ``neg_input_ids`` / ``neg_attention_mask`` / ``neg_owner``, the owners indexing
    this process's rows) one (image, dataset negative caption) pair per negative caption.

    The in-batch negatives are drawn for every row of the global batch ``g``
    (``matching.gather_token_batch``) from softmax(``logit_scale`` · similarity) of the gathered
    normalised features ``image_feat`` / ``text_feat`` (B, E), positives (same id) excluded, and
    this process's rows kept: the draw does not depend on the number of processes. The negative
    images are the global batch's image tokens (gathered with their gradient). Returns (image
    tokens (N, 1+P, D), ids (N, L), masks (N, L), labels (N,), the rows of the dataset negatives)."""
    b, rows, device = image_tokens.shape[0], g["rows"], image_tokens.device
    with torch.no_grad():
        img_all, txt_all = all_gather_no_grad(image_feat, g["sizes"]), all_gather_no_grad(text_feat, g["sizes"])
        neg_text, neg_image = (i[rows] for i in itm_hard_negative_index(
            logit_scale * img_all @ txt_all.T, logit_scale * txt_all @ img_all.T, 0, g["ids"], g["ids"],
            hard=hard, generator=generator))
    tokens_all = all_gather_with_grad(image_tokens, g["sizes"])
    ids_p, mask_p = g["local_ids"], g["local_mask"]  # padded to the global length
    images = torch.cat([image_tokens, tokens_all[neg_image], image_tokens])
    ids = torch.cat([ids_p, ids_p, g["all_ids"][neg_text]])
    masks = torch.cat([mask_p, mask_p, g["all_mask"][neg_text]])
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(device)
    negative_rows = torch.zeros(0, dtype=torch.long, device=device)
    neg_ids = None if negatives is None else negatives.get("neg_input_ids")
    if neg_ids is not None and neg_ids.shape[0] > 0:
        owner = negatives["neg_owner"].to(device)
        ids, masks = pad_cat(ids, masks, neg_ids, negatives["neg_attention_mask"], pad_id)
        images = torch.cat([images, image_tokens[owner]])
        labels = torch.cat([labels, torch.zeros_like(owner)])
        negative_rows = 3 * b + torch.arange(owner.shape[0], device=device)
    return images, ids, masks, labels, negative_rows
