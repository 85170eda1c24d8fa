"""CapFilt against caption noise: corrupt a share of a synthetic dataset's training captions
(mismatched pairs), run ``vlkit capfilt`` over it, measure how well the filter finds the
corrupted captions, and train the same retrieval model with the same budget on the clean, the
noisy and the cleaned data.

    python benchmarks/capfilt_noise.py --blip RUN --vit RUN --out DIR [--filter RUN]
        [--num 4000] [--test 1000] [--noise 0.4] [--steps 300] [--batch-size 256] [--lr 1.4e-3]
        [--samples 1] [--threshold P | --keep-true 0.9] [--seed 0] [--skip-train]

1. ``DIR/clean``: the synthetic world written as a dataset folder (``--num`` training records, six
   true captions each, ``--test`` test records).
2. ``DIR/noisy``: the same images; ``--noise`` of the training records (drawn with ``--seed``)
   take the captions of another corrupted record (a cyclic shift among them, so none keeps its
   own), with their grounding spans and negatives. ``noisy/corrupted.json`` lists them.
3. ``DIR/cleaned-FILTER``: ``vlkit capfilt DIR/noisy --captioner BLIP --filter FILTER`` (the
   filter is the BLIP run unless ``--filter`` names another run with an ITM head; ``--samples``
   nucleus-sampled captions per image). The match-probability threshold is ``--threshold``, or
   with ``--keep-true K`` (the default, 0.9) the one that keeps the share K of the clean val
   split's true captions: the filter calibrated on clean held-out data, as BLIP's filter is
   fine-tuned on clean human captions.
4. The filter as a detector of corrupted captions, per original caption: precision (of the
   captions it dropped, the share that were corrupted) and recall (of the corrupted captions, the
   share it dropped); the same per record (a record counts as flagged when all its original
   captions were dropped); and how many synthetic captions were kept, and how many are true of
   their image by the world's grammar (``caption_is_true``, as ``caption.correct`` checks).
5. CLIP (tiny, its image tower from the ViT run ``--vit``) trained ``--steps`` steps on each of
   the training sets (clean, noisy, cleaned by each filter run so far), then ``vlkit eval --tasks retrieval --retrieval-size TEST`` on the
   clean test split (the three folders share it).

Prints one table and writes ``DIR/capfilt_noise-FILTER.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CAPTION_FIELDS = ("caption", "captions", "captions_grounding", "negatives")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def link_tree(src: Path, dst: Path) -> None:
    """dst/images/* as hard links to src/images/* (plain files to every reader), the jsonl files copied."""
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for f in (src / "images").iterdir():
        target = dst / "images" / f.name
        if not target.exists():
            os.link(f, target)
    for name in ("val.jsonl", "test.jsonl", "world.json"):
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())


def corrupt(rows: list[dict], share: float, seed: int) -> tuple[list[dict], list[int]]:
    """``share`` of the rows (drawn with ``seed``) take the caption fields of the next drawn row."""
    picked = sorted(random.Random(seed).sample(range(len(rows)), round(share * len(rows))))
    out = [dict(r) for r in rows]
    for a, b in zip(picked, picked[1:] + picked[:1]):
        for field in CAPTION_FIELDS:
            out[a].pop(field, None)
            if field in rows[b]:
                out[a][field] = rows[b][field]
    return out, picked


def filter_scores(cleaned: Path, corrupted_images: set[str]) -> dict:
    """Precision and recall of the filter's drops against the corrupted captions (see the doc)."""
    details = read_jsonl(cleaned / "capfilt.jsonl")
    tp = fp = fn = tn = 0
    rec_tp = rec_fp = rec_fn = 0
    synthetic, synthetic_kept = [], 0
    for d in details:
        bad = d["image"] in corrupted_images
        originals = [v for v in d["captions"] if v["source"] == "original"]
        for v in originals:
            dropped = not v["kept"]
            tp += bad and dropped
            fp += (not bad) and dropped
            fn += bad and not dropped
            tn += (not bad) and not dropped
        flagged = all(not v["kept"] for v in originals)
        rec_tp += bad and flagged
        rec_fp += (not bad) and flagged
        rec_fn += bad and not flagged
        for v in d["captions"]:
            if v["source"] == "synthetic":
                synthetic.append((d["image"], v["caption"], v["kept"]))
                synthetic_kept += v["kept"]
    div = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return dict(caption_precision=div(tp, tp + fp), caption_recall=div(tp, tp + fn),
                caption_false_drop_rate=div(fp, fp + tn), record_precision=div(rec_tp, rec_tp + rec_fp),
                record_recall=div(rec_tp, rec_tp + rec_fn), originals=tp + fp + fn + tn, corrupted=tp + fn,
                synthetic=len(synthetic), synthetic_kept=synthetic_kept), synthetic


def synthetic_truth(folder: Path, synthetic: list[tuple[str, str, bool]]) -> dict:
    """Of the synthetic captions, the share true of their image (the world's grammar), kept and dropped."""
    from vlkit.data.synthetic import caption_is_true
    records = {r["image"]: r for r in read_jsonl(folder / "train.jsonl")}
    out = {}
    for kept in (True, False):
        rows = [(records[img], text) for img, text, k in synthetic if k == kept]
        truth = [caption_is_true(text, rec["objects"]) for rec, text in rows]
        out["synthetic_true_" + ("kept" if kept else "dropped")] = sum(truth) / len(truth) if truth else float("nan")
    return out


def calibrated_threshold(clean: Path, filter_run: str, keep: float) -> float:
    """The match probability above which the share ``keep`` of the clean val split's captions lie."""
    import vlkit
    filt = vlkit.load(filter_run)
    pairs = [(str(clean / r["image"]), c) for r in read_jsonl(clean / "val.jsonl")
             for c in (r.get("captions") or [r["caption"]])]
    probs = []
    for i in range(0, len(pairs), 64):
        chunk = pairs[i:i + 64]
        probs += filt.match([p for p, _ in chunk], [c for _, c in chunk]).tolist()
    probs.sort()
    return float(probs[int((1 - keep) * (len(probs) - 1))])


def train_and_eval(data: Path, run: Path, vit: str, steps: int, batch_size: int, lr: float, test: int,
                   seed: int) -> dict:
    from vlkit.cli import main
    if not (run / "model.safetensors").is_file():
        code = main(["train", "clip", "--data", str(data), "--out", str(run), "--steps", str(steps),
                     "--batch-size", str(batch_size), "--lr", str(lr), "--seed", str(seed),
                     "--set", f"vision_init={vit}", "--no-eval", "--no-progress"])
        if code:
            raise SystemExit(f"training on {data} failed ({code})")
    out = run / "eval_retrieval.json"
    code = main(["eval", str(run), "--data", str(data), "--tasks", "retrieval",
                 "--retrieval-size", str(test), "--out", str(out)])
    if code:
        raise SystemExit(f"evaluating {run} failed ({code})")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blip", required=True, help="BLIP run: captioner and filter")
    parser.add_argument("--vit", required=True, help="ViT run: CLIP's image tower")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, default=4000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1.4e-3)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--filter", help="run with an ITM head (default: --blip)")
    parser.add_argument("--threshold", type=float, help="match probability a caption must exceed")
    parser.add_argument("--keep-true", type=float, default=0.9,
                        help="without --threshold: keep this share of the clean val captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-train", action="store_true", help="the filter's figures only")
    args = parser.parse_args()
    from vlkit.data.synthetic import write_dataset
    from vlkit.train.capfilt import capfilt

    out = Path(args.out)
    filter_run = args.filter or args.blip
    clean, noisy, cleaned = out / "clean", out / "noisy", out / f"cleaned-{Path(filter_run).name}"
    if not (clean / "train.jsonl").is_file():
        write_dataset(clean, seed=args.seed, sizes={"train": args.num, "val": 100, "test": args.test})
    if not (noisy / "train.jsonl").is_file():
        link_tree(clean, noisy)
        rows, picked = corrupt(read_jsonl(clean / "train.jsonl"), args.noise, args.seed)
        (noisy / "corrupted.json").write_text(json.dumps([rows[i]["image"] for i in picked]) + "\n")
        write_jsonl(noisy / "train.jsonl", rows)
    if not (cleaned / "capfilt.json").is_file():
        threshold = args.threshold if args.threshold is not None else \
            calibrated_threshold(clean, filter_run, args.keep_true)
        capfilt(noisy, args.blip, filter_run, cleaned, samples=args.samples, threshold=threshold, seed=args.seed)
    corrupted = set(json.loads((noisy / "corrupted.json").read_text()))
    scores, synthetic = filter_scores(cleaned, corrupted)
    scores.update(synthetic_truth(noisy, synthetic))
    report = dict(vars(args), filter_scores=scores, capfilt=json.loads((cleaned / "capfilt.json").read_text()))
    print(f"filter over {scores['originals']} original captions ({scores['corrupted']} corrupted): "
          f"precision {scores['caption_precision']:.3f}, recall {scores['caption_recall']:.3f}, "
          f"clean captions dropped {scores['caption_false_drop_rate']:.3f}; per record precision "
          f"{scores['record_precision']:.3f}, recall {scores['record_recall']:.3f}; synthetic captions kept "
          f"{scores['synthetic_kept']} of {scores['synthetic']} (true of the image: kept "
          f"{scores['synthetic_true_kept']:.3f}, dropped {scores['synthetic_true_dropped']:.3f})")
    if not args.skip_train:
        report["retrieval"] = {}
        print(f"{'training data':24s}{'records':>9s}{'t2i R@1':>9s}{'i2t R@1':>9s}{'t2i R@5':>9s}")
        for name, folder in (("clean", clean), ("noisy", noisy), (cleaned.name, cleaned)):
            ev = train_and_eval(folder, out / f"clip-{name}", args.vit, args.steps, args.batch_size, args.lr,
                                args.test, args.seed)
            r = {k.split(".", 1)[1]: v for k, v in ev["metrics"].items() if k.startswith("retrieval.")}
            report["retrieval"][name] = r
            print(f"{name:24s}{len(read_jsonl(folder / 'train.jsonl')):9d}{r['t2i_r1']:9.3f}{r['i2t_r1']:9.3f}"
                  f"{r['t2i_r5']:9.3f}")
    (out / f"capfilt_noise-{Path(filter_run).name}.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
