"""Phrase grounding: the synthetic world's spans, the token x patch targets (flips, truncation,
bad input), the loss against a direct computation, and ViLT learning to look where a word points."""
import random

import pytest
import torch
from PIL import Image

from vlkit.data import synthetic
from vlkit.data.collate import ImageTextCollate
from vlkit.data.grounding import check_grounding, grounding_targets, object_cells
from vlkit.data.transforms import ImageTransform
from vlkit.losses.grounding import grounding_loss
from vlkit.models.vilt import ViLT, ViLTConfig
from vlkit.tokenizers import build_wordpiece_vocab


def test_world_spans_name_their_objects():
    """Every span of every true caption and question ends in its object's shape (or "it", or the
    plural) and, when it has more words, holds the object's colour; "it" is the object of the
    phrase before it. Relation words come with a subject and an object entry over the same span,
    and in a true caption the words are the relation of the subject to the object."""
    world = synthetic.SyntheticWorld(seed=3, image_size=64, group_size=4)
    seen = {"it": 0, "plural": 0, "question": 0, "relation": 0, "asked": 0}
    for split in ("train", "test"):
        for i in range(60):
            rec = world.sample(i, split, single_object=i % 4 == 0)
            objs = rec["objects"]
            assert len(rec["captions_grounding"]) == len(rec["captions"])
            texts = list(zip(rec["captions"], rec["captions_grounding"]))
            texts += [(q["question"], q["grounding"]) for q in rec["qa"]]
            for text, spans in texts:
                check_grounding(spans, text, len(objs), "test")
                subjects = [e for e in spans if e[3:] == ["subject"]]
                objects = [e for e in spans if e[3:] == ["object"]]
                assert [e[:2] for e in subjects] == [e[:2] for e in objects], text
                for (start, end, (a,), _), (_, _, (b,), _) in zip(subjects, objects):
                    words = text[start:end]
                    if text.endswith("?"):  # a question may ask about the false relation
                        assert words in [synthetic._rel_text(r, f) for r in synthetic.RELATIONS
                                         for f in (False, True)], (text, words)
                        seen["asked"] += 1
                        continue
                    found = synthetic.relation_of(*(synthetic._Obj(**objs[k]) for k in (a, b)))
                    assert words in (found, "to the " + found), (text, words, found)
                    seen["relation"] += 1
                for start, end, which in (e[:3] for e in spans if len(e) == 3):
                    words = text[start:end].split()
                    assert which, text
                    for o in which:
                        last = words[-1]
                        if last == "it":
                            seen["it"] += 1
                        elif last == synthetic._plural(objs[o]["shape"]):
                            seen["plural"] += 1
                        elif last == "object":  # "what shape is the red object?"
                            assert words == [objs[o]["color"], "object"]
                            seen["question"] += 1
                            continue
                        else:
                            assert last == objs[o]["shape"], (text, words, objs[o])
                        if len(words) > 1:
                            assert objs[o]["color"] in words, (text, words, objs[o])
    assert min(seen.values()) > 0, seen


def test_plural_span_covers_every_object_of_the_shape():
    objs = [synthetic._Obj("circle", "red", "small", 0.2, 0.2, 0.25),
            synthetic._Obj("circle", "blue", "small", 0.8, 0.8, 0.25),
            synthetic._Obj("star", "green", "small", 0.2, 0.8, 0.25)]
    caption = [("shapes", [(2, "circle"), (1, "star")])]
    text = synthetic._render(caption)
    assert text == "two circles and one star"
    assert [(text[a:b], o) for a, b, o in synthetic._grounding(caption, objs)] == \
        [("circles", [0, 1]), ("star", [2])]


def test_object_cells_follow_the_box_and_the_flip():
    box = (0.0, 0.0, 0.5, 0.25)  # top-left: two columns of the first row of a 4 x 4 grid
    assert object_cells(box, (4, 4)) == [0, 1]
    assert object_cells(box, (4, 4), flipped=True) == [2, 3]
    # a small box owns the patch it mostly sits in, even though it covers little of it
    assert object_cells((0.30, 0.30, 0.40, 0.40), (4, 4)) == [5]


@pytest.fixture(scope="module")
def tok():
    return build_wordpiece_vocab(["the red circle is left of the blue square",
                                  "the blue square is right of the red circle",
                                  "what color is the circle ?"] * 4, vocab_size=60)


OBJECTS = [{"x": 0.125, "y": 0.125, "extent": 0.25},   # cell 0 of a 4 x 4 grid
           {"x": 0.875, "y": 0.875, "extent": 0.25}]   # cell 15


