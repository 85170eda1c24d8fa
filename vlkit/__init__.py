"""vlkit: vision-language models from one library of shared layers."""
from ._version import __version__
from .factory import create_model
from .models import list_models


def load(path, **kwargs):
    """A :class:`vlkit.pipeline.Pipeline` from a run folder or a Hugging Face model folder."""
    from .pipeline import load as _load
    return _load(path, **kwargs)


__all__ = ["create_model", "list_models", "load", "__version__"]
