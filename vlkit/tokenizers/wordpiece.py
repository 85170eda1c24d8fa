"""BERT-style WordPiece tokenizer ([CLS] text [SEP]), as used by ViLT, ALBEF, VLMo and BLIP."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from .base import TextTokenizer, special_token, read_backend
from .learn import learn_wordpiece_vocab

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
CORE_SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)


def read_vocab_txt(path: str | Path) -> dict[str, int]:
    """One token a line, the id being the line number (as BERT's vocab.txt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WordPiece vocabulary {path} does not exist")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    vocab = {token: index for index, token in enumerate(lines)}
    if not vocab:
        raise ValueError(f"WordPiece vocabulary {path} is empty")
    return vocab


def bert_backend(vocab: dict[str, int], lowercase: bool = True, strip_accents: bool | None = None) -> Tokenizer:
    """A `tokenizers.Tokenizer` doing what BERT's tokenizer does: clean-up, optional lower-casing and
    accent stripping (by default exactly when lower-casing), splitting on whitespace and punctuation,
    then greedy longest-match WordPiece with "##" continuations."""
    backend = Tokenizer(WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([special_token(t) for t in CORE_SPECIAL_TOKENS if t in vocab])
    if CLS in vocab and SEP in vocab:  # lets plain `tokenizers` users of the saved file get [CLS] ... [SEP]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{CLS}:0 $A:0 {SEP}:0",
            pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
            special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
        )
    return backend


class WordPieceTokenizer(TextTokenizer):
    """WordPiece tokenizer: `[CLS] tokens [SEP]`, padded with [PAD], default max_length 64.

    Extra special tokens (BLIP's "[DEC]", "[ENC]") are added after the vocabulary when it lacks them,
    are matched on the raw text, and are never split.
    """

    kind = "wordpiece"

    def __init__(
        self,
        backend: Tokenizer,
        *,
        max_length: int = 64,
        extra_special_tokens: Sequence[str] = (),
        source: str = "<in memory>",
    ) -> None:
        missing = [t for t in CORE_SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{source}: a WordPiece vocabulary needs {', '.join(missing)}")
        super().__init__(
            backend,
            bos_token=CLS,
            eos_token=SEP,
            pad_token=PAD,
            max_length=max_length,
            extra_special_tokens=extra_special_tokens,
            source=source,
        )
        self.cls_token_id = self.bos_token_id
        self.sep_token_id = self.eos_token_id
        self.unk_token_id = self._require(UNK)
        self.mask_token_id = self._require(MASK)

    @classmethod
    def from_vocab_file(
        cls,
        path: str | Path,
        lowercase: bool = True,
        extra_special_tokens: Sequence[str] = (),
        max_length: int = 64,
        strip_accents: bool | None = None,
    ) -> WordPieceTokenizer:
        """From a BERT vocab.txt. `strip_accents=None` strips accents exactly when lower-casing."""
        backend = bert_backend(read_vocab_txt(path), lowercase=lowercase, strip_accents=strip_accents)
        return cls(backend, max_length=max_length, extra_special_tokens=extra_special_tokens, source=str(path))

    @classmethod
    def from_file(
        cls, path: str | Path, max_length: int = 64, extra_special_tokens: Sequence[str] = ()
    ) -> WordPieceTokenizer:
        """From a `tokenizers` JSON file (one saved by vlkit or a Hugging Face BERT tokenizer.json),
        whose normaliser and pre-tokeniser are used as they are."""
        path = Path(path)
        backend = read_backend(path)
        return cls(backend, max_length=max_length, extra_special_tokens=extra_special_tokens, source=str(path))

    @property
    def lowercase(self) -> bool:
        """Whether the backend's normaliser lower-cases (read off the normaliser itself)."""
        normalizer = self.backend.normalizer
        return normalizer is not None and normalizer.normalize_str("A") == "a"

    def _options(self) -> dict[str, Any]:
        return {"lowercase": self.lowercase}


def build_wordpiece_vocab(
    texts: Iterable[str],
    vocab_size: int = 1000,
    extra_special_tokens: Sequence[str] = (),
    lowercase: bool = True,
    min_frequency: int = 2,
    max_length: int = 64,
) -> WordPieceTokenizer:
    """Learn a WordPiece vocabulary from a caption corpus; the same texts give the same vocabulary.

    Ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then `extra_special_tokens`, then every character
    seen (so no corpus word becomes [UNK]), then learned pieces up to `vocab_size`.
    """
    probe = bert_backend({UNK: 0}, lowercase=lowercase)  # only its normaliser and pre-tokeniser are used
    words: Counter[str] = Counter()
    for text in texts:
        normalized = probe.normalizer.normalize_str(text)
        words.update(piece for piece, _ in probe.pre_tokenizer.pre_tokenize_str(normalized))
    specials = list(dict.fromkeys([*CORE_SPECIAL_TOKENS, *extra_special_tokens]))
    tokens = learn_wordpiece_vocab(words, vocab_size, specials, min_frequency=min_frequency)
    backend = bert_backend({token: index for index, token in enumerate(tokens)}, lowercase=lowercase)
    return WordPieceTokenizer(
        backend, max_length=max_length, extra_special_tokens=extra_special_tokens, source="build_wordpiece_vocab"
    )
