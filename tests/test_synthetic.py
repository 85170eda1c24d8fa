"""The synthetic world, checked by an independent reading of its caption grammar."""
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from vlkit.data.synthetic import (COLORS, HELDOUT_COMBINATIONS, RELATIONS, SHAPES, SIZES,
                                  SyntheticStream, SyntheticWorld, class_names, write_dataset)
from vlkit.data.transforms import load_image

# reference colours, written out here rather than imported
PALETTE = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (45, 90, 235),
           "yellow": (240, 220, 40), "purple": (150, 65, 205), "orange": (245, 140, 25),
           "white": (245, 245, 245), "gray": (135, 135, 135)}
NUM = {"one": 1, "two": 2, "three": 3, "four": 4}
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle",
          "diamonds": "diamond", "stars": "star", "crosses": "cross"}
_C, _S = "|".join(COLORS), "|".join(SHAPES)
NP = rf"(?:a|an|the) (?:(?:small|large) )?(?:{_C}) (?:{_S})"
NP_PARTS = re.compile(rf"(a|an|the) (?:(small|large) )?({_C}) ({_S})")
RELP = r"to the left of|left of|to the right of|right of|above|below"


# ----------------------------------------------------------------------------- the checker
def parse_np(text):
    m = NP_PARTS.fullmatch(text)
    assert m, f"not a noun phrase: {text!r}"
    det, size, color, shape = m.groups()
    if det != "the":
        assert det == ("an" if (size or color)[0] in "aeiou" else "a"), f"article in {text!r}"
    return size, color, shape


def split_list(text):
    parts = text.split(" and ")
    assert len(parts) == 2 or len(parts) == 1, text
    head = parts[0].split(", ")
    return head + parts[1:]


def find(objects, np_):
    size, color, shape = np_
    hits = [o for o in objects if o["color"] == color and o["shape"] == shape
            and (size is None or o["size"] == size)]
    assert len(hits) <= 1
    return hits[0] if hits else None


