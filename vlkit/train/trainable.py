"""Trainable-parameter patterns: a run trains only the parameters whose names match one of a list
of shell-style globs (``fnmatch``: ``*`` matches any text, dots included), e.g. VLMo's text-only
stage ``["text_embed.*", "blocks.*.mlp.experts.text.*", "mlm_head.*"]``. A pattern that starts
with ``!`` excludes what it matches, whatever else matches it: ``["*", "!image_embed.patch_embed.*"]``
trains everything but the patch embedding. The rest are frozen (``requires_grad=False``), so
they stay out of the optimiser and keep their values bit for bit."""
from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn


def apply_trainable(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Freeze every parameter of ``model`` whose name matches none of ``patterns`` (or matches
    one of its ``!`` patterns); returns the names left trainable. ``None`` or an empty list
    leaves the model as it is. A pattern that matches no parameter is an error naming it (a typo
    would silently freeze the whole model, or freeze nothing), as is a list of ``!`` patterns
    alone (it would train nothing)."""
    if not patterns:
        return [name for name, p in model.named_parameters() if p.requires_grad]
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    if not include:
        raise ValueError(f"--trainable: {', '.join(repr(p) for p in patterns)} only excludes; "
                         "name what trains first (\"*\" for everything else)")
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in include if not any(fnmatchcase(n, p) for n in names)]
    unmatched += ["!" + p for p in exclude if not any(fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"--trainable: {', '.join(repr(p) for p in unmatched)} matches no parameter of "
                         f"this {getattr(model, 'model_name', type(model).__name__)} "
                         f"(names look like {names[0]!r})")
    kept = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatchcase(name, q) for q in include)
                         and not any(fnmatchcase(name, q) for q in exclude))
        if p.requires_grad:
            kept.append(name)
    return kept
