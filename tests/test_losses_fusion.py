"""Fusion losses: MLM masking statistics, hard-negative sampling, ITM swaps, VQA soft scores."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlkit.losses.matching import (itm_batch_from_swaps, itm_loss, other_index,
                                   sample_hard_negatives)
from vlkit.losses.mlm import mask_tokens, mlm_loss
from vlkit.data.answers import build_answer_vocab, vqa_soft_scores
from vlkit.losses.vqa import vqa_loss

SPECIAL = (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK]
VOCAB = 500



def _captions(b=1024, length=40, seed=0):
    """[CLS] content [SEP] [PAD]..., random lengths, a few [UNK]s inside the content."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    ids[torch.rand(b, length, generator=g) < 0.02] = 1
    lengths = torch.randint(4, length + 1, (b,), generator=g)
    pos = torch.arange(length)[None]
    ids[:, 0] = 2
    ids[torch.arange(b), lengths - 1] = 3
    mask = (pos < lengths[:, None]).long()
    ids[mask == 0] = 0
    return ids, mask


def test_mask_tokens_statistics():
    ids, mask = _captions()
    masked, labels = mask_tokens(ids, mask, SPECIAL, 4, VOCAB, prob=0.15,
                                 generator=torch.Generator().manual_seed(1))
    eligible = mask.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))
    chosen = labels != -100
    assert not bool((chosen & ~eligible).any())  # never special or padding positions
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # unchosen tokens untouched
    rate = chosen.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.01, rate
    n = chosen.sum().item()
    to_mask = (masked[chosen] == 4).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    rand = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(rand - 0.1) < 0.02, \
        (to_mask, kept, rand)
    replaced = chosen & (masked != 4) & (masked != ids)
    assert not bool(torch.isin(masked[replaced], torch.tensor(SPECIAL)).any())  # random ids are real
    assert int(masked.max()) < VOCAB


