"""What every auxiliary objective shares: its options, the model facts it is checked against
(``FusionSpec``), the registry, and the per-step view of a model's generic taps (``Step``).

An objective is an ``nn.Module`` that owns its config options (a dataclass of fields with
defaults, mixed into each model config by ``ObjectiveOptions``), its validation (``check``,
run on every config whether the objective is on or off), its heads (built only when it is on)
and its loss. A model builds the objectives that are on (``build_objectives``), registers
them as submodules under their ``name`` (their weights travel in model.safetensors), and, in
``training_losses``, hands each step's taps to a ``Step``:

- ``text_pass`` kind: each fused pass of text over an image the model marks as tappable
  ("caption": the MLM pass, "question": the VQA pass, "itm": the ITM pass). For those, the
  objectives name the layers whose attention they read (``attention_layers``) and may force
  (``guides``); the model returns that attention as (B, heads, L, P) — text rows over the P
  image patches — and the text states (B, L, D) (``read``).
  A model whose tapped pass is ITM places the targets on the rows of the true pairs
  (``targets_at``).
- ``itm_rows``: the ITM pass's fused text states with their pairing (the row of each caption
  shown with its own image, the row of each dataset negative shown with its own image).
- ``mask_words``: the MLM masking, after the model's own.
- ``fuse``/``word_logits``/``draw``: a fusion pass of given texts over given batch images,
  the MLM head, and uniform draws for batch rows made as the model makes its random draws.

Objectives read only these; none imports a model.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_OBJECTIVES: list[type["Objective"]] = []


def register_objective(cls: type["Objective"]) -> type["Objective"]:
    """Class decorator: models build and check this objective from their config."""
    if any(c.name == cls.name for c in _OBJECTIVES):
        raise ValueError(f"an objective named {cls.name!r} is already registered")
    _OBJECTIVES.append(cls)
    return cls


def unregister_objective(name: str) -> None:
    _OBJECTIVES[:] = [c for c in _OBJECTIVES if c.name != name]


def registered_objectives() -> list[type["Objective"]]:
    return list(_OBJECTIVES)


@dataclass(frozen=True)
class FusionSpec:
    """The facts of a model's fused stack that objectives are checked against and read."""
    stack: str                       # "fusion stack" (ALBEF) or "backbone" (ViLT), for errors
    layers: int                      # blocks whose attention of text over the image can be read
    heads: int
    dim: int                         # width of the text states
    grid: tuple[int, int]            # the image patch grid
    all_patches: str = ""            # "" or why not every patch token is in place in training
    blind_heads: tuple[int, ...] = ()  # heads whose text rows do not see the image
    blind_reason: str = ""
    mlm_head: bool = True            # a head that predicts the word at each text position
    mlm_pass: bool = True            # ... trained by MLM (else by the objectives alone: no ``mask_words``)
    itm_pass: bool = True            # the model trains ITM (``itm_rows`` is tapped)
    hard_negatives: bool = False     # batches carry the dataset's negative captions


class Objective(nn.Module):
    """Base of the auxiliary objectives (see the module docstring). Subclasses set ``name``,
    ``options`` (their dataclass of config fields) and override the hooks they need."""

    name = "?"
    options: type = object
    reads_attention = False          # taps the attention of text passes

    def __init__(self, cfg, spec: FusionSpec):
        super().__init__()
        self.cfg, self.spec = cfg, spec

    @classmethod
    def enabled(cls, cfg) -> bool:
        """Whether a config turns this objective on (a weight above 0)."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg, spec: FusionSpec, on: set[str]) -> None:
        """Clear one-line errors for bad option values; ``on`` names the objectives switched on."""

    # -- hooks (no-ops unless overridden) ----------------------------------------------------
    def begin(self, step: "Step") -> None:
        """At the start of a ``training_losses`` call (e.g. check the batch has what it needs)."""

    def attention_layers(self, step: "Step") -> dict[int, tuple[int, int]]:
        """{layer: (first head, number of heads)} whose attention this objective reads."""
        return {}

    def guides(self, step: "Step", targets: dict) -> list[tuple[int, int, torch.Tensor]]:
        """Attention forcing: [(layer, first head, target (B, h, L, P))] and the weight via
        ``guide_weight``."""
        return []

    def read(self, step: "Step", kind: str, attention_of: Callable, states: torch.Tensor,
             targets: dict) -> None:
        """A tapped pass: ``attention_of(layer, heads)`` (B, h, L, P), text states (B, L, D)."""

    def mask_words(self, step: "Step", ids, mask, masked, labels):
        return masked, labels

    def itm_rows(self, step: "Step", states, caption_rows, negative_rows) -> None:
        """The ITM pass: states (N, L, D); ``caption_rows`` (B,) the row of each caption with
        its own image (-1: none); ``negative_rows`` (K,) each dataset negative's row."""

    def finish(self, step: "Step", out: dict) -> list[torch.Tensor]:
        """The weighted loss terms of this step; metrics go into ``out``."""
        return []

    def log_score(self, logp: torch.Tensor, word_logits: Callable, input_ids, attention_mask):
        """``score``: the ITM log-probability ``logp`` (B,), adjusted (default: unchanged)."""
        return logp

    def after_step(self) -> None:
        """After each optimiser step."""


