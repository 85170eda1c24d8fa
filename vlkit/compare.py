"""``vlkit compare``: the family on one world, side by side — each model's world recipe run with
the same wall-clock budget (or the same step budget), every task it supports evaluated on the same
test records, and a report (``report.md``, ``report.json``, a self-contained ``report.html``
with its figures embedded, and the figures as PNG files) that says which of the family's claims
held on this run.

A model whose ``MODEL-world`` recipe or model class is not shipped yet keeps its column, marked
"not yet"; a task a model cannot do keeps its cell, with the reason. Run folders live in
``OUT/runs/MODEL-sSEED``; a compare stopped part-way continues where it stopped when run again
with the same ``--out`` (finished runs are kept, a stopped stage resumes).
"""
from __future__ import annotations

import base64
import html
import json
import math
import sys
import time
from pathlib import Path

import torch

FAMILY = {  # model -> (name in the report, the design it stands for)
    "clip": ("CLIP", "dual encoder"), "vilt": ("ViLT", "single stream"),
    "albef": ("ALBEF", "align, then fuse"), "vlmo": ("VLMo", "modality experts"),
    "blip": ("BLIP", "encoder-decoder"),
}
FUSION = ("vilt", "albef", "vlmo", "blip")
COLOR = {name: f"C{i}" for i, name in enumerate(FAMILY)}  # one colour per model in every figure
DEFAULT_MINUTES, QUICK_MINUTES = 8.0, 1.0
DEFAULT_EVAL_SIZE, QUICK_EVAL_SIZE = 1000, 200
KINDS = ("attribute_change", "count_change", "attribute_swap", "relation_flip")
# (key in the report's JSON, row label); metric keys are those of ``vlkit eval``
ROWS = [
    ("params", "parameters"), ("samples_per_s", "training samples/s"),
    ("retrieval.t2i_r1", "retrieval t2i R@1"), ("retrieval.i2t_r1", "retrieval i2t R@1"),
    ("zeroshot.top1_seen", "zero-shot top-1, seen"), ("zeroshot.top1_heldout", "zero-shot top-1, held-out"),
    *[(f"itm.{k}_acc", k.replace("_", " ")) for k in KINDS],
    ("itm.compositional_acc", "compositional, all negatives"),
    ("vqa.acc", "VQA"), *[(f"vqa.{t}_acc", f"VQA {t}") for t in ("color", "shape", "count", "exists", "relation")],
    ("caption.correct", "caption correct"), ("caption.cider", "caption CIDEr"),
    ("query_ms", "retrieval cost per text query (ms)"),
    ("query_ms_dual", "the same by embeddings alone, no re-rank (ms)"),
]
WHY = {"retrieval": "no retrieval", "zeroshot": "no text and image embeddings", "itm": "no matching head",
       "vqa": "no VQA head", "caption": "no decoder"}
WHY_OF_MODEL = {("blip", "vqa"): "not trained for VQA (blip-vqa-world is)"}  # where WHY's reason is wrong
TASK_OF = {"retrieval": "retrieval", "zeroshot": "zeroshot", "itm": "itm", "vqa": "vqa", "caption": "caption",
           "query_ms": "retrieval", "query_ms_dual": "zeroshot"}


class CompareError(ValueError):
    """A bad ``vlkit compare`` argument: one line, exit 2."""


# ---- running one model ------------------------------------------------------------------------

def plan(models: list[str]) -> dict[str, str]:
    """model -> "" when it can run, else why not ("not yet: ...")."""
    from .models import list_models
    from .train.recipe import recipe_names
    unknown = [m for m in models if m not in FAMILY]
    if unknown or not models:
        raise CompareError(f"--models: {', '.join(unknown) or 'none given'}; choose from {', '.join(FAMILY)}")
    shipped, recipes = set(list_models()), set(recipe_names())
    return {m: "" if m in shipped and f"{m}-world" in recipes else
            f"not yet: vlkit ships no {m + '-world' if m in shipped else m} yet" for m in models}


