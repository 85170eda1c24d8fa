"""Replaced-word correction, and matching scored through it.

For a caption and a dataset negative that edits it word for word (a swapped colour, a flipped
relation: ``losses.mlm.minimal_pairs``), the fused text states of the negative shown with the
image must predict, through the MLM head, the caption's words at the edited positions, and the
caption's own states must keep them: the words a caption states are checked against the image
where they stand, which [CLS]-pooled ITM does not learn for swaps and flips.

Options: ``edit_weight`` (>0: on; needs ``hard_negatives`` and an MLM head); ``edit_pass``:
"separate" (a fusion pass of its own over each caption's first minimal-pair negative, shown
false or, with probability 1/2, true) or "itm" (read off the ITM pass, which already holds every
dataset negative with its image and the captions with theirs: each minimal pair read both ways
at no extra fusion cost; needs the ITM pass); ``match_score``: "itm" (``score`` is the ITM
log-probability) or "itm+edit" (plus the MLM head's lowest log-probability of a word of the
text where it stands, ``losses.mlm.lowest_word_logprob``: a word the image contradicts lowers
the score; needs an MLM head, works with ``edit_weight`` 0 too).

A model whose word head no MLM trains (``FusionSpec.mlm_pass`` false: BLIP's grounded encoder)
trains it here alone: besides the edited positions, the head names every word of the captions
shown with their own image in the ITM pass (``losses.mlm.word_keep_loss``, weighted as the edit
loss), so ``match_score="itm+edit"`` there needs ``edit_weight`` > 0 and the ITM pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses.mlm import (edit_from_pass, edit_loss_and_accuracy, lowest_word_logprob, minimal_pairs, no_edit_pairs,
                          word_keep_loss)
from .base import FusionSpec, Objective, register_objective


@dataclass
class EditOptions:
    edit_weight: float = 0.0
    edit_pass: str = "separate"     # "separate" or "itm"
    match_score: str = "itm"        # "itm" or "itm+edit"


@register_objective
class ReplacedWordCorrection(Objective):
    name = "replaced_word_correction"
    options = EditOptions

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.edit_weight > 0 or cfg.match_score != "itm"

    @classmethod
    def check(cls, cfg, spec: FusionSpec, on: set[str]) -> None:
        if cfg.edit_weight < 0 or (cfg.edit_weight > 0 and not (spec.hard_negatives and spec.mlm_head)):
            raise ValueError(f"edit_weight={cfg.edit_weight}: needs to be >= 0, and > 0 needs "
                             "hard_negatives (--hard-negatives: the dataset's negative captions) "
                             "and the MLM head")
        if cfg.edit_pass not in ("separate", "itm") or (cfg.edit_pass == "itm" and cfg.edit_weight > 0
                                                         and not spec.itm_pass):
            raise ValueError(f"edit_pass must be 'separate' or 'itm' (which needs the ITM head and "
                             f"objective), got {cfg.edit_pass!r}")
        if cfg.match_score not in ("itm", "itm+edit") or (cfg.match_score == "itm+edit" and not spec.mlm_head):
            raise ValueError(f"match_score must be 'itm' or 'itm+edit' (which needs the MLM head), "
                             f"got {cfg.match_score!r}")
        if not spec.mlm_pass and (cfg.edit_weight > 0 or cfg.match_score != "itm") \
                and not (cfg.edit_weight > 0 and spec.itm_pass):
            raise ValueError(f"edit_weight={cfg.edit_weight}, match_score={cfg.match_score!r}: the {spec.stack} "
                             "trains no MLM, so its word head is trained by the replaced-word correction "
                             "alone, read off the ITM pass: match_score='itm+edit' needs edit_weight > 0, "
                             "and both need the ITM head and objective")

    @property
    def on(self) -> bool:
        return self.cfg.edit_weight > 0

    def itm_rows(self, step, states, caption_rows, negative_rows) -> None:
        if self.on and self.cfg.edit_pass == "itm":
            step.state["edit"] = edit_from_pass(step.word_logits, states, step.batch, caption_rows, negative_rows)
        if self.on and not self.spec.mlm_pass:
            step.state["words"] = word_keep_loss(step.word_logits, states, step.batch["input_ids"],
                                                 step.batch["attention_mask"], caption_rows,
                                                 self.cfg.special_token_ids)

    def _separate(self, step) -> dict:
        """A fusion pass over each caption's first minimal-pair negative (or, with probability
        1/2, the caption), the caption's tokens the targets where the two differ."""
        batch = step.batch
        ids, mask = batch["input_ids"], batch["attention_mask"]
        like = batch["pixel_values"]
        neg_ids = batch.get("neg_input_ids")
        if neg_ids is None or neg_ids.shape[0] == 0:
            return no_edit_pairs(like)
        pairs = minimal_pairs(ids, mask, neg_ids, batch["neg_attention_mask"], batch["neg_owner"])
        if pairs.rows.numel() == 0:
            return no_edit_pairs(like)
        show_false = step.draw(pairs.rows) < 0.5
        shown = torch.where(show_false[:, None], pairs.neg_ids, pairs.ids)
        states = step.fuse(pairs.rows, shown, pairs.mask)
        logits = step.word_logits(states[pairs.edited])  # (M, vocab)
        return edit_loss_and_accuracy(logits, pairs.ids[pairs.edited],
                                      show_false[:, None].expand_as(pairs.edited)[pairs.edited])

    def finish(self, step, out: dict) -> list:
        if not self.on:
            return []
        out.update(step.state["edit"] if self.cfg.edit_pass == "itm" and "edit" in step.state
                   else self._separate(step))
        terms = [self.cfg.edit_weight * out["edit_loss"]]
        if "words" in step.state:
            out.update(step.state["words"])
            terms.append(self.cfg.edit_weight * out["edit_word_loss"])
        return terms

    def log_score(self, logp, word_logits, input_ids, attention_mask):
        if self.cfg.match_score != "itm+edit":
            return logp
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return logp + lowest_word_logprob(word_logits(), input_ids, attention_mask, self.cfg.special_token_ids)
