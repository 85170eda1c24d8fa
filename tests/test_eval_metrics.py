"""Evaluation metrics against brute force and hand-computed examples."""
import math

import pytest
import torch

from vlkit.eval import (bleu4, cider, cider_scores, compositional_accuracy, retrieval_recall,
                        retrieval_recall_from_scores, vqa_accuracy, zero_shot_accuracy)


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------
def _random_retrieval(n_images=23, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_caps = torch.randint(1, 5, (n_images,), generator=g)  # 1..4 captions per image
    t2i = torch.repeat_interleave(torch.arange(n_images), n_caps)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]
    img = torch.randn(n_images, d, generator=g)
    txt = img[t2i] + 1.2 * torch.randn(len(t2i), d, generator=g)  # noisy: recalls in (0, 1)
    return img, txt, t2i


def _brute_force(img, txt, t2i, ks):
    s = img @ txt.T  # full matrix, sorted rankings
    out = {}
    for k in ks:
        hits = []
        for i in range(s.shape[0]):
            top = s[i].argsort(descending=True)[:k].tolist()
            hits.append(any(t2i[j] == i for j in top))
        out[f"i2t_r{k}"] = sum(hits) / len(hits)
    for k in ks:
        hits = [t2i[j].item() in s[:, j].argsort(descending=True)[:k].tolist()
                for j in range(s.shape[1])]
        out[f"t2i_r{k}"] = sum(hits) / len(hits)
    return out


@pytest.mark.parametrize("chunk", [1, 4, 7, 23, 1000])
def test_retrieval_recall_matches_brute_force(chunk):
    img, txt, t2i = _random_retrieval()
    ks = (1, 3, 5, 10)
    got = retrieval_recall(img, txt, t2i, ks=ks, chunk_size=chunk)
    want = _brute_force(img, txt, t2i, ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert 0 < got["i2t_r1"] < 1 and 0 < got["t2i_r1"] < 1  # a non-trivial example


def test_retrieval_default_keys_and_perfect_and_collapsed():
    eye = torch.eye(12)
    t2i = torch.arange(12).repeat(2)  # two identical captions per image
    r = retrieval_recall(eye, eye[t2i], t2i)
    assert set(r) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in r.values())
    # collapsed embeddings: every score ties; ties count against the query
    ones = torch.ones(12, 4)
    r = retrieval_recall(ones, ones[t2i], t2i, ks=(1, 5))
    assert all(v == 0.0 for v in r.values())


def test_retrieval_from_scores_equals_embeddings():
    img, txt, t2i = _random_retrieval(seed=3)
    want = retrieval_recall(img, txt, t2i, ks=(1, 2))
    got = retrieval_recall_from_scores(lambda a, b: img[a:b] @ txt.T, len(img), len(txt), t2i,
                                       ks=(1, 2), chunk_size=5)
    assert got == pytest.approx(want)
    with pytest.raises(ValueError):
        retrieval_recall(img, txt, t2i[:-1])


# --------------------------------------------------------------------------------------------
# Zero-shot, compositional, VQA
# --------------------------------------------------------------------------------------------
def test_zero_shot_accuracy_with_groups():
    classes = torch.eye(3)
    images = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]])
    labels = torch.tensor([0, 1, 1, 0, 2])  # hits: T T F T F
    seen = torch.tensor([True, True, False, True, False])
    out = zero_shot_accuracy(images, classes, labels, {"seen": seen, "heldout": ~seen,
                                                       "empty": torch.zeros(5, dtype=torch.bool)})
    assert out == pytest.approx({"top1": 3 / 5, "top1_seen": 1.0, "top1_heldout": 0.0})


def test_compositional_accuracy_ties_wrong():
    pos = torch.tensor([0.9, 0.5, 0.3, 0.7, 0.2])
    neg = torch.tensor([0.1, 0.5, 0.4, 0.6, 0.2])  # hits: T, tie, F, T, tie
    kinds = ["attribute_swap", "attribute_swap", "relation_flip", "relation_flip", "count_change"]
    out = compositional_accuracy(pos, neg, kinds)
    assert out == pytest.approx({"compositional_acc": 2 / 5, "attribute_swap_acc": 0.5,
                                 "relation_flip_acc": 0.5, "count_change_acc": 0.0})


def test_vqa_accuracy():
    preds = ["Red ", "two", "yes", "left of", "3"]
    answers = ["red", "2", "YES", ["left", "left of"], "three"]
    types = ["color", "count", "exists", "relation", "count"]
    out = vqa_accuracy(preds, answers, types)
    assert out == pytest.approx({"acc": 3 / 5, "color_acc": 1.0, "count_acc": 0.0,
                                 "exists_acc": 1.0, "relation_acc": 1.0})
    assert vqa_accuracy(["a"], ["b"]) == {"acc": 0.0}


# --------------------------------------------------------------------------------------------
# BLEU-4
# --------------------------------------------------------------------------------------------
def test_bleu4_hand_computed_single_sentence():
    cand = ["The cat sat on the mat."]
    refs = [["the cat sat on a mat", "a cat is on the mat"]]
    # clipped precisions: 1-grams 5/6 ('the' clipped to 1), 2-grams 5/5, 3-grams 3/4,
    # 4-grams 1/3; candidate length 6 = closest reference length -> no brevity penalty
    want = (5 / 6 * 5 / 5 * 3 / 4 * 1 / 3) ** 0.25
    assert bleu4(cand, refs) == pytest.approx(want, rel=1e-12)


