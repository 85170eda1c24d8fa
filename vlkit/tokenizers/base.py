"""What every vlkit tokenizer shares: batching, truncation, padding, decoding and saving.

A vlkit tokenizer wraps a Hugging Face `tokenizers.Tokenizer` (the *backend*) that turns text into
content tokens. The wrapper adds the begin and end tokens itself ([CLS] ... [SEP] for WordPiece,
<|startoftext|> ... <|endoftext|> for CLIP), so truncation always cuts the content and keeps the end
token, whatever the backend file says about truncation or padding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Encoding, Tokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "vlkit_tokenizer.json"


def read_backend(path: str | Path) -> Tokenizer:
    """A `tokenizers` JSON file, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust parser raises plain Exception
        raise ValueError(f"{path} is not a valid tokenizers JSON file: {error}") from error


def special_token(content: str) -> AddedToken:
    """An added token that is matched on the raw text (before lower-casing) and never split."""
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


class TextTokenizer:
    """Base class of `WordPieceTokenizer` and `CLIPTokenizer`.

    Subclasses set `kind` (written to vlkit_tokenizer.json), build the backend, and may override
    `_clean_decoded` and `_options`.
    """

    kind: str = ""

    def __init__(
        self,
        backend: Tokenizer,
        *,
        bos_token: str,
        eos_token: str,
        pad_token: str,
        max_length: int,
        extra_special_tokens: Sequence[str] = (),
        source: str = "<in memory>",
    ) -> None:
        self.backend = backend
        self.source = source
        # The wrapper does truncation and padding itself; settings stored in a file must not interfere.
        backend.no_truncation()
        backend.no_padding()
        self.extra_special_tokens = tuple(extra_special_tokens)
        if self.extra_special_tokens:
            backend.add_special_tokens([special_token(t) for t in self.extra_special_tokens])
        self.bos_token_id = self._require(bos_token)
        self.eos_token_id = self._require(eos_token)
        self.pad_token_id = self._require(pad_token)
        self.max_length = max_length

    def _require(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.source}: the vocabulary has no {token!r} token")
        return token_id

    # ----------------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the size the embedding table needs)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_token_ids(self) -> set[int]:
        """Ids of every special token (begin, end, padding, unknown, mask, extra): never to be masked."""
        added = self.backend.get_added_tokens_decoder()
        ids = {i for i, token in added.items() if token.special}
        return ids | {self.bos_token_id, self.eos_token_id}

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of `token_id`, or None when out of range."""
        return self.backend.id_to_token(token_id)

    # ------------------------------------------------------------------------------------ encoding
    def _content(self, texts: Sequence[str]) -> list[Encoding]:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"expected text as str, got {type(text).__name__}")
        return self.backend.encode_batch(list(texts), add_special_tokens=False)

    def _frame(
        self, encoding: Encoding, max_length: int | None, truncation: bool
    ) -> tuple[list[int], list[int | None]]:
        """[begin] + content + [end]; with truncation the content is cut to max_length - 2 tokens."""
        ids, words = encoding.ids, encoding.word_ids
        if truncation:
            limit = self.max_length if max_length is None else max_length
            if limit < 2:
                raise ValueError(f"max_length must be at least 2 (begin and end tokens), got {limit}")
            ids, words = ids[: limit - 2], words[: limit - 2]
        return [self.bos_token_id, *ids, self.eos_token_id], [None, *words, None]

    def encode(self, text: str, *, max_length: int | None = None, truncation: bool = False) -> list[int]:
        """Ids of `text` with the begin and end tokens (not truncated unless asked)."""
        return self._frame(self._content([text])[0], max_length, truncation)[0]

    def word_ids(self, text: str, *, max_length: int | None = None, truncation: bool = False) -> list[int | None]:
        """For each token of `encode(text)` (same arguments), the index of the word it came from.

        None marks the begin and end tokens. Words are the pieces of the pre-tokeniser: for WordPiece a
        run of letters/digits or one punctuation mark ("don't" is three words), for CLIP a piece of its
        regex. This is what whole-word masking needs.
        """
        return self._frame(self._content([text])[0], max_length, truncation)[1]

    def tokenize(self, text: str) -> list[str]:
        """The content tokens of `text` as strings (no begin/end tokens)."""
        return self._content([text])[0].tokens

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        padding: str | bool = "longest",
        truncation: bool = True,
        return_tensors: str | None = "pt",
        return_word_ids: bool = False,
    ) -> dict[str, Any]:
        """Tokenise a batch (a single str is a batch of one).

        Args:
            max_length: length limit, default `self.max_length`.
            padding: "longest" (or True) pads to the longest sequence of the batch; "max_length" pads to
                max_length (to the longest when truncation is off and a sequence is longer); False does
                not pad (then only `return_tensors=None` works for ragged batches).
            truncation: cut the content so that each sequence, end token included, fits max_length.
            return_tensors: "pt" for LongTensors of shape (B, L), None for lists of lists.
            return_word_ids: also return "word_ids" as in `word_ids()`, with -1 for the begin, end and
                padding positions.

        Returns:
            {"input_ids", "attention_mask"} (plus "word_ids" when asked).
        """
        if isinstance(texts, str):
            texts = [texts]
        limit = self.max_length if max_length is None else max_length
        framed = [self._frame(e, limit, truncation) for e in self._content(texts)]
        longest = max((len(ids) for ids, _ in framed), default=0)
        if padding is True or padding == "longest":
            target = longest
        elif padding == "max_length":
            target = max(limit, longest)
        elif padding is False or padding == "do_not_pad":
            target = 0
        else:
            raise ValueError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")

        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
        if return_word_ids:
            batch["word_ids"] = []
        for ids, words in framed:
            n_pad = max(target - len(ids), 0)
            batch["input_ids"].append(ids + [self.pad_token_id] * n_pad)
            batch["attention_mask"].append([1] * len(ids) + [0] * n_pad)
            if return_word_ids:
                batch["word_ids"].append([-1 if w is None else w for w in words] + [-1] * n_pad)

        if return_tensors is None:
            return batch
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if len({len(ids) for ids in batch["input_ids"]}) > 1:
            raise ValueError("sequences have different lengths: use padding, or return_tensors=None")
        if not framed:
            width = limit if padding == "max_length" else 0
            return {key: torch.zeros(0, width, dtype=torch.long) for key in batch}
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}

    # ------------------------------------------------------------------------------------ decoding
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list or a 1-D tensor). Pass the unpadded ids (or mask with attention_mask)
        when the padding id is not a special token."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._clean_decoded(text)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        """`decode` of each row of a (B, L) tensor or list of id lists."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    def _clean_decoded(self, text: str) -> str:
        return text

    # ------------------------------------------------------------------------------------- saving
    def _options(self) -> dict[str, Any]:
        """Constructor options a subclass records in vlkit_tokenizer.json (beyond the common ones)."""
        return {}

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` (the backend, usable by any `tokenizers` user) and
        `vlkit_tokenizer.json` (kind and options), which `load_tokenizer(directory)` reads back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        config = {
            "kind": self.kind,
            "max_length": self.max_length,
            "extra_special_tokens": list(self.extra_special_tokens),
            **self._options(),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, max_length={self.max_length}, "
            f"source={self.source!r})"
        )
