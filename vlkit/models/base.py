"""What every vlkit model shares: the registry, presets, config (de)serialisation, outputs."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import torch
from torch import nn

_REGISTRY: dict[str, type["VLModel"]] = {}


def register(name: str):
    """Class decorator: make a model reachable by ``model_class(name)`` (and ``vlkit.create_model``)."""
    def wrap(cls):
        cls.model_name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


@dataclass
class Output:
    """What ``forward`` returns: features and logits (fields a model does not produce are None)."""
    features: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None


class VLModel(nn.Module):
    """Base of the registered models. Subclasses set ``config_class``, ``presets`` and ``task``
    and implement ``training_losses(batch) -> dict`` (with a ``"loss"`` entry)."""

    model_name = "?"
    config_class: type = object
    presets: dict = {}
    task = "none"
    cfg: typing.Any

    @classmethod
    def make_config(cls, preset: str = "tiny", **overrides):
        if preset not in cls.presets:
            raise ValueError(f"unknown preset {preset!r} for {cls.model_name}; "
                             f"presets: {', '.join(cls.presets)}")
        base = cls.config_class(**cls.presets[preset])
        return merge_config(base, overrides, cls.model_name)

    def config_dict(self) -> dict:
        return config_to_dict(self.cfg)

    def training_losses(self, batch: dict) -> dict:
        raise NotImplementedError

    @classmethod
    def upgrade_config(cls, data: dict) -> dict:
        """A saved config dict brought up to date (fields added since keep what the run used)."""
        return data

    # ``score(pixel_values, input_ids, attention_mask=None) -> (B,)``, on every model that rates
    # image-text pairs: a log-score that each zipped (image, text) pair matches, higher = a
    # better match, comparable between captions of one image and between images of one caption.
    # Fusion models (ViLT, ALBEF) return log P(match) from the ITM head (<= 0); with
    # ``match_score="itm+edit"`` the log of that probability times the MLM head's probability of
    # the text's least likely word (``vlkit.objectives.word_edit``). CLIP, which has no match
    # head, returns its logit: the temperature-scaled cosine, whose softmax over candidate
    # captions (or images) is CLIP's probability of each, i.e. a log-probability up to the
    # normaliser of the candidate set. ``Pipeline.match`` stays a probability (ITM softmax).

    def image_spec(self) -> dict:
        """Image size and normalisation the model expects (drives the pipeline's transform)."""
        return image_spec(self.cfg)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay besides norms, biases and embeddings."""
        return set()


def merge_config(cfg, overrides: dict, name: str = "model"):
    """``cfg`` with fields replaced; a nested config takes a dict (merged into it) or dotted keys
    such as ``"vision.dim"``; unknown fields are an error naming them."""
    grouped: dict = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            grouped.setdefault(head, {})[rest] = value
        else:
            grouped[head] = value
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(grouped) - fields)
    if unknown:
        raise ValueError(f"unknown {name} config field(s): {', '.join(unknown)}")
    changes = {}
    for key, value in grouped.items():
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = merge_config(current, value, f"{name}.{key}")
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def config_to_dict(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def config_from_dict(cls, data: dict, where: str = ""):
    """Rebuild a (possibly nested) config dataclass from JSON, rejecting unknown fields and
    values of the wrong type (a ValueError naming the field, e.g. ``vision.depth``)."""
    if not isinstance(data, dict):
        raise ValueError(f"config{' field ' + where if where else ''}: expected an object of "
                         f"{cls.__name__} fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) in config: {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        field = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            value = config_from_dict(hint, value, field)
        else:
            check_config_value(hint, value, field)
            if isinstance(value, list) and typing.get_origin(hint) is tuple:
                value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_config_value(hint, value, field: str) -> None:
    """Raise a ValueError naming ``field`` unless ``value`` (as read from JSON) fits the type
    ``hint`` (bool, int, float, str, ``X | None``, ``list[X]``, ``tuple[X, ...]``)."""
    import math
    if hint is None or hint is typing.Any:
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return
        for arg in args:
            if arg is type(None):
                continue
            try:
                check_config_value(arg, value, field)
                return
            except ValueError:
                pass
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else None
            for i, x in enumerate(value):
                check_config_value(item, x, f"{field}[{i}]")
            return
    elif hint is bool:
        if isinstance(value, bool):
            return
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"config field {field}: must be a finite number, got {value}")
            return
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return
    else:
        return  # a type this check does not know: left to the model
    raise ValueError(f"config field {field}: expected {_type_name(hint)}, got "
                     f"{type(value).__name__} {value!r:.40}")


def list_models() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def model_class(name: str) -> type[VLModel]:
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_model(name: str, config: dict) -> VLModel:
    """A model from its name and a config dict (as stored in a run folder's config.json; a
    saved config from before an option existed gets the value that reproduces it,
    ``VLModel.upgrade_config``)."""
    cls = model_class(name)
    return cls(config_from_dict(cls.config_class, cls.upgrade_config(dict(config))))


def _import_all() -> None:
    """Import every model file in this package: each registers its model."""
    import importlib
    import pkgutil
    from pathlib import Path
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in ("base", "__init__"):
            importlib.import_module(f"{__package__}.{info.name}")


def image_spec(cfg) -> dict:
    """Image size and normalisation of a config with ``image_size``, ``mean``, ``std``."""
    return {"size": cfg.image_size, "mean": tuple(cfg.mean), "std": tuple(cfg.std)}
