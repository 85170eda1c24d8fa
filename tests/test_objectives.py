"""Objectives as parts: weight 0 adds no loss and no parameters; a new objective is added by
registering it (no model file edited); ``score`` is a log-score in every model; old run
configs keep their directional heads."""
import dataclasses

import pytest
import torch
from torch import nn

import vlkit
from vlkit.models import build_model, model_class
from vlkit.objectives import FusionSpec, Objective, register_objective, unregister_objective

SMALL = {"albef": dict(dim=32, heads=4, mlp_dim=64, text_layers=1, fusion_layers=2, vocab_size=60, embed_dim=16,
                       queue_size=32, **{"vision.dim": 32, "vision.depth": 1, "vision.heads": 2,
                                         "vision.mlp_dim": 64}),
         "vilt": dict(dim=32, depth=2, heads=4, mlp_dim=64, vocab_size=60),
         "blip": dict(dim=32, heads=2, mlp_dim=64, layers=2, vocab_size=60, embed_dim=16, queue_size=8,
                      **{"vision.dim": 32, "vision.depth": 1, "vision.heads": 2, "vision.mlp_dim": 64})}


def _batch(size, b=3, length=7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return {"pixel_values": torch.randn(b, 3, size, size, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("name", ["albef", "vilt", "blip"])
def test_weight_zero_adds_no_loss_and_no_parameters(name):
    torch.manual_seed(0)
    off = vlkit.create_model(name, "tiny", **SMALL[name], grounding_weight=0.0, relation_weight=0.0,
                             geometry_weight=0.0, edit_weight=0.0, attention_forcing_steps=0)
    torch.manual_seed(0)
    plain = vlkit.create_model(name, "tiny", **SMALL[name])
    assert off.objectives == [] and set(off.state_dict()) == set(plain.state_dict())
    on = vlkit.create_model(name, "tiny", **SMALL[name], grounding_weight=1.0, relation_weight=1.0,
                            geometry_weight=1.0, attention_forcing_steps=3)
    extra = set(on.state_dict()) - set(plain.state_dict())
    assert extra == {"relation_grounding.geometry_head.weight", "relation_grounding.geometry_head.bias",
                     "attention_forcing.steps_done"}
    batch = _batch(off.image_spec()["size"])
    torch.manual_seed(1)
    a = off.training_losses(batch)
    torch.manual_seed(1)
    b = plain.training_losses(batch)
    assert set(a) == set(b) and not any(k.startswith(("grounding", "relation", "geometry", "edit")) for k in a)
    torch.testing.assert_close(a["loss"], b["loss"])


def test_a_registered_objective_joins_training_without_a_model_edit():
    """A toy objective (an L2 pull of the fused text states, with a parameter of its own) and a
    config class that carries its option: ALBEF, ViLT and BLIP build it, add its weighted loss, save
    its parameter, and a weight of 0 leaves it out."""
    @dataclasses.dataclass
    class ToyOptions:
        toy_weight: float = 0.0

    @register_objective
    class Toy(Objective):
        name = "toy"
        options = ToyOptions
        reads_attention = True

        @classmethod
        def enabled(cls, cfg):
            return cfg.toy_weight > 0

        @classmethod
        def check(cls, cfg, spec: FusionSpec, on):
            if cfg.toy_weight < 0:
                raise ValueError(f"toy_weight must be >= 0, got {cfg.toy_weight}")

        def __init__(self, cfg, spec):
            super().__init__(cfg, spec)
            self.scale = nn.Parameter(torch.ones(()))

        def attention_layers(self, step):
            return {0: (0, 1)}

        def begin(self, step):
            step.state["toy"] = []

        def read(self, step, kind, attention_of, states, targets):
            assert attention_of(0, slice(0, 1)).dim() == 4
            step.state["toy"].append(self.scale * states.float().pow(2).mean())

        def finish(self, step, out):
            out["toy_loss"] = torch.stack(step.state["toy"]).mean()
            return [self.cfg.toy_weight * out["toy_loss"]]
    try:
        for name in ("albef", "vilt", "blip"):
            cls = model_class(name)
            config = dataclasses.make_dataclass("ToyConfig", [("toy_weight", float, 0.5)], bases=(cls.config_class,))
            base = cls.make_config("tiny", **SMALL[name])
            cfg = config(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
            model = cls(cfg)
            assert [o.name for o in model.objectives] == ["toy"] and "toy.scale" in model.state_dict()
            size = model.image_spec()["size"]
            n = size // (8 if name == "vilt" else 16)
            batch = {**_batch(size), "grounding": torch.zeros(3, 7, n * n)}
            out = model.training_losses(batch)
            parts = [v for k, v in out.items() if k.endswith("_loss") and k != "toy_loss"]
            torch.testing.assert_close(out["loss"], torch.stack(parts).sum() + 0.5 * out["toy_loss"])
            out["loss"].backward()
            assert model.toy.scale.grad is not None
            cfg.toy_weight = 0.0
            assert cls(cfg).objectives == []
            with pytest.raises(ValueError, match="toy_weight"):
                cls(dataclasses.replace(cfg, toy_weight=-1.0))
    finally:
        unregister_objective("toy")


@pytest.mark.parametrize("name", ["clip", "albef", "vilt"])
def test_score_is_a_log_score(name):
    """Fusion models: log P(match) from the ITM head; CLIP: the scaled cosine (its softmax over
    candidates is CLIP's probability); ``itm+edit`` adds the word check's log-probability."""
    torch.manual_seed(0)
    small = {} if name == "clip" else SMALL[name]
    model = vlkit.create_model(name, "tiny", **small).eval()
    b = _batch(model.image_spec()["size"])
    if name == "clip":
        b["input_ids"] = b["input_ids"].clamp(max=model.cfg.text.vocab_size - 1)
    with torch.no_grad():
        s = model.score(b["pixel_values"], b["input_ids"], b["attention_mask"])
        assert s.shape == (3,)
        if name == "clip":
            cos = (model.encode_image(b["pixel_values"]) * model.encode_text(b["input_ids"], b["attention_mask"])).sum(-1)
            torch.testing.assert_close(s, model.logit_scale.exp().clamp(max=100) * cos)
            return
        logits = model.match(b["pixel_values"], b["input_ids"], b["attention_mask"])
        torch.testing.assert_close(s, logits.log_softmax(-1)[:, 1])
        assert (s < 0).all()
        model.cfg.match_score = "itm+edit"
        edit = vlkit.create_model(name, "tiny", **small, match_score="itm+edit").eval()
        edit.load_state_dict(model.state_dict())
        assert (edit.score(b["pixel_values"], b["input_ids"], b["attention_mask"]) < s).all()


def test_old_albef_runs_keep_heads_zero_and_one():
    cfg = model_class("albef").make_config("tiny", **SMALL["albef"], directional_heads=True).__dict__
    saved = {k: v for k, v in vlkit.create_model("albef", "tiny", **SMALL["albef"]).config_dict().items()
             if k != "directional_head_index"}
    saved["directional_heads"] = True
    assert build_model("albef", saved).cfg.directional_head_index == 0
    assert cfg["directional_head_index"] == -2


def test_runs_saved_with_the_earlier_weight_names_still_load(tmp_path):
    """Before the objectives moved out of the model files, the geometry head was ``geometry_head``
    and ViLT's forcing clock ``forcing_steps_done`` (ALBEF's forcing read ``steps_done``)."""
    import vlkit
    from vlkit.checkpoint import WEIGHTS, atomic_save_tensors, model_state, save_run_config
    for name, extra, renames in [
            ("vilt", {"heads": 4}, {"relation_grounding.geometry_head.": "geometry_head.",
                                    "attention_forcing.steps_done": "forcing_steps_done"}),
            ("albef", {}, {"relation_grounding.geometry_head.": "geometry_head.",
                           "attention_forcing.steps_done": None})]:
        model = vlkit.create_model(name, "tiny", relation_weight=1.0, geometry_weight=1.0,
                                   attention_forcing_steps=10, grounding_weight=1.0, **extra)
        state = {k: v.clone() for k, v in model_state(model).items()}
        with torch.no_grad():
            for k, v in state.items():
                v.add_(3) if v.dtype == torch.long else v.normal_()
        if name == "albef":
            state["attention_forcing.steps_done"] = state["steps_done"].clone()
        old = {}
        for k, v in state.items():
            for new, before in renames.items():
                if k.startswith(new):
                    k = None if before is None else before + k[len(new):]
                    break
            if k is not None:
                old[k] = v
        assert old.keys() != state.keys()
        run = tmp_path / name
        run.mkdir()
        save_run_config(run, name, model.config_dict())
        atomic_save_tensors(run / WEIGHTS, old)
        loaded = vlkit.load(run).model.state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state), name
