"""CLIP's byte-level BPE tokenizer (<|startoftext|> text <|endoftext|>, context length 77).

Matches OpenAI CLIP's `simple_tokenizer` and Hugging Face's `CLIPTokenizer`: NFC normalisation,
whitespace runs collapsed to one space and stripped, lower-case, CLIP's pre-tokenisation regex, bytes
mapped to printable symbols, BPE with "</w>" marking the end of each word. Like Hugging Face (and unlike
OpenAI) it does not run `ftfy` or unescape HTML entities.

Padding: OpenAI CLIP pads with id 0, Hugging Face with the pad token of the folder (usually
<|endoftext|>). vlkit pads with <|endoftext|> unless `pad_token_id` says otherwise; models must rely on
`attention_mask` (or the first <|endoftext|>), never on the padding id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .base import TextTokenizer, special_token, read_backend

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def read_vocab_json(path: str | Path) -> dict[str, int]:
    """A {token: id} JSON object (CLIP's / GPT-2's vocab.json)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BPE vocabulary {path} does not exist")
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{path} must be a JSON object mapping tokens to integer ids")
    return vocab


def read_merges_txt(path: str | Path) -> list[tuple[str, str]]:
    """Merge rules, one "left right" pair a line, in priority order; "#version" lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BPE merges file {path} does not exist")
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}, line {number}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A `tokenizers.Tokenizer` doing what CLIP's tokenizer does (see the module docstring)."""
    backend = Tokenizer(
        BPE(vocab, merges, end_of_word_suffix=END_OF_WORD, unk_token=END, fuse_unk=False, dropout=None)
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([special_token(START), special_token(END)])
    backend.post_processor = processors.TemplateProcessing(  # for plain `tokenizers` users of the saved file
        single=f"{START} $A {END}",
        pair=f"{START} $A {END} $B {END}",
        special_tokens=[(START, backend.token_to_id(START)), (END, backend.token_to_id(END))],
    )
    return backend


class CLIPTokenizer(TextTokenizer):
    """CLIP's tokenizer: `<|startoftext|> tokens <|endoftext|>`, padded to `context_length` or less.

    `max_length` (default `context_length`) is the default length limit of a call; `context_length`
    records the text model's number of positions. `pad_token_id=None` pads with <|endoftext|>.
    """

    kind = "clip"

    def __init__(
        self,
        backend: Tokenizer,
        *,
        context_length: int = 77,
        max_length: int | None = None,
        pad_token_id: int | None = None,
        extra_special_tokens: Sequence[str] = (),
        source: str = "<in memory>",
    ) -> None:
        pad_token = END
        if pad_token_id is not None:
            pad_token = backend.id_to_token(pad_token_id)
            if pad_token is None:
                raise ValueError(f"{source}: pad_token_id {pad_token_id} is not in the vocabulary")
        self.context_length = context_length
        super().__init__(
            backend,
            bos_token=START,
            eos_token=END,
            pad_token=pad_token,
            max_length=context_length if max_length is None else max_length,
            extra_special_tokens=extra_special_tokens,
            source=source,
        )

    @classmethod
    def from_files(
        cls,
        vocab_file: str | Path,
        merges_file: str | Path,
        context_length: int = 77,
        pad_token_id: int | None = None,
        extra_special_tokens: Sequence[str] = (),
    ) -> CLIPTokenizer:
        """From CLIP's vocab.json and merges.txt (the Hugging Face folder layout)."""
        vocab, merges = read_vocab_json(vocab_file), read_merges_txt(merges_file)
        source = f"{vocab_file} + {merges_file}"
        for token in (START, END):
            if token not in vocab:
                raise ValueError(f"{vocab_file}: a CLIP vocabulary needs the token {token!r}")
        try:
            backend = clip_backend(vocab, merges)
        except Exception as error:  # e.g. a merge whose result is not in the vocabulary
            raise ValueError(f"{source} do not form a BPE model: {error}") from error
        return cls(
            backend,
            context_length=context_length,
            pad_token_id=pad_token_id,
            extra_special_tokens=extra_special_tokens,
            source=source,
        )

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        context_length: int = 77,
        max_length: int | None = None,
        pad_token_id: int | None = None,
        extra_special_tokens: Sequence[str] = (),
    ) -> CLIPTokenizer:
        """From a `tokenizers` JSON file (one saved by vlkit or a Hugging Face CLIP tokenizer.json),
        whose normaliser and pre-tokeniser are used as they are."""
        path = Path(path)
        backend = read_backend(path)
        return cls(
            backend,
            context_length=context_length,
            max_length=max_length,
            pad_token_id=pad_token_id,
            extra_special_tokens=extra_special_tokens,
            source=str(path),
        )

    def _clean_decoded(self, text: str) -> str:
        return text.replace(END_OF_WORD, " ").strip()

    def _options(self) -> dict[str, Any]:
        return {"lowercase": True, "context_length": self.context_length, "pad_token_id": self.pad_token_id}
