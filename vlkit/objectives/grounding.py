"""Phrase grounding: the attention of the words that name an object is pulled onto its patches.

A fusion model finds, for a word like "circle", the image tokens of the circle only by search;
with the objects' boxes known (``vlkit.data.grounding``) the search can be skipped: the loss is
the negative log of the attention mass each grounded text token puts on the patches of the
objects it names (``losses.grounding.grounding_loss``), for the first ``grounding_heads`` heads
of layer ``grounding_layer`` — ALBEF's fusion cross-attention, ViLT's joint self-attention (text
rows over the patches) — in every tapped pass (captions in the MLM pass, questions in the VQA
pass; ViLT's ITM pass when it trains no MLM).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses.grounding import grounding_loss, mean_grounding
from .base import FusionSpec, Objective, register_objective


@dataclass
class GroundingOptions:
    grounding_weight: float = 0.0   # >0: on; needs batches with grounding targets (boxes in the data)
    grounding_layer: int = 0        # the layer whose attention of the text over the image is supervised
    grounding_heads: int = 1        # its first heads are supervised, the others stay free


def require_grounding(batch: dict, key: str = "grounding") -> torch.Tensor:
    """The batch's grounding targets, or a clear error saying where they come from."""
    if key not in batch:
        raise ValueError(f"grounding_weight > 0 needs batches with {key!r} targets "
                         "(ImageTextCollate(grounding_grid=model.grounding_grid) on data with "
                         "captions_grounding / qa grounding)")
    return batch[key]


def check_targets(targets: torch.Tensor, text_shape, patches: int) -> None:
    """Grounding targets (B, L, P) must fit the text (B, L) and the image's P patches."""
    if targets.shape[:2] != tuple(text_shape):
        raise ValueError(f"grounding targets {tuple(targets.shape)} do not fit the text {tuple(text_shape)}")
    if targets.shape[2] != patches:
        raise ValueError(f"grounding targets cover {targets.shape[2]} patches, the image has {patches}")


@register_objective
class PhraseGrounding(Objective):
    name = "phrase_grounding"
    options = GroundingOptions
    reads_attention = True

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.grounding_weight > 0

    @classmethod
    def check(cls, cfg, spec: FusionSpec, on: set[str]) -> None:
        if cfg.grounding_weight < 0:
            raise ValueError(f"grounding_weight must be >= 0, got {cfg.grounding_weight}")
        if cfg.grounding_weight == 0:
            return
        if not 0 <= cfg.grounding_layer < spec.layers:
            raise ValueError(f"grounding_layer {cfg.grounding_layer}: the {spec.stack} has {spec.layers} layers")
        if not 1 <= cfg.grounding_heads <= spec.heads:
            raise ValueError(f"grounding_heads {cfg.grounding_heads}: choose 1 to {spec.heads}")
        if spec.all_patches:
            raise ValueError(f"grounding needs every patch token in place ({spec.all_patches})")
        check_supervised_heads(cfg, spec)

    def begin(self, step) -> None:
        require_grounding(step.batch)
        step.state["grounded"] = []

    def attention_layers(self, step) -> dict:
        return {self.cfg.grounding_layer: (0, self.cfg.grounding_heads)}

    def guides(self, step, targets: dict) -> list:
        names = targets["names"]
        return [(self.cfg.grounding_layer, 0, names[:, None].expand(-1, self.cfg.grounding_heads, -1, -1))]

    def read(self, step, kind, attention_of, states, targets) -> None:
        attention = attention_of(self.cfg.grounding_layer, slice(0, self.cfg.grounding_heads))
        step.state["grounded"].append(grounding_loss(attention, targets["names"]))

    def finish(self, step, out: dict) -> list:
        if not step.state["grounded"]:
            return []
        out["grounding_loss"], out["grounding_mass"] = mean_grounding(step.state["grounded"])
        return [self.cfg.grounding_weight * out["grounding_loss"]]


def supervised_heads(cfg) -> int:
    """How many heads, from head 0, the grounding and relation losses supervise (0 when off)."""
    from .relation import relation_heads
    n = cfg.grounding_heads if cfg.grounding_weight > 0 else 0
    if cfg.relation_weight > 0:
        n = max(n, relation_heads(cfg) + 2)
    return n


def check_supervised_heads(cfg, spec: FusionSpec) -> None:
    """The supervised heads must see the image: none of them among the model's blind heads."""
    if not spec.blind_heads:
        return
    n = supervised_heads(cfg)
    if n > min(spec.blind_heads):
        blind = " and ".join(str(h) for h in spec.blind_heads)
        raise ValueError(f"{spec.blind_reason}: heads {blind} read text only, but grounding and relation "
                         f"supervise heads 0 to {n - 1}: use at least {n + len(spec.blind_heads)} heads")