def run_model(model: str, seed: int, out: Path, minutes: float | None, steps: int | None,
              eval_size: int, progress: bool, batch_size: int | None = None) -> dict:
    """Train ``MODEL-world`` (resuming a stopped run), then evaluate it: the record of one run."""
    from .train.recipe import RESOLVED, load_recipe, resolve, run_recipe
    run = out / "runs" / f"{model}-s{seed}"
    if (run / RESOLVED).is_file():
        result = run_recipe(None, run, resume=True, progress=progress)
    else:
        recipe = load_recipe(f"{model}-world")
        sets = {f"{s['name']}:steps": steps for s in recipe["stage"]} if steps else {}
        if batch_size:
            sets.update({f"{s['name']}:batch_size": batch_size for s in recipe["stage"]})
        last = recipe["stage"][-1]
        expect = steps or last["steps"] * (minutes / _measured_minutes(recipe) if minutes else 1)
        # about six learning-curve points, three on a budget under 3 minutes (--quick), where the
        # curve's evaluations would otherwise take longer than the training they follow
        points = 3 if minutes and minutes < 3 else 6
        if expect >= 2 * points:
            sets["eval_every"] = round(expect / points)
            sets["eval_size"] = min(eval_size, 300 if points == 6 else 100)
        result = run_recipe(resolve(recipe, seed=seed, sets=sets, minutes=None if steps else minutes), run,
                            progress=progress)
    if result.get("stopped"):
        raise KeyboardInterrupt  # the run kept its checkpoint; the next compare resumes it
    return {"run": str(run), **cached_evaluation(run, eval_size)}


EVAL_VERSION = 2  # what evaluate_run measures; a kept evaluation of another version is redone


def cached_evaluation(run: Path, eval_size: int) -> dict:
    """``evaluate_run``, kept in ``RUN/compare_eval.json`` for the weights it was made from (their
    size and modification time) and the test records evaluated, so a compare run again over
    finished runs (to add a model, a seed, or retrain one) evaluates only what changed."""
    from .checkpoint import WEIGHTS, atomic_write_json
    weights = (run / WEIGHTS).stat()
    key = {"eval_size": eval_size, "weights": [weights.st_size, weights.st_mtime_ns], "version": EVAL_VERSION}
    path = run / "compare_eval.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = {}
        if saved.get("key") == key:
            return saved["record"]
    record = evaluate_run(run, eval_size)
    if record.get("attention"):  # the PIL image under the heat maps, as nested lists of RGB values
        import numpy as np
        record["attention"]["image"] = np.asarray(record["attention"]["image"].convert("RGB")).tolist()
    atomic_write_json(path, {"key": key, "record": record})
    return record


def _measured_minutes(recipe: dict) -> float:
    times = [m.get("minutes") for m in recipe.get("measured", []) if m.get("minutes")]
    return float(times[0]) if times else 15.0


def evaluate_run(run: Path, eval_size: int) -> dict:
    from .data.synthetic import synthetic_world
    from .eval.run import ALL_TASKS, _is_dual, evaluate
    from .pipeline import load
    pipe = load(run)
    model = pipe.model
    world = synthetic_world(model.image_spec()["size"])  # the first records of the fixed test split
    records, singles = world.records("test", eval_size), world.records("test", eval_size, single_object=True)
    tasks = [t for t in ALL_TASKS if t != "classification"]  # what a model cannot do is listed as such
    # a model that scores every pair by a forward pass retrieves among its default (smaller) gallery
    result = evaluate(pipe, "synthetic", "test", tasks, retrieval_size=eval_size if _is_dual(model) else None,
                      records=(records, singles))
    metrics = dict(result["metrics"])
    metrics["params"] = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("momentum."))
    summary = json.loads((run / "train_summary.json").read_text())  # the model's own stage
    metrics["samples_per_s"] = round(summary["samples"] / max(summary["elapsed"], 1e-9), 2)
    if "retrieval" not in result["unsupported"]:
        metrics["query_ms"] = round(query_cost(pipe, records), 2)
    if _is_dual(model):  # the same query by the embeddings alone (VLMo's dual mode)
        metrics["query_ms_dual"] = round(query_cost(pipe, records, rerank=False), 2)
    return {"metrics": metrics, "unsupported": result["unsupported"],
            "retrieval_images": result.get("retrieval_images"), "curve": learning_curve(run),
            "examples": top_captions(pipe, records), "attention": swap_attention(pipe, records)}


