"""Reading Hugging Face model folders and renaming their weights with strict checks."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..checkpoint import check_finite, read_weights


class ConversionError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


# transformers' class defaults of the config fields the converters read. transformers 4.x writes
# into config.json only the fields that differ from them (5.x writes every field) and reads a
# missing one as its default, so a folder it wrote is read the same way here.
_TEXT_ROLES = {"blip": ("blip_text_model", "blip_vision_model"), "clip": ("clip_text_model", "clip_vision_model")}
HF_DEFAULTS = {
    "vit": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                qkv_bias=True),
    "bert": dict(vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12,
                 pad_token_id=0, type_vocab_size=2),
    "vilt": dict(vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=40, hidden_act="gelu", layer_norm_eps=1e-12,
                 image_size=384, patch_size=32, num_channels=3, qkv_bias=True, type_vocab_size=2,
                 modality_type_vocab_size=2, max_image_length=-1, num_images=-1),
    "blip": dict(image_text_hidden_size=256),
    "blip_text_model": dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=512,
                            hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0, bos_token_id=30522,
                            eos_token_id=2, sep_token_id=102),
    "blip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              hidden_act="gelu", layer_norm_eps=1e-5, image_size=384, patch_size=16),
    "clip": dict(projection_dim=512, logit_scale_init_value=2.6592),
    "clip_text_model": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                            num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406, eos_token_id=49407),
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5, image_size=224, patch_size=32,
                              num_channels=3),
}


def read_hf_config(folder: str | Path) -> dict:
    """A model folder's config.json, with transformers' defaults for the fields it leaves out
    (`HF_DEFAULTS`), in its own part and in ``text_config`` / ``vision_config``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a model folder)")
    try:
        cfg = json.loads(path.read_text(), object_hook=lambda d: HFConfig(d, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, HFConfig):
        raise ConversionError(f"{path}: not a JSON object")
    kind = cfg.get("model_type")
    for field, role in zip(("text_config", "vision_config"), _TEXT_ROLES.get(kind, ())):
        part = cfg.get(field)
        if part is None or isinstance(part, HFConfig):
            cfg[field] = with_defaults(part if part is not None else HFConfig({}, path), role)
    return with_defaults(cfg, kind)


def with_defaults(cfg: "HFConfig", model_type) -> "HFConfig":
    """``cfg`` with transformers' default for each field of ``model_type`` it lacks."""
    defaults = HF_DEFAULTS.get(model_type if isinstance(model_type, str) else "", {})
    return HFConfig({**defaults, **cfg}, cfg.path)


class HFConfig(dict):
    """A config.json object: a field the converters need but the file lacks is a
    `ConversionError` naming the file and the field (not a KeyError)."""

    def __init__(self, data: dict, path: Path):
        super().__init__(data)
        self.path = path

    def __missing__(self, key):
        raise ConversionError(f"{self.path}: no \"{key}\" field (a Hugging Face config of this "
                              "model type needs it)")


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a Hugging Face folder: model.safetensors (or its sharded index), else
    pytorch_model.bin read with ``torch.load(weights_only=True)`` (no pickle code runs)."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    legacy = folder / "pytorch_model.bin"
    if single.is_file():
        return read_weights(single, check=False)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ConversionError(f"{index}: not a safetensors index (needs a \"weight_map\" "
                                  "object of file names)") from None
        out = {}
        for shard in shards:
            out.update(read_weights(folder / shard, check=False))
        return out
    if legacy.is_file():
        try:
            return torch.load(str(legacy), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is reported the same way
            raise ConversionError(f"{legacy}: cannot be read as plain tensors ({e})") from None
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")


def checked_config(cfg, folder: str | Path):
    """A config built from a Hugging Face config.json, with every field's type checked (as a
    vlkit run's config is): a value of the wrong type (``"hidden_size": "768"``, null) is a
    `ConversionError` naming the file and the field, not a TypeError deep in a layer."""
    from ..models.base import config_from_dict, config_to_dict
    try:
        config_from_dict(type(cfg), config_to_dict(cfg))
    except ValueError as e:
        raise ConversionError(f"{Path(folder) / 'config.json'}: {e}") from None
    return cfg


def rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]],
           ignore: list[str] = ()) -> dict[str, torch.Tensor]:
    """Apply the first matching ``(regex, replacement)`` rule to every key. A key that no rule
    matches and no ``ignore`` pattern covers is an error: nothing is dropped silently."""
    compiled = [(re.compile(p), r) for p, r in rules]
    ignored = [re.compile(p) for p in ignore]
    out, unmatched = {}, []
    for key, value in state.items():
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            if not any(p.fullmatch(key) for p in ignored):
                unmatched.append(key)
    if unmatched:
        raise ConversionError(f"{len(unmatched)} checkpoint key(s) have no place in the model: "
                              + ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else ""))
    return out


