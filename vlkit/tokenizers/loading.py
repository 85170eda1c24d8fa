"""`load_tokenizer(directory)`: the right tokenizer from a vlkit or Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import CONFIG_FILE, TOKENIZER_FILE, TextTokenizer
from .bpe import CLIPTokenizer
from .wordpiece import WordPieceTokenizer

KINDS: dict[str, type[TextTokenizer]] = {"wordpiece": WordPieceTokenizer, "clip": CLIPTokenizer}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _from_vlkit_config(directory: Path) -> TextTokenizer:
    config = _read_json(directory / CONFIG_FILE)
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind not in KINDS:
        raise ValueError(f"{directory / CONFIG_FILE}: unknown tokenizer kind {kind!r}, expected {sorted(KINDS)}")
    options = {
        "max_length": config.get("max_length", 64),
        "extra_special_tokens": config.get("extra_special_tokens", ()),
    }
    if kind == "clip":
        options.update(context_length=config.get("context_length", 77), pad_token_id=config.get("pad_token_id"))
    return KINDS[kind].from_file(directory / TOKENIZER_FILE, **options)


def _from_tokenizer_json(path: Path) -> TextTokenizer:
    data = _read_json(path)
    model_type = data.get("model", {}).get("type") if isinstance(data, dict) else None
    if model_type == "WordPiece":
        return WordPieceTokenizer.from_file(path)
    if model_type == "BPE":
        return CLIPTokenizer.from_file(path)
    raise ValueError(
        f"{path}: unsupported tokenizer model {model_type!r}; vlkit reads WordPiece (BERT) and BPE (CLIP)"
    )


def _hf_lowercase(directory: Path) -> bool:
    """do_lower_case from a Hugging Face tokenizer_config.json (BERT's default, True, without one)."""
    path = directory / "tokenizer_config.json"
    config = _read_json(path) if path.is_file() else {}
    return bool(config.get("do_lower_case", True)) if isinstance(config, dict) else True


def _from_vocab_txt(directory: Path) -> WordPieceTokenizer:
    """A BERT folder: vocab.txt, do_lower_case from tokenizer_config.json, and the tokens of
    added_tokens.json (e.g. BLIP's [DEC], [ENC]) as extra special tokens, checked against their ids."""
    added_path = directory / "added_tokens.json"
    added = _read_json(added_path) if added_path.is_file() else {}
    extra = sorted(added, key=added.get)
    tokenizer = WordPieceTokenizer.from_vocab_file(
        directory / "vocab.txt", lowercase=_hf_lowercase(directory), extra_special_tokens=extra
    )
    for token, token_id in added.items():
        if tokenizer.token_to_id(token) != token_id:
            expected = tokenizer.token_to_id(token)
            raise ValueError(f"{added_path}: {token!r} should have id {expected} after vocab.txt, not {token_id}")
    return tokenizer


def load_tokenizer(directory: str | Path) -> TextTokenizer:
    """The tokenizer stored in `directory`, looked for in this order:

    1. `vlkit_tokenizer.json` + `tokenizer.json` written by `save()`;
    2. a Hugging Face `tokenizer.json` (WordPiece -> `WordPieceTokenizer`, BPE -> `CLIPTokenizer`);
    3. a BERT `vocab.txt` (with `do_lower_case` from tokenizer_config.json and added_tokens.json);
    4. CLIP's `vocab.json` + `merges.txt`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer folder {directory} does not exist")
    if (directory / CONFIG_FILE).is_file():
        return _from_vlkit_config(directory)
    if (directory / TOKENIZER_FILE).is_file():
        return _from_tokenizer_json(directory / TOKENIZER_FILE)
    if (directory / "vocab.txt").is_file():
        return _from_vocab_txt(directory)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return CLIPTokenizer.from_files(directory / "vocab.json", directory / "merges.txt")
    raise FileNotFoundError(
        f"no tokenizer in {directory}: expected {CONFIG_FILE} + {TOKENIZER_FILE} (vlkit), {TOKENIZER_FILE}, "
        "vocab.txt (BERT) or vocab.json + merges.txt (CLIP)"
    )
