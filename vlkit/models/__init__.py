"""The model family: one file per architecture, all built from ``vlkit.layers``."""
from .base import (Output, VLModel, build_model, create_model, list_models, model_class,
                   register)

__all__ = ["Output", "VLModel", "build_model", "create_model", "list_models", "model_class",
           "register"]
