"""Recipes: the shipped files are valid, overrides land where they should, stages chain, and a
multi-stage run killed in its second stage resumes to the same weights as an uninterrupted one."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vlkit.models import model_class
from vlkit.models.base import merge_config
from vlkit.train import loop
from vlkit.train.recipe import (RESOLVED, RecipeError, check_recipe, dump_toml, load_recipe, recipe_names,
                                resolve, run_recipe, stage_shares, tomllib)

SHIPPED = ["albef-world", "blip-world", "clip-world", "vilt-vqa-world", "vilt-world", "vit-world", "vlmo-world"]


def test_the_named_recipes_ship_with_the_package():
    assert set(SHIPPED) <= set(recipe_names())


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_recipe_names_real_models_options_and_config_fields(name):
    recipe = load_recipe(name)
    assert recipe["name"] == name and recipe["summary"]
    for stage in recipe["stage"]:
        assert isinstance(stage["steps"], int) and stage["steps"] > 0  # a budget in steps, not minutes
        cls = model_class(stage["model"])
        config = {k: v for k, v in stage.get("config", {}).items() if k not in ("vision_init", "text_init")}
        merge_config(cls.make_config(stage.get("preset", "tiny")), config, cls.model_name)  # unknown fields raise
    assert recipe["measured"], "a shipped recipe records what it reached"
    assert tomllib.loads(dump_toml(recipe)) == recipe


def test_overrides_reach_the_stage_they_name():
    recipe = load_recipe("albef-world")
    out = resolve(recipe, seed=3, sets={"edit_weight": 0, "vit:lr": 2e-3, "vit:heads": 4, "batch_size": 32},
                  flags={"lr": 5e-4, "steps": 10})
    vit, albef = out["stage"]
    assert vit["seed"] == albef["seed"] == 3
    assert albef["config"]["edit_weight"] == 0 and albef["lr"] == 5e-4 and albef["steps"] == 10
    assert albef["batch_size"] == 32            # a run option by --set
    assert vit["lr"] == 2e-3 and vit["config"]["heads"] == 4
    assert recipe["stage"][1]["lr"] == 1e-3     # the loaded recipe is left as it was
    with pytest.raises(RecipeError, match="no stage 'clip'"):
        resolve(recipe, sets={"clip:lr": 1.0})
    with pytest.raises(ValueError, match="--set lr: expected float"):
        resolve(recipe, sets={"lr": "fast"})
    with pytest.raises(RecipeError, match="lr: expected float"):
        resolve(recipe, flags={"lr": "fast"})
    assert resolve(recipe, sets={"vit:steps": "7"})["stage"][0]["steps"] == 7  # --set gives text
    with pytest.raises(RecipeError, match="unknown run option 'learning_rate'"):
        resolve(recipe, flags={"learning_rate": 1.0})


def test_minutes_are_shared_among_the_stages_as_they_were_measured():
    recipe = load_recipe("albef-world")
    assert stage_shares(recipe) == pytest.approx({"vit": 0.2, "albef": 0.8})
    out = resolve(recipe, minutes=30)
    assert [s.get("steps") for s in out["stage"]] == [None, None]
    assert [s["minutes"] for s in out["stage"]] == pytest.approx([6.0, 24.0])
    with pytest.raises(RecipeError, match="minutes must be > 0"):
        resolve(recipe, minutes=-1)
    # without a measurement that times every stage: the recipe's time_shares, else the steps
    blip = load_recipe("blip-world")
    timed = next(m["stage_minutes"] for m in blip["measured"] if "stage_minutes" in m)
    assert stage_shares(blip) == pytest.approx({k: v / sum(timed.values()) for k, v in timed.items()})
    for entry in blip["measured"]:
        entry.pop("stage_minutes", None)
    assert stage_shares(blip) == pytest.approx({"vit": 0.34, "blip": 0.66})
    del blip["time_shares"]
    assert stage_shares(blip) == pytest.approx({"vit": 1500 / 2100, "blip": 600 / 2100})


@pytest.mark.parametrize("text, message", [
    ("recipe = 1\ntime_shares = { a = 1.0 }\n[[stage]]\nname='b'\nmodel='vit'\nsteps=1\n", "time_shares must give every stage"),
    ("recipe = 1\n", "no \\[\\[stage\\]\\]"),
    ("recipe = 2\n[[stage]]\nname='a'\nmodel='vit'\nsteps=1\n", "format version"),
    ("recipe = 1\nstages = 1\n", "unknown key\\(s\\) stages"),
    ("recipe = 1\n[[stage]]\nname='a'\nmodel='vit'\n", "'steps'"),
    ("recipe = 1\n[[stage]]\nname='a'\nmodel='vit'\nsteps=1\nwidth=3\n", "unknown run option 'width'"),
    ("recipe = 1\n[[stage]]\nname='a'\nmodel='clip'\nsteps=1\n[stage.config]\nvision_init='stage:b'\n",
     "names no earlier stage"),
    ("recipe = 1\n[[stage]]\nname='a'\nmodel='vit'\nsteps=1\n[[stage]]\nname='a'\nmodel='vit'\nsteps=1\n",
     "unique"),
])
def test_a_bad_recipe_is_refused_naming_the_key(text, message):
    with pytest.raises(RecipeError, match=message):
        check_recipe(tomllib.loads(text), "r.toml")


TINY = """
recipe = 1
name = "tiny-chain"
summary = "a ViT stage, then CLIP from its tower"