def test_targets_map_spans_to_tokens_through_a_flip(tok):
    written = "the red circle is left of the blue square"
    spans = [[4, 14, [0]], [30, 41, [1]]]  # "red circle", "blue square"
    plain = grounding_targets(tok, written, written, spans, OBJECTS, (4, 4), length=12)
    ids = tok.encode(written)
    marked = {tok.id_to_token(ids[k]): plain[k].nonzero().flatten().tolist()
              for k in range(len(ids)) if plain[k].any()}
    assert marked == {"red": [0], "circle": [0], "blue": [15], "square": [15]}
    # mirrored: the text says "right" (one letter longer) and the boxes move to the other side
    read = "the red circle is right of the blue square"
    flipped = grounding_targets(tok, written, read, spans, OBJECTS, (4, 4), length=12, flipped=True)
    ids = tok.encode(read)
    marked = {tok.id_to_token(ids[k]): flipped[k].nonzero().flatten().tolist()
              for k in range(len(ids)) if flipped[k].any()}
    assert marked == {"red": [3], "circle": [3], "blue": [12], "square": [12]}
    # truncated to 6 tokens (begin, 4 words, end): "blue square" is cut off
    short = grounding_targets(tok, written, written, spans, OBJECTS, (4, 4), length=6, max_length=6)
    assert short[2].any() and short[3].any() and not short[4:].any()


def test_bad_grounding_is_named(tok):
    text = "the red circle"
    with pytest.raises(ValueError, match="outside the text"):
        grounding_targets(tok, text, text, [[4, 40, [0]]], OBJECTS, (4, 4), length=8, where="rec 7")
    with pytest.raises(ValueError, match="names objects \\[5\\]"):
        grounding_targets(tok, text, text, [[4, 14, [5]]], OBJECTS, (4, 4), length=8)
    with pytest.raises(ValueError, match="not \\[start, end, \\[objects\\]\\]"):
        grounding_targets(tok, text, text, [[4, 14]], OBJECTS, (4, 4), length=8)
    with pytest.raises(ValueError, match="'box'"):
        grounding_targets(tok, text, text, [[4, 14, [0]]], [{"x": 0.5}], (4, 4), length=8)


def _record(size=(32, 32)):
    return {"image": Image.new("RGB", size, (90, 90, 90)),
            "captions": ["the red circle is left of the blue square", "the blue square"],
            "captions_grounding": [[[4, 14, [0]], [30, 41, [1]]], [[4, 15, [1]]]],
            "objects": [dict(o) for o in OBJECTS]}


def test_collate_targets_and_errors(tok):
    train = ImageTransform(32, train=True, scale=(1.0, 1.0), hflip=True)
    collate = ImageTextCollate(train, tok, max_length=16, grounding_grid=(4, 4))
    batch = collate([_record(), _record()], [random.Random(1), random.Random(2)])
    g = batch["grounding"]
    assert g.shape == (2, batch["input_ids"].shape[1], 16)
    assert all(g[j].sum() > 0 for j in range(2))
    with pytest.raises(ValueError, match="must not be cropped"):
        ImageTextCollate(ImageTransform(32, train=True, scale=(0.5, 1.0)), tok, grounding_grid=(4, 4))
    with pytest.raises(ValueError, match="square"):
        collate([_record(size=(40, 32))])
    bad = _record()
    bad["captions_grounding"] = bad["captions_grounding"][:1]
    with pytest.raises(ValueError, match="parallel to 'captions'"):
        collate([bad], [random.Random(0)])


def test_loss_against_a_direct_computation():
    torch.manual_seed(0)
    attention = torch.rand(2, 3, 4, 5)  # (B, heads, L, P): only a slice of the rows
    targets = torch.zeros(2, 4, 5)
    targets[0, 1, [0, 2]] = 1
    targets[1, 3, 4] = 1
    loss, mass = grounding_loss(attention, targets)
    masses = torch.cat([attention[0, :, 1, [0, 2]].sum(-1), attention[1, :, 3, 4]])
    assert torch.allclose(loss, -masses.log().mean())
    assert torch.allclose(mass, masses.mean())
    loss, mass = grounding_loss(attention, torch.zeros(2, 4, 5))
    assert loss.item() == 0.0 and torch.isnan(mass)
    with pytest.raises(ValueError, match="does not fit"):
        grounding_loss(attention, torch.zeros(2, 3, 5))


def _vilt(**kw):
    cfg = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, vocab_size=60,
               max_text_len=16, dropout=0.0, eps=1e-6, objectives=("mlm",), itm_head=False,
               grounding_weight=1.0)
    cfg.update(kw)
    return ViLT(ViLTConfig(**cfg))


