"""`vlkit compare` on two models with a few steps each: the report's every cell is a figure or a
reason, its JSON holds the figures the table shows, every figure file is there, the HTML embeds
them, a second compare into the same folder keeps the finished runs, and bad arguments are one
line and exit 2."""
from __future__ import annotations

import json
import re

import pytest

from vlkit import cli
from vlkit.compare import FAMILY, ROWS, WHY, WHY_OF_MODEL, CompareError, aggregate, cell, claims, fmt, plan


def test_compare_two_models_writes_a_full_report(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--steps", "2", "--batch-size", "8", "--eval-size", "20", "--out", str(out), "--no-progress"]
    assert cli.main(args + ["--models", "clip"]) == 0
    clip_summary = out / "runs" / "clip-s0" / "train_summary.json"
    clip_eval = out / "runs" / "clip-s0" / "compare_eval.json"
    before, eval_before = clip_summary.stat().st_mtime_ns, clip_eval.stat().st_mtime_ns
    assert cli.main(args + ["--models", "clip,vilt"]) == 0
    assert clip_summary.stat().st_mtime_ns == before, "the finished CLIP run was trained again"
    assert clip_eval.stat().st_mtime_ns == eval_before, "the finished CLIP run was evaluated again"
    assert "report.html" in capsys.readouterr().out

    report = json.loads((out / "report.json").read_text())
    models = report["settings"]["models"]
    assert models == ["clip", "vilt"] and report["rows"] == [k for k, _ in ROWS]
    assert json.loads((out / "runs" / "vilt-s0" / "config.json").read_text())["train"]["batch_size"] == 8
    reasons = set(WHY.values()) | set(WHY_OF_MODEL.values()) | {"no data on this split"}
    for r, key in enumerate(report["rows"]):
        row = report["table"][r]
        assert row[0] == dict(ROWS)[key] and len(row) == 1 + len(models)
        for m, text in zip(models, row[1:]):
            assert text, f"empty cell {key} / {m}"
            figure = report["models"][m]["metrics"].get(key)
            if figure is None:
                assert text in reasons, f"{key} / {m}: {text!r} is neither a figure nor a reason"
            else:  # the table shows the JSON's figure
                assert text == fmt(key, figure) and figure["values"] and figure["mean"] == figure["values"][0]
    cells = {(key, m): report["table"][r][1 + i] for r, key in enumerate(report["rows"]) for i, m in enumerate(models)}
    assert cells[("zeroshot.top1_seen", "vilt")] == WHY["zeroshot"]  # a single stream has no embeddings
    assert cells[("caption.correct", "clip")] == WHY["caption"]
    assert cells[("query_ms_dual", "vilt")] == WHY["zeroshot"]  # no embeddings: every pair through the model
    assert report["models"]["clip"]["metrics"]["query_ms_dual"]["mean"] > 0
    assert re.fullmatch(r"0\.\d{3}", cells[("itm.attribute_swap_acc", "vilt")])
    assert report["models"]["clip"]["metrics"]["params"]["mean"] > 1e5

    assert set(report["figures"]) >= {"kinds", "curves", "captions"}
    page = (out / "report.html").read_text()
    for name in report["figures"].values():
        assert (out / name).stat().st_size > 1000, name
    assert page.count("data:image/png;base64,") == len(report["figures"])
    md = (out / "report.md").read_text()
    assert all(f"![{k}]({v})" in md for k, v in report["figures"].items())
    assert len(report["claims"]) == 5 and all(c["held"] in (True, False, None) for c in report["claims"])
    assert [c["held"] for c in report["claims"]][2:] == [None, None, None]  # ALBEF, VLMo, BLIP did not run
    assert all(len(run["examples"]) == 3 for run in report["runs"]["vilt"])


def test_a_model_without_a_world_recipe_is_marked_not_yet(monkeypatch):
    import vlkit.train.recipe as recipe
    monkeypatch.setattr(recipe, "recipe_names", lambda: ["clip-world"])
    why = plan(["clip", "vilt"])
    assert why["clip"] == "" and why["vilt"].startswith("not yet")
    with pytest.raises(CompareError, match="--models: nope"):
        plan(["clip", "nope"])
    assert set(FAMILY) == {"clip", "vilt", "albef", "vlmo", "blip"}


def test_an_evaluation_is_kept_for_the_weights_it_was_made_from(tmp_path, monkeypatch):
    import os
    from PIL import Image
    import vlkit.compare as compare
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    calls = []

    def fake_evaluate(path, eval_size):
        calls.append(eval_size)
        return {"metrics": {"itm.compositional_acc": 0.5 + len(calls) / 10}, "unsupported": [],
                "attention": {"image": Image.new("RGB", (2, 2), (255, 0, 0)), "captions": {}}}

    monkeypatch.setattr(compare, "evaluate_run", fake_evaluate)
    first = compare.cached_evaluation(run, 20)
    assert first["attention"]["image"][0][0] == [255, 0, 0]  # the image kept as RGB values
    assert compare.cached_evaluation(run, 20) == first and calls == [20]
    compare.cached_evaluation(run, 30)  # other test records: evaluated again
    assert calls == [20, 30]
    stat = (run / "model.safetensors").stat()
    os.utime(run / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # retrained
    assert compare.cached_evaluation(run, 30)["metrics"]["itm.compositional_acc"] == 0.8 and len(calls) == 3


def test_a_missing_cell_names_the_models_own_reason():
    pretrained_blip = {"metrics": {}, "unsupported": ["vqa"]}
    assert cell(pretrained_blip, "vqa.acc", "blip") == "not trained for VQA (blip-vqa-world is)"
    assert cell(pretrained_blip, "vqa.acc", "clip") == WHY["vqa"]
    assert cell({"metrics": {}, "unsupported": []}, "vqa.acc", "blip") == "no data on this split"


def test_a_model_keeps_its_colour_in_every_figure(tmp_path, monkeypatch):
    import vlkit.compare as compare
    shown = {}
    monkeypatch.setattr(compare, "_save", lambda fig, path: shown.setdefault(path.stem, fig) and path)
    curve = [{"seconds": 60.0 * i, "itm.compositional_acc": 0.5, "retrieval.t2i_r1": 0.1} for i in (1, 2)]
    run = {"curve": curve, "examples": [["a caption"]] * 3, "attention": None}
    models = {name: {"metrics": {}, "runs": [run]} for name in ("albef", "blip")}  # no CLIP, no ViLT
    compare.figures(models, tmp_path)
    colours = [{line.get_label(): line.get_color() for line in ax.lines} for ax in shown["curves"].axes]
    assert colours[0] == colours[1] == {"ALBEF": "C2", "BLIP": "C4"}  # the same colours as in a full report
    bars = {patch.get_label(): patch.patches[0].get_facecolor() for patch in shown["kinds"].axes[0].containers}
    assert set(bars) == {"ALBEF", "BLIP"} and bars["ALBEF"] != bars["BLIP"]


def _models(**per_model):
    """Report inputs from per-seed metric values: model -> {key: [value per seed]}."""
    out = {}
    for model, figures in per_model.items():
        seeds = len(next(iter(figures.values())))
        out[model] = {"metrics": aggregate([{"metrics": {k: v[i] for k, v in figures.items()}}
                                            for i in range(seeds)])}
    return out


def test_a_claim_within_the_seeds_spread_is_not_judged():
    key = "itm.compositional_acc"
    # ALBEF ahead of ViLT by 0.02 while each moves by 0.04 between seeds: not judged
    noisy = claims(_models(albef={key: [0.90, 0.98]}, vilt={key: [0.88, 0.96]}))
    assert noisy[2]["held"] is None and "within the seeds' spread" in noisy[2]["detail"]
    # the same means with seeds that agree: judged (and held)
    clear = claims(_models(albef={key: [0.94, 0.94]}, vilt={key: [0.92, 0.92]}))
    assert clear[2]["held"] is True and "spread" not in clear[2]["detail"]
    # one seed: no spread is measured, the claim is judged on the figures
    single = claims(_models(albef={key: [0.80]}, vilt={key: [0.85]}))
    assert single[2]["held"] is False and "-0.050" in single[2]["detail"]


@pytest.mark.parametrize("extra, message", [
    (["--models", "clip,nope"], "--models: nope"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--minutes", "-2"], "--minutes must be above 0"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, extra, message):
    assert cli.main(["compare", "--out", str(tmp_path / "c"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists()
