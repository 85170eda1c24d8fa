r"""What a BLIP run's captions get wrong on the synthetic world.

    python scripts/caption_errors.py RUN [--records 400] [--split test] [--show 6]

Captions the first ``--records`` records of a split with the run's default decoding
(``Pipeline.caption``) and sorts each caption by the first of these it meets: true of the image
(``caption_is_true``); not a sentence of the world's grammar; a count of shapes that names one
shape twice ("one circle and one circle"); a noun phrase that names no object of the image
(colour, shape or a stated size); a relation that does not hold; a wrong count (of objects or of
shapes); anything else (a list that names one object twice). Prints the counts as JSON, then up to
``--show`` captions of each false kind with the image's objects.
"""
from __future__ import annotations

import argparse
import json

import torch

import vlkit
from vlkit.data.synthetic import caption_facts, caption_is_true, parse_caption, synthetic_world

KINDS = ("true", "ungrammatical", "shape_named_twice", "false_phrase", "false_relation", "wrong_count", "other")


def kind_of(caption: str, objects: list[dict]) -> str:
    """The first kind in ``KINDS`` a caption meets for these objects."""
    if caption_is_true(caption, objects):
        return "true"
    parsed = parse_caption(caption)
    if parsed is None:
        return "ungrammatical"
    if any(cl[0] == "shapes" and len({s for _, s in cl[1]}) < len(cl[1]) for cl in parsed):
        return "shape_named_twice"
    facts = caption_facts(caption, objects)
    if facts["phrases_true"] < facts["phrases"]:
        return "false_phrase"
    if facts["relations_true"] < facts["relations"]:
        return "false_relation"
    if any(cl[0] in ("shapes", "count") for cl in parsed):
        return "wrong_count"
    return "other"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--split", default="test")
    ap.add_argument("--show", type=int, default=6)
    args = ap.parse_args(argv)
    pipe = vlkit.load(args.run)
    records = synthetic_world(pipe.model.image_spec()["size"]).records(args.split, args.records)
    captions = []
    with torch.no_grad():
        for i in range(0, len(records), 50):
            captions += pipe.caption([r["image"] for r in records[i:i + 50]])
    counts, shown = {k: 0 for k in KINDS}, {}
    for caption, rec in zip(captions, records):
        kind = kind_of(caption, rec["objects"])
        counts[kind] += 1
        shown.setdefault(kind, []).append((caption, rec["objects"]))
    out = {"run": args.run, "split": args.split, "records": len(records),
           "true": counts["true"] / max(1, len(records)), "counts": counts}
    print(json.dumps(out))
    for kind in KINDS[1:]:
        for caption, objects in shown.get(kind, [])[:args.show]:
            print(f"{kind} | {caption} | " + ", ".join(f'{o.get("size") or ""} {o["color"]} {o["shape"]}'.strip()
                                                       for o in objects))
    return out


if __name__ == "__main__":
    main()
