"""Phrase grounding: pull the attention of the words that name an object onto its patches.

A fusion model finds, for a word like "circle", the image tokens of the circle only by search:
until its attention lands there, nothing it reads depends on which object the word names, so
questions such as "what color is the circle?" sit at their answer prior. With the objects' boxes
known (``vlkit.data.grounding``), the search can be skipped: the loss is the negative log of the
attention mass that each grounded text token puts on the patches of the objects it names, for
the supervised heads of one layer (MDETR and GLIP align words and regions with box annotations
in the same spirit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers.attention import AttentionGuide

__all__ = ["grounding_loss", "mean_grounding", "check_grounding_settings", "require_grounding",
           "require_relations", "mask_relation_words", "relation_offsets", "relation_geometry_loss", "relation_heads", "grounding_losses", "GroundedPasses",
           "attention_guides"]


def grounding_loss(attention: torch.Tensor, targets: torch.Tensor,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean attention mass on the target patches).

    attention: (B, heads, L, P) attention probabilities of L text tokens over P image patches
    (a slice of the full rows, which may also cover text or other tokens); targets: (B, L, P)
    0/1 for every head alike, or (B, heads, L, P) one set per head (the subject and object heads
    of relation phrases); all-zero rows for tokens without grounding. The loss averages
    -log(mass) over the grounded tokens and the given heads; with no grounded token it is 0
    (still part of the graph) and the mass is NaN."""
    if targets.dim() == 3:
        targets = targets[:, None]
    if attention.dim() != 4 or targets.dim() != 4 or attention.shape[0] != targets.shape[0] \
            or attention.shape[2:] != targets.shape[2:] or targets.shape[1] not in (1, attention.shape[1]):
        raise ValueError(f"grounding: attention {tuple(attention.shape)} (B, heads, L, P) does not "
                         f"fit targets {tuple(targets.shape)} (B, L, P) or (B, heads, L, P)")
    targets = targets.to(attention.dtype)
    mass = (attention * targets).sum(-1)  # (B, heads, L)
    rows = (targets.sum(-1) > 0).expand_as(mass)
    if not bool(rows.any()):
        return attention.sum() * 0.0, attention.new_tensor(float("nan"))
    picked = mass[rows]
    return -picked.clamp_min(eps).log().mean(), picked.detach().mean()


