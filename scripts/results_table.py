r"""Record recipe runs and render the README's headline table from the records, so its figures
are copied by a script, never typed.

    python scripts/results_table.py record RUN [RUN ...]   # writes docs/runs/RECIPE-sSEED.json
    python scripts/results_table.py                        # prints the headline table

``record`` reads a recipe run folder: its resolved ``recipe.toml`` (name, seed), the steps of each
stage (``train_summary.json``), ``eval.json`` and, when present, ``eval-1000-pairs.json`` (the
1,000-pair retrieval protocol; its metrics are kept as ``retrieval_1000.*`` and
``retrieval_1000_itc.*``), and notes the
machine's CPU (AVX-512 or AVX2) and the precision the run trained in. The table puts the runs of
one recipe (seeds) in one row, their figures joined by " / ", in seed order.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "runs"
# (recipe, the model as the table names it) in table order; recipes without records are left out
RECIPES = [("clip-world", "CLIP"), ("vilt-world", "ViLT"), ("albef-world", "ALBEF"),
           ("vlmo-world", "VLMo"), ("blip-world", "BLIP")]
COLUMNS = [("attribute swaps", "itm.attribute_swap_acc"), ("relation flips", "itm.relation_flip_acc"),
           ("all negatives", "itm.compositional_acc"), ("zero-shot", "zeroshot.top1"),
           ("t2i R@1, 1,000 pairs", "retrieval_1000.t2i_r1")]


def machine() -> str:
    """The CPU as the records name it: its vector extensions, cores and model."""
    flags, model = "", platform.processor()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = value
            if key.strip() == "model name":
                model = value.strip()
    simd = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    if " avx512_bf16" in flags:
        simd += "-bf16"
    return f"{simd} ({os.cpu_count()}-core {model})"


def record(run: Path) -> dict:
    recipe = tomllib.loads((run / "recipe.toml").read_text())
    steps, precision = [], set()
    for stage in recipe["stage"]:
        folder = run if stage is recipe["stage"][-1] else run / "stages" / stage["name"]
        steps.append([stage["name"], json.loads((folder / "train_summary.json").read_text())["step"]])
        precision.add(json.loads((folder / "config.json").read_text()).get("train", {}).get("precision", "auto"))
    seeds = {stage.get("seed", 0) for stage in recipe["stage"]}
    metrics = json.loads((run / "eval.json").read_text())["metrics"]
    pairs = run / "eval-1000-pairs.json"
    if pairs.is_file():
        # retrieval.* -> retrieval_1000.*, retrieval_itc.* -> retrieval_1000_itc.* (dual-mode
        # figures of a model that also re-ranks), so neither overwrites the whole-split figures
        metrics |= {k.replace("retrieval", "retrieval_1000", 1): v
                    for k, v in json.loads(pairs.read_text())["metrics"].items()}
    cpu = machine()
    auto = "bf16 autocast" if cpu.startswith("AVX-512-bf16") else "fp32"  # what --precision auto picks
    return {"recipe": recipe["name"], "seed": max(seeds), "machine": cpu,
            "precision": "/".join(sorted(auto if p == "auto" else p for p in precision)), "steps": steps,
            "metrics": metrics}


def table(records: list[dict]) -> str:
    lines = ["| recipe | model | seeds | steps | " + " | ".join(n for n, _ in COLUMNS) + " |",
             "|---" * (4 + len(COLUMNS)) + "|"]
    for name, model in RECIPES:
        runs = sorted((r for r in records if r["recipe"] == name), key=lambda r: r["seed"])
        if not runs:
            continue
        steps = {" → ".join(f"{k} {v:,}" for k, v in r["steps"]) for r in runs}
        cells = [f"`{name}`", model, " / ".join(str(r["seed"]) for r in runs), " / ".join(sorted(steps))]
        cells += [" / ".join(f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "–" for r in runs)
                  for _, k in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_records(folder: Path = RECORDS) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def main(argv: list[str]) -> int:
    if argv[:1] == ["record"] and len(argv) > 1:
        RECORDS.mkdir(parents=True, exist_ok=True)
        for run in argv[1:]:
            rec = record(Path(run))
            out = RECORDS / f"{rec['recipe']}-s{rec['seed']}.json"
            out.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
            print(f"{run} -> {out.relative_to(ROOT)}")
        return 0
    if argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print(table(load_records()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