def where(a, b):
    """True relation of a to b, and whether it is clear (dominant axis, boxes apart)."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dx) > abs(dy):
        rel, major, minor = ("left of" if dx < 0 else "right of"), abs(dx), abs(dy)
    else:
        rel, major, minor = ("above" if dy < 0 else "below"), abs(dy), abs(dx)
    clear = major - minor > 0.05 and major > (a["extent"] + b["extent"]) / 2
    return rel, clear


def truth(caption, objects):
    """Parse a caption of the grammar and decide it against the objects (raises if unparsable)."""
    prev = None
    value = True
    for clause in caption.split("; "):
        last = None
        if m := re.fullmatch(rf"there is ({NP})", clause):
            last = parse_np(m.group(1))
            value &= find(objects, last) is not None
        elif m := re.fullmatch(rf"({NP})( is)? ({RELP}) ({NP}|it)", clause):
            a_np = parse_np(m.group(1))
            b_np = prev if m.group(4) == "it" else parse_np(m.group(4))
            assert b_np is not None, caption
            rel = m.group(3).replace("to the ", "")
            a, b = find(objects, a_np), find(objects, b_np)
            if a is None or b is None:
                value = False
            else:
                true_rel, clear = where(a, b)
                assert clear, f"relation not clear-cut in {caption!r}"
                value &= rel == true_rel
            last = b_np if m.group(4) != "it" else None
        elif m := re.fullmatch(r"(one|two|three|four) objects?: (.*)", clause):
            n = NUM[m.group(1)]
            assert (n == 1) == (not clause.split(":")[0].endswith("s")), clause
            nps = [parse_np(x) for x in split_list(m.group(2))]
            assert len(nps) == n, f"count word disagrees with the list in {caption!r}"
            value &= n == len(objects) and all(find(objects, x) for x in nps)
            last = nps[-1]
        elif re.fullmatch(rf"(?:(?:one|two|three|four) \w+)(?:, (?:one|two|three|four) \w+)*"
                          rf"(?: and (?:one|two|three|four) \w+)?", clause):
            counts = {}
            for item in split_list(clause):
                word, noun = item.split(" ")
                shape = noun if word == "one" else PLURAL[noun]
                assert shape in SHAPES and shape not in counts, clause
                counts[shape] = NUM[word]
            value &= counts == dict(Counter(o["shape"] for o in objects))
        else:
            nps = [parse_np(x) for x in split_list(clause)]
            value &= all(find(objects, x) is not None for x in nps)
            last = nps[-1]
        prev = last if last is not None else prev
    return bool(value)


def flip_clause(caption, i):
    """The caption with the relation of clause i reversed on the same axis."""
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    clauses = caption.split("; ")
    clauses[i] = re.sub(r"\b(left|right|above|below)\b", lambda m: opposite[m.group(1)], clauses[i])
    return "; ".join(clauses)


def mentioned(caption):
    return [(s or None, c, sh) for _, s, c, sh in NP_PARTS.findall(caption)]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(seed=0)


@pytest.fixture(scope="module")
def train_recs(world):
    return world.records("train", 600) + [world.sample(i, "train", single_object=True)
                                          for i in range(600, 700)]


@pytest.fixture(scope="module")
def test_recs(world):
    return world.records("test", 400)


def test_vocabulary_and_class_names():
    assert len(SHAPES) == 6 and len(COLORS) == 8 and SIZES == ("small", "large")
    assert RELATIONS == ("left of", "right of", "above", "below")
    names = class_names()
    assert len(names) == 48 == len(set(names)) and names[0] == "red circle"
    seen = class_names(include_heldout=False)
    assert len(seen) == 48 - len(HELDOUT_COMBINATIONS)
    assert not {f"{c} {s}" for c, s in HELDOUT_COMBINATIONS} & set(seen)
    assert 6 <= len(HELDOUT_COMBINATIONS) <= 10
    assert max(Counter(c for c, _ in HELDOUT_COMBINATIONS).values()) <= 2
    assert max(Counter(s for _, s in HELDOUT_COMBINATIONS).values()) <= 2


def test_deterministic_per_seed_split_index():
    a, b = SyntheticWorld(seed=3).sample(11), SyntheticWorld(seed=3).sample(11)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    c = SyntheticWorld(seed=4).sample(11)
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))
    d = SyntheticWorld(seed=3).sample(11, "test")
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(d["image"]))
    recs = SyntheticWorld(seed=3).records("test", 5)
    assert [r["caption"] for r in recs] == [r["caption"] for r in SyntheticWorld(seed=3).records("test", 5)]


def test_every_caption_true_and_every_negative_false(train_recs, test_recs):
    kinds = Counter()
    for rec in train_recs + test_recs:
        objs = rec["objects"]
        assert rec["caption"] == rec["captions"][0] and len(rec["captions"]) >= 3
        for cap in rec["captions"]:
            assert truth(cap, objs), (cap, objs)
        assert len(set(rec["captions"])) == len(rec["captions"])
        for neg in rec["negatives"]:
            cap, kind = neg["caption"], neg["kind"]
            assert 0 <= neg["source"] < len(rec["captions"])  # the true caption it was edited from
            kinds[kind] += 1
            assert not truth(cap, objs), (kind, cap, objs)
            assert cap not in rec["captions"]
            words = mentioned(cap)
            colors, shapes = {o["color"] for o in objs}, {o["shape"] for o in objs}
            if kind in ("attribute_swap", "relation_flip"):
                # same words as the image: a bag of words cannot tell these apart
                assert all(c in colors and s in shapes for _, c, s in words), (kind, cap)
            if kind == "attribute_swap":
                # size words travel with the colour: (size, colour) pairs stay true,
                # unless the two objects share a shape and only the sizes swap
                same_shape = len(shapes) < len(objs)
                bad_size = [(z, c) for z, c, _ in words
                            if z and not any(o["size"] == z and o["color"] == c for o in objs)]
                assert not bad_size or same_shape, cap
            if kind == "relation_flip":
                assert all(find(objs, (z, c, s)) for z, c, s in words), cap
                src = rec["captions"][neg["source"]]
                assert any(flip_clause(cap, i) == src for i in range(cap.count("; ") + 1)), cap
            if kind == "attribute_change":
                assert any(c not in colors or s not in shapes for _, c, s in words) or \
                    not re.search(_C, cap), cap
        n = len(objs)
        if n == 1:
            assert {nk["kind"] for nk in rec["negatives"]} <= {"attribute_change", "count_change"}
    assert set(kinds) == {"attribute_swap", "relation_flip", "attribute_change", "count_change"}
    assert min(kinds.values()) > 200


def test_count_negatives_state_totals_like_true_captions(world):
    """A count caption's number must not hint at its truth: stated totals in count_change
    negatives follow the frequencies of true totals."""
    stated = {"pos": Counter(), "neg": Counter()}
    for i in range(1500):
        rec = world.sample(i, "val")
        for cap in rec["captions"]:
            if m := re.match(r"(one|two|three) objects?:", cap):
                stated["pos"][m.group(1)] += 1
        for neg in rec["negatives"]:
            m = re.match(r"(one|two|three) objects?:", neg["caption"])
            if neg["kind"] == "count_change" and m:
                stated["neg"][m.group(1)] += 1
    for word in ("one", "two", "three"):
        p = stated["pos"][word] / sum(stated["pos"].values())
        q = stated["neg"][word] / sum(stated["neg"].values())
        assert abs(p - q) < 0.07, (word, p, q)


def test_objects_geometry(train_recs):
    sizes = {"small": [], "large": []}
    for rec in train_recs:
        objs = rec["objects"]
        assert 1 <= len(objs) <= 3
        assert len({o["color"] for o in objs}) == len(objs)  # colours unique in an image
        for o in objs:
            assert o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in SIZES
            half = o["extent"] / 2
            assert half <= o["x"] <= 1 - half and half <= o["y"] <= 1 - half
            sizes[o["size"]].append(o["extent"])
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                sep = (a["extent"] + b["extent"]) / 2
                assert abs(a["x"] - b["x"]) >= sep or abs(a["y"] - b["y"]) >= sep  # no overlap
                assert where(a, b)[1], (a, b)  # every pair has a clear-cut relation
    assert min(sizes["small"]) * 64 >= 14 and 0.2 <= np.mean(sizes["small"]) <= 0.3
    assert 0.35 <= np.mean(sizes["large"]) <= 0.45


def test_pixels_match_objects(train_recs, test_recs):
    names = list(PALETTE)
    ref = np.array([PALETTE[c] for c in names], float)
    for rec in train_recs[:300] + test_recs[:100]:
        a = np.asarray(rec["image"]).astype(float)
        assert a.shape == (64, 64, 3)
        bg = a[:3, :3].reshape(-1, 3).mean(0)
        for o in rec["objects"]:
            r, c = int(o["y"] * 64), int(o["x"] * 64)
            patch = a[r - 1:r + 2, c - 1:c + 2].reshape(-1, 3).mean(0)
            nearest = names[int(np.argmin(((ref - patch) ** 2).sum(1)))]
            assert nearest == o["color"], (o, patch)
            assert np.abs(patch - np.array(PALETTE[o["color"]])).max() < 50
            # the object stands out from the background (a corner patch)
            assert np.sqrt(((bg - np.array(PALETTE[o["color"]])) ** 2).sum()) > 60, (o, bg)
        assert a.std() > 5  # not a flat image


def test_backgrounds_vary(train_recs):
    corners = np.array([np.asarray(r["image"])[0, 0].mean() for r in train_recs])
    assert corners.std() > 30 and corners.min() < 60 and corners.max() > 150


def test_heldout_only_outside_train(train_recs, test_recs, world):
    held = {f"{c} {s}" for c, s in HELDOUT_COMBINATIONS}
    for rec in train_recs:
        assert not rec["heldout"]
        texts = rec["captions"] + [n["caption"] for n in rec["negatives"]] + \
            [q["question"] for q in rec["qa"]] + [f["caption"] for f in rec.get("false_captions") or ()]
        for t in texts:
            assert not any(h in t for h in held), t
    assert any(r["heldout"] for r in test_recs)
    found = {f"{o['color']} {o['shape']}" for r in test_recs for o in r["objects"]} & held
    assert found == held
    for r in test_recs:
        assert r["heldout"] == any(f"{o['color']} {o['shape']}" in held for o in r["objects"])
    singles = [world.sample(i, "val", single_object=True) for i in range(150)]
    assert any(r["heldout"] and r["label"] in held for r in singles)


def test_labels_only_for_single_objects(train_recs):
    singles = 0
    for rec in train_recs:
        if len(rec["objects"]) == 1:
            o = rec["objects"][0]
            assert rec["label"] == f"{o['color']} {o['shape']}"
            singles += 1
        else:
            assert "label" not in rec
    assert 150 < singles < 450  # ~35% of 600, plus the 100 forced ones


def test_qa_answers_are_right(train_recs, test_recs):
    answers = Counter()
    for rec in train_recs + test_recs:
        objs = rec["objects"]
        types = [q["type"] for q in rec["qa"]]
        assert types.count("exists") == 2 and types.count("count") == 1
        assert ("relation" in types) == (len(objs) > 1)
        for q in rec["qa"]:
            text, ans, kind = q["question"], q["answer"], q["type"]
            if kind == "color":
                shape = re.fullmatch(rf"what color is the ({_S})\?", text).group(1)
                hits = [o for o in objs if o["shape"] == shape]
                assert len(hits) == 1 and ans == hits[0]["color"]
            elif kind == "shape":
                color = re.fullmatch(rf"what shape is the ({_C}) object\?", text).group(1)
                hits = [o for o in objs if o["color"] == color]
                assert len(hits) == 1 and ans == hits[0]["shape"]
            elif kind == "count":
                assert text == "how many objects are there?"
                assert NUM[ans] == len(objs)
            elif kind == "exists":
                _, color, shape = parse_np(re.fullmatch(r"is there (.*)\?", text).group(1))
                present = any(o["color"] == color and o["shape"] == shape for o in objs)
                assert ans == ("yes" if present else "no"), (text, objs)
            elif kind == "relation":
                m = re.fullmatch(rf"is the ({_C}) ({_S}) ({RELP}) the ({_C}) ({_S})\?", text)
                a = find(objs, (None, m.group(1), m.group(2)))
                b = find(objs, (None, m.group(4), m.group(5)))
                rel, clear = where(a, b)
                assert clear and ans == ("yes" if m.group(3).replace("to the ", "") == rel else "no")
            else:
                raise AssertionError(kind)
            answers[(kind, ans)] += 1
    assert answers[("exists", "yes")] == answers[("exists", "no")]
    rel_yes, rel_no = answers[("relation", "yes")], answers[("relation", "no")]
    assert 0.4 < rel_yes / (rel_yes + rel_no) < 0.6


def test_single_object_forced(world):
    for i in range(20):
        rec = world.sample(i, "train", single_object=True)
        assert len(rec["objects"]) == 1 and rec["label"]


def test_stream_order_same_with_workers(world):
    expect = [world.sample(i, "val")["caption"] for i in range(5, 17)]

    def captions(batch):
        return [r["caption"] for r in batch]

    stream = SyntheticStream(world, "val", start=5, chunk=4)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=workers,
                                             collate_fn=captions)
        got = []
        for batch in loader:
            got += batch
            if len(got) >= 12:
                break
        assert got == expect, workers


def test_write_dataset(tmp_path):
    written = write_dataset(tmp_path, num=20, seed=1, image_size=32)
    assert written == {"train": 16, "val": 2, "test": 2}
    meta = json.loads((tmp_path / "world.json").read_text())
    assert meta["seed"] == 1 and meta["image_size"] == 32
    assert [tuple(p) for p in meta["heldout"]] == list(HELDOUT_COMBINATIONS)
    for split, n in written.items():
        lines = (tmp_path / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        for line in lines:
            rec = json.loads(line)
            assert rec["image"].startswith("images/") and rec["caption"] == rec["captions"][0]
            assert {"negatives", "qa", "objects", "heldout"} <= set(rec)
            img = load_image(tmp_path / rec["image"])
            assert img.size == (32, 32)
            for cap in rec["captions"]:
                assert truth(cap, rec["objects"])
    first = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    again = SyntheticWorld(seed=1, image_size=32).sample(0, "train")
    assert first["caption"] == again["caption"]
    assert np.array_equal(np.asarray(load_image(tmp_path / first["image"])), np.asarray(again["image"]))


# ----------------------------------------------------------------------------- minimal-pair groups
def _scene(rec):
    return sorted((o["color"], o["shape"], o["size"], o["x"], o["y"]) for o in rec["objects"])


def _one_edit(a, b):
    """The kind of the single edit turning scene a into scene b (objects as dicts), or None."""
    oa, ob = a["objects"], b["objects"]
    if len(oa) != len(ob):
        return None
    pos = lambda o: (o["x"], o["y"], o["size"])  # noqa: E731
    if [pos(o) for o in oa] == [pos(o) for o in ob]:
        diff = [i for i, (p, q) in enumerate(zip(oa, ob)) if (p["color"], p["shape"]) != (q["color"], q["shape"])]
        if len(diff) == 1:
            p, q = oa[diff[0]], ob[diff[0]]
            if p["color"] == q["color"]:
                return "shape"
            return "color" if p["shape"] == q["shape"] else None
        if len(diff) == 2:
            i, j = diff
            swapped = (oa[i]["color"] == ob[j]["color"] and oa[j]["color"] == ob[i]["color"]
                       and oa[i]["shape"] == ob[i]["shape"] and oa[j]["shape"] == ob[j]["shape"])
            return "swap" if swapped else None
        return None
    for axis, other in (("x", "y"), ("y", "x")):
        if all(abs(p[axis] + q[axis] - 1) < 1e-3 and p[other] == q[other] and
               (p["color"], p["shape"], p["size"]) == (q["color"], q["shape"], q["size"])
               for p, q in zip(oa, ob)):
            return "mirror"
    return None


def test_groups_leave_val_and_test_alone(world):
    grouped = SyntheticWorld(seed=0, group_size=4)
    for split in ("val", "test"):
        for i in (0, 5, 17):
            a, b = world.sample(i, split), grouped.sample(i, split)
            assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
            assert a["captions"] == b["captions"] and a["negatives"] == b["negatives"]
    assert grouped.config()["group_size"] == 4
    with pytest.raises(ValueError, match="group_size"):
        SyntheticWorld(group_size=0)


@pytest.mark.parametrize("size", [2, 4])
def test_group_members_are_one_edit_apart_and_captions_single_them_out(size):
    w = SyntheticWorld(seed=1, group_size=size)
    held = {f"{c} {s}" for c, s in HELDOUT_COMBINATIONS}
    edits, fallbacks, groups = Counter(), 0, 60
    for g in range(groups):
        recs = [w.sample(g * size + m) for m in range(size)]
        again = w.sample(g * size + size - 1)  # deterministic, whatever was sampled before
        assert again["captions"] == recs[-1]["captions"]
        assert np.array_equal(np.asarray(again["image"]), np.asarray(recs[-1]["image"]))
        assert len({tuple(map(tuple, _scene(r))) for r in recs}) == size  # distinct scenes
        for m, rec in enumerate(recs):
            objs = rec["objects"]
            assert len({o["color"] for o in objs}) == len(objs)
            assert not {f"{o['color']} {o['shape']}" for o in objs} & held and not rec["heldout"]
            for cap in rec["captions"]:
                assert truth(cap, objs), (cap, objs)
            for neg in rec["negatives"]:
                assert not truth(neg["caption"], objs)
            others = [r["objects"] for k, r in enumerate(recs) if k != m]
            singled = [c for c in rec["captions"] if not any(truth(c, o) for o in others)]
            if singled != rec["captions"]:
                fallbacks += 1  # no caption singles this member out: it keeps them all
                assert not singled
            if m:
                kind = _one_edit(recs[0], rec)
                assert kind is not None, (recs[0]["objects"], objs)
                edits[kind] += 1
        # shared background: the corner pixels of the members are alike
        corners = np.array([np.asarray(r["image"])[:4, :4].mean((0, 1)) for r in recs])
        assert np.abs(corners - corners[0]).max() < 40
    assert fallbacks <= 0.05 * groups * size
    assert set(edits) == {"shape", "color", "swap", "mirror"}


def test_collate_pairs_a_negative_with_its_source_caption(train_recs):
    """With negatives, the caption drawn for an image is the source its first negative edits, so
    a batch holds each minimal pair; the flip augmentation keeps the pair aligned; and
    ``neg_edits_caption`` tells which negatives edit the caption drawn."""
    import random

    from vlkit.data.collate import ImageTextCollate
    from vlkit.data.transforms import ImageTransform

    class Words:  # a tokenizer stand-in that keeps the text: ids index into ``texts``
        def __init__(self):
            self.texts = []

        def __call__(self, texts, **kw):
            ids = []
            for t in texts:
                self.texts.append(t)
                ids.append([len(self.texts) - 1])
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), 1, dtype=torch.long)}

    from vlkit.data.transforms import swap_left_right

    recs = [r for r in train_recs if r["negatives"]][:40]
    by_neg = {(i, n["caption"]): r["captions"][n["source"]] for i, r in enumerate(recs) for n in r["negatives"]}
    for train in (False, True):  # train: crops and mirror flips (left/right swapped in every text)
        tok = Words()
        collate = ImageTextCollate(ImageTransform(64, train=train, hflip=train), tok, negatives=2)
        batch = collate(recs, [random.Random(i) for i in range(len(recs))])
        caps = [tok.texts[i] for i in batch["input_ids"][:, 0].tolist()]
        negs = [tok.texts[i] for i in batch["neg_input_ids"][:, 0].tolist()]
        owners = batch["neg_owner"].tolist()
        assert len(negs) == len(owners) > len(recs)
        firsts = {}
        for k, o in enumerate(owners):
            firsts.setdefault(o, k)
        assert set(firsts) == set(range(len(recs)))
        flipped = 0
        for o, k in firsts.items():
            if (o, negs[k]) in by_neg and by_neg[(o, negs[k])] == caps[o]:
                continue
            flipped += 1
            assert by_neg[(o, swap_left_right(negs[k]))] == swap_left_right(caps[o])
        assert (flipped > 0) == train
        if not train:
            paired_caps = caps
            # neg_edits_caption: the negative's source is the caption drawn for its image
            edits = batch["neg_edits_caption"].tolist()
            assert edits == [by_neg[(o, n)] == caps[o] for o, n in zip(owners, negs)]
            assert all(edits[k] for k in firsts.values()) and not all(edits)
    unpaired = ImageTextCollate(ImageTransform(64), Words(), negatives=2, paired=False)
    pos = [unpaired.tokenizer.texts[i] for i in
           unpaired(recs, [random.Random(i) for i in range(len(recs))])["input_ids"][:, 0].tolist()]
    # without pairing the caption is drawn independently of the negatives: often another one
    assert sum(a != b for a, b in zip(pos, paired_caps)) > len(recs) // 4


def test_negatives_drawn_by_kind_weight():
    """Weighted draws without replacement: a kind's share follows its weight, weight 0 never
    comes, no negative twice in one draw, and bad weights are refused by name."""
    import random
    from vlkit.data.collate import check_negative_weights, draw_negatives
    pool = [{"caption": f"{k} {i}", "kind": k} for k in ("a", "b", "c") for i in range(2)]
    weights = {"a": 4.0, "c": 0.0}  # "b" not named: weight 1
    counts = {"a": 0, "b": 0, "c": 0}
    rng = random.Random(0)
    for _ in range(2000):
        drawn = draw_negatives(pool, 1, rng, weights)
        counts[drawn[0]["kind"]] += 1
        two = draw_negatives(pool, 2, rng, weights)
        assert len({n["caption"] for n in two}) == 2 and all(n["kind"] != "c" for n in two)
    assert counts["c"] == 0
    assert 3.4 < counts["a"] / counts["b"] < 4.7  # 4 expected: 8 vs 2 of total weight 10
    assert len(draw_negatives(pool, 10, rng, weights)) == 4  # only the non-zero ones exist
    uniform = draw_negatives(pool, 3, random.Random(1))
    assert len(uniform) == 3 and len({n["caption"] for n in uniform}) == 3
    for bad in ({"a": -1.0}, {"a": float("nan")}, {"a": "x"}):
        with pytest.raises(ValueError, match="negative_weights"):
            check_negative_weights(bad)


def test_train_records_negative_weights(tmp_path):
    """--negatives and --negative-weights reach the run's config, so a resumed run draws alike."""
    from vlkit.train.run import RunArgs, train
    from vlkit.checkpoint import read_run_config
    out = tmp_path / "run"
    small = {"vision.image_size": 32, "vision.dim": 32, "vision.depth": 1, "vision.heads": 2,
             "vision.mlp_dim": 64, "dim": 32, "text_layers": 1, "fusion_layers": 1, "heads": 2,
             "mlp_dim": 64, "embed_dim": 16, "queue_size": 64}
    train(RunArgs(model="albef", out=str(out), steps=1, batch_size=8, hard_negatives=True,
                  negatives=3, negative_weights={"attribute_swap": 2.0}, overrides=small, progress=False))
    saved = read_run_config(out)
    assert saved["negatives"] == 3 and saved["negative_weights"] == {"attribute_swap": 2.0}