@torch.no_grad()
def query_cost(pipe, records, queries: int = 5, rerank: bool = True) -> float:
    """Milliseconds to rank the gallery (the records' images) for one text query, the gallery's
    embeddings made beforehand where the model has them: a dual encoder embeds the text and takes
    a dot product (then, with an ITM head and ``rerank``, re-scores its top 16 through fusion); a
    model without embeddings scores the query against every image through the model."""
    model = pipe.model
    px = torch.cat([pipe.pixels([r["image"] for r in records[i:i + 128]]) for i in range(0, len(records), 128)])
    texts = [r["caption"] for r in records[:queries]]
    dual = hasattr(model, "encode_image") and hasattr(model, "encode_text")
    gallery = model.encode_image(px) if dual else None
    start = time.perf_counter()
    for text in texts:
        tok = pipe.tokens([text])
        ids, mask = tok["input_ids"], tok["attention_mask"]
        if dual:
            sims = model.encode_text(ids, mask) @ gallery.T  # (1, N)
            if rerank and hasattr(model, "match"):
                top = sims[0].topk(min(16, px.shape[0])).indices
                model.match(px[top], ids.expand(len(top), -1), mask.expand(len(top), -1))
        else:
            for i in range(0, px.shape[0], 128):
                n = px[i:i + 128].shape[0]
                model.score(px[i:i + 128], ids.expand(n, -1), mask.expand(n, -1))
    return 1000 * (time.perf_counter() - start) / len(texts)


def learning_curve(run: Path) -> list[dict]:
    """(training seconds of every stage so far, metrics) at each curve point of the last stage."""
    path = run / "curve.jsonl"
    if not path.is_file():
        return []
    before = sum(json.loads(p.read_text())["elapsed"] for p in run.glob("stages/*/train_summary.json"))
    return [{**point, "seconds": before + point.get("elapsed", 0.0)}
            for point in map(json.loads, path.read_text().splitlines())]


@torch.no_grad()
def top_captions(pipe, records, images: int = 3, pool: int = 200) -> list[list[str]]:
    """For the first ``images`` test images, the model's three best captions: generated (beam
    search, three returned) by a model with a decoder, else the three it ranks highest among the
    first ``pool`` test captions."""
    shown, pool_texts = [r["image"] for r in records[:images]], [r["caption"] for r in records[:pool]]
    if hasattr(pipe.model, "generate"):
        try:
            out = pipe.caption(shown, num_beams=3, num_return_sequences=3)
            return [list(out[i * 3:(i + 1) * 3]) if len(out) == 3 * len(shown) else [out[i]] for i in range(len(shown))]
        except (TypeError, ValueError):
            pass
    rows = []
    for image in shown:
        scores = torch.cat([_scores(pipe, image, pool_texts[i:i + 64]) for i in range(0, len(pool_texts), 64)])
        rows.append([pool_texts[i] for i in scores.topk(3).indices.tolist()])
    return rows


def _scores(pipe, image, texts) -> torch.Tensor:
    model = pipe.model
    if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        return (pipe.embed_images([image]) @ pipe.embed_texts(texts).T)[0]
    tok = pipe.tokens(texts)
    px = pipe.pixels([image]).expand(len(texts), -1, -1, -1)
    return model.score(px, tok["input_ids"], tok["attention_mask"]).float()


