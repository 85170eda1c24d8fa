"""vlkit.tokenizers against Hugging Face transformers and a pure-Python port of OpenAI CLIP's BPE.

transformers 5.x has no Python ("slow") CLIPTokenizer any more (CLIPTokenizer and CLIPTokenizerFast are
both the `tokenizers`-backed class), so the slow reference for CLIP is `OpenAIBPE` below, a port of
OpenAI's `simple_tokenizer.py` (without ftfy/HTML unescaping, as in Hugging Face; NFC instead of ftfy).
For BERT the slow reference is transformers' `BertTokenizerLegacy`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import torch

from vlkit.tokenizers import CLIPTokenizer, WordPieceTokenizer, build_wordpiece_vocab, load_tokenizer

regex = pytest.importorskip("regex")  # a dependency of transformers; the CLIP reference needs \p{L}

CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

TRICKY_CLIP = [
    "A RED Circle, left of two blue squares.",
    "don't stop: it's 12:30 -- they're here, we'll see, I'd go, you've been, I'm in",
    "DON'T SHOUT, IT'S LOUD",
    "  multiple   spaces\tand\t\ttabs\nand\n\nnewlines  ",
    "café naïve résumé Ångström",
    "cafe\u0301 written with a combining accent",
    "",
    "1234567890 3.14159 $100,000 50% 2nd",
    "hello!!! ??? ... ;-) #hashtag @user e-mail",
    "emoji 🙂 and 中文 characters",
    " ".join(["the red circle is left of the blue square"] * 12),  # longer than 77 tokens
]

TRICKY_BERT = [
    "Hello, World!",
    "A RED circle left of two Blue squares.",
    "Café au lait, naïve résumé",
    "unaffable xyzzy",
    "snowman ☃ and ø are unknown",
    "1234 3.14 $100,000",
    "don't it's",
    "  spaces\t\ttabs\nnewline  ",
    "",
    "中文 text",
    "a [MASK] token",
    " ".join(["the red circle is left of the blue square"] * 10),
]


# ---------------------------------------------------------------------------------- CLIP fixtures
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_clip_files(directory: Path, corpus: list[str], n_merges: int = 200) -> tuple[Path, Path]:
    """CLIP-format vocab.json / merges.txt: 256 byte symbols, the same with "</w>", merges learned on
    `corpus` by plain BPE, then <|startoftext|>, <|endoftext|> (CLIP's layout)."""
    b2u = bytes_to_unicode()
    pattern = regex.compile(CLIP_PATTERN, regex.IGNORECASE)
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for piece in pattern.findall(text.lower()):
            symbols = [b2u[b] for b in piece.encode("utf-8")]
            words[tuple(symbols[:-1]) + (symbols[-1] + "</w>",)] += 1
    merges = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        words = Counter({merge_word(w, best): c for w, c in words.items()})
    vocab = list(b2u.values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory / "vocab.json", directory / "merges.txt"


class OpenAIBPE:
    """Port of OpenAI CLIP's simple_tokenizer.SimpleTokenizer (encode, decode, tokenize)."""

    def __init__(self, vocab_file: Path, merges_file: Path):
        self.encoder = json.loads(vocab_file.read_text(encoding="utf-8"))
        self.decoder = {v: k for k, v in self.encoder.items()}
        merges = merges_file.read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(m for m in merges if m)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.pattern = regex.compile(CLIP_PATTERN, regex.IGNORECASE)
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, token: str) -> list[str]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            word = merge_word(word, best)
        return list(word)

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for piece in self.pattern.findall(text):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece))
        return ids

    def tokenize(self, text: str, context_length: int = 77) -> list[int]:
        tokens = [self.sot, *self.encode(text), self.eot][:context_length]
        tokens[-1] = self.eot  # OpenAI's truncate=True
        return tokens

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    corpus = [t for t in TRICKY_CLIP if len(t) < 200] + ["the the the red red circle circles squares"]
    directory = tmp_path_factory.mktemp("clip")
    write_clip_files(directory, corpus)
    return directory


@pytest.fixture(scope="module")
def clip(clip_dir) -> CLIPTokenizer:
    return CLIPTokenizer.from_files(clip_dir / "vocab.json", clip_dir / "merges.txt")