def test_vilt_checks_its_grounding_settings():
    with pytest.raises(ValueError, match="max_image_tokens"):
        _vilt(max_image_tokens=8)
    with pytest.raises(ValueError, match="grounding_layer"):
        _vilt(grounding_layer=2)
    with pytest.raises(ValueError, match="grounding_heads"):
        _vilt(grounding_heads=3)
    with pytest.raises(ValueError, match="'grounding' targets"):
        _vilt().training_losses({"pixel_values": torch.zeros(1, 3, 32, 32),
                                 "input_ids": torch.tensor([[2, 7, 3]]),
                                 "attention_mask": torch.ones(1, 3, dtype=torch.long)})


def test_vilt_learns_to_look_where_the_word_points(word_squares):
    """Two words, each naming the patch of a bright square somewhere in a dark image: trained on
    the grounding loss (with MLM beside it), the supervised head's attention mass on the right
    patch rises from chance (1/16) to most of it, and an unsupervised image shows it."""
    torch.manual_seed(0)
    model = _vilt(mlm_prob=0.15)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(n, gen):
        return word_squares(n, gen, 32)

    gen = torch.Generator().manual_seed(1)
    test = batch(32, torch.Generator().manual_seed(99))
    model.eval()
    with torch.no_grad():
        before = model.training_losses(test)["grounding_mass"].item()
    model.train()
    for _ in range(60):
        out = model.training_losses(batch(16, gen))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model.training_losses(test)["grounding_mass"].item()
    assert before < 0.15 and after > 0.6, (before, after)


def test_transformer_maps_of_one_block_match_the_full_pass():
    from vlkit.layers import PreNormBlock, Transformer
    torch.manual_seed(0)
    stack = Transformer([PreNormBlock(16, 2, 32) for _ in range(3)]).eval()
    x = torch.randn(2, 5, 16)
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    keep[1, ..., 3:] = False
    full, maps = stack(x, return_attention=True, mask=keep)
    out, one = stack.forward_with_maps_of(x, 1, mask=keep)
    assert torch.allclose(out, full, atol=1e-6)
    assert torch.allclose(one["self"], maps[1]["self"])
    with pytest.raises(ValueError, match="3 blocks"):
        stack.forward_with_maps_of(x, 3)


def _tapped(model, *args, targets, roles=None):
    """One tapped pass (``fuse_tapped`` / ``forward_tapped``) with the model's objectives:
    (output, grounding (loss, mass), relation (loss, mass) or None)."""
    from vlkit.objectives import Step
    step = Step(model.objectives, {"grounding": targets, "grounding_roles": roles}, model.training)
    run = model.fuse_tapped if hasattr(model, "fuse_tapped") else model.forward_tapped
    out = run(*args, step, {"names": targets, "roles": roles})
    related = step.state.get("related") or [None]
    return out, step.state["grounded"][0], related[0]


def _guides(model, targets, roles):
    """Attention forcing's guides now: ({layer: (first head, target (B, h, L, P))}, weight) or None."""
    from vlkit.objectives import Step
    step = Step(model.objectives, {"grounding": targets, "grounding_roles": roles}, model.training)
    return step.guides({"names": targets, "roles": roles})


def _albef(**kw):
    from vlkit.models.albef import ALBEF
    args = dict(dim=32, heads=2, mlp_dim=64, text_layers=1, fusion_layers=2, vocab_size=60,
                embed_dim=16, queue_size=32, grounding_weight=1.0, fusion_pos="sincos",
                **{"vision.dim": 32, "vision.depth": 1, "vision.heads": 2, "vision.mlp_dim": 64})
    cfg = ALBEF.make_config("tiny", **{**args, **kw})
    return ALBEF(cfg)


