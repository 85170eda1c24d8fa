"""The model family: one file per architecture, all built from ``vlkit.layers``
(``vlkit.create_model``, in ``vlkit.factory``, makes one with its pretrained parts loaded)."""
from .base import Output, VLModel, build_model, list_models, model_class, register

__all__ = ["Output", "VLModel", "build_model", "list_models", "model_class", "register"]
