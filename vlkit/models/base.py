"""What every vlkit model shares: the registry, presets, config (de)serialisation, outputs."""
from __future__ import annotations

import dataclasses
import json
import math
import types
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
    # config fields of the model's own that serve only the auxiliary objectives (besides their
    # options in ``ObjectiveOptions``): ``--vqa`` trained alone resets them with the objectives
    objective_fields: tuple[str, ...] = ()
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
    # Fusion models (ViLT, ALBEF, VLMo, BLIP) return log P(match) from the ITM head (<= 0); with
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


def requires_head(*heads: str):
    """Decorator: a method that exists only when one of the named heads does (is not None), so
    ``hasattr(model, name)`` tells the pipeline and the evaluation what a model can do."""
    def wrap(fn):
        def get(self):
            if all(getattr(self, h) is None for h in heads):
                raise AttributeError(f"this {self.model_name} has no {' or '.join(heads)} for {fn.__name__}")
            return fn.__get__(self)
        return property(get, doc=fn.__doc__)
    return wrap


def answer_names(cfg, best: list[int]) -> list[str]:
    """The names of answer indices ``best`` (a config's ``answer_names``, else the indices)."""
    names = cfg.answer_names or [str(i) for i in range(cfg.num_answers)]
    return [names[i] for i in best]


def merge_config(cfg, overrides: dict, name: str = "model"):
    """``cfg`` with fields replaced; a nested config takes a dict (merged into it) or dotted keys
    such as ``"vision.dim"``; unknown fields are an error naming them. Each value is coerced to
    its field's declared type (see ``coerce_value``): ``"false"`` for a bool field is False,
    ``"64"`` for an int field is 64, and a value that is not of the type is a ValueError naming
    the field and the type."""
    grouped: dict = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            group = grouped.get(head, {})
            if isinstance(group, str):  # vision='{"dim": 32}' then vision.depth=1
                group = _json_or_none(group)
            elif dataclasses.is_dataclass(group):
                group = config_to_dict(group)
            if not isinstance(group, dict):
                raise ValueError(f"{name}.{head}: expected a JSON object of its fields, got {grouped[head]!r}")
            grouped[head] = {**group, rest: value}
        else:
            grouped[head] = value
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(grouped) - fields)
    if unknown:
        raise ValueError(f"unknown {name} config field(s): {', '.join(unknown)}")
    hints = _type_hints(type(cfg))
    changes = {}
    for key, value in grouped.items():
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, str):  # --set vision='{"dim": 32}'
                value = _json_or_none(value)
            if isinstance(value, dict):
                value = merge_config(current, value, f"{name}.{key}")
            elif not (dataclasses.is_dataclass(value) and type(value) is type(current)):
                raise ValueError(f"{name}.{key}: expected a {type(current).__name__} "
                                 f"(a JSON object of its fields), got {value!r}")
        else:
            value = coerce_value(value, hints.get(key, typing.Any), f"{name}.{key}")
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def _type_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: leave those fields untyped
        return {}


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _type_name(hint) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def coerce_value(value, hint, label: str, strict: bool = False):
    """``value`` as the declared type ``hint`` of the field named ``label``, or a one-line
    ValueError naming the field and the expected type. The one check of typed values: config
    fields, run options and recipe entries all go through it.

    ``strict=False`` (text from a command line or ``--set``): bool takes True/False, 0/1 or the
    strings true/false/1/0/yes/no/on/off; int an integral number or its text; float a finite
    number or its text; list/tuple a list, JSON text of one, or comma-separated text (each element
    coerced); Optional None or "none"/"null". ``strict=True`` (typed files: JSON configs, TOML
    recipes): the value must already be of the type — an int for a float field, a list for a
    tuple field, nothing parsed from text."""
    def bad():
        return ValueError(f"{label}: expected {_type_name(hint)}, got {type(value).__name__} {value!r:.40}")
    if hint is typing.Any or hint is None:
        return value
    text = None if strict or not isinstance(value, str) else value.strip()
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (text is not None and text.lower() in ("none", "null")):
            if type(None) in args:
                return None
            raise bad()
        kinds = [arg for arg in args if arg is not type(None)]
        if len(kinds) == 1:  # Optional[X]: X's own message
            return coerce_value(value, kinds[0], label, strict)
        for arg in kinds:
            try:
                return coerce_value(value, arg, label, strict)
            except ValueError:
                continue
        raise bad()
    if origin in (list, tuple) or hint in (list, tuple):
        if text is not None:
            parsed = _json_or_none(text) if text.startswith("[") else None
            value = parsed if isinstance(parsed, list) else [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        elem = args[0] if args else typing.Any
        if origin is tuple and len(args) > 1 and Ellipsis not in typing.get_args(hint):
            if len(value) != len(args):
                raise bad()
            items = [coerce_value(v, a, f"{label}[{i}]", strict) for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [coerce_value(v, elem, f"{label}[{i}]", strict) for i, v in enumerate(value)]
        return tuple(items) if (origin or hint) is tuple else list(items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if not strict and isinstance(value, int) and value in (0, 1):
            return bool(value)
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{label}: expected true or false, got {value!r}")
    if hint in (int, float):
        number = value
        if text is not None:
            try:
                number = hint(text)
            except ValueError:
                raise bad() from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise bad()
        if not math.isfinite(number):
            raise ValueError(f"{label}: expected a finite number, got {value!r}")
        if hint is float:
            return float(number) if not strict else number
        if isinstance(number, float) and (strict or not number.is_integer()):
            raise bad()
        return int(number)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise bad()
    return value


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
            value = coerce_value(value, hint, f"config field {field}", strict=True)
        kwargs[name] = value
    return cls(**kwargs)


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