def test_image_only_records_are_the_full_records_image_part():
    """image_only (a classifier's stream) skips the text but keeps the image, objects, label and
    held-out flag exactly as the full record has them, grouped worlds included; the training
    source of a classifier reads it, the others read full records."""
    import numpy as np
    from vlkit.data.synthetic import SyntheticWorld
    from vlkit.train.run import training_source
    for world in (SyntheticWorld(image_size=64), SyntheticWorld(image_size=64, group_size=2)):
        for single in (True, False):
            for i in range(12):
                full = world.sample(i, "train", single)
                part = world.sample(i, "train", single, image_only=True)
                assert set(part) == {k for k in ("image", "heldout", "objects", "label") if k in full}
                assert np.array_equal(np.asarray(part["image"]), np.asarray(full["image"]))
                assert part["objects"] == full["objects"] and part.get("label") == full.get("label")
                assert part["heldout"] == full["heldout"]
    vit = training_source("classification", "synthetic", 64, 0, "error")
    clip = training_source("contrastive", "synthetic", 64, 0, "error")
    assert "captions" not in vit(3) and "label" in vit(3) and "captions" in clip(3)
    full = SyntheticWorld(image_size=64).sample(3, "train", True)
    assert np.array_equal(np.asarray(vit(3)["image"]), np.asarray(full["image"]))


