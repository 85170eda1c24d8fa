"""Masked language modelling: BERT's 80/10/10 token masking (optionally whole words) and the loss.

Eligible tokens are real (attention_mask 1) and not special. Each is chosen with probability
``prob`` (with ``word_ids``, each *word* is chosen and all its pieces with it); a chosen token
becomes [MASK] with probability 0.8, a random non-special token with 0.1, and stays with 0.1.
Labels hold the original id at chosen positions and -100 elsewhere (ignored by the loss).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["mask_tokens", "mlm_loss", "minimal_pairs", "MinimalPairs", "IGNORE_INDEX", "no_edit_pairs",
           "lowest_word_logprob", "edit_loss_and_accuracy", "edit_from_pass", "word_keep_loss"]

IGNORE_INDEX = -100


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Iterable[int],
                mask_token_id: int, vocab_size: int, prob: float = 0.15,
                generator: torch.Generator | None = None, word_ids: torch.Tensor | None = None):
    """(masked_ids, labels), both (B, L). ``word_ids`` (B, L): the word each token belongs to
    (negative for special/padding positions, as the tokenizer's ``return_word_ids`` gives);
    when given, the pieces of a word are masked together."""
    device = input_ids.device
    special = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=torch.long, device=device)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special)
    if word_ids is None:
        chosen = torch.rand(input_ids.shape, generator=generator, device=device) < prob
    else:
        if word_ids.shape != input_ids.shape:
            raise ValueError(f"word_ids {tuple(word_ids.shape)} do not fit "
                             f"input_ids {tuple(input_ids.shape)}")
        n_words = int(word_ids.max().clamp(min=0)) + 1
        word_chosen = torch.rand(input_ids.shape[0], n_words, generator=generator, device=device) < prob
        chosen = word_chosen.gather(1, word_ids.clamp(min=0)) & (word_ids >= 0)
    chosen &= eligible
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    r = torch.rand(input_ids.shape, generator=generator, device=device)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special[special < vocab_size]] = False
    allowed = allowed.nonzero()[:, 0]  # random replacements are never special tokens
    pick = torch.randint(len(allowed), input_ids.shape, generator=generator, device=device)
    masked = torch.where(chosen & (r < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (r >= 0.8) & (r < 0.9), allowed[pick], masked)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the predicted positions (labels != -100); 0 (with a gradient path)
    when a batch happens to have none."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"MLM logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}")
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class MinimalPairs(NamedTuple):
    """Minimal pairs of a batch (see ``minimal_pairs``), P of them, texts at a common length L."""
    rows: torch.Tensor      # (P,) the caption rows
    neg_rows: torch.Tensor  # (P,) their negatives' rows
    edited: torch.Tensor    # (P, L) bool: the positions where the two differ
    ids: torch.Tensor       # (P, L) the captions
    mask: torch.Tensor      # (P, L) their attention mask (the negatives' is the same)
    neg_ids: torch.Tensor   # (P, L) the negatives


def minimal_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, neg_input_ids: torch.Tensor,
                  neg_attention_mask: torch.Tensor, neg_owner: torch.Tensor,
                  max_edits: int = 3, first_only: bool = True,
                  edits_caption: torch.Tensor | None = None) -> MinimalPairs:
    """Captions and the negatives that edit them word for word.

    A batch's first negative of each caption (``neg_owner[k]`` names the caption negative ``k``
    belongs to; the collate draws the caption as that negative's source) is a *minimal pair*
    with it when both have the same length and differ in 1 to ``max_edits`` tokens (colour,
    shape or relation words replaced; added or removed words do not qualify). With
    ``first_only=False`` every negative is tried against its caption; ``edits_caption`` (K,)
    bool (the collate's ``neg_edits_caption``) rules out the negatives that edit another caption
    of the image. Both texts are read at the longer padded length of the two batches."""
    device = input_ids.device
    owner = neg_owner.to(device)
    first = torch.ones_like(owner, dtype=torch.bool)
    if first_only:
        first[1:] = owner[1:] != owner[:-1]  # a caption's negatives are consecutive
    if edits_caption is not None:
        first &= edits_caption.to(device).bool()
    neg_rows = first.nonzero().squeeze(1)
    rows = owner[neg_rows]
    length = max(input_ids.shape[1], neg_input_ids.shape[1])
    a = F.pad(input_ids, (0, length - input_ids.shape[1]))[rows]
    am = F.pad(attention_mask, (0, length - attention_mask.shape[1]))[rows]
    b = F.pad(neg_input_ids.to(device), (0, length - neg_input_ids.shape[1]))[neg_rows]
    bm = F.pad(neg_attention_mask.to(device), (0, length - neg_attention_mask.shape[1]))[neg_rows]
    same_length = (am == bm).all(1)
    edited = (a != b) & am.bool()
    n = edited.sum(1)
    keep = same_length & (n >= 1) & (n <= max_edits)
    return MinimalPairs(rows[keep], neg_rows[keep], edited[keep], a[keep], am[keep], b[keep])


def lowest_word_logprob(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        special_ids: Iterable[int]) -> torch.Tensor:
    """(B,) the lowest log-probability that MLM ``logits`` (B, L, vocab), read at visible words
    (no [MASK]), give the word that stands there, over the real non-special tokens: a word the
    image contradicts pulls it down (matching scored through replaced-word correction)."""
    special = torch.tensor(sorted(set(int(i) for i in special_ids)), device=input_ids.device)
    words = attention_mask.bool() & ~torch.isin(input_ids, special)
    logp = logits.float().log_softmax(-1).gather(-1, input_ids[..., None])[..., 0]
    return logp.masked_fill(~words, 0.0).min(dim=1).values


def no_edit_pairs(like: torch.Tensor) -> dict:
    """The replaced-word correction keys for a batch without minimal pairs: a zero loss and NaN
    accuracies (on ``like``'s device and dtype)."""
    zero = like.new_zeros(())
    nan = torch.full_like(zero, float("nan"))
    return {"edit_loss": zero, "edit_fix_acc": nan, "edit_keep_acc": nan}


def edit_from_pass(head, states: torch.Tensor, batch: dict, caption_rows: torch.Tensor,
                   negative_rows: torch.Tensor) -> dict:
    """Replaced-word correction read off a fused pass that already holds the minimal pairs:
    ``states`` (N, >=L, D) holds caption i of ``batch`` with its own image at row
    ``caption_rows[i]`` (-1: not with its own image) and dataset negative k with its image at
    row ``negative_rows[k]``. Every negative that edits its caption word for word
    (``minimal_pairs``, ``first_only=False``) gives the MLM ``head`` the true caption's tokens to
    predict at the edited positions, read from the negative's row (correcting false words) and
    from the caption's row (keeping true ones). Keys of ``edit_loss_and_accuracy``."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    neg = batch.get("neg_input_ids")
    if neg is None or neg.shape[0] == 0:
        return no_edit_pairs(states)
    pairs = minimal_pairs(ids, mask, neg, batch["neg_attention_mask"], batch["neg_owner"],
                          first_only=False, edits_caption=batch.get("neg_edits_caption"))
    if pairs.rows.numel() == 0:
        return no_edit_pairs(states)
    edited = pairs.edited
    if edited.shape[1] > states.shape[1]:
        raise ValueError(f"edit_from_pass: the pass holds {states.shape[1]} text positions, the "
                         f"pairs {edited.shape[1]}")
    at = states[:, :edited.shape[1]]
    caption_rows = caption_rows.to(pairs.rows.device)
    own = caption_rows[pairs.rows] >= 0
    false_states = at[negative_rows.to(pairs.rows.device)[pairs.neg_rows]][edited]
    true_states = at[caption_rows[pairs.rows[own]]][edited[own]]
    target = torch.cat([pairs.ids[edited], pairs.ids[own][edited[own]]])
    false_shown = torch.arange(target.shape[0], device=target.device) < false_states.shape[0]
    return edit_loss_and_accuracy(head(torch.cat([false_states, true_states])), target, false_shown)


def edit_loss_and_accuracy(logits: torch.Tensor, target: torch.Tensor, false_shown: torch.Tensor) -> dict:
    """Replaced-word correction: cross-entropy of ``logits`` (M, vocab) at the M edited
    positions of minimal pairs against the true caption's tokens, and the accuracy of correcting
    a false word (``false_shown``) and of keeping a true one (NaN when none was shown)."""
    hit = (logits.detach().argmax(-1) == target).float()
    nan = torch.full((), float("nan"), device=logits.device)

    def share(sel):
        return hit[sel].mean() if bool(sel.any()) else nan
    return {"edit_loss": F.cross_entropy(logits.float(), target),
            "edit_fix_acc": share(false_shown), "edit_keep_acc": share(~false_shown)}


def word_keep_loss(head, states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   rows: torch.Tensor, special_ids: Iterable[int]) -> dict:
    """A word head that no MLM trains, taught to name every visible word where it stands (what
    MLM's unchanged tenth teaches an MLM head), so that a word it doubts stands out in
    ``lowest_word_logprob``: ``states`` (N, >=L, D) of a fused pass holding caption i of
    ``input_ids`` (B, L) at row ``rows[i]`` (-1: not in the pass). {"edit_word_loss": the
    cross-entropy over the real non-special tokens, "edit_word_acc": the share named right}."""
    special = torch.tensor(sorted(set(int(i) for i in special_ids)), device=input_ids.device)
    rows = rows.to(input_ids.device)
    shown = rows >= 0
    ids, mask = input_ids[shown], attention_mask[shown]
    words = mask.bool() & ~torch.isin(ids, special)
    if not bool(words.any()):
        zero = states.new_zeros(())
        return {"edit_word_loss": zero, "edit_word_acc": torch.full_like(zero, float("nan"))}
    logits = head(states[rows[shown], :ids.shape[1]][words]).float()  # (M, vocab)
    target = ids[words]
    return {"edit_word_loss": F.cross_entropy(logits, target),
            "edit_word_acc": (logits.detach().argmax(-1) == target).float().mean()}