def mean_grounding(parts) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, mean attention mass) over the (loss, mass) of several grounded passes; the
    mass over the passes that had grounded tokens (NaN if none had)."""
    loss = torch.stack([l for l, _ in parts]).mean()
    masses = torch.stack([m for _, m in parts])
    masses = masses[~masses.isnan()]
    return loss, masses.mean() if masses.numel() else masses.new_tensor(float("nan"))


def check_grounding_settings(cfg, layers: int, stack: str) -> None:
    """Clear errors for a model config's grounding fields: ``grounding_weight`` >= 0 and, when
    it is on, a ``grounding_layer`` among the ``layers`` of the supervised ``stack`` and 1 to
    ``heads`` grounding heads; a ``relation_weight`` >= 0 that, when on, needs grounding on, a
    ``relation_layer`` of the stack and two heads there (``relation_heads``); a
    ``relation_mask_prob`` in [0, 1] (> 0 needs grounding), a ``geometry_weight`` >= 0 (> 0
    needs relations) and ``attention_forcing_steps`` >= 0 (> 0 needs grounding)."""
    weight, layer, heads, max_heads = cfg.grounding_weight, cfg.grounding_layer, cfg.grounding_heads, cfg.heads
    relation_weight, relation_layer = cfg.relation_weight, cfg.relation_layer
    if weight < 0:
        raise ValueError(f"grounding_weight must be >= 0, got {weight}")
    if relation_weight < 0:
        raise ValueError(f"relation_weight must be >= 0, got {relation_weight}")
    if weight > 0:
        if not 0 <= layer < layers:
            raise ValueError(f"grounding_layer {layer}: the {stack} has {layers} layers")
        if not 1 <= heads <= max_heads:
            raise ValueError(f"grounding_heads {heads}: choose 1 to {max_heads}")
    if relation_weight > 0:
        if weight <= 0:
            raise ValueError("relation_weight > 0 needs grounding_weight > 0 (relations are "
                             "learnt in the grounded passes)")
        if not 0 <= relation_layer < layers:
            raise ValueError(f"relation_layer {relation_layer}: the {stack} has {layers} layers")
        first = relation_heads(layer, heads, relation_layer)
        if first + 2 > max_heads:
            raise ValueError(f"relation_weight needs heads {first} and {first + 1} after the "
                             f"{heads} grounding head(s) of that layer, but a layer has {max_heads} "
                             "heads (or choose another relation_layer)")
    if cfg.geometry_weight < 0 or (cfg.geometry_weight > 0 and relation_weight <= 0):
        raise ValueError(f"geometry_weight={cfg.geometry_weight}: needs to be >= 0, and > 0 needs "
                         "relation_weight > 0 (the relation words and their objects)")
    if not 0 <= cfg.relation_mask_prob <= 1 or (cfg.relation_mask_prob > 0 and weight <= 0):
        raise ValueError(f"relation_mask_prob={cfg.relation_mask_prob}: needs to be in [0, 1], and "
                         "> 0 needs grounding_weight > 0 (the relation words come from the grounding)")
    forcing = cfg.attention_forcing_steps
    if forcing < 0 or (forcing > 0 and weight <= 0):
        raise ValueError(f"attention_forcing_steps={forcing}: needs to be >= 0, and > 0 needs "
                         "grounding_weight > 0 (the targets it forces)")


def attention_guides(cfg, step: int, targets: torch.Tensor, roles: torch.Tensor | None, place) -> dict | None:
    """Attention forcing (``cfg.attention_forcing_steps``), a curriculum for the supervised
    heads: {layer: {"self" or "cross": ``layers.AttentionGuide``}} that has the grounding heads
    read the image through ``targets`` (B, L, P) and the relation heads through ``roles``
    (B, 2, L, P), mixed into their own attention at a share falling linearly from 1 at step 0
    to 0 at that many optimiser steps (then None). What the layers do with an object's or a
    relation's patches is learned from the first step, while the heads learn to find them (the
    grounding losses stay on their own attention). ``place(t)`` maps targets (B, h, L, P) to
    (kind, the model's attention layout)."""
    steps = cfg.attention_forcing_steps
    weight = 1.0 - step / steps if steps > 0 else 0.0
    if weight <= 0:
        return None
    per_layer = {cfg.grounding_layer: [(0, targets[:, None].expand(-1, cfg.grounding_heads, -1, -1))]}
    if roles is not None:
        per_layer.setdefault(cfg.relation_layer, []).append(
            (relation_heads(cfg.grounding_layer, cfg.grounding_heads, cfg.relation_layer), roles))
    guides = {}
    for layer, parts in per_layer.items():
        parts.sort(key=lambda part: part[0])  # grounding heads first, then the relation heads
        kind, target = place(torch.cat([t for _, t in parts], dim=1))
        guides[layer] = {kind: AttentionGuide(parts[0][0], target, weight)}
    return guides


def mask_relation_words(roles: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor,
                        masked: torch.Tensor, labels: torch.Tensor, pick: torch.Tensor,
                        mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, MLM labels) with every relation word (a token with a role in ``roles``
    (B, 2, L, P)) of the rows ``pick`` (B,) bool replaced by [MASK] and made a target."""
    words = roles.to(ids.device).sum((1, 3)) > 0  # (B, L)
    sel = words & pick[:, None] & attention_mask.bool()
    return (torch.where(sel, torch.full_like(masked, mask_token_id), masked),
            torch.where(sel, ids, labels))


def relation_offsets(roles: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, L, 2) the subject's centre minus the object's, (B, L) bool: the relation words),
    from relation targets ``roles`` (B, 2, L, rows * columns): the centres of the marked patches,
    in fractions of the image side (x to the right, y down)."""
    gh, gw = grid
    if roles.shape[-1] != gh * gw:
        raise ValueError(f"relation targets cover {roles.shape[-1]} patches, the grid {grid} has {gh * gw}")
    cell = torch.arange(gh * gw, device=roles.device)
    coords = torch.stack([(cell % gw + 0.5) / gw, (cell // gw + 0.5) / gh], dim=-1).to(roles.dtype)
    mass = roles.sum(-1)  # (B, 2, L)
    centres = (roles @ coords) / mass.clamp_min(1)[..., None]  # (B, 2, L, 2)
    return centres[:, 0] - centres[:, 1], (mass > 0).all(1)


def relation_geometry_loss(predicted: torch.Tensor, roles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean squared error of ``predicted`` (B, L, 2), read at the relation words, against twice
    the subject-minus-object offset (``relation_offsets``; 0 when the batch has no relation).
    A target of first order for the comparison a relation word stands for: with the subject and
    the object each looked at by a head, the offset is a linear read of their outputs."""
    offset, rows = relation_offsets(roles.to(predicted.device, torch.float32), grid)
    if not bool(rows.any()):
        return predicted.sum() * 0.0
    return F.mse_loss(predicted[rows].float(), 2 * offset[rows])


def require_relations(batch: dict, key: str = "grounding_roles") -> torch.Tensor:
    """The batch's relation targets (B, 2, L, P), or a clear error saying where they come from."""
    if key not in batch:
        raise ValueError(f"relation_weight > 0 needs batches with {key!r} (ImageTextCollate with a "
                         "grounding_grid writes them from grounding entries with a role)")
    return batch[key]


def relation_heads(grounding_layer: int, grounding_heads: int, relation_layer: int) -> int:
    """The first of the two relation heads (subject, object): right after the grounding heads
    when both losses supervise one layer, else the layer's first head."""
    return grounding_heads if relation_layer == grounding_layer else 0


def grounding_losses(cfg, attention_of, targets: torch.Tensor, roles: torch.Tensor | None = None):
    """(grounding (loss, mass), relation (loss, mass) or None) of a model config's supervised
    heads: ``attention_of(layer, heads)`` gives that layer's attention of the text over the
    patches for a slice of heads, (B, h, L, P); ``targets`` (B, L, P) are the names', ``roles``
    (B, 2, L, P) the relation words' subjects and objects."""
    h = cfg.grounding_heads
    named = grounding_loss(attention_of(cfg.grounding_layer, slice(0, h)), targets)
    if roles is None:
        return named, None
    if roles.shape[0] != targets.shape[0] or roles.shape[1] != 2 or roles.shape[2:] != targets.shape[1:]:
        raise ValueError(f"relation targets {tuple(roles.shape)} do not fit the grounding "
                         f"targets {tuple(targets.shape)} (expected (B, 2, L, P))")
    r = relation_heads(cfg.grounding_layer, h, cfg.relation_layer)
    return named, grounding_loss(attention_of(cfg.relation_layer, slice(r, r + 2)), roles)


class GroundedPasses:
    """The grounding terms of one training step, collected over its grounded passes: each
    pass's (loss, mass) of the names and of the relation words, and, with a ``geometry_head``,
    the offset regression read from that pass's text states (B, L, D) on the patch ``grid``."""

    def __init__(self, cfg, geometry_head=None, grid: tuple[int, int] | None = None):
        self.cfg, self.geometry_head, self.grid = cfg, geometry_head, grid
        self.named, self.related, self.geometry = [], [], []

    def __bool__(self) -> bool:
        return bool(self.named)

    def add(self, text_states: torch.Tensor, named, related, roles: torch.Tensor | None) -> None:
        self.named.append(named)
        if related is not None:
            self.related.append(related)
            if self.geometry_head is not None:
                self.geometry.append(relation_geometry_loss(self.geometry_head(text_states), roles, self.grid))

    def losses(self, out: dict) -> list[torch.Tensor]:
        """The weighted loss terms; ``out`` gets the grounding, relation and geometry metrics."""
        terms = []
        if self.named:
            out["grounding_loss"], out["grounding_mass"] = mean_grounding(self.named)
            terms.append(self.cfg.grounding_weight * out["grounding_loss"])
        if self.related:
            out["relation_loss"], out["relation_mass"] = mean_grounding(self.related)
            terms.append(self.cfg.relation_weight * out["relation_loss"])
        if self.geometry:
            out["geometry_loss"] = torch.stack(self.geometry).mean()
            terms.append(self.cfg.geometry_weight * out["geometry_loss"])
        return terms


def require_grounding(batch: dict) -> torch.Tensor:
    """The batch's caption grounding targets, or a clear error saying where they come from."""
    if "grounding" not in batch:
        raise ValueError("grounding_weight > 0 needs batches with 'grounding' targets "
                         "(ImageTextCollate(grounding_grid=model.grounding_grid) on data with "
                         "captions_grounding / qa grounding)")
    return batch["grounding"]
