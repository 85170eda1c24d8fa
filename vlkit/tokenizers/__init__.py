"""Text tokenizers on the Hugging Face `tokenizers` library.

- `WordPieceTokenizer`: BERT-style ([CLS] ... [SEP]) for ViLT, ALBEF, VLMo and BLIP.
- `CLIPTokenizer`: CLIP's byte-level BPE (<|startoftext|> ... <|endoftext|>).
- `build_wordpiece_vocab(texts, vocab_size)`: a deterministic WordPiece vocabulary from captions.
- `load_tokenizer(directory)`: whatever `save()` wrote, or a Hugging Face tokenizer folder.

Every tokenizer is called on a str or a list of str and returns {"input_ids", "attention_mask"}
LongTensors of shape (B, L); truncation cuts the content and keeps the end token.
"""

from .base import TextTokenizer
from .bpe import CLIPTokenizer
from .loading import load_tokenizer
from .wordpiece import WordPieceTokenizer, build_wordpiece_vocab

__all__ = ["CLIPTokenizer", "TextTokenizer", "WordPieceTokenizer", "build_wordpiece_vocab", "load_tokenizer"]
