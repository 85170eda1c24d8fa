"""Models made ready to train: ``create_model`` and the pretrained starting points a config
names (``vision_init``, ``text_init``), which load other runs (``pipeline``) and foreign
checkpoints (``convert``) and so live above ``models/``."""
from __future__ import annotations

from torch import nn

from .models.base import VLModel, model_class
from .models.vit import VisionTransformer


def source_vision_tower(path: str) -> nn.Module:
    """The ViT image tower (a ``VisionTransformer``) of a run or Hugging Face folder: a ViT
    classifier's or a CLIP's; a clear error for a model without one (``vision_init``)."""
    from .pipeline import load
    source = load(path).model
    tower = getattr(source, "vision", None)
    if not isinstance(tower, VisionTransformer):
        raise ValueError(f"vision_init {path}: a {source.model_name} model has no ViT image tower")
    return tower


def load_vision_tower(tower: nn.Module, path: str) -> None:
    """Copy the ViT image tower of a run or Hugging Face folder into ``tower``; every key and
    shape must match (``vlkit train`` gives the model the source tower's architecture first)."""
    from .convert.common import load_strict
    load_strict(tower, source_vision_tower(path).state_dict(), f"vision_init {path}")


def init_pretrained(model: VLModel) -> None:
    """Load what ``model.cfg`` names: ``text_init`` (a BERT folder or "minilm", into ALBEF's text
    and fusion stack) and ``vision_init`` (a ViT or CLIP run's image tower: into ``model.vision``,
    or, for a model with ``vision_init_state`` (ViLT), under the names that method gives and
    every one of them checked against the model). Then ``model.pretrained_loaded()`` if it has
    one (ALBEF: the momentum copies follow)."""
    cfg = model.cfg
    text, vision = getattr(cfg, "text_init", ""), getattr(cfg, "vision_init", "")
    if text:
        from .convert.hf_bert import load_bert_text
        load_bert_text(model, text)
    if vision:
        from .convert.common import check_fit
        label = f"vision_init {vision}"
        if hasattr(model, "vision_init_state"):
            state = model.vision_init_state(source_vision_tower(vision).state_dict(), label)
            own = model.state_dict()
            check_fit(own, state, label, f"this {model.model_name}", needed=())
            model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
        else:
            load_vision_tower(model.vision, vision)
    if (text or vision) and hasattr(model, "pretrained_loaded"):
        model.pretrained_loaded()


def create_model(name: str, preset: str = "tiny", **overrides) -> VLModel:
    """``create_model("clip", preset="tiny", dim=256)``: a freshly initialised model, with the
    pretrained parts its config names (``init_pretrained``) loaded."""
    cls = model_class(name)
    model = cls(cls.make_config(preset, **overrides))
    init_pretrained(model)
    return model