@pytest.fixture(scope="module")
def openai_bpe(clip_dir) -> OpenAIBPE:
    return OpenAIBPE(clip_dir / "vocab.json", clip_dir / "merges.txt")


# ------------------------------------------------------------------------------------ CLIP tests
def test_fixture_exercises_multi_symbol_merges(clip, openai_bpe):
    """Guards the other tests: the learned merges must actually fire on the tricky strings."""
    ids = openai_bpe.encode("don't stop: it's the red circle")
    assert any(i >= 512 for i in ids)  # a merged token (ids < 512 are the byte symbols)
    assert clip.vocab_size == len(openai_bpe.encoder)


@pytest.mark.parametrize("text", TRICKY_CLIP)
def test_clip_matches_openai_reference(clip, openai_bpe, text):
    expected = openai_bpe.tokenize(text, context_length=77)
    assert clip.encode(text, truncation=True) == expected
    batch = clip(text, padding="max_length")
    assert batch["input_ids"].shape == (1, 77)
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    assert batch["attention_mask"][0].tolist() == [1] * len(expected) + [0] * (77 - len(expected))


def test_clip_matches_transformers(clip, clip_dir):
    transformers = pytest.importorskip("transformers")
    for hf_class in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast):
        hf = hf_class.from_pretrained(str(clip_dir))
        expected = hf(TRICKY_CLIP, padding="max_length", max_length=77, truncation=True)
        ours = clip(TRICKY_CLIP, padding="max_length")
        assert ours["input_ids"].tolist() == expected["input_ids"]
        assert ours["attention_mask"].tolist() == expected["attention_mask"]
        assert clip.pad_token_id == hf.pad_token_id == clip.eos_token_id


def test_clip_truncation_keeps_end_token(clip, openai_bpe):
    long_text = TRICKY_CLIP[-1]
    assert len(openai_bpe.encode(long_text)) > 75
    ids = clip(long_text)["input_ids"][0]
    assert ids.shape == (77,)  # default max_length is the context length
    assert ids[0].item() == clip.bos_token_id and ids[-1].item() == clip.eos_token_id
    assert (ids == clip.eos_token_id).sum().item() == 1
    short = clip([long_text, "a red circle"], max_length=10)
    assert short["input_ids"].shape == (2, 10)
    assert short["input_ids"][0, -1].item() == clip.eos_token_id
    assert short["input_ids"][0, 1:9].tolist() == openai_bpe.encode(long_text)[:8]
    assert short["attention_mask"][1].tolist() == [1] * len(clip.encode("a red circle")) + [0] * (
        10 - len(clip.encode("a red circle"))
    )


def test_clip_decode_and_pad_option(clip, clip_dir, openai_bpe):
    for text in ["a red circle, left of it's square!", "café naïve"]:
        ids = clip.encode(text)
        assert clip.decode(ids) == openai_bpe.decode(ids[1:-1]).strip()
        assert clip.decode(ids, skip_special_tokens=False).startswith("<|startoftext|>")
    padded = clip(["a red circle", "it's 12"], padding="max_length")["input_ids"]
    assert clip.decode(padded[0]) == "a red circle"
    assert clip.batch_decode(padded) == ["a red circle", "it 's 1 2"]  # CLIP splits digits
    zero_pad = CLIPTokenizer.from_files(clip_dir / "vocab.json", clip_dir / "merges.txt", pad_token_id=0)
    batch = zero_pad(["a", "a red circle"])
    assert zero_pad.pad_token_id == 0
    assert batch["input_ids"][0, 3:].tolist() == [0] * (batch["input_ids"].shape[1] - 3)
    assert batch["attention_mask"][0].tolist()[:4] == [1, 1, 1, 0]


def test_clip_word_ids(clip):
    text = "a red circle, don't"
    words = clip.word_ids(text)
    assert len(words) == len(clip.encode(text))
    assert words[0] is None and words[-1] is None
    # pieces of CLIP's regex: a | red | circle | , | don | 't
    assert sorted(set(words[1:-1])) == list(range(6))
    assert words[1:-1] == sorted(words[1:-1])


