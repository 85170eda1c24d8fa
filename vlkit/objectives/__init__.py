"""Auxiliary training objectives that are not a paper's own, one module each, composed into a
model's training by a weight (0 = off: no loss, no parameters). See docs/objectives.md."""
from __future__ import annotations

from .base import (FusionSpec, Objective, Step, options_of, register_objective, registered_objectives,
                   unregister_objective)
from .grounding import GroundingOptions, PhraseGrounding
from .relation import RelationGrounding, RelationOptions
from .word_edit import EditOptions, ReplacedWordCorrection
from .attention_forcing import AttentionForcing, ForcingOptions

# the option fields of the built-in objectives, mixed into every fusion model's config
ObjectiveOptions = options_of(PhraseGrounding, RelationGrounding, ReplacedWordCorrection, AttentionForcing)


def build_objectives(cfg, spec: FusionSpec) -> list[Objective]:
    """Check every registered objective's options against ``spec``, then build the ones the
    config turns on (a registered objective whose options the config lacks stays off)."""
    usable = [cls for cls in registered_objectives()
              if all(hasattr(cfg, f) for f in cls.options.__dataclass_fields__)]
    on = {cls.name for cls in usable if cls.enabled(cfg)}
    for cls in usable:
        cls.check(cfg, spec, on)
    return [cls(cfg, spec) for cls in usable if cls.name in on]


def match_log_score(objectives, itm_logits, word_logits, input_ids, attention_mask, log_odds: bool = False):
    """(B,) log-probability that each pair matches (what a fusion model's ``score`` returns):
    the ITM head's, from its (B, 2) logits, adjusted by each objective's ``log_score``
    (``match_score="itm+edit"``); ``word_logits()`` gives the word predictions they may read.
    ``log_odds``: start from the ITM log-odds instead (re-ranking scores, ``eval.rerank``)."""
    logits = itm_logits.float()
    logp = logits[:, 1] - logits[:, 0] if log_odds else logits.log_softmax(-1)[:, 1]
    for objective in objectives:
        logp = objective.log_score(logp, word_logits, input_ids, attention_mask)
    return logp


__all__ = ["FusionSpec", "Objective", "Step", "ObjectiveOptions", "build_objectives", "match_log_score", "register_objective",
           "registered_objectives", "unregister_objective", "PhraseGrounding", "RelationGrounding",
           "ReplacedWordCorrection", "AttentionForcing", "GroundingOptions", "RelationOptions",
           "EditOptions", "ForcingOptions"]
