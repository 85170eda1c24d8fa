"""Zero-shot classification: class embeddings from prompt templates, averaged and cached."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Size words are part of the prompts: with "a red circle" alone a model that ties "large" to
# the biggest shapes guesses one shape for every large object.
TEMPLATES = (
    "a {}",
    "a small {}",
    "a large {}",
    "there is a {}",
    "a picture of a {}",
)


def class_embeddings(pipe, labels, templates=None, batch_size: int = 256) -> torch.Tensor:
    """(C, E): for each label the normalised mean of its normalised template embeddings."""
    templates = tuple(templates or TEMPLATES)
    # the cache holds while the model's weights do: new weights loaded into pipe.model (copy_
    # bumps each parameter's version) or swapped in (new storage) rebuild it
    weights = tuple((p._version, p.data_ptr()) for p in pipe.model.parameters())
    key = (tuple(labels), templates, id(pipe.model), weights)
    cache = getattr(pipe, "_class_cache", None)
    if cache is not None and cache[0] == key:
        return cache[1]
    texts = [t.format(label) for label in labels for t in templates]
    embs = torch.cat([pipe.embed_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
    embs = embs.view(len(labels), len(templates), -1).mean(dim=1)
    out = F.normalize(embs, dim=-1)
    pipe._class_cache = (key, out)
    return out