def test_albef_grounding_reads_the_chosen_cross_attention():
    """The grounded fusion pass gives the plain pass's output, and its loss is the loss of that
    layer's cross-attention (first heads, patches after the image [CLS]) against the targets."""
    torch.manual_seed(0)
    model = _albef(grounding_layer=1, grounding_heads=1).eval()
    assert model.grounding_grid == (4, 4)
    pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(5, 60, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    targets = torch.zeros(2, 6, 16)
    targets[0, 2, [1, 5]] = 1
    targets[1, 1, 15] = 1
    tokens = model.forward_features(pixels)
    hidden = model.text_features(ids, mask)
    fused, (loss, mass), related = _tapped(model, hidden, mask, tokens, targets=targets)
    assert related is None
    plain, maps = model.fuse(hidden, mask, tokens, return_attention=True)
    assert torch.allclose(fused, plain, atol=1e-6)
    want, want_mass = grounding_loss(maps[1]["cross"][:, :1, :, 1:], targets)
    assert torch.allclose(loss, want) and torch.allclose(mass, want_mass)
    with pytest.raises(ValueError, match="covers? 9 patches|cover 9 patches"):
        _tapped(model, hidden, mask, tokens, targets=torch.zeros(2, 6, 9))


def test_albef_trains_with_grounding_and_checks_its_settings():
    torch.manual_seed(0)
    model = _albef()
    ids = torch.randint(5, 60, (3, 6))
    ids[:, 0], ids[:, -1] = 2, 3
    batch = {"pixel_values": torch.randn(3, 3, 64, 64), "input_ids": ids,
             "attention_mask": torch.ones_like(ids)}
    with pytest.raises(ValueError, match="'grounding' targets"):
        model.training_losses(batch)
    batch["grounding"] = torch.zeros(3, 6, 16)
    batch["grounding"][:, 1, 0] = 1
    out = model.training_losses(batch)
    assert out["grounding_loss"] > 0 and 0 < out["grounding_mass"] < 1
    out["loss"].backward()
    assert model.fusion_layers.blocks[0].cross_attn.q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="grounding_layer"):
        _albef(grounding_layer=2)
    with pytest.raises(ValueError, match="patch_dropout"):
        _albef(**{"vision.patch_dropout": 0.5})


@pytest.mark.parametrize("model_name", ["vilt", "albef"])
def test_cli_trains_grounding_on_the_synthetic_world(tmp_path, model_name):
    """`vlkit train MODEL --set grounding_weight=1 --set relation_weight=1`: the collate brings
    the world's grounding for the model's patch grid (relation phrases included), in the VQA
    questions and in the captions, and the logged metrics carry both losses."""
    import json

    from vlkit.cli import main
    tiny = {"vilt": ["--set", "dim=32", "--set", "depth=2", "--set", "heads=4", "--set", "mlp_dim=64"],
            "albef": ["--set", "dim=32", "--set", "heads=4", "--set", "mlp_dim=64",
                      "--set", "text_layers=1", "--set", "fusion_layers=1", "--set", "queue_size=64",
                      "--set", "relation_layer=0",
                      "--set", "vision.dim=32", "--set", "vision.depth=1", "--set", "vision.heads=2",
                      "--set", "vision.mlp_dim=64"]}[model_name]
    out = tmp_path / "run"
    assert main(["train", model_name, "--vqa", "--steps", "2", "--batch-size", "8", "--no-eval",
                 "--no-progress", "--out", str(out), "--set", "grounding_weight=1",
                 "--set", "relation_weight=1", *tiny]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["grounding_loss"] > 0 and 0 < r["grounding_mass"] < 1 for r in rows)
    assert all("relation_loss" in r for r in rows)  # a batch may hold no relation question
    # the captions: about half of them state a relation
    out = tmp_path / "captions"
    assert main(["train", model_name, "--steps", "2", "--batch-size", "8", "--no-eval",
                 "--no-progress", "--out", str(out), "--set", "grounding_weight=1",
                 "--set", "relation_weight=1", *tiny]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["relation_loss"] > 0 and 0 < r["relation_mass"] < 1 for r in rows)


def test_vilt_grounds_the_true_pairs_of_itm_when_it_trains_no_mlm():
    """With ITM alone the grounded pass is the ITM one: only the rows that keep their own image
    carry targets, so the loss equals the loss over those rows alone."""
    torch.manual_seed(0)
    model = _vilt(objectives=("itm",), itm_head=True, mlm_head=False).eval()
    ids = torch.tensor([[2, 10, 11, 3]] * 4)
    targets = torch.zeros(4, 4, 16)
    targets[:, 1, 5] = 1
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "input_ids": ids,
             "attention_mask": torch.ones_like(ids), "grounding": targets}
    torch.manual_seed(1)
    out = model.training_losses(batch)
    torch.manual_seed(1)  # the same image swaps: which rows keep their own image
    from vlkit.losses.matching import itm_batch_from_swaps
    index, _ = itm_batch_from_swaps(4, model.cfg.itm_swap_prob, device=ids.device)
    own = index == torch.arange(4)
    assert 0 < int(own.sum()) < 4  # this seed swaps some images, not all
    _, (loss, _), _ = _tapped(model, batch["pixel_values"][index], ids, batch["attention_mask"],
                              targets=targets * own[:, None, None])
    assert torch.allclose(out["grounding_loss"], loss)
    out["loss"].backward()


