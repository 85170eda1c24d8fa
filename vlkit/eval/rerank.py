"""Retrieval in two stages (ALBEF, BLIP): rank every candidate by ITC similarity, then re-score
the top k of each query with the ITM head.

The model needs ``encode_image``/``encode_text`` (normalised embeddings) and ``match`` (ITM
logits of zipped pairs). Models that also have ``forward_features``, ``text_features`` and
``match_tokens`` run each image and text through its encoder once and only the fusion layers
per pair; a model with ``match_log_odds`` (the same inputs) scores the pairs with it, the ITM
log-odds adjusted as its ``score`` is (BLIP with ``match_score="itm+edit"``).

Scores: the top k of a row hold the ITM log-odds of a match (logit 1 − logit 0; plus the ITC
similarity for a model with ``rerank_adds_itc``, as BLIP scores them); the other
entries hold ITC similarity − 1e4, so they keep their ITC order and always rank below the top k.
"""
from __future__ import annotations

import torch

OUTSIDE_TOP_K = -1e4


class _Encoded:
    """Per-item inputs of the fusion stage, computed once."""

    def __init__(self, model, pixel_values, input_ids, attention_mask, batch_size):
        self.model, self.batch_size = model, batch_size
        self.fast = all(hasattr(model, n) for n in ("forward_features", "text_features", "match_tokens"))
        self.pixels, self.ids, self.mask = pixel_values, input_ids, attention_mask
        if self.fast:
            self.images = _chunked(model.forward_features, batch_size, pixel_values)
            self.texts = _chunked(model.text_features, batch_size, input_ids, attention_mask)

    def itm_log_odds(self, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(image_index), self.batch_size):
            i, t = image_index[s:s + self.batch_size], text_index[s:s + self.batch_size]
            if self.fast and hasattr(self.model, "match_log_odds"):
                out.append(self.model.match_log_odds(self.images[i], self.texts[t], self.mask[t]).float())
                continue
            if self.fast:
                logits = self.model.match_tokens(self.images[i], self.texts[t], self.mask[t])
            else:
                logits = self.model.match(self.pixels[i], self.ids[t], self.mask[t])
            logits = logits.float()
            out.append(logits[:, 1] - logits[:, 0])
        return torch.cat(out)


def _chunked(fn, batch_size, *tensors):
    n = tensors[0].shape[0]
    return torch.cat([fn(*(t[s:s + batch_size] for t in tensors)) for s in range(0, n, batch_size)])


@torch.no_grad()
def rerank(model, pixel_values: torch.Tensor, input_ids: torch.Tensor,
           attention_mask: torch.Tensor | None = None, k: int = 16, batch_size: int = 64,
           directions: tuple[str, ...] = ("i2t", "t2i")) -> dict[str, torch.Tensor]:
    """ITC top-k then ITM re-ranking of every image against every text.

    pixel_values (Ni, 3, H, W); input_ids, attention_mask (Nt, L). Returns {"itc": (Ni, Nt)
    similarities, "i2t": (Ni, Nt) scores, "t2i": (Nt, Ni) scores} (see the module doc)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not set(directions) <= {"i2t", "t2i"}:
        raise ValueError(f"unknown direction(s) {sorted(set(directions) - {'i2t', 't2i'})} (i2t, t2i)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    img = _chunked(model.encode_image, batch_size, pixel_values).float()
    txt = _chunked(model.encode_text, batch_size, input_ids, attention_mask).float()
    sim = img @ txt.T  # (Ni, Nt)
    enc = _Encoded(model, pixel_values, input_ids, attention_mask, batch_size)
    out = {"itc": sim}
    for direction in directions:
        rows = sim if direction == "i2t" else sim.T  # (queries, candidates)
        kk = min(k, rows.shape[1])
        top = rows.topk(kk, dim=1).indices  # (Q, k)
        query = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(top).reshape(-1)
        cand = top.reshape(-1)
        image_index, text_index = (query, cand) if direction == "i2t" else (cand, query)
        scores = rows + OUTSIDE_TOP_K
        itm = enc.itm_log_odds(image_index, text_index).to(scores.dtype)
        # BLIP scores a candidate by ITM plus its ITC similarity (``rerank_adds_itc``)
        scores[query, cand] = itm + rows[query, cand] if getattr(model, "rerank_adds_itc", False) else itm
        out[direction] = scores
    return out


@torch.no_grad()
def rerank_query(model, query_is_text: bool, query: dict, candidates: dict, k: int = 16,
                 batch_size: int = 64) -> torch.Tensor:
    """Scores (N,) of one query against N candidates: ITC for all, ITM log-odds for the top k.
    ``query`` / ``candidates`` hold "pixel_values" or "input_ids" + "attention_mask"."""
    if query_is_text:
        res = rerank(model, candidates["pixel_values"], query["input_ids"], query["attention_mask"],
                     k, batch_size, directions=("t2i",))
        return res["t2i"][0]
    res = rerank(model, query["pixel_values"], candidates["input_ids"], candidates["attention_mask"],
                 k, batch_size, directions=("i2t",))
    return res["i2t"][0]