# ------------------------------------------------------------------------------- WordPiece fixtures
def write_bert_vocab(path: Path) -> Path:
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + list("0123456789") + list(letters)
    tokens += ["##" + c for c in letters + "0123456789"]
    tokens += ["Hello", "World", "Red", "中", "文", "é"]  # cased tokens, CJK and an accented letter
    tokens += "the red blue circle square left of two a hello world cafe au lait naive resume un text".split()
    tokens += "##aff ##able ##s ##le ##ir ##cle ##ua ##re ##34 don it 12 ##00 spaces tabs new ##line".split()
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bert")
    write_bert_vocab(directory / "vocab.txt")
    return directory


@pytest.fixture(scope="module")
def wordpiece(bert_dir) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_vocab_file(bert_dir / "vocab.txt")


def hf_bert_tokenizers(directory: Path, lowercase: bool) -> list:
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    return [
        BertTokenizerLegacy(vocab_file=str(directory / "vocab.txt"), do_lower_case=lowercase),
        transformers.BertTokenizer.from_pretrained(str(directory), do_lower_case=lowercase),
        transformers.BertTokenizerFast.from_pretrained(str(directory), do_lower_case=lowercase),
    ]


# ------------------------------------------------------------------------------- WordPiece tests
@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_matches_transformers(bert_dir, lowercase):
    ours = WordPieceTokenizer.from_vocab_file(bert_dir / "vocab.txt", lowercase=lowercase)
    assert ours.lowercase is lowercase
    for hf in hf_bert_tokenizers(bert_dir, lowercase):
        for text in TRICKY_BERT:
            assert ours.encode(text) == hf(text)["input_ids"], (type(hf).__name__, text)
        for kwargs, hf_padding in [({"padding": "max_length"}, "max_length"), ({"padding": "longest"}, True)]:
            expected = hf(TRICKY_BERT, padding=hf_padding, max_length=12, truncation=True)
            batch = ours(TRICKY_BERT, max_length=12, **kwargs)
            assert batch["input_ids"].tolist() == expected["input_ids"]
            assert batch["attention_mask"].tolist() == expected["attention_mask"]
            assert batch["input_ids"].dtype == torch.long


def test_wordpiece_unknowns_and_ids(wordpiece):
    ids = wordpiece.encode("snowman ☃")
    assert ids[0] == wordpiece.cls_token_id == 2 and ids[-1] == wordpiece.sep_token_id == 3
    assert wordpiece.unk_token_id in ids
    assert wordpiece.pad_token_id == 0 and wordpiece.mask_token_id == 4
    assert wordpiece.bos_token_id == wordpiece.cls_token_id and wordpiece.eos_token_id == wordpiece.sep_token_id
    assert wordpiece.token_to_id("circle") == wordpiece.encode("circle")[1]
    assert wordpiece.token_to_id("no-such-token") is None
    assert wordpiece.special_token_ids == {0, 1, 2, 3, 4}
    assert wordpiece.decode(wordpiece.encode("Hello, World!")) == "hello, world!"