# ----------------------------------------------------------------------------- relation phrases
REL_TEXT = "the red circle is left of the blue square"
REL_SPANS = [[4, 14, [0]], [30, 41, [1]], [18, 25, [0], "subject"], [18, 25, [1], "object"]]


def test_relation_roles_become_their_own_targets(tok):
    """Entries with a role mark the relation words: the subject's patches in the second
    channel, the object's in the third; without ``roles`` they are left out and the names are
    what they were."""
    t = grounding_targets(tok, REL_TEXT, REL_TEXT, REL_SPANS, OBJECTS, (4, 4), length=12, roles=True)
    assert t.shape == (3, 12, 16)
    ids = tok.encode(REL_TEXT)

    def marked(channel):
        return {tok.id_to_token(ids[k]): channel[k].nonzero().flatten().tolist()
                for k in range(len(ids)) if channel[k].any()}

    assert marked(t[0]) == {"red": [0], "circle": [0], "blue": [15], "square": [15]}
    words = {tok.id_to_token(i) for i in tok.encode("left of")[1:-1]}
    assert marked(t[1]) == {w: [0] for w in words}
    assert marked(t[2]) == {w: [15] for w in words}
    names = grounding_targets(tok, REL_TEXT, REL_TEXT, REL_SPANS, OBJECTS, (4, 4), length=12)
    assert torch.equal(names, t[0])
    with pytest.raises(ValueError, match="role must be one of"):
        grounding_targets(tok, REL_TEXT, REL_TEXT, [[18, 25, [0], "verb"]], OBJECTS, (4, 4), length=12)
    # the collate hands them over as (B, 2, L, P), mirrored with the image
    rec = {"image": Image.new("RGB", (32, 32)), "captions": [REL_TEXT], "captions_grounding": [REL_SPANS],
           "objects": [dict(o) for o in OBJECTS]}
    collate = ImageTextCollate(ImageTransform(32, train=True, scale=(1.0, 1.0), hflip=True), tok,
                               max_length=16, grounding_grid=(4, 4))
    for seed in range(4):
        batch = collate([rec], [random.Random(seed)])
        roles = batch["grounding_roles"]
        assert roles.shape == (1, 2, batch["input_ids"].shape[1], 16)
        read = tok.decode(batch["input_ids"][0].tolist())
        flipped = "right" in read
        subject_cell, object_cell = (3, 12) if flipped else (0, 15)
        rows = roles[0, 0].any(-1).nonzero().flatten().tolist()
        assert len(rows) >= 2  # "left|right" (maybe in pieces), "of"
        assert roles[0, 0, rows].nonzero()[:, 1].unique().tolist() == [subject_cell]
        assert roles[0, 1, rows].nonzero()[:, 1].unique().tolist() == [object_cell]


def test_per_head_targets_in_the_loss():
    torch.manual_seed(0)
    attention = torch.rand(2, 2, 4, 5)
    targets = torch.zeros(2, 2, 4, 5)
    targets[0, 0, 1, 0] = 1  # head 0 looks at patch 0, head 1 at patch 3, from token 1
    targets[0, 1, 1, 3] = 1
    loss, mass = grounding_loss(attention, targets)
    masses = torch.stack([attention[0, 0, 1, 0], attention[0, 1, 1, 3]])
    assert torch.allclose(loss, -masses.log().mean()) and torch.allclose(mass, masses.mean())
    with pytest.raises(ValueError, match="does not fit"):
        grounding_loss(attention, torch.zeros(2, 3, 4, 5))


def _roles_batch(n=2, length=6):
    roles = torch.zeros(n, 2, length, 16)
    roles[:, 0, 2, 1] = 1
    roles[:, 1, 2, 14] = 1
    targets = torch.zeros(n, length, 16)
    targets[:, 1, 5] = 1
    return targets, roles


