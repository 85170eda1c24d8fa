"""Losses: pure functions / modules of tensors, apart from the models."""
from vlkit.losses.contrastive import (ContrastiveLoss, contrastive_loss, local_contrastive_loss,
                                      local_siglip_loss, siglip_loss)

__all__ = ["ContrastiveLoss", "contrastive_loss", "local_contrastive_loss", "local_siglip_loss",
           "siglip_loss"]