def test_mask_tokens_seeded():
    ids, mask = _captions(8)
    a = mask_tokens(ids, mask, SPECIAL, 4, VOCAB, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(ids, mask, SPECIAL, 4, VOCAB, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_whole_word_masking_masks_whole_words():
    g = torch.Generator().manual_seed(0)
    b, length = 512, 30
    word_ids = torch.full((b, length), -1)
    for row in range(b):  # words of 1-3 pieces between [CLS] and [SEP]
        pos, word = 1, 0
        while pos < length - 4:
            size = int(torch.randint(1, 4, (1,), generator=g))
            word_ids[row, pos:pos + size] = word
            pos, word = pos + size, word + 1
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    ids[word_ids < 0] = 0
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    mask[:, -2:] = 0  # trailing padding (words end by position 27)
    assert not bool(((mask == 0) & (word_ids >= 0)).any())
    masked, labels = mask_tokens(ids, mask, SPECIAL, 4, VOCAB, prob=0.15, generator=g, word_ids=word_ids)
    chosen = labels != -100
    assert not bool((chosen & (word_ids < 0)).any())
    words_total = words_chosen = 0
    for row in range(b):
        for w in word_ids[row].unique().tolist():
            if w < 0:
                continue
            flags = chosen[row][word_ids[row] == w]
            assert bool(flags.all()) or not bool(flags.any()), (row, w)  # all pieces or none
            words_total += 1
            words_chosen += int(flags[0])
    assert abs(words_chosen / words_total - 0.15) < 0.015
    # multi-piece words really occur among the chosen ones
    assert any(chosen[r][word_ids[r] == w].sum() > 1 for r in range(64) for w in range(8))


def test_mlm_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    labels = torch.full((3, 5), -100)
    labels[0, 1], labels[2, 4], labels[1, 0] = 7, 2, 10
    expected = -torch.stack([logits[0, 1].log_softmax(-1)[7], logits[2, 4].log_softmax(-1)[2],
                             logits[1, 0].log_softmax(-1)[10]]).mean()
    torch.testing.assert_close(mlm_loss(logits, labels), expected)
    empty = mlm_loss(logits, torch.full((3, 5), -100))
    assert empty.item() == 0.0
    empty.backward()  # still differentiable
    assert logits.grad is not None


def test_itm_loss_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 2, generator=g)
    labels = torch.randint(0, 2, (9,), generator=g)
    direct = -(logits.log_softmax(-1)[torch.arange(9), labels]).mean()
    torch.testing.assert_close(itm_loss(logits, labels), direct)
    torch.testing.assert_close(itm_loss(logits, labels), F.cross_entropy(logits, labels))


def test_hard_negatives_never_pick_the_positive():
    g = torch.Generator().manual_seed(0)
    n = 16
    counts = torch.zeros(n, n)
    sim = torch.randn(n, n, generator=g)
    sim.diagonal().add_(30.0)  # the positive dominates softmax(sim): excluding it must still work
    for _ in range(400):
        picks = sample_hard_negatives(sim, generator=g)
        counts[torch.arange(n), picks] += 1
    assert counts.diagonal().sum() == 0
    # the draws follow softmax over the negatives (row 0, 400 draws)
    probs = sim[0, 1:].softmax(-1)
    freq = counts[0, 1:] / 400
    assert (freq - probs).abs().max() < 0.08
    # a positive mask (e.g. two captions of one image) excludes every positive
    positive = torch.zeros(n, n, dtype=torch.bool)
    positive[torch.arange(n), torch.arange(n) // 2 * 2] = True
    positive[torch.arange(n), torch.arange(n) // 2 * 2 + 1] = True
    for _ in range(100):
        picks = sample_hard_negatives(torch.randn(n, n, generator=g), g, positive_mask=positive)
        assert not bool(positive[torch.arange(n), picks].any())
    with pytest.raises(ValueError):
        sample_hard_negatives(torch.zeros(1, 1))


def test_itm_swaps():
    g = torch.Generator().manual_seed(0)
    labels_all = []
    for _ in range(50):
        index, labels = itm_batch_from_swaps(32, prob=0.5, generator=g)
        own = index == torch.arange(32)
        assert torch.equal(own, labels == 1)  # label 1 exactly where the image is the caption's own
        labels_all.append(labels)
    rate = torch.cat(labels_all).float().mean().item()
    assert abs(rate - 0.5) < 0.05
    other = other_index(5, generator=g)
    assert not bool((other == torch.arange(5)).any())
    index, labels = itm_batch_from_swaps(1)
    assert index.tolist() == [0] and labels.tolist() == [1]
    hard = torch.tensor([1, 0, 3, 2])
    index, labels = itm_batch_from_swaps(4, prob=1.0, negative_index=hard)
    assert torch.equal(index, hard) and labels.sum() == 0


def test_vqa_soft_scores_and_loss():
    vocab = build_answer_vocab(["no", "yes", "yes", "2", "blue", "yes", "no", "rare"], min_count=2)
    assert vocab == ["yes", "no"]
    index = {a: i for i, a in enumerate(["yes", "no", "2", "red"])}
    scores = vqa_soft_scores([
        ["no"] * 10,                                   # yes 0
        ["yes", "no", "no", "no", "2", "2", "x"],      # yes 1/3, no 1, 2 2/3
        ["yes"] * 2 + ["red"] * 3 + ["red"] * 5,       # yes 2/3, red 1 (8 >= 3)
    ], index)
    expected = torch.tensor([[0, 1, 0, 0], [1 / 3, 1, 2 / 3, 0], [2 / 3, 0, 0, 1]])
    torch.testing.assert_close(scores, expected)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, generator=g)
    direct = 0.0
    for q in range(3):
        for a in range(4):
            x, t = logits[q, a].item(), scores[q, a].item()
            p = 1 / (1 + math.exp(-x))
            direct -= t * math.log(p) + (1 - t) * math.log(1 - p)
    direct = direct / 12 * 4  # mean over entries, times the number of answers
    assert vqa_loss(logits, scores).item() == pytest.approx(direct, rel=1e-5)