@torch.no_grad()
def swap_attention(pipe, records) -> dict | None:
    """For the first test record with an attribute swap: the cross-attention over the patches of
    each colour word, under the true caption and under the swap (models with
    ``cross_attention_maps``), as lists for the report's heat maps."""
    from .data.synthetic import COLORS
    model = pipe.model
    if not hasattr(model, "cross_attention_maps"):
        return None
    for r in records:
        swaps = [n["caption"] for n in r.get("negatives") or [] if n["kind"] == "attribute_swap"]
        if not swaps:
            continue
        out = {"image": r["image"], "captions": {}}
        for caption in (r["caption"], swaps[0]):
            tok = pipe.tokens([caption])
            maps = model.cross_attention_maps(pipe.pixels([r["image"]]), tok["input_ids"], tok["attention_mask"])[0]
            words = [pipe.tokenizer.id_to_token(i) for i in tok["input_ids"][0].tolist()]
            side = math.isqrt(maps.shape[-1])
            out["captions"][caption] = {w: maps[i].reshape(side, side).tolist()
                                        for i, w in enumerate(words) if w in COLORS}
        return out
    return None


# ---- the report ---------------------------------------------------------------------------------

def aggregate(runs: list[dict]) -> dict:
    """Per metric over seeds: mean, spread (half the range) and the per-seed values."""
    keys = sorted({k for r in runs for k in r["metrics"]})
    out = {}
    for k in keys:
        values = [r["metrics"][k] for r in runs if k in r["metrics"]]
        mean = sum(values) / len(values)
        out[k] = {"mean": mean, "spread": (max(values) - min(values)) / 2, "values": values}
    return out


def cell(model: dict, key: str, name: str = "") -> str:
    """A table cell: the figure (mean ± spread over seeds), else why there is none."""
    if model.get("skipped"):
        return model["skipped"].split(":")[0]
    figure = model["metrics"].get(key)
    if figure is None:
        task = TASK_OF.get(key.split(".")[0])
        if task not in model.get("unsupported", []):
            return "no data on this split"
        return WHY_OF_MODEL.get((name, task), WHY[task])
    return fmt(key, figure)


def fmt(key: str, figure: dict) -> str:
    mean, spread, n = figure["mean"], figure["spread"], len(figure["values"])
    if key == "params":
        text = f"{mean / 1e6:.2f}M"
    elif key in ("samples_per_s", "query_ms", "query_ms_dual", "caption.cider"):
        text = f"{mean:.1f}" + (f" ± {spread:.1f}" if n > 1 else "")
    else:
        text = f"{mean:.3f}" + (f" ± {spread:.3f}" if n > 1 else "")
    return text