def test_vilt_relation_heads_and_settings():
    from vlkit.layers.attention import padding_mask
    """The relation loss is that of two heads of relation_layer (0 and 1, or the two after the
    grounding heads in grounding_layer) against the subject and object targets; the settings
    are checked."""
    torch.manual_seed(0)
    model = _vilt(heads=4, relation_weight=1.0, relation_layer=1).eval()
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(5, 60, (2, 6))
    mask = torch.ones_like(ids)
    targets, roles = _roles_batch()
    features, named, related = _tapped(model, pixels, ids, mask, targets=targets, roles=roles)
    x, joint = model.embed(pixels, ids, mask)
    plain, maps = model.encoder(x, return_attention=True, mask=padding_mask(joint))
    assert torch.allclose(features, model.norm(plain), atol=1e-5)
    want = grounding_loss(maps[1]["self"][:, 0:2, :6, 7:], roles)  # another layer: heads 0 and 1
    assert torch.allclose(related[0], want[0]) and torch.allclose(related[1], want[1])
    want = grounding_loss(maps[0]["self"][:, :1, :6, 7:], targets)
    assert torch.allclose(named[0], want[0])
    with pytest.raises(ValueError, match="needs grounding_weight"):
        _vilt(grounding_weight=0.0, relation_weight=1.0)
    with pytest.raises(ValueError, match="heads 1 and 2"):  # after the grounding head
        _vilt(heads=2, relation_weight=1.0, relation_layer=0)
    _vilt(heads=2, relation_weight=1.0, relation_layer=1)  # another layer: heads 0 and 1
    same = _vilt(heads=4, relation_weight=1.0, relation_layer=0).eval()
    _, _, related = _tapped(same, pixels, ids, mask, targets=targets, roles=roles)
    x, joint = same.embed(pixels, ids, mask)
    _, maps = same.encoder(x, return_attention=True, mask=padding_mask(joint))
    assert torch.allclose(related[0], grounding_loss(maps[0]["self"][:, 1:3, :6, 7:], roles)[0])
    with pytest.raises(ValueError, match="relation_layer 2"):
        _vilt(heads=4, relation_weight=1.0, relation_layer=2)
    batch = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "grounding": targets}
    with pytest.raises(ValueError, match="grounding_roles"):
        model.training_losses(batch)
    batch["grounding_roles"] = roles
    out = _vilt(heads=4, relation_weight=1.0).training_losses(batch)
    assert out["relation_loss"] > 0 and 0 < out["relation_mass"] < 1


def test_albef_relation_heads():
    torch.manual_seed(0)
    model = _albef(heads=4, relation_weight=1.0, relation_layer=1).eval()
    pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(5, 60, (2, 6))
    mask = torch.ones_like(ids)
    targets, roles = _roles_batch()
    tokens = model.forward_features(pixels)
    hidden = model.text_features(ids, mask)
    fused, named, related = _tapped(model, hidden, mask, tokens, targets=targets, roles=roles)
    plain, maps = model.fuse(hidden, mask, tokens, return_attention=True)
    assert torch.allclose(fused, plain, atol=1e-6)
    want = grounding_loss(maps[1]["cross"][:, 0:2, :, 1:], roles)
    assert torch.allclose(related[0], want[0]) and torch.allclose(related[1], want[1])
    with pytest.raises(ValueError, match="needs grounding_weight"):
        _albef(grounding_weight=0.0, relation_weight=1.0)
    ids[:, 0], ids[:, -1] = 2, 3
    out = _albef(heads=4, relation_weight=1.0).training_losses(
        {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "grounding": targets,
         "grounding_roles": roles})
    assert out["relation_loss"] > 0 and 0 < out["relation_mass"] < 1
    out["loss"].backward()


def test_albef_masks_whole_relation_phrases():
    """relation_mask_prob=1 masks every relation word (and makes it a target); 0.5 masks the
    phrase of about half the captions, each phrase whole."""
    torch.manual_seed(0)
    model = _albef(heads=4, relation_weight=1.0, relation_mask_prob=1.0)
    ids = torch.randint(5, 60, (64, 6))
    mask = torch.ones_like(ids)
    _, roles = _roles_batch(64)
    roles[:, :, 3] = roles[:, :, 2]  # a two-token phrase: tokens 2 and 3
    batch = {"grounding": roles[:, 0], "grounding_roles": roles, "attention_mask": mask}
    labels = torch.full_like(ids, -100)

    def mask_relations():
        from vlkit.objectives import Step
        g = torch.Generator().manual_seed(0)
        step = Step(model.objectives, batch, True, draw=lambda rows: torch.rand(64, generator=g)[rows])
        return step.mask_words(ids, mask, ids.clone(), labels)
    masked, out = mask_relations()
    assert (masked[:, 2:4] == model.cfg.mask_token_id).all() and torch.equal(out[:, 2:4], ids[:, 2:4])
    assert torch.equal(masked[:, [0, 1, 4, 5]], ids[:, [0, 1, 4, 5]]) and (out[:, [0, 1, 4, 5]] == -100).all()
    model.cfg.relation_mask_prob = 0.5
    masked, _ = mask_relations()
    hit = masked[:, 2:4] == model.cfg.mask_token_id
    assert torch.equal(hit[:, 0], hit[:, 1]) and 16 < int(hit[:, 0].sum()) < 48
    with pytest.raises(ValueError, match="relation_mask_prob"):
        _albef(grounding_weight=0.0, relation_mask_prob=0.5)