def test_wordpiece_call_defaults_and_truncation(wordpiece):
    long_text = TRICKY_BERT[-1]
    single = wordpiece(long_text)
    assert single["input_ids"].shape == (1, 64)  # default max_length
    assert single["input_ids"][0, -1].item() == wordpiece.sep_token_id
    assert single["input_ids"][0, :-1].tolist() == wordpiece.encode(long_text)[:63]
    wordpiece.max_length = 16
    try:
        assert wordpiece(long_text)["input_ids"].shape == (1, 16)
        assert wordpiece([long_text], padding="max_length", max_length=20)["input_ids"].shape == (1, 20)
    finally:
        wordpiece.max_length = 64
    batch = wordpiece(["a red circle", "two"], padding="max_length", max_length=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
    assert wordpiece(["a red circle", "two"])["input_ids"].shape == (2, 5)  # padding="longest"
    untruncated = wordpiece(long_text, truncation=False)["input_ids"]
    assert untruncated.shape[1] == len(wordpiece.encode(long_text)) > 64
    lists = wordpiece(["a", "a red"], padding=False, return_tensors=None)
    assert [len(ids) for ids in lists["input_ids"]] == [3, 4]
    with pytest.raises(ValueError, match="padding"):
        wordpiece(["a", "a red"], padding=False)


def test_wordpiece_word_ids(wordpiece):
    text = "the circles, don't"
    tokens = wordpiece.tokenize(text)
    assert tokens == ["the", "circle", "##s", ",", "don", "'", "t"]
    assert wordpiece.word_ids(text) == [None, 0, 1, 1, 2, 3, 4, 5, None]
    batch = wordpiece([text, "a"], return_word_ids=True)
    assert batch["word_ids"][0].tolist() == [-1, 0, 1, 1, 2, 3, 4, 5, -1]
    assert batch["word_ids"][1].tolist() == [-1, 0, -1] + [-1] * 6


def test_extra_special_tokens_are_single_and_never_split(bert_dir):
    plain = WordPieceTokenizer.from_vocab_file(bert_dir / "vocab.txt")
    tok = WordPieceTokenizer.from_vocab_file(bert_dir / "vocab.txt", extra_special_tokens=("[DEC]", "[ENC]"))
    dec, enc = tok.token_to_id("[DEC]"), tok.token_to_id("[ENC]")
    assert (dec, enc) == (plain.vocab_size, plain.vocab_size + 1)  # appended, as BLIP does
    assert tok.vocab_size == plain.vocab_size + 2
    text = "[DEC]a red[ENC]circle [DEC]"
    ids = tok.encode(text)
    assert ids.count(dec) == 2 and ids.count(enc) == 1
    assert tok.tokenize(text) == ["[DEC]", "a", "red", "[ENC]", "circle", "[DEC]"]
    assert {dec, enc} <= tok.special_token_ids
    assert tok.decode(ids) == "a red circle"
    assert len(plain.encode(text)) > len(ids)  # without them the brackets are split
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizer.from_pretrained(str(bert_dir))
    hf.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's recipe
    hf.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert hf(text)["input_ids"] == ids


# ------------------------------------------------------------------------ build_wordpiece_vocab
def caption_corpus() -> list[str]:
    colors = "red green blue yellow purple orange".split()
    shapes = "circle square triangle star hexagon".split()
    relations = ["left of", "right of", "above", "below"]
    return [
        f"A {colors[i % 6]} {shapes[i % 5]} {relations[i % 4]} {['one', 'two', 'three'][i % 3]} "
        f"{colors[(i * 7) % 6]} {shapes[(i * 3) % 5]}s."
        for i in range(300)
    ]


BUILD_SNIPPET = """
import json, sys
sys.path.insert(0, {root!r})
from vlkit.tokenizers import build_wordpiece_vocab
tok = build_wordpiece_vocab(json.load(sys.stdin), vocab_size=90)
print(json.dumps(tok.backend.get_vocab()))
"""


def test_build_wordpiece_vocab_deterministic_and_covering(tmp_path):
    corpus = caption_corpus()
    tok = build_wordpiece_vocab(corpus, vocab_size=90, extra_special_tokens=("[DEC]", "[ENC]"))
    first = [tok.id_to_token(i) for i in range(7)]
    assert first == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    assert tok.vocab_size <= 90
    for text in corpus:
        assert tok.unk_token_id not in tok.encode(text)
    assert tok.tokenize("circle") == ["circle"]  # frequent words became single tokens
    assert tok.decode(tok.encode(corpus[0])) == corpus[0].lower()
    assert tok.encode("a [DEC] b").count(tok.token_to_id("[DEC]")) == 1
    again = build_wordpiece_vocab(corpus, vocab_size=90, extra_special_tokens=("[DEC]", "[ENC]"))
    assert again.backend.get_vocab() == tok.backend.get_vocab()
    # In another process too, with another hash seed (tokenizers' own trainer fails this).
    root = str(Path(__file__).resolve().parents[1])
    in_process = build_wordpiece_vocab(corpus, vocab_size=90).backend.get_vocab()
    out = subprocess.run(
        [sys.executable, "-c", BUILD_SNIPPET.format(root=root)],
        input=json.dumps(corpus),
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == in_process


def test_save_and_load_round_trip(tmp_path, clip):
    corpus = caption_corpus()
    tok = build_wordpiece_vocab(corpus, vocab_size=90, extra_special_tokens=("[DEC]", "[ENC]"))
    tok.max_length = 24
    tok.save(tmp_path / "wp")
    assert {p.name for p in (tmp_path / "wp").iterdir()} == {"tokenizer.json", "vlkit_tokenizer.json"}
    config = json.loads((tmp_path / "wp" / "vlkit_tokenizer.json").read_text())
    assert config == {
        "kind": "wordpiece", "max_length": 24, "extra_special_tokens": ["[DEC]", "[ENC]"], "lowercase": True
    }
    loaded = load_tokenizer(tmp_path / "wp")
    assert isinstance(loaded, WordPieceTokenizer) and loaded.max_length == 24
    texts = corpus[:5] + ["[DEC] a red circle [ENC]", "Unseen WORDS!"]
    assert torch.equal(loaded(texts)["input_ids"], tok(texts)["input_ids"])
    assert loaded.vocab_size == tok.vocab_size and loaded.special_token_ids == tok.special_token_ids

    clip.save(tmp_path / "clip")
    loaded_clip = load_tokenizer(tmp_path / "clip")
    assert isinstance(loaded_clip, CLIPTokenizer)
    assert (loaded_clip.context_length, loaded_clip.max_length) == (77, 77)
    assert loaded_clip.pad_token_id == clip.pad_token_id
    assert loaded_clip(TRICKY_CLIP)["input_ids"].tolist() == clip(TRICKY_CLIP)["input_ids"].tolist()


def test_load_hugging_face_folders(tmp_path, bert_dir, clip_dir, clip, wordpiece):
    from_vocab_txt = load_tokenizer(bert_dir)
    assert isinstance(from_vocab_txt, WordPieceTokenizer)
    assert from_vocab_txt(TRICKY_BERT)["input_ids"].tolist() == wordpiece(TRICKY_BERT)["input_ids"].tolist()
    from_bpe_files = load_tokenizer(clip_dir)
    assert isinstance(from_bpe_files, CLIPTokenizer)
    assert from_bpe_files(TRICKY_CLIP)["input_ids"].tolist() == clip(TRICKY_CLIP)["input_ids"].tolist()

    blip_like = tmp_path / "blip_like"  # vocab.txt + added_tokens.json + tokenizer_config.json
    blip_like.mkdir()
    (blip_like / "vocab.txt").write_bytes((bert_dir / "vocab.txt").read_bytes())
    n = wordpiece.vocab_size
    (blip_like / "added_tokens.json").write_text(json.dumps({"[ENC]": n + 1, "[DEC]": n}))
    (blip_like / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = load_tokenizer(blip_like)
    assert (cased.token_to_id("[DEC]"), cased.token_to_id("[ENC]")) == (n, n + 1)
    assert cased.lowercase is False and cased.tokenize("Hello [ENC]") == ["Hello", "[ENC]"]
    (blip_like / "added_tokens.json").write_text(json.dumps({"[ENC]": n + 5}))
    with pytest.raises(ValueError, match="added_tokens.json"):
        load_tokenizer(blip_like)

    transformers = pytest.importorskip("transformers")
    for hf, ours, texts in [
        (transformers.BertTokenizer.from_pretrained(str(bert_dir)), WordPieceTokenizer, TRICKY_BERT),
        (transformers.CLIPTokenizer.from_pretrained(str(clip_dir)), CLIPTokenizer, TRICKY_CLIP),
    ]:
        folder = tmp_path / type(hf).__name__
        hf.save_pretrained(str(folder))
        for name in ("vocab.txt", "vocab.json", "merges.txt"):  # leave tokenizer.json as the only source
            (folder / name).unlink(missing_ok=True)
        loaded = load_tokenizer(folder)
        assert isinstance(loaded, ours)
        expected = hf(texts, padding="max_length", max_length=loaded.max_length, truncation=True)["input_ids"]
        assert loaded(texts, padding="max_length")["input_ids"].tolist() == expected


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(tmp_path / "empty")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    (tmp_path / "wordlevel").mkdir()
    word_level = Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word_level.save(str(tmp_path / "wordlevel" / "tokenizer.json"))
    with pytest.raises(ValueError, match="WordLevel"):
        load_tokenizer(tmp_path / "wordlevel")
    (tmp_path / "novocab").mkdir()
    (tmp_path / "novocab" / "vocab.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"novocab.*\[PAD\]"):
        load_tokenizer(tmp_path / "novocab")
    (tmp_path / "bad_merges").mkdir()
    (tmp_path / "bad_merges" / "vocab.json").write_text('{"<|startoftext|>": 0, "<|endoftext|>": 1}')
    (tmp_path / "bad_merges" / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"merges.txt, line 2"):
        load_tokenizer(tmp_path / "bad_merges")