def claims(models: dict) -> list[dict]:
    """Each of the family's claims with what this run measured: held, did not hold (by how
    much), or not judged — a model missing, or, with several seeds, a gap no larger than the
    two figures' spreads over seeds (seed noise decides nothing)."""
    def m(model, key):
        fig = models.get(model, {}).get("metrics", {}).get(key)
        return None if fig is None else fig["mean"]

    def noise(*pairs) -> float:  # the sum of the figures' spreads over seeds (0 with one seed)
        return sum(models[a]["metrics"][b]["spread"] for a, b in pairs)

    out = []

    def claim(text, needed, verdict, gaps=()):
        """``gaps``: (gap, (model, key) pairs it is measured between) — a claim is judged only
        where every gap it rests on stands clear of those figures' seed spread."""
        missing = [n for n in needed if m(n[0], n[1]) is None]
        if missing:
            out.append({"claim": text, "held": None, "detail": "cannot be judged: no figure for " +
                        ", ".join(f"{FAMILY[a][0]} {b}" for a, b in missing)})
            return
        held, detail = verdict()
        for gap, pairs in gaps:
            spread = noise(*pairs)
            if spread > 0 and abs(gap()) <= spread:
                held, detail = None, f"{detail}; within the seeds' spread (±{spread:.3f}), so not judged"
        out.append({"claim": text, "held": held, "detail": detail})

    fusion = [f for f in FUSION if m(f, "itm.attribute_swap_acc") is not None]
    for kind in ("attribute_swap", "relation_flip"):
        key = f"itm.{kind}_acc"
        best = max(fusion, key=lambda f: m(f, key)) if fusion else "vilt"
        claim(f"a dot-product dual encoder (CLIP) is weaker at {kind.replace('_', ' ')}s than the fusion models",
              [("clip", key), (best, key)],
              lambda key=key, best=best: (m("clip", key) < m(best, key),
                                          f"CLIP {m('clip', key):.3f}, best fusion ({FAMILY[best][0]}) "
                                          f"{m(best, key):.3f}: a gap of {m(best, key) - m('clip', key):+.3f}"),
              [(lambda key=key, best=best: m(best, key) - m("clip", key), [("clip", key), (best, key)])])
    key = "itm.compositional_acc"
    claim("aligning before fusing (ALBEF) beats fusing without it (ViLT) at equal budget",
          [("albef", key), ("vilt", key)],
          lambda: (m("albef", key) > m("vilt", key),
                   f"ALBEF {m('albef', key):.3f}, ViLT {m('vilt', key):.3f} ({m('albef', key) - m('vilt', key):+.3f})"),
          [(lambda: m("albef", key) - m("vilt", key), [("albef", key), ("vilt", key)])])
    claim("VLMo in dual mode retrieves as cheaply as CLIP (within 1.2x per query) while its fusion "
          "mode matches like a fusion model (compositional within 0.05 of ALBEF)",
          [("vlmo", "query_ms_dual"), ("clip", "query_ms_dual"), ("vlmo", key), ("albef", key)],
          lambda: (m("vlmo", "query_ms_dual") <= 1.2 * m("clip", "query_ms_dual")
                   and m("vlmo", key) >= m("albef", key) - 0.05,
                   f"dual-mode cost {m('vlmo', 'query_ms_dual') / m('clip', 'query_ms_dual'):.2f}x CLIP's "
                   f"({m('vlmo', 'query_ms') / m('clip', 'query_ms'):.2f}x with its fusion re-rank of the top 16); "
                   f"compositional {m('vlmo', key):.3f} vs ALBEF {m('albef', key):.3f}"),
          [(lambda: m("vlmo", key) - (m("albef", key) - 0.05), [("vlmo", key), ("albef", key)])])
    claim("BLIP adds captioning without losing matching (compositional within 0.05 of ALBEF)",
          [("blip", "caption.correct"), ("blip", key), ("albef", key)],
          lambda: (m("blip", key) >= m("albef", key) - 0.05,
                   f"caption correct {m('blip', 'caption.correct'):.3f}; compositional {m('blip', key):.3f} "
                   f"vs ALBEF {m('albef', key):.3f}"),
          [(lambda: m("blip", key) - (m("albef", key) - 0.05), [("blip", key), ("albef", key)])])
    return out