def check_fit(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str,
              what: str = "the model", needed=None) -> None:
    """Raise a ConversionError naming the keys of ``needed`` (default: all of ``expected``) that
    ``state`` lacks, the keys of ``state`` that ``expected`` lacks, and every shape mismatch."""
    needed = expected if needed is None else needed
    missing = sorted(set(needed) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
           for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: " + ", ".join(missing[:6]))
    if extra:
        problems.append(f"unexpected {len(extra)}: " + ", ".join(extra[:6]))
    if bad:
        problems.append("shape mismatch: " + "; ".join(bad[:6]))
    if problems:
        raise ConversionError(f"{source}: checkpoint does not fit {what} ({' | '.join(problems)})")


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load converted weights, asserting that every key exists on both sides with equal shapes."""
    expected = model.state_dict()
    check_fit(expected, state, source)
    check_finite(state, source)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` from keys that have it (e.g. "vit." of a classification checkpoint)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


# -- the rename tables read backwards (vlkit names -> the foreign checkpoint's) -------------------

def _closing(pattern: str, start: int) -> int:
    """Index of the ``)`` closing the group opened at ``pattern[start]``."""
    depth, i = 0, start
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            return i
        i += 1
    raise ValueError(f"unbalanced group in {pattern!r}")


def _alternatives(body: str) -> list[str]:
    """The top-level ``|`` alternatives of a group body."""
    parts, depth, last, i = [], 0, 0, 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            i += 2
            continue
        depth += (c == "(") - (c == ")")
        if c == "|" and depth == 0:
            parts.append(body[last:i])
            last = i + 1
        i += 1
    return parts + [body[last:]]


def _template(pattern: str, groups: list[str]) -> list:
    """A rule's pattern as the key it names: literal text and group numbers (its capture groups,
    whose bodies are appended to ``groups``); a non-capturing group takes its first alternative
    (an optional one is kept: the saved layout). Anything else (``.*``, classes) cannot be
    written backwards: ValueError."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            out.append(pattern[i + 1])
            i += 2
        elif c == "(" and pattern.startswith("(?:", i):
            end = _closing(pattern, i)
            first, *rest = _alternatives(pattern[i + 3:end])
            if any("(" in alt.replace("(?:", "") for alt in rest):
                raise ValueError(f"a capture group in a later alternative of {pattern!r}")
            out += _template(first, groups)
            i = end + 1 + (pattern[end + 1:end + 2] == "?")
        elif c == "(":
            end = _closing(pattern, i)
            groups.append(pattern[i + 1:end])
            out.append(len(groups))
            i = end + 1
        elif c in ".*+?[]{}^$|\\":
            raise ValueError(f"rename rule {pattern!r} cannot be read backwards (at {pattern[i:]!r})")
        else:
            out.append(c)
            i += 1
    return out


def reverse_rules(rules: list[tuple[str, str]]) -> list[tuple[re.Pattern, list]]:
    """Each ``(pattern, replacement)`` rename rule as (a regex over our names, the foreign key
    template): ``encoder\\.layer\\.(\\d+)\\.attention\\.(?:attention\\.)?query\\.(weight|bias)`` ->
    ``blocks.\\1.attn.q.\\2`` reads backwards as ``blocks.(?P<g1>\\d+).attn.q.(?P<g2>weight|bias)``
    -> ``encoder.layer.{1}.attention.attention.query.{2}``."""
    out = []
    for pattern, repl in rules:
        groups: list[str] = []
        template = _template(pattern, groups)
        used, regex, i = set(), "", 0
        for m in re.finditer(r"\\(\d)", repl):
            n = int(m.group(1))
            regex += re.escape(repl[i:m.start()]) + (f"(?P=g{n})" if n in used else f"(?P<g{n}>{groups[n - 1]})")
            used.add(n)
            i = m.end()
        regex += re.escape(repl[i:])
        if used != set(range(1, len(groups) + 1)):
            raise ValueError(f"rename rule {pattern!r} -> {repl!r} drops a group: it cannot be read backwards")
        out.append((re.compile(regex), template))
    return out


def unrename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]], ignore: list[str] = (),
             prefix: str = "") -> dict[str, torch.Tensor]:
    """``rename`` backwards: our keys -> the checkpoint's (``prefix`` before each, e.g. "vit.").
    Every key must find a rule unless ``ignore`` covers it, and renaming the result forwards
    must give the key back; otherwise a ConversionError lists the keys."""
    backwards = reverse_rules(rules)
    ignored = [re.compile(p) for p in ignore]
    out, unmatched = {}, []
    for key, value in state.items():
        for regex, template in backwards:
            m = regex.fullmatch(key)
            if m:
                foreign = "".join(p if isinstance(p, str) else m.group(f"g{p}") for p in template)
                if rename({foreign: value}, rules) != {key: value}:  # a rule earlier in the table wins
                    raise ConversionError(f"{key}: written back as {foreign}, which reads as another name")
                out[prefix + foreign] = value
                break
        else:
            if not any(p.fullmatch(key) for p in ignored):
                unmatched.append(key)
    if unmatched:
        raise ConversionError(f"{len(unmatched)} weight(s) have no place in the checkpoint format: "
                              + ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else ""))
    return out