def test_relation_offsets_and_geometry_loss():
    """The offset at a relation word is the subject's patch centre minus the object's, in
    fractions of the side; the loss is the MSE of a prediction against twice that."""
    from vlkit.losses.grounding import relation_geometry_loss, relation_offsets
    roles = torch.zeros(1, 2, 3, 16)
    roles[0, 0, 1, [0, 1]] = 1   # subject: cells 0 and 1 -> centre (0.25, 0.125)
    roles[0, 1, 1, 15] = 1       # object: cell 15 -> centre (0.875, 0.875)
    offset, rows = relation_offsets(roles, (4, 4))
    assert rows.tolist() == [[False, True, False]]
    assert torch.allclose(offset[0, 1], torch.tensor([0.25 - 0.875, 0.125 - 0.875]))
    pred = torch.randn(1, 3, 2)
    assert torch.allclose(relation_geometry_loss(pred, roles, (4, 4)),
                          ((pred[0, 1] - 2 * offset[0, 1]) ** 2).mean())
    assert relation_geometry_loss(pred, torch.zeros_like(roles), (4, 4)).item() == 0.0
    with pytest.raises(ValueError, match="16 patches"):
        relation_offsets(roles, (3, 3))


@pytest.mark.parametrize("name", ["vilt", "albef"])
def test_geometry_head_trains_in_the_grounded_passes(name):
    torch.manual_seed(0)
    if name == "vilt":
        model, size = _vilt(heads=4, relation_weight=1.0, geometry_weight=1.0), 32
    else:
        model, size = _albef(heads=4, relation_weight=1.0, geometry_weight=1.0), 64
    ids = torch.randint(5, 60, (2, 6))
    ids[:, 0], ids[:, -1] = 2, 3
    targets, roles = _roles_batch()
    cells = 16 if name == "albef" else 16
    batch = {"pixel_values": torch.randn(2, 3, size, size), "input_ids": ids,
             "attention_mask": torch.ones_like(ids), "grounding": targets[..., :cells],
             "grounding_roles": roles[..., :cells]}
    out = model.training_losses(batch)
    assert out["geometry_loss"] > 0
    out["loss"].backward()
    assert model.relation_grounding.geometry_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="geometry_weight"):
        (_vilt if name == "vilt" else _albef)(geometry_weight=1.0)


def _forcing_changes_the_pass_only(model, grounded_pass):
    """``grounded_pass()`` -> (output, grounding (loss, mass), relation (loss, mass)) with the
    grounding and relation heads in one layer: forced in training, plain in evaluation. The
    output changes; the losses, read from the heads' own maps of that layer, do not. Returns
    the plain output (the model is left in training mode)."""
    forced, named, related = grounded_pass()
    model.eval()
    plain, named_e, related_e = grounded_pass()
    model.train()
    assert (forced - plain).abs().max() > 1e-3
    torch.testing.assert_close(named[0], named_e[0])
    torch.testing.assert_close(related[0], related_e[0])
    return plain


def test_albef_attention_forcing():
    """attention_forcing_steps: in training, while steps_done < that, the grounded pass reads the
    image through the grounding and relation targets (a different output; the weight falls
    linearly); the losses stay on the heads' own maps; in evaluation and afterwards nothing changes."""
    torch.manual_seed(0)
    model = _albef(heads=4, relation_weight=1.0, relation_layer=0, attention_forcing_steps=4)
    pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(5, 60, (2, 6))
    mask = torch.ones_like(ids)
    targets, roles = _roles_batch()
    tokens = model.forward_features(pixels).detach()
    hidden = model.text_features(ids, mask).detach()
    guides, weight = _guides(model, targets, roles)
    first, target = guides[0]
    assert first == 0 and weight == 1.0 and target.shape == (2, 3, 6, 16)
    assert torch.equal(target[:, 1:], roles) and torch.equal(target[:, 0], targets)
    plain = _forcing_changes_the_pass_only(model, lambda: _tapped(model, hidden, mask, tokens, targets=targets, roles=roles))
    model.attention_forcing.steps_done.fill_(3)
    assert _guides(model, targets, roles)[1] == pytest.approx(0.25)
    model.attention_forcing.steps_done.fill_(4)
    assert _guides(model, targets, roles) is None
    torch.testing.assert_close(_tapped(model, hidden, mask, tokens, targets=targets, roles=roles)[0], plain)
    other = _albef(heads=4, relation_weight=1.0, relation_layer=1, attention_forcing_steps=4)
    assert sorted(_guides(other, targets, roles)[0]) == [0, 1]
    with pytest.raises(ValueError, match="attention_forcing_steps"):
        _albef(grounding_weight=0.0, attention_forcing_steps=4)


