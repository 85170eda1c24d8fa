"""vlkit: vision-language models from one library of shared layers."""
from ._version import __version__

__all__ = ["create_model", "list_models", "load", "__version__"]


def load(path, **kwargs):
    """A :class:`vlkit.pipeline.Pipeline` from a run folder or a Hugging Face model folder."""
    from .pipeline import load as _load
    return _load(path, **kwargs)


def __getattr__(name: str):
    # torch and the models load on first use, so that the command line answers --help and
    # refuses bad arguments without importing them
    if name == "create_model":
        from .factory import create_model
        return create_model
    if name == "list_models":
        from .models import list_models
        return list_models
    raise AttributeError(f"module 'vlkit' has no attribute {name!r}")