def test_records_without_questions_keep_every_other_field():
    """questions=False leaves out ``qa`` (drawn last) and nothing else changes, grouped worlds
    included; a model that trains no VQA reads such records, one that does reads the questions."""
    import numpy as np
    from vlkit.data.synthetic import SyntheticWorld
    for world in (SyntheticWorld(image_size=64), SyntheticWorld(image_size=64, group_size=2)):
        for i in range(12):
            full, lean = world.sample(i, "train"), world.sample(i, "train", questions=False)
            assert "qa" in full and set(lean) == set(full) - {"qa"}
            assert np.array_equal(np.asarray(lean.pop("image")), np.asarray(full.pop("image")))
            full.pop("qa")
            assert lean == full
    from vlkit.train.run import training_source
    assert "qa" not in training_source("fusion", "synthetic", 64, 0, "error", questions=False)(3)
    assert "qa" in training_source("fusion", "synthetic", 64, 0, "error")(3)


def test_false_captions_repeat_a_shape_or_an_object_and_the_collate_marks_the_word(train_recs):
    """The world's ``false_captions`` (a "shapes" caption with a shape named once per object; a
    list or count caption with its first object named again; one phrase with the other size; one
    phrase with a shape the image lacks) are false from ``false_from`` on, cost no random draw, and
    the collate's ``false_words`` gives the token where each turns false."""
    import random

    from vlkit.data.collate import ImageTextCollate
    from vlkit.data.synthetic import COLORS, SHAPES, caption_is_true, parse_caption
    from vlkit.data.transforms import ImageTransform
    from vlkit.train.run import build_tokenizer

    kinds = Counter()
    for r in train_recs:
        shapes = [o["shape"] for o in r["objects"]]
        for f in r.get("false_captions") or []:
            text, at = f["caption"], f["false_from"]
            assert not caption_is_true(text, r["objects"]) and parse_caption(text) is not None
            word = text[at:].split(" ")[0].rstrip(",;")
            # one word of one of the record's captions changed
            changed = [[b for a, b in zip(c.split(), text.split()) if a != b] for c in r["captions"]
                       if len(c.split()) == len(text.split())]
            changed = [c[0].rstrip(",;") for c in changed if len(c) == 1]
            if changed and changed[0] in SIZES:  # a phrase with the other size
                kinds["size"] += 1
                if changed[0] in {o["size"] for o in r["objects"]}:  # false at the colour after it
                    assert word in COLORS and text[:at].split()[-1] == changed[0]
                else:
                    assert word == changed[0]
            elif changed and changed[0] in SHAPES and changed[0] not in shapes:  # a shape the image lacks
                kinds["shape"] += 1
                assert word == changed[0] and text[:at].split()[-1] in COLORS
            elif word in SHAPES:  # the second naming of a shape in a count of shapes
                kinds["shapes"] += 1
                assert len(set(shapes)) < len(shapes) and text[:at].count(" " + word) + text.startswith(word) == 1
            else:  # the first object's colour again (or "an" before it), where the list names another
                kinds["list"] += 1
                assert word in COLORS or word == "an"
                first = parse_caption(text)[0][-1][0]
                assert first[3] == parse_caption(text)[0][-1][-1][3] and len(r["objects"]) > 1
                assert word == "an" or text[:at].count(word) == 1
        if len(r["objects"]) == 1:  # the size and shape kinds alone
            assert 1 <= len(r.get("false_captions") or ()) <= 2
    assert kinds["shapes"] > 20 and kinds["list"] > 200 and kinds["size"] > 200 and kinds["shape"] > 400
    tok = build_tokenizer("synthetic", 64, records=train_recs)
    for false_words in (False, True):
        collate = ImageTextCollate(ImageTransform(64, train=True, hflip=True), tok, negatives=1,
                                   false_words=false_words)
        batch = collate(train_recs[:32], [random.Random(i) for i in range(32)])
        if not false_words:
            assert "false_input_ids" not in batch
            plain = batch
            continue
        assert torch.equal(batch["input_ids"], plain["input_ids"])  # the same draws as without
        owners = batch["false_owner"].tolist()
        entries = [f for r in train_recs[:32] for f in r.get("false_captions") or []]
        assert owners == [j for j, r in enumerate(train_recs[:32]) for _ in r.get("false_captions") or []]
        for k, f in enumerate(entries):
            p = int(batch["false_position"][k])
            word = f["caption"][f["false_from"]:].split(" ")[0].rstrip(",;")
            assert tok.decode([int(batch["false_input_ids"][k, p])]).strip() == word
    bad = dict(train_recs[0], false_captions=[{"caption": "one circle and one circle", "false_from": 3}],
               image_path="x.png")
    with pytest.raises(ValueError, match="x.png.*false_from"):
        ImageTextCollate(ImageTransform(64), tok, false_words=True)([bad])