def test_directional_heads():
    """directional_mask: head 0 sees keys at or before its query, head 1 at or after, the others
    every real token. In ALBEF with directional_heads and head 1's values cut, a word's text
    state does not depend on later words (without the option it does)."""
    from vlkit.layers import directional_mask
    mask = torch.tensor([[1, 1, 1, 0]])
    m = directional_mask(mask, 3)
    assert m.shape == (1, 3, 4, 4)
    assert m[0, 0, 1].tolist() == [True, True, False, False]
    assert m[0, 1, 1].tolist() == [False, True, True, False]
    assert m[0, 2, 1].tolist() == [True, True, True, False]
    assert m[0, 0, 3].tolist() == [True, True, True, True] and m[0, 1, 3].tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="at least 2"):
        directional_mask(mask, 1)
    torch.manual_seed(0)
    model = _albef(heads=2, directional_heads=True).eval()
    ids = torch.randint(5, 60, (1, 6))
    later = ids.clone()
    later[0, 4] = (ids[0, 4] + 1 - 5) % 55 + 5
    for layer in model.text_layers.blocks:  # head 1 (looks ahead) cut: its value weights zeroed
        with torch.no_grad():
            layer.attn.v.weight[16:] = 0
            layer.attn.v.bias[16:] = 0
    a, b = model.text_features(ids), model.text_features(later)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # words before position 4 never saw it
    assert (a[:, 4] - b[:, 4]).abs().max() > 1e-3
    plain = _albef(heads=2).eval()
    plain.load_state_dict(model.state_dict())
    assert (plain.text_features(ids)[:, :4] - plain.text_features(later)[:, :4]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="directional_heads"):
        _albef(heads=1, grounding_weight=0.0, directional_heads=True)


def test_vilt_attention_forcing():
    """ViLT: while forcing_steps_done < attention_forcing_steps, in training, the grounded pass
    reads the patches through the targets (text rows of the joint self-attention); the losses
    stay on the heads' own maps; the clock advances in after_step and travels in the weights."""
    torch.manual_seed(0)
    model = _vilt(heads=4, relation_weight=1.0, relation_layer=0, attention_forcing_steps=2)
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(5, 60, (2, 6))
    mask = torch.ones_like(ids)
    targets, roles = _roles_batch()
    plain = _forcing_changes_the_pass_only(model, lambda: _tapped(model, pixels, ids, mask, targets=targets, roles=roles))
    model.after_step(0)
    model.after_step(1)
    assert int(model.state_dict()["attention_forcing.steps_done"]) == 2
    torch.testing.assert_close(_tapped(model, pixels, ids, mask, targets=targets, roles=roles)[0], plain)
    with pytest.raises(ValueError, match="attention_forcing_steps"):
        _vilt(attention_forcing_steps=-1)


def test_vilt_directional_heads():
    """ViLT directional_heads: the text rows of the second-to-last head see the text at or before
    them, of the last head the text at or after them, and neither sees the image; the other
    heads' text rows and all image rows see everything; padding stays masked. The grounding and
    relation heads must come before the two."""
    model = _vilt(heads=3, dim=48, grounding_weight=0.0, directional_heads=True)
    joint = torch.tensor([[1, 1, 1, 0, 1, 1]])  # 4 text positions (one padded), 2 image tokens
    m = model._joint_mask(joint, 4)
    assert m.shape == (1, 3, 6, 6)
    assert m[0, 0, 1].tolist() == [True, True, True, False, True, True]
    assert m[0, 1, 1].tolist() == [True, True, False, False, False, False]
    assert m[0, 2, 1].tolist() == [False, True, True, False, False, False]
    assert not m[0, 1:, :4, 4:].any() and m[0, 0, :4, 4:].all()  # the image: to head 0's text rows only
    assert all(m[0, h, r].tolist() == [True, True, True, False, True, True] for h in range(3) for r in (4, 5))
    assert torch.equal(_vilt(heads=2)._joint_mask(joint, 4), joint.bool()[:, None, None, :])
    pixels, ids = torch.randn(1, 3, 32, 32), torch.randint(5, 60, (1, 4))
    out = model(pixels, ids).features
    assert out.shape[1] == 4 + 1 + 16 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="directional_heads"):
        _vilt(heads=1, grounding_weight=0.0, directional_heads=True)
    with pytest.raises(ValueError, match="use at least 5 heads"):  # 1 grounding + 2 relation heads
        _vilt(heads=4, relation_weight=1.0, relation_layer=0, directional_heads=True)
    _vilt(heads=4, relation_weight=1.0, directional_heads=True)  # relation heads 0, 1 of layer 1
