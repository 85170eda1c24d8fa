"""Image-text matching (ITM): the loss and the ways negatives are built (ViLT, ALBEF, BLIP, VLMo).

- ``itm_loss``: 2-way cross-entropy on the fused [CLS] (label 1 = matching pair).
- ``sample_hard_negatives``: per row, one index drawn from softmax(sim) with the positives
  excluded (ALBEF/BLIP/VLMo hard negatives mined by contrastive similarity).
- ``other_index`` / ``itm_batch_from_swaps``: negatives made by giving a caption another image
  of the batch (ViLT swaps the image with probability 0.5).
- ``gather_itm_batch``: the global batch the negatives are drawn from under a process group;
  ``pad_cat``: two batches of texts (ids or hidden states) stacked at a common length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..collective import all_gather_no_grad, all_gather_sizes, all_gather_with_grad, is_dist, rank, world_size

__all__ = ["itm_loss", "itm_accuracy", "sample_hard_negatives", "other_index", "itm_batch_from_swaps",
           "gather_itm_batch", "gather_token_batch", "pad_cat"]


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (N, 2) ITM logits against (N,) labels in {0, 1} (1 = match)."""
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"ITM logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels.long())


def itm_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).float().mean()


def sample_hard_negatives(sim: torch.Tensor, generator: torch.Generator | None = None,
                          positive_mask: torch.Tensor | None = None) -> torch.Tensor:
    """For each row of ``sim`` (N, M), one column index drawn from softmax(sim[row]) over the
    non-positive columns (multinomial). Positives are the diagonal (i == j), or the True
    entries of ``positive_mask`` (N, M) when given (e.g. other captions of the same image).
    The positives get probability exactly 0, so they are never drawn."""
    if sim.ndim != 2:
        raise ValueError(f"similarity must be (N, M), got shape {tuple(sim.shape)}")
    n, m = sim.shape
    if positive_mask is None:
        positive_mask = torch.eye(n, m, dtype=torch.bool, device=sim.device)
    if not bool((~positive_mask).any(dim=1).all()):
        raise ValueError("every row needs at least one negative candidate (batch of one?)")
    logits = sim.detach().float().masked_fill(positive_mask, float("-inf"))
    probs = logits.softmax(dim=1)  # exactly 0 at the positives
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def other_index(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(n,) indices, entry i drawn uniformly from {0..n-1} \\ {i} (needs n >= 2)."""
    if n < 2:
        raise ValueError("swapping needs a batch of at least two")
    shift = torch.randint(1, n, (n,), generator=generator, device=device)
    return (torch.arange(n, device=device) + shift) % n


def itm_batch_from_swaps(batch_size: int, prob: float = 0.5, generator: torch.Generator | None = None,
                         device=None, negative_index: torch.Tensor | None = None):
    """ViLT's ITM batch: caption i keeps its image with probability 1 - ``prob`` (label 1) or is
    paired with another image of the batch (label 0). Returns (image_index (B,), labels (B,)):
    pair i is (images[image_index[i]], captions[i]). ``negative_index`` (B,) chooses the other
    image (e.g. from ``sample_hard_negatives``); by default it is uniform over the others.
    A batch of one has no other image, so it stays positive."""
    device = negative_index.device if negative_index is not None else device
    own = torch.arange(batch_size, device=device)
    if batch_size < 2:
        return own, torch.ones(batch_size, dtype=torch.long, device=device)
    swap = torch.rand(batch_size, generator=generator, device=device) < prob
    other = negative_index if negative_index is not None else other_index(batch_size, generator, device)
    if bool((other[swap] == own[swap]).any()):
        raise ValueError("negative_index pairs a caption with its own image")
    return torch.where(swap, other, own), (~swap).long()


def pad_cat(a: torch.Tensor, mask_a: torch.Tensor, b: torch.Tensor, mask_b: torch.Tensor,
            pad_value: int | float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack two text batches (N, L, ...) — token ids or hidden states — and their (N, L) masks,
    each padded along L to the longer length (``pad_value`` in ``a``/``b``, 0 in the masks)."""
    n = max(a.shape[1], b.shape[1])

    def pad(t, value):
        return F.pad(t.to(a.device), (0, 0) * (t.dim() - 2) + (0, n - t.shape[1]), value=value)
    return torch.cat([pad(a, pad_value), pad(b, pad_value)]), torch.cat([pad(mask_a, 0), pad(mask_b, 0)])


def gather_itm_batch(image_tokens, text_hidden, mask, image_feat, text_feat, ids) -> dict:
    """The global batch ITM negatives are drawn from: every process's image tokens and text
    hidden states (with gradient; texts padded to the longest length of all processes), masks,
    features and ids (``image_tokens``, ``text_hidden``, ``mask``, ``image_feat``, ``text_feat``,
    ``ids``), this process's texts padded alike (``local_text``, ``local_mask``), its first row in
    the global batch (``row_start``), every process's batch size (``sizes``) and the common text
    ``length``. Without a process group this is the local batch."""
    out = dict(image_tokens=image_tokens, text_hidden=text_hidden, mask=mask, image_feat=image_feat,
               text_feat=text_feat, ids=ids, row_start=0, local_text=text_hidden, local_mask=mask,
               sizes=[image_tokens.shape[0]], length=text_hidden.shape[1])
    if not (is_dist() and world_size() > 1):
        return out
    sizes = all_gather_sizes([image_tokens.shape[0], text_hidden.shape[1]], mask.device)
    b_sizes, length = [s[0] for s in sizes], max(s[1] for s in sizes)
    pad = length - text_hidden.shape[1]
    local_text, local_mask = F.pad(text_hidden, (0, 0, 0, pad)), F.pad(mask, (0, pad))
    out.update(local_text=local_text, local_mask=local_mask, row_start=sum(b_sizes[:rank()]),
               sizes=b_sizes, length=length,
               image_tokens=all_gather_with_grad(image_tokens, b_sizes),
               text_hidden=all_gather_with_grad(local_text, b_sizes),
               mask=all_gather_no_grad(local_mask, b_sizes),
               image_feat=all_gather_no_grad(image_feat, b_sizes),
               text_feat=all_gather_no_grad(text_feat, b_sizes),
               ids=None if ids is None else all_gather_no_grad(ids, b_sizes))
    return out


def gather_token_batch(ids, mask, image_ids, pad_id: int) -> dict:
    """Every process's token ids and masks (padded to the longest text of all: ``all_ids``,
    ``all_mask``), image ids (``ids``), the batch sizes (``sizes``), the common ``length``, this
    process's rows in the global batch (``rows``) and its own texts padded alike (``local_ids``,
    ``local_mask``): what a model that fuses from token ids (VLMo) draws ITM negatives from. The
    local batch without a process group."""
    b = ids.shape[0]
    out = dict(sizes=[b], length=ids.shape[1], rows=slice(0, b), local_ids=ids, local_mask=mask,
               all_ids=ids, all_mask=mask, ids=image_ids)
    if not (is_dist() and world_size() > 1):
        return out
    sizes = all_gather_sizes([b, ids.shape[1]], ids.device)
    b_sizes, length = [s[0] for s in sizes], max(s[1] for s in sizes)
    start = sum(b_sizes[:rank()])
    local_ids = F.pad(ids, (0, length - ids.shape[1]), value=pad_id)
    local_mask = F.pad(mask, (0, length - mask.shape[1]))
    out.update(sizes=b_sizes, length=length, rows=slice(start, start + b), local_ids=local_ids,
               local_mask=local_mask, all_ids=all_gather_no_grad(local_ids, b_sizes),
               all_mask=all_gather_no_grad(local_mask, b_sizes),
               ids=None if image_ids is None else all_gather_no_grad(image_ids, b_sizes))
    return out
