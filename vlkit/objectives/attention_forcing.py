"""Attention forcing: a curriculum for the supervised heads of phrase and relation grounding.

In the tapped passes of training, the grounding heads read the image through their targets and
the relation heads through the subjects' and objects' patches (``layers.AttentionGuide``),
mixed into their own attention at a share falling linearly from 1 at step 0 to 0 at
``attention_forcing_steps`` optimiser steps. What the layers do with an object's patches is
learnt from the first step, while the heads learn to find them; the grounding losses stay on
the heads' own attention. The clock (``steps_done``) is a buffer saved with the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import FusionSpec, Objective, register_objective


@dataclass
class ForcingOptions:
    attention_forcing_steps: int = 0  # >0: on, over this many optimiser steps (needs grounding)


@register_objective
class AttentionForcing(Objective):
    name = "attention_forcing"
    options = ForcingOptions

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.attention_forcing_steps > 0

    @classmethod
    def check(cls, cfg, spec: FusionSpec, on: set[str]) -> None:
        steps = cfg.attention_forcing_steps
        if steps < 0 or (steps > 0 and cfg.grounding_weight <= 0):
            raise ValueError(f"attention_forcing_steps={steps}: needs to be >= 0, and > 0 needs "
                             "grounding_weight > 0 (the targets it forces)")

    def __init__(self, cfg, spec: FusionSpec):
        super().__init__(cfg, spec)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def weight(self) -> float:
        """The share of the targets in the forced heads' attention now."""
        return max(0.0, 1.0 - int(self.steps_done) / self.cfg.attention_forcing_steps)

    def begin(self, step) -> None:
        step.state["guide_weight"] = self.weight()

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps_done += 1
