r"""What a BLIP run's matching and captions rest on, on the synthetic world's test split.

    python scripts/blip_diagnostics.py RUN [--records 300] [--beams 16]

1. Compositional accuracy (a true caption against its minimal edit) scored three ways: the
   model's ``score`` without the decoder term (ITM + word head, ``match_lm_weight = 0``), the
   decoder's caption log-likelihood alone (``score_captions``), and their sum
   (``match_lm_weight = 1``).
2. Captions from beam search with ``--beams`` beams, all returned: the share of images whose top
   beam is true of the image (``caption_is_true``), whose beams hold a true one (the oracle), and
   whose beam ranked first is true, ranked by the model's score (ITM + word head + the decoder's
   log-likelihood: ``caption_rerank``), by its two parts alone, and by twice the first plus the
   second.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import types

import torch

import vlkit
from vlkit.data.synthetic import caption_is_true, synthetic_world
from vlkit.eval.run import eval_itm


@contextlib.contextmanager
def lm_weight(model, weight: float):
    """The model's ``score`` with ``match_lm_weight = weight`` inside the block."""
    cfg = model.cfg
    model.cfg = dataclasses.replace(cfg, match_lm_weight=weight)
    try:
        yield
    finally:
        model.cfg = cfg


def compositional(pipe, score, records) -> dict:
    """eval_itm with ``score(pixels, ids, mask)`` as the model's pair score."""
    view = types.SimpleNamespace(model=types.SimpleNamespace(score=score), tokens=pipe.tokens, pixels=pipe.pixels)
    with torch.no_grad():
        return eval_itm(view, records)


def beam_captions(pipe, records, beams: int) -> dict:
    model = pipe.model
    counts = dict.fromkeys(("top beam", "any beam (oracle)", "ranked first by the score",
                            "... by ITM + word head", "... by the log-likelihood", "... by twice the ITM part + log-lik."), 0)
    for i in range(0, len(records), 16):
        chunk = records[i:i + 16]
        caps = pipe.caption([r["image"] for r in chunk], num_beams=beams, num_return_sequences=beams)
        t = pipe.tokens(caps)
        with torch.no_grad(), lm_weight(model, 0.0):
            px = pipe.pixels([r["image"] for r in chunk for _ in range(beams)])
            itm = model.score(px, t["input_ids"], t["attention_mask"]).float().view(len(chunk), beams)
            lm = model.score_captions(px, t["input_ids"], t["attention_mask"]).float().view(len(chunk), beams)
        rankings = {"ranked first by the score": itm + lm, "... by ITM + word head": itm,
                    "... by the log-likelihood": lm, "... by twice the ITM part + log-lik.": 2 * itm + lm}
        for j, r in enumerate(chunk):
            true = [caption_is_true(c, r["objects"]) for c in caps[j * beams:(j + 1) * beams]]
            counts["top beam"] += true[0]
            counts["any beam (oracle)"] += any(true)
            for name, score in rankings.items():
                counts[name] += true[int(score[j].argmax())]
    return {k: v / len(records) for k, v in counts.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--records", type=int, default=300, help="the first N test records")
    ap.add_argument("--beams", type=int, default=16)
    args = ap.parse_args(argv)
    pipe = vlkit.load(args.run)
    if not hasattr(pipe.model, "score_captions"):
        raise SystemExit(f"{args.run}: not a BLIP with a decoder")
    records = synthetic_world(pipe.model.image_spec()["size"]).records("test", args.records)
    print(f"compositional accuracy, first {len(records)} test records")
    model = pipe.model
    for name, weight in (("ITM + word head", 0.0), ("decoder log-likelihood", None), ("sum", 1.0)):
        with lm_weight(model, weight or 0.0):
            res = compositional(pipe, model.score_captions if weight is None else model.score, records)
        print(f"  {name:24s} " + "  ".join(f"{k.replace('itm.', '').replace('_acc', '')} {v:.3f}"
                                           for k, v in sorted(res.items())))
    print(f"captions from {args.beams} beams, true of the image:")
    for k, v in beam_captions(pipe, records, args.beams).items():
        print(f"  {k:38s} {v:.3f}")


if __name__ == "__main__":
    main()
