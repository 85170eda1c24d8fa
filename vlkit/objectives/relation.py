"""Relation grounding: relation words ("left of") look at their two objects, with a geometry term.

In layer ``relation_layer`` one head looks from the relation words at the subject and the next
at the object (the grounding entries with a role; ``losses.grounding.grounding_loss`` per
head): the two heads after the grounding heads when ``relation_layer == grounding_layer``, else
heads 0 and 1. ``geometry_weight``: a linear head on the relation words' output states
regresses the subject's centre minus the object's (``losses.grounding.relation_geometry_loss``)
in every tapped pass. ``relation_mask_prob``: that share of the captions has every relation
word masked in the MLM pass (on top of ``mlm_prob``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..losses.grounding import mask_relation_words, mean_grounding, relation_geometry_loss, grounding_loss
from .base import FusionSpec, Objective, register_objective


@dataclass
class RelationOptions:
    relation_weight: float = 0.0    # >0: on (needs grounding_weight > 0)
    relation_layer: int = 1         # the layer of the two relation heads
    relation_mask_prob: float = 0.0  # share of captions with all relation words masked (needs grounding)
    geometry_weight: float = 0.0    # >0: the subject-minus-object offset regression (needs relation_weight)


def relation_heads(cfg) -> int:
    """The first of the two relation heads (subject, object): right after the grounding heads
    when both losses supervise one layer, else the layer's first head."""
    return cfg.grounding_heads if cfg.relation_layer == cfg.grounding_layer else 0


def require_relations(batch: dict, key: str = "grounding_roles") -> torch.Tensor:
    """The batch's relation targets (B, 2, L, P), or a clear error saying where they come from."""
    if batch.get(key) is None:
        raise ValueError(f"relation_weight > 0 needs batches with {key!r} (ImageTextCollate with a "
                         "grounding_grid writes them from grounding entries with a role)")
    return batch[key]


@register_objective
class RelationGrounding(Objective):
    name = "relation_grounding"
    options = RelationOptions

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.relation_weight > 0 or cfg.relation_mask_prob > 0

    @property
    def reads_attention(self) -> bool:
        return self.cfg.relation_weight > 0

    @classmethod
    def check(cls, cfg, spec: FusionSpec, on: set[str]) -> None:
        weight, layer = cfg.relation_weight, cfg.relation_layer
        if weight < 0:
            raise ValueError(f"relation_weight must be >= 0, got {weight}")
        if weight > 0:
            if cfg.grounding_weight <= 0:
                raise ValueError("relation_weight > 0 needs grounding_weight > 0 (relations are "
                                 "learnt in the grounded passes)")
            if not 0 <= layer < spec.layers:
                raise ValueError(f"relation_layer {layer}: the {spec.stack} has {spec.layers} layers")
            first = relation_heads(cfg)
            if first + 2 > spec.heads:
                raise ValueError(f"relation_weight needs heads {first} and {first + 1} after the "
                                 f"{cfg.grounding_heads} grounding head(s) of that layer, but a layer has "
                                 f"{spec.heads} heads (or choose another relation_layer)")
        if cfg.geometry_weight < 0 or (cfg.geometry_weight > 0 and weight <= 0):
            raise ValueError(f"geometry_weight={cfg.geometry_weight}: needs to be >= 0, and > 0 needs "
                             "relation_weight > 0 (the relation words and their objects)")
        if not 0 <= cfg.relation_mask_prob <= 1 or (cfg.relation_mask_prob > 0 and cfg.grounding_weight <= 0):
            raise ValueError(f"relation_mask_prob={cfg.relation_mask_prob}: needs to be in [0, 1], and "
                             "> 0 needs grounding_weight > 0 (the relation words come from the grounding)")
        if cfg.relation_mask_prob > 0 and not spec.mlm_pass:
            raise ValueError(f"relation_mask_prob={cfg.relation_mask_prob}: the {spec.stack} trains no MLM "
                             "(relation words are masked in the MLM pass); set it to 0")

    def __init__(self, cfg, spec: FusionSpec):
        super().__init__(cfg, spec)
        self.geometry_head = nn.Linear(spec.dim, 2) if cfg.geometry_weight > 0 else None

    def begin(self, step) -> None:
        if self.cfg.relation_weight > 0:
            require_relations(step.batch)
        step.state.update(related=[], geometry=[])

    def _roles(self, targets: dict) -> torch.Tensor:
        roles, names = targets["roles"], targets["names"]
        if roles is None:
            raise ValueError("relation_weight > 0 needs batches with 'grounding_roles' (ImageTextCollate "
                             "with a grounding_grid writes them from grounding entries with a role)")
        if roles.shape[0] != names.shape[0] or roles.shape[1] != 2 or roles.shape[2:] != names.shape[1:]:
            raise ValueError(f"relation targets {tuple(roles.shape)} do not fit the grounding "
                             f"targets {tuple(names.shape)} (expected (B, 2, L, P))")
        return roles

    def attention_layers(self, step) -> dict:
        return {self.cfg.relation_layer: (relation_heads(self.cfg), 2)} if self.cfg.relation_weight > 0 else {}

    def guides(self, step, targets: dict) -> list:
        if self.cfg.relation_weight <= 0:
            return []
        return [(self.cfg.relation_layer, relation_heads(self.cfg), self._roles(targets))]

    def read(self, step, kind, attention_of, states, targets) -> None:
        if self.cfg.relation_weight <= 0:
            return
        roles = self._roles(targets)
        r = relation_heads(self.cfg)
        step.state["related"].append(grounding_loss(attention_of(self.cfg.relation_layer, slice(r, r + 2)), roles))
        if self.geometry_head is not None:
            step.state["geometry"].append(relation_geometry_loss(self.geometry_head(states), roles,
                                                                 self.spec.grid))

    def mask_words(self, step, ids, mask, masked, labels):
        if self.cfg.relation_mask_prob <= 0:
            return masked, labels
        pick = step.draw(torch.arange(ids.shape[0], device=ids.device)) < self.cfg.relation_mask_prob
        return mask_relation_words(require_relations(step.batch), ids, mask, masked, labels, pick,
                                   self.cfg.mask_token_id)

    def finish(self, step, out: dict) -> list:
        terms = []
        if step.state["related"]:
            out["relation_loss"], out["relation_mass"] = mean_grounding(step.state["related"])
            terms.append(self.cfg.relation_weight * out["relation_loss"])
        if step.state["geometry"]:
            out["geometry_loss"] = torch.stack(step.state["geometry"]).mean()
            terms.append(self.cfg.geometry_weight * out["geometry_loss"])
        return terms
