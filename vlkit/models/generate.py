"""Autoregressive decoding on a KV cache, for any model that supplies one step function.

``decode(step, prompts, ...)`` runs greedy search, beam search (``num_beams``, ``length_penalty``,
``num_return_sequences``) or top-k / nucleus sampling (``do_sample``, ``temperature``, ``top_k``,
``top_p``, a ``torch.Generator``), with a repetition penalty and minimum / maximum numbers of
new tokens. ``step(tokens, past_length, cache, rows) -> logits`` feeds the (N, T) tokens that
follow ``past_length`` cached positions and returns the (N, V) logits of the last position;
``rows`` is None while the N rows are G consecutive rows for each conditioning input (image) in
order, else the (N,) index of each row's input. The cache is a ``layers.KVCache``: the step
appends self-attention keys and values, and computes cross-attention keys and values once per
input (static entries, one row per input, read by the input's G rows without copies).

Each input has its own prompt (a list of ids starting with the begin token). All rows advance in
step: a row whose prompt is longer than the shortest is fed its own prompt tokens (not scored)
until its prompt ends, so every token keeps its true position. A row stops at the end token or
after ``max_new_tokens``; finished rows (greedy, sampling) or inputs whose beams are settled (beam
search) leave the batch. Beam search follows Hugging Face transformers' (2K candidates per input,
finished hypotheses scored by sum log p / new_length ** length_penalty, its early-stop rule), so
the same weights give the same tokens. ``use_cache=False`` recomputes the whole sequence every
step (a check on the cache).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..layers import KVCache

NEG = -1.0e9


def repetition_penalty_(scores: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """In place: the score of every token already in a row of ``seqs`` divided by ``penalty`` when
    positive, multiplied when negative (Keskar et al. 2019, as transformers applies it)."""
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, seqs)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter_(1, seqs, seen)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits outside the ``top_k`` largest, and outside the smallest set whose probability
    reaches ``top_p`` (nucleus), set to -inf; at least one token stays."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, index = logits.sort(dim=-1)  # ascending
        cum = ordered.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
    return logits


def _check(num_beams, num_return_sequences, max_new_tokens, min_new_tokens, do_sample,
           temperature, top_p, top_k, repetition_penalty, length_penalty):
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a whole number >= 1, got {num_beams!r}")
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be a whole number >= 1, got {num_return_sequences!r}")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences {num_return_sequences} exceeds num_beams {num_beams}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam search with sampling is not supported: give num_beams=1 or do_sample=False")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    if not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must lie in [0, max_new_tokens], got {min_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be above 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be above 0, got {repetition_penalty}")
    if not isinstance(length_penalty, (int, float)):
        raise ValueError(f"length_penalty must be a number, got {length_penalty!r}")


@torch.no_grad()
def decode(step: Callable, prompts: list[list[int]], *, eos_token_id: int, pad_token_id: int,
           max_new_tokens: int = 30, min_new_tokens: int = 0, num_beams: int = 1,
           length_penalty: float = 1.0, do_sample: bool = False, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
           num_return_sequences: int = 1, generator: torch.Generator | None = None,
           use_cache: bool = True, device=None) -> torch.Tensor:
    """(B * num_return_sequences, T) new tokens of each input's sequences (the end token left
    out, padded with ``pad_token_id``), the sequences of input b in rows b*R ... b*R + R - 1
    (beam search: best first)."""
    _check(num_beams, num_return_sequences, max_new_tokens, min_new_tokens, do_sample, temperature,
           top_p, top_k, repetition_penalty, length_penalty)
    if not prompts or any(len(p) < 1 for p in prompts):
        raise ValueError("every input needs a prompt of at least the begin token")
    opts = dict(eos=eos_token_id, max_new=max_new_tokens, min_new=min_new_tokens,
                rep=float(repetition_penalty), use_cache=use_cache)
    if num_beams > 1:
        seqs, plen = _beam(step, prompts, num_beams, num_return_sequences, float(length_penalty),
                           pad_token_id, device, **opts)
    else:
        seqs, plen = _sample(step, prompts, num_return_sequences, do_sample, float(temperature),
                             int(top_k), float(top_p), generator, pad_token_id, device, **opts)
    return _new_tokens(seqs, plen, eos_token_id, pad_token_id)


def _prompt_table(prompts, repeat: int, total: int, pad: int, device):
    rows = [p for p in prompts for _ in range(repeat)]
    plen = torch.tensor([len(p) for p in rows], device=device)
    seqs = torch.full((len(rows), total), pad, dtype=torch.long, device=device)
    for i, p in enumerate(rows):
        seqs[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    return seqs, plen


def _new_tokens(seqs, plen, eos: int, pad: int) -> torch.Tensor:
    out = []
    for row, start in zip(seqs.tolist(), plen.tolist()):
        new = row[start:]
        out.append(new[:new.index(eos)] if eos in new else new)
    width = max(1, max(len(r) for r in out))
    table = torch.full((len(out), width), pad, dtype=torch.long)
    for i, r in enumerate(out):
        table[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return table


def _feed(step, seqs, rows, t, cache, context_rows, use_cache):
    """Logits after position t - 1 of ``seqs[rows]`` (the token just chosen, or the prefix)."""
    if use_cache:
        return step(seqs[rows, t - 1:t], t - 1, cache, context_rows)
    return step(seqs[rows, :t], 0, None, context_rows)


def _sample(step, prompts, repeat, do_sample, temperature, top_k, top_p, generator, pad, device,
            eos, max_new, min_new, rep, use_cache):
    b = len(prompts)
    seqs, plen = _prompt_table(prompts, repeat, max(map(len, prompts)) + max_new, pad, device)
    rows = torch.arange(b * repeat, device=seqs.device)  # the rows still decoding
    image_of = rows // repeat
    cache = KVCache() if use_cache else None
    t = int(plen.min())
    context_rows = None if use_cache else image_of
    per_row = repeat == 1  # whether the static cache entries hold one row per decoding row
    logits = step(seqs[:, :t], 0, cache, context_rows)
    while True:
        forced = t < plen[rows]
        new = t - plen[rows]
        scores = repetition_penalty_(logits.float(), seqs[rows, :t], rep)
        scores[:, eos] = torch.where(new < min_new, float("-inf"), scores[:, eos])
        if do_sample:
            scores = filter_top_k_top_p(scores / temperature, top_k, top_p)
            tok = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
        else:
            tok = scores.argmax(-1)
        tok = torch.where(forced, seqs[rows, t], tok)
        seqs[rows, t] = tok
        done = ~forced & ((tok == eos) | (new + 1 >= max_new))
        t += 1
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero()[:, 0]
            if cache is not None:  # the static entries: one row per image, then one per row
                cache.select(keep, keep if per_row else image_of[rows[keep]])
                per_row = True
            rows = rows[keep]
            context_rows = None if use_cache else image_of[rows]
        logits = _feed(step, seqs, rows, t, cache, context_rows, use_cache)
    return seqs, plen


def _beam(step, prompts, k, repeat, length_penalty, pad, device, eos, max_new, min_new, rep, use_cache):
    b = len(prompts)
    total = max(map(len, prompts)) + max_new
    flat, plen_rows = _prompt_table(prompts, k, total, pad, device)
    dev = flat.device
    running = flat.view(b, k, total)
    plen = plen_rows.view(b, k)[:, 0]  # (B,)
    run_scores = torch.zeros(b, k, device=dev)
    run_scores[:, 1:] = NEG
    fin_seqs, fin_scores = running.clone(), torch.full((b, k), NEG, device=dev)
    fin_done = torch.zeros(b, k, dtype=torch.bool, device=dev)
    unsat = torch.ones(b, dtype=torch.bool, device=dev)  # improvement still possible
    images = torch.arange(b, device=dev)  # the inputs still decoding
    cache = KVCache() if use_cache else None
    t = int(plen.min())
    top_k_mask = torch.arange(2 * k, device=dev) < k

    def context(imgs):
        return None if use_cache else imgs.repeat_interleave(k)
    logits = step(running.reshape(b * k, total)[:, :t], 0, cache, context(images))
    while True:
        n = len(images)
        seqs = running[images]  # (n, K, total)
        p = plen[images]
        forced = t < p  # (n,)
        new = t - p
        logp = repetition_penalty_(logits.float().log_softmax(-1), seqs.reshape(n * k, total)[:, :t], rep)
        v = logp.shape[-1]
        logp = logp.view(n, k, v)
        logp[..., eos] = torch.where((new < min_new)[:, None], float("-inf"), logp[..., eos])
        if bool(forced.any()):
            force = torch.full_like(logp[forced], float("-inf"))
            force.scatter_(-1, seqs[forced][:, :, t:t + 1], 0.0)
            logp[forced] = force
        cand = (logp + run_scores[images][..., None]).view(n, k * v)
        top, index = cand.topk(2 * k, dim=-1)  # (n, 2K)
        parent, tok = index // v, index % v
        cand_seqs = seqs.gather(1, parent[..., None].expand(-1, -1, total)).clone()
        cand_seqs[:, :, t] = tok
        hits = ~forced[:, None] & ((tok == eos) | (new + 1 >= max_new)[:, None])
        # the best K continuations that did not finish run on
        keep = (top + hits.float() * NEG).topk(k, dim=-1).indices  # (n, K)
        running[images] = cand_seqs.gather(1, keep[..., None].expand(-1, -1, total))
        run_scores[images] = (top + hits.float() * NEG).gather(1, keep)
        # finished: the top-K candidates that hit the end, length-normalised, merged with the best so far
        length = (t + 1 - p).clamp(min=1).float()[:, None]
        scored = top / length ** length_penalty + (~unsat[images]).float()[:, None] * NEG
        scored = scored + (~(hits & top_k_mask)).float() * NEG
        merged_scores = torch.cat([fin_scores[images], scored], dim=1)
        best = merged_scores.topk(k, dim=-1).indices
        fin_seqs[images] = torch.cat([fin_seqs[images], cand_seqs], 1).gather(1, best[..., None].expand(-1, -1, total))
        fin_scores[images] = merged_scores.gather(1, best)
        fin_done[images] = torch.cat([fin_done[images], hits & top_k_mask], 1).gather(1, best)
        t += 1
        worst = torch.where(fin_done[images], fin_scores[images].min(1, keepdim=True).values, NEG)
        # the early-stop rule of transformers (early_stopping=False): the best running beam at
        # its current length against the worst finished hypothesis
        gen = (t - p).clamp(min=1).float()[:, None]
        better = ((run_scores[images][:, :1] / gen ** length_penalty) > worst).any(1) | forced
        unsat[images] = unsat[images] & better
        alive = unsat[images] & ~hits.all(1)
        parent_rows = (torch.arange(n, device=dev)[:, None] * k + parent.gather(1, keep)).reshape(-1)
        if cache is not None:
            cache.reorder(parent_rows, static=False)
        if not bool(alive.any()):
            break
        if not bool(alive.all()):
            live = alive.nonzero()[:, 0]
            if cache is not None:
                cache.select((live[:, None] * k + torch.arange(k, device=dev)).reshape(-1), live)
            images = images[live]
        rows_now = running[images].reshape(len(images) * k, total)
        if use_cache:
            logits = step(rows_now[:, t - 1:t], t - 1, cache, None)
        else:
            logits = step(rows_now[:, :t], 0, None, context(images))
    order = fin_scores.argsort(dim=1, descending=True)[:, :repeat]
    out = fin_seqs.gather(1, order[..., None].expand(-1, -1, total)).reshape(b * repeat, total)
    return out, plen.repeat_interleave(repeat)
