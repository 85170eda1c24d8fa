r"""Render the README's headline table from recorded runs, instead of typing the figures.

    python scripts/results_table.py clip-world=runs/clip vilt-world=runs/vilt vilt-world=runs/vilt-s1 \
        albef-world=runs/albef albef-world=runs/albef-s1

Each argument is RECIPE=RUN: a run folder (its eval.json, as `vlkit train` writes it) or an eval
JSON file. Runs of the same recipe (seeds) share a row, their figures joined by " / ". Minutes
are the training time of the run and of its stages (`RUN/stages/*/train_summary.json`), steps
those of the run itself (else of its last stage). Prints a Markdown table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [("attribute swaps", "itm.attribute_swap_acc"), ("relation flips", "itm.relation_flip_acc"),
           ("all negatives", "itm.compositional_acc"), ("zero-shot", "zeroshot.top1")]


def record(path: Path) -> dict:
    run = path if path.is_dir() else path.parent
    metrics = json.loads((path / "eval.json" if path.is_dir() else path).read_text())["metrics"]
    summaries = [p for p in [run / "train_summary.json", *sorted(run.glob("stages/*/train_summary.json"))]
                 if p.is_file()]
    done = [json.loads(p.read_text()) for p in summaries]
    last = max(summaries, key=lambda p: (p.parent == run, p.stat().st_mtime), default=None)
    return {"metrics": metrics, "minutes": sum(d.get("elapsed", 0) for d in done) / 60,
            "steps": json.loads(last.read_text())["step"] if last else 0}


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    rows: dict[str, list[dict]] = {}
    for arg in argv:
        recipe, path = arg.split("=", 1)
        rows.setdefault(recipe, []).append(record(Path(path)))
    print("| recipe | minutes | steps | " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|---" * (3 + len(COLUMNS)) + "|")
    for recipe, runs in rows.items():
        def joined(get):
            return " / ".join(get(r) for r in runs)
        cells = [f"`{recipe}`", joined(lambda r: f"{r['minutes']:.0f}"), joined(lambda r: f"{r['steps']:,}")]
        cells += [joined(lambda r, k=key: f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "–")
                  for _, key in COLUMNS]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