def test_bleu4_hand_computed_corpus_with_brevity_penalty():
    cands = ["the cat sat on the mat", "a b c d"]
    refs = [["the cat sat on a mat", "a cat is on the mat"],
            ["a b c d e f", "a b c d e f g h"]]
    # corpus counts: 1-grams (5+4)/(6+4), 2-grams (5+3)/(5+3), 3-grams (3+2)/(4+2),
    # 4-grams (1+1)/(3+1); c = 6 + 4 = 10, r = 6 + 6 (closest) = 12 -> BP = exp(1 - 12/10)
    want = math.exp(1 - 12 / 10) * (9 / 10 * 1 * 5 / 6 * 2 / 4) ** 0.25
    assert bleu4(cands, refs) == pytest.approx(want, rel=1e-12)


def test_bleu4_edges():
    assert bleu4(["a b c d e"], [["a b c d e"]]) == pytest.approx(1.0)
    assert bleu4(["a b c"], [["a b c"]]) == 0.0  # no 4-grams at all
    assert bleu4(["x y z w"], [["a b c d"]]) == 0.0
    with pytest.raises(ValueError):
        bleu4(["a"], ["a"])  # references must be lists


# --------------------------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------------------------
def test_cider_hand_computed_two_images():
    # every reference n-gram has df = 1 -> weight tf * log(2); unseen n-grams also log(2)
    # image 1: identical -> n=1 and n=2 cosines 1, no 3/4-grams -> mean over n = 2/4 -> x10 = 5
    # image 2: 'c e' vs 'c d': unigram cosine (L*L)/(sqrt2 L * sqrt2 L) = 1/2, bigram 0 -> 1.25
    cands = ["a b", "c e"]
    refs = [["a b"], ["c d"]]
    assert cider_scores(cands, refs) == pytest.approx([5.0, 1.25], rel=1e-12)
    assert cider(cands, refs) == pytest.approx(3.125, rel=1e-12)


def test_cider_hand_computed_idf_clipping_and_length_penalty():
    cands = ["a b b", "a c", "d e"]
    refs = [["a b"], ["a c"], ["d e"]]
    x = math.log(3) - math.log(2)  # idf weight of 'a' (in 2 of 3 reference sets)
    y = math.log(3)  # every other n-gram (df 1, or unseen)
    # unigrams: hyp {a: x, b: 2y}, ref {a: x, b: y}; clipped dot x*x + min(2y, y)*y
    v1 = (x * x + y * y) / (math.sqrt(x * x + 4 * y * y) * math.sqrt(x * x + y * y))
    v2 = y * y / (math.sqrt(2) * y * y)  # bigrams: hyp {ab, bb}, ref {ab}
    penalty = math.exp(-(2 - 1) ** 2 / (2 * 6.0 ** 2))  # lengths in bigrams: 2 vs 1
    want = 10 * penalty * (v1 + v2 + 0 + 0) / 4
    assert cider_scores(cands, refs)[0] == pytest.approx(want, rel=1e-12)


def test_cider_properties():
    refs = [["a red circle left of a blue square", "a red circle next to a blue square"],
            ["two green triangles", "a pair of green triangles"],
            ["a small yellow star", "one yellow star"]]
    exact = [r[0] for r in refs]
    wrong = ["a blue square", "three red circles", "a large green star"]
    s_exact, s_wrong = cider_scores(exact, refs), cider_scores(wrong, refs)
    assert all(e > w for e, w in zip(s_exact, s_wrong))
    assert cider(exact, refs) > cider(wrong, refs) >= 0.0
    # word order matters through higher n-grams
    shuffled = ["square blue a of left circle red a"] + exact[1:]
    assert cider(shuffled, refs) < cider(exact, refs)


def test_class_embeddings_follow_new_weights():
    """The zero-shot class-embedding cache is rebuilt when other weights are loaded into the
    pipeline's model (and reused while they stay)."""
    import vlkit
    from vlkit.eval.zeroshot import class_embeddings
    from vlkit.pipeline import Pipeline
    from vlkit.tokenizers import build_wordpiece_vocab
    torch.manual_seed(0)
    small = {"vision.image_size": 32, "vision.patch_size": 16, "vision.dim": 32, "vision.depth": 1,
             "vision.heads": 2, "vision.mlp_dim": 64, "text.dim": 32, "text.depth": 1, "text.heads": 2,
             "text.mlp_dim": 64, "embed_dim": 16}
    tok = build_wordpiece_vocab(["a red circle", "a blue square", "a small red circle"], vocab_size=60)
    small.update({"text.vocab_size": tok.vocab_size, "text.eot_token_id": tok.eos_token_id})
    model, other = (vlkit.create_model("clip", "tiny", **small) for _ in range(2))
    pipe = Pipeline(model, tok)
    first = class_embeddings(pipe, ["red circle", "blue square"])
    assert class_embeddings(pipe, ["red circle", "blue square"]) is first  # cached
    model.load_state_dict(other.state_dict())
    again = class_embeddings(pipe, ["red circle", "blue square"])
    assert not torch.allclose(again, first)
    torch.testing.assert_close(again, class_embeddings(Pipeline(other, tok),
                                                       ["red circle", "blue square"]))
