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

__all__ = ["grounding_loss", "mean_grounding", "mask_relation_words", "relation_offsets",
           "relation_geometry_loss"]


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
