"""Deterministic WordPiece vocabulary learning (BPE-style merges over word counts).

The `tokenizers` library's WordPieceTrainer breaks ties between equally frequent pairs by hash-map
order, so two runs on the same corpus give different vocabularies. This learner does the same job
(merge the most frequent adjacent pair, "##" marking word-internal pieces) with ties broken by the
pair's strings, so the same words always give the same vocabulary.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Mapping

Pair = tuple[str, str]


def _pairs(symbols: list[str]) -> list[Pair]:
    return list(zip(symbols, symbols[1:]))


def _merge(symbols: list[str], pair: Pair, merged: str) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_wordpiece_vocab(
    word_counts: Mapping[str, int],
    vocab_size: int,
    special_tokens: list[str],
    min_frequency: int = 2,
    prefix: str = "##",
    max_word_chars: int = 100,
) -> list[str]:
    """Vocabulary (ordered by id) learned from `word_counts` (already normalised, pre-tokenised words).

    Order: `special_tokens`, the characters that start words, the `prefix` + characters inside words
    (both sorted), then merged pieces in the order they were learned. The alphabet is always kept, so
    the result may exceed `vocab_size` when the alphabet alone does not fit; merging stops at
    `vocab_size` or when no pair occurs `min_frequency` times.
    """
    words = sorted(w for w in word_counts if 0 < len(w) <= max_word_chars)
    counts = [word_counts[w] for w in words]
    symbols = [[w[0]] + [prefix + c for c in w[1:]] for w in words]

    vocab: dict[str, None] = dict.fromkeys(special_tokens)
    vocab.update(dict.fromkeys(sorted({s[0] for s in symbols})))
    vocab.update(dict.fromkeys(sorted({c for s in symbols for c in s[1:]})))

    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for index, (word, count) in enumerate(zip(symbols, counts)):
        for pair in _pairs(word):
            pair_counts[pair] += count
            where[pair].add(index)
    # Max-heap on count; among equal counts the smallest (left, right) strings win. Entries go stale
    # when counts change and are skipped when popped.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if -negative != pair_counts.get(pair, 0):
            continue
        if -negative < max(min_frequency, 1):
            break
        left, right = pair
        merged = left + right[len(prefix) :]
        vocab[merged] = None
        touched: set[Pair] = set()
        for index in sorted(where.pop(pair)):
            old = symbols[index]
            new = _merge(old, pair, merged)
            if len(new) == len(old):
                continue  # stale index: the pair was merged away by an earlier merge
            for p in _pairs(old):
                pair_counts[p] -= counts[index]
                touched.add(p)
            for p in _pairs(new):
                pair_counts[p] += counts[index]
                where[p].add(index)
                touched.add(p)
            symbols[index] = new
        for p in sorted(touched):
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                pair_counts.pop(p, None)
    return list(vocab)