[[stage]]
name = "vit"
model = "vit"
steps = 3
batch_size = 8
ckpt_every = 2
[stage.config]
dim = 32
mlp_dim = 64

[[stage]]
name = "clip"
model = "clip"
steps = 5
batch_size = 8
ckpt_every = 2
[stage.config]
vision_init = "stage:vit"
"text.depth" = 1
"text.dim" = 32
"text.heads" = 2
"text.mlp_dim" = 64
embed_dim = 16
"""


def _tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return resolve(load_recipe(str(path)))


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stages_chain_and_a_run_killed_in_its_second_stage_resumes_bit_identical(tmp_path, monkeypatch):
    recipe = _tiny(tmp_path)
    full = tmp_path / "full"
    result = run_recipe(recipe, full, progress=False)
    assert [s["stage"] for s in result["stages"]] == ["vit", "clip"] and result["step"] == 5
    assert json.loads((full / "stages" / "vit" / "config.json").read_text())["model"] == "vit"
    assert json.loads((full / "config.json").read_text())["model"] == "clip"
    assert tomllib.loads((full / RESOLVED).read_text()) == recipe
    vit = load_file(str(full / "stages" / "vit" / "model.safetensors"))
    clip = load_file(str(full / "model.safetensors"))
    assert vit["head.weight"].shape[1] == 32  # the stage's config table reached the ViT
    tower = {k for k in vit if k.startswith("vision.")}
    assert tower and all(clip[k].shape == vit[k].shape for k in tower)  # CLIP's tower from the ViT stage

    _kill_in_second_stage_and_resume(recipe, tmp_path, monkeypatch, full)


def _kill_in_second_stage_and_resume(recipe, tmp_path, monkeypatch, full):
    """Run ``recipe`` killed at step 4 of its second stage, resume it, and check it ends where
    the uninterrupted run ``full`` did, its first stage not trained again."""
    first = recipe["stage"][0]["name"]

    class Crash(Exception):
        pass
    real = loop.Trainer._micro_step

    def crash_in_step_4_of_stage_2(self, batch, sync):
        if self.run == tmp_path / "killed" and self.step == 3:
            raise Crash
        return real(self, batch, sync)
    monkeypatch.setattr(loop.Trainer, "_micro_step", crash_in_step_4_of_stage_2)
    killed = tmp_path / "killed"
    with pytest.raises(Crash):
        run_recipe(recipe, killed, progress=False)
    first_metrics = (killed / "stages" / first / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(loop.Trainer, "_micro_step", real)
    torch.manual_seed(999)  # a new process: other RNG state, which the checkpoint restores
    result = run_recipe(None, killed, resume=True, progress=False)
    assert [s["status"] for s in result["stages"]] == ["kept", "resumed"]
    assert (killed / "stages" / first / "metrics.jsonl").read_bytes() == first_metrics  # not trained again
    assert _losses(killed) == _losses(full)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stage_that_starts_from_another_stages_weights_resumes(tmp_path, monkeypatch):
    """A stage with ``init = "stage:NAME"`` killed after a checkpoint resumes from its own
    checkpoint (the init was applied when it started)."""
    text = TINY.replace('name = "vit"\nmodel = "vit"', 'name = "first"\nmodel = "clip"')
    text = text.replace('[stage.config]\ndim = 32\nmlp_dim = 64\n', '[stage.config]\n"vision.dim" = 32\n"vision.heads" = 2\n'
                        '"vision.mlp_dim" = 64\n"text.depth" = 1\n"text.dim" = 32\n"text.heads" = 2\n'
                        '"text.mlp_dim" = 64\nembed_dim = 16\n')
    text = text[:text.index('[stage.config]\nvision_init')] + 'init = "stage:first"\n'
    path = tmp_path / "chain.toml"
    path.write_text(text)
    recipe = resolve(load_recipe(str(path)))
    assert recipe["stage"][1]["init"] == "stage:first"
    full = tmp_path / "full"
    run_recipe(recipe, full, progress=False)
    _kill_in_second_stage_and_resume(recipe, tmp_path, monkeypatch, full)


def _vlkit(*args):
    """``vlkit ARGS`` run in this process (the command's own code path, without a fresh
    interpreter's start-up): its exit code and what it printed."""
    import contextlib
    import io
    from vlkit import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_recipe_commands(tmp_path):
    listing = _vlkit("recipes")
    assert listing.returncode == 0
    assert all(name in listing.stdout for name in SHIPPED)
    shown = _vlkit("recipes", "show", "albef-world")
    assert shown.returncode == 0 and shown.stdout == load_recipe.__globals__["recipe_path"]("albef-world").read_text()
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    first = _vlkit("train", "--recipe", str(tmp_path / "tiny.toml"), "--out", str(out), "--no-eval",
                   "--no-progress", "--set", "vit:steps=2", "--steps", "2")
    assert first.returncode == 0, first.stderr
    assert "stage 1/2 vit" in first.stderr and "stage 2/2 clip" in first.stderr
    saved = tomllib.loads((out / RESOLVED).read_text())
    assert [s["steps"] for s in saved["stage"]] == [2, 2]
    again = _vlkit("train", "--recipe", str(tmp_path / "tiny.toml"), "--out", str(out), "--no-eval")
    assert again.returncode == 2 and "already holds a recipe run" in again.stderr
    other = _vlkit("train", "--recipe", str(tmp_path / "tiny.toml"), "--out", str(out), "--resume", "--seed", "4")
    assert other.returncode == 2 and "seed" in other.stderr and len(other.stderr.strip().splitlines()) == 1
    done = _vlkit("train", "--resume", "--out", str(out), "--no-eval")
    assert done.returncode == 0 and "finished before, kept" in done.stderr
    single = _vlkit("train", "--resume", "--out", str(out / "stages" / "vit"), "--no-eval")  # not a recipe run
    assert single.returncode == 0 and "training vit" in single.stderr and "resumed from step 2" in single.stderr
    both = _vlkit("train", "clip", "--recipe", "clip-world", "--out", str(tmp_path / "x"))
    assert both.returncode == 2 and "not both" in both.stderr
    missing = _vlkit("train", "--recipe", "no-such-recipe", "--out", str(tmp_path / "y"))
    assert missing.returncode == 2 and "no such recipe" in missing.stderr and not (tmp_path / "y").exists()


def test_a_recipe_runs_under_torchrun(tmp_path):
    """Every rank runs the stages; rank 0 alone checks, locks and writes the run folder."""
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vlkit",
                          "train", "--recipe", str(tmp_path / "tiny.toml"), "--out", str(out), "--no-eval",
                          "--no-progress", "--set", "vit:steps=2", "--steps", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "over 2 processes" in res.stderr
    assert tomllib.loads((out / RESOLVED).read_text())["stage"][1]["steps"] == 2
    assert json.loads((out / "train_summary.json").read_text())["step"] == 2
    assert (out / "stages" / "vit" / "model.safetensors").is_file()