def figures(models: dict, out: Path) -> dict[str, Path]:
    """The report's PNG figures: accuracy by negative kind, learning curves, top captions,
    attention heat maps for a swap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made, ran = {}, {k: v for k, v in models.items() if not v.get("skipped")}
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(1, len(ran))
    for j, (name, model) in enumerate(ran.items()):
        values = [(model["metrics"].get(f"itm.{k}_acc") or {"mean": 0})["mean"] for k in KINDS]
        ax.bar([i + j * width for i in range(len(KINDS))], values, width, label=FAMILY[name][0], color=COLOR[name])
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xticks([i + width * (len(ran) - 1) / 2 for i in range(len(KINDS))], [k.replace("_", " ") for k in KINDS])
    ax.set_ylim(0, 1.02), ax.set_ylabel("accuracy (true caption beats the negative)"), ax.legend(fontsize=8)
    made["kinds"] = _save(fig, out / "kinds.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, model in ran.items():
        curve = model["runs"][0]["curve"]
        for ax, key in zip(axes, ("itm.compositional_acc", "retrieval.t2i_r1")):
            points = [(p["seconds"] / 60, p[key]) for p in curve if key in p]
            if points:
                ax.plot(*zip(*points), marker="o", label=FAMILY[name][0], color=COLOR[name])
    for ax, title in zip(axes, ("compositional matching", "retrieval t2i R@1 (dual encoders)")):
        ax.set_title(title, fontsize=10), ax.set_xlabel("training minutes (all stages)")
        ax.legend(fontsize=8) if ax.lines else ax.text(0.5, 0.5, "no curve points", ha="center")
    made["curves"] = _save(fig, out / "curves.png")

    first = next(iter(ran.values()), None)
    if first is not None:
        from .data.synthetic import synthetic_world
        images = synthetic_world(64).records("test", 3)
        fig, axes = plt.subplots(2, len(images), figsize=(4.2 * len(images), 6.4),
                                 gridspec_kw={"height_ratios": [1, 1.1]})
        for i, rec in enumerate(images):
            axes[0, i].imshow(rec["image"]), axes[0, i].axis("off")
            lines = [f"{FAMILY[n][0]}:\n" + "\n".join("  " + _short(c) for c in m["runs"][0]["examples"][i])
                     for n, m in ran.items()]
            axes[1, i].axis("off")
            axes[1, i].text(0, 1, "\n".join(lines), va="top", fontsize=6.5, family="monospace")
        made["captions"] = _save(fig, out / "captions.png")

    for name, model in ran.items():
        att = model["runs"][0].get("attention")
        if not att:
            continue
        cols = [(c, w, grid) for c, words in att["captions"].items() for w, grid in words.items()]
        if not cols:
            continue
        fig, axes = plt.subplots(1, len(cols) + 1, figsize=(2.6 * (len(cols) + 1), 2.9))
        axes[0].imshow(att["image"]), axes[0].axis("off"), axes[0].set_title("image", fontsize=8)
        for ax, (caption, word, grid) in zip(axes[1:], cols):
            ax.imshow(grid, cmap="magma"), ax.axis("off")
            ax.set_title(f"'{word}' in\n" + _wrap(caption, 26), fontsize=6.5)
        made[f"attention_{name}"] = _save(fig, out / f"attention_{name}.png")
    return made


def _short(text: str, width: int = 52) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def write_report(models: dict, out: Path, settings: dict) -> dict:
    from .checkpoint import atomic_write_bytes, atomic_write_json
    made = figures(models, out)
    table = [[label] + [cell(models[m], key, m) for m in models] for key, label in ROWS]
    found = claims(models)
    report = {"settings": settings, "models": {m: {k: v for k, v in d.items() if k != "runs"} for m, d in models.items()},
              "runs": {m: [{k: v for k, v in r.items() if k not in ("attention",)} for r in d.get("runs", [])]
                       for m, d in models.items()},
              "rows": [key for key, _ in ROWS], "table": table, "claims": found,
              "figures": {k: v.name for k, v in made.items()}}
    atomic_write_json(out / "report.json", report)
    head = "| | " + " | ".join(f"{FAMILY[m][0]} ({FAMILY[m][1]})" for m in models) + " |"
    lines = [f"# vlkit compare: {', '.join(FAMILY[m][0] for m in models)} on the synthetic world", "",
             _settings_line(settings), "", head, "|---" * (len(models) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    lines += ["", "## The family's claims on this run", ""]
    lines += [f"- **{'held' if c['held'] else 'did not hold' if c['held'] is False else 'not judged'}**: "
              f"{c['claim']}. {c['detail']}." for c in found]
    lines += ["", "## Figures", ""] + [f"![{k}]({p.name})" for k, p in made.items()]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    body = [f"<h1>vlkit compare</h1><p>{html.escape(_settings_line(settings))}</p><table border=1 cellpadding=4>",
            "<tr><th></th>" + "".join(f"<th>{FAMILY[m][0]}<br><small>{FAMILY[m][1]}</small></th>" for m in models)
            + "</tr>"]
    body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table]
    body += ["</table><h2>The family's claims on this run</h2><ul>"]
    body += [f"<li><b>{'held' if c['held'] else 'did not hold' if c['held'] is False else 'not judged'}</b>: "
             f"{html.escape(c['claim'])}. {html.escape(c['detail'])}.</li>" for c in found]
    body += ["</ul><h2>Figures</h2>"] + [
        f'<p><img alt="{k}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"></p>'
        for k, p in made.items()]
    page = "<!doctype html><html><head><meta charset=utf-8><title>vlkit compare</title><style>body{font-family:sans-serif;max-width:1100px}img{max-width:100%}td,th{text-align:left}</style></head><body>" + \
        "".join(body) + "</body></html>"
    atomic_write_bytes(out / "report.html", page.encode())
    return report


def _settings_line(s: dict) -> str:
    budget = f"{s['steps']} steps per stage" if s.get("steps") else f"{s['minutes']} minutes per model"
    if s.get("batch_size"):
        budget += f", batch size {s['batch_size']}"
    return (f"Each model's world recipe with {budget}, seeds {', '.join(map(str, s['seeds']))}; the first "
            f"{s['eval_size']} test records of the synthetic world (retrieval among {s['eval_size']} pairs, or "
            f"{min(100, s['eval_size'])} for a model that scores every pair by a forward pass); "
            f"machine: {s['machine']}.")


def compare(models: list[str], out: str | Path, minutes: float | None = None, steps: int | None = None,
            seeds: int = 1, eval_size: int = DEFAULT_EVAL_SIZE, progress: bool = True,
            batch_size: int | None = None) -> dict:
    if seeds < 1:
        raise CompareError(f"--seeds must be at least 1, got {seeds}")
    if steps is not None and steps < 1:
        raise CompareError(f"--steps must be at least 1, got {steps}")
    if minutes is not None and not minutes > 0:
        raise CompareError(f"--minutes must be above 0, got {minutes}")
    if batch_size is not None and batch_size < 2:
        raise CompareError(f"--batch-size must be at least 2, got {batch_size}")
    if eval_size < 10:
        raise CompareError(f"--eval-size must be at least 10, got {eval_size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out}: not a folder")
    why = plan(models)
    out.mkdir(parents=True, exist_ok=True)
    minutes = None if steps else (minutes or DEFAULT_MINUTES)
    results: dict = {}
    for model in models:
        if why[model]:
            results[model] = {"skipped": why[model], "metrics": {}, "unsupported": []}
            print(f"compare: {model}: {why[model]}", file=sys.stderr)
            continue
        runs = []
        for seed in range(seeds):
            print(f"compare: {model} seed {seed}", file=sys.stderr)
            runs.append(run_model(model, seed, out, minutes, steps, eval_size, progress, batch_size))
        results[model] = {"metrics": aggregate(runs), "unsupported": runs[0]["unsupported"],
                          "retrieval_images": runs[0]["retrieval_images"], "runs": runs}
    settings = {"models": models, "minutes": minutes, "steps": steps, "batch_size": batch_size,
                "seeds": list(range(seeds)),
                "eval_size": eval_size, "machine": _machine()}
    return write_report(results, out, settings)


def _machine() -> str:
    import os
    flags = ""
    if Path("/proc/cpuinfo").is_file():
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    simd = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "CPU"
    return f"{os.cpu_count()} cores, {simd}" + (", CUDA" if torch.cuda.is_available() else "")


__all__ = ["compare", "CompareError", "FAMILY", "ROWS"]