def options_of(*objectives: type[Objective]) -> type:
    """One dataclass holding every given objective's option fields (models' configs inherit it)."""
    fields = []
    for cls in objectives:
        for f in dataclasses.fields(cls.options):
            fields.append((f.name, f.type, dataclasses.field(default=f.default)))
    return dataclasses.make_dataclass("ObjectiveOptions", fields)


class Step:
    """One ``training_losses`` call as the objectives see it: the batch, the mode, and the
    model's taps (``fuse``, ``word_logits``, ``draw``; see the module docstring)."""

    def __init__(self, objectives: list[Objective], batch: dict, training: bool,
                 fuse: Callable | None = None, word_logits: Callable | None = None,
                 draw: Callable | None = None):
        self.objectives, self.batch, self.training = objectives, batch, training
        self.fuse, self.word_logits, self.draw = fuse, word_logits, draw
        self.state: dict = {}
        for o in objectives:
            o.begin(self)

    @property
    def taps_attention(self) -> bool:
        return any(o.reads_attention for o in self.objectives)

    def targets(self, kind: str) -> dict:
        """The attention targets of a pass over the captions ("caption") or questions ("question")."""
        key = "grounding" if kind == "caption" else "question_grounding"
        return {"names": self.batch.get(key), "roles": self.batch.get(key + "_roles")}

    def targets_at(self, kind: str, rows: torch.Tensor, total: int, length: int) -> dict:
        """``targets(kind)`` placed in a pass of ``total`` rows at ``length`` text positions:
        the batch's row i at pass row ``rows[i]`` (-1: nowhere), every other row without targets
        (a pass such as ITM that also shows texts with images they do not describe)."""
        out = {}
        for key, t in self.targets(kind).items():
            if t is not None:
                at = rows.to(t.device)
                t = F.pad(t, (0, 0, 0, length - t.shape[-2]))
                placed = t.new_zeros(total, *t.shape[1:])
                placed[at[at >= 0]] = t[at >= 0]
                t = placed
            out[key] = t
        return out

    def attention_layers(self) -> list[int]:
        layers: set[int] = set()
        for o in self.objectives:
            layers |= set(o.attention_layers(self))
        return sorted(layers)

    def guides(self, targets: dict) -> tuple[dict, float] | None:
        """({layer: (first head, target (B, h, L, P))}, weight) of attention forcing in training."""
        if not self.training:
            return None
        weight = self.state.get("guide_weight", 0.0)
        if weight <= 0:
            return None
        parts: dict[int, list] = {}
        for o in self.objectives:
            for layer, first, target in o.guides(self, targets):
                parts.setdefault(layer, []).append((first, target))
        out = {}
        for layer, items in parts.items():
            items.sort(key=lambda item: item[0])  # in head order
            out[layer] = (items[0][0], torch.cat([t for _, t in items], dim=1))
        return out, weight

    def read(self, kind: str, attention_of: Callable, states: torch.Tensor, targets: dict) -> None:
        for o in self.objectives:
            o.read(self, kind, attention_of, states, targets)

    def mask_words(self, ids, mask, masked, labels):
        for o in self.objectives:
            masked, labels = o.mask_words(self, ids, mask, masked, labels)
        return masked, labels

    def itm_rows(self, states, caption_rows, negative_rows) -> None:
        for o in self.objectives:
            o.itm_rows(self, states, caption_rows, negative_rows)

    def finish(self, out: dict) -> list[torch.Tensor]:
        terms = []
        for o in self.objectives:
            terms.extend(o.finish(self, out))
        return terms
