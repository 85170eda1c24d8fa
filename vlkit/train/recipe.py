"""Recipes: named, commented training configs that ``vlkit train --recipe`` runs.

A recipe is a TOML file (the named ones ship in ``vlkit/recipes/``) holding one or more
**stages**, each one ``vlkit train`` run: the model, preset, data, a budget in **steps** (the
same model on any machine) and any other run option, plus a ``[stage.config]`` table of model
config fields (what ``--set`` sets). A config value ``"stage:NAME"`` names the run folder of an
earlier stage, e.g. ``vision_init = "stage:vit"``. Stage runs live in ``RUN/stages/NAME/``; the
last stage's run is ``RUN`` itself, so ``vlkit eval RUN`` evaluates the recipe's model.
``[[measured]]`` entries record what the recipe reached and how long it took on a machine.

The recipe as run (after ``--seed``, ``--set``, flags and ``--minutes``) is written to
``RUN/recipe.toml`` before the first stage starts: ``vlkit train --recipe RUN/recipe.toml``
repeats the run, and ``--resume`` continues it in the stage where it stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..checkpoint import WEIGHTS, atomic_write_bytes, latest_checkpoint
from ..models.base import _type_hints, coerce_value
from .run import RunArgs
from .runfolder import LOCK, RECIPE_FILES, check_output_path, remove_if_untouched, run_lock

SCHEMA = 1
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
RESOLVED, STAGES = RECIPE_FILES
STAGE_REF = "stage:"
SUMMARY = "train_summary.json"
# run options a stage may set (the rest of RunArgs is the command's own business)
RUN_OPTIONS = {f.name: f for f in dataclasses.fields(RunArgs)} 
for _name in ("model", "out", "resume", "overrides", "progress", "minutes"):
    RUN_OPTIONS.pop(_name)
RUN_HINTS = _type_hints(RunArgs)
TOP_KEYS = {"recipe", "name", "summary", "stage", "measured", "time_shares"}
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class RecipeError(ValueError):
    pass


# ---- finding and reading ------------------------------------------------------------------

def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def recipe_path(name_or_file: str) -> Path:
    """A recipe shipped with vlkit by name (``albef-world``), else a file path."""
    if NAME.match(name_or_file) and (RECIPE_DIR / f"{name_or_file}.toml").is_file():
        return RECIPE_DIR / f"{name_or_file}.toml"
    path = Path(name_or_file)
    if path.is_dir() and (path / RESOLVED).is_file():  # a run folder: the recipe it ran
        path = path / RESOLVED
    if not path.is_file():
        raise RecipeError(f"--recipe {name_or_file}: no such recipe or file "
                          f"(recipes: {', '.join(recipe_names())})")
    return path


def load_recipe(name_or_file: str) -> dict:
    path = recipe_path(name_or_file)
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not a valid TOML file ({e})") from None
    check_recipe(recipe, str(path))
    return recipe


def check_recipe(recipe: dict, where: str) -> None:
    """Every key known and of the right type, names unique, stage references backwards."""
    unknown = sorted(set(recipe) - TOP_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    if recipe.get("recipe") != SCHEMA:
        raise RecipeError(f"{where}: 'recipe = {SCHEMA}' (the format version) is missing or not {SCHEMA}")
    stages = recipe.get("stage")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{where}: no [[stage]] tables")
    seen: list[str] = []
    for i, stage in enumerate(stages):
        label = f"{where}: stage {i + 1}"
        name = stage.get("name")
        if not isinstance(name, str) or not NAME.match(name) or name in seen:
            raise RecipeError(f"{label}: 'name' must be a unique identifier (letters, digits, - and _), got {name!r}")
        label = f"{where}: stage {name!r}"
        if not isinstance(stage.get("model"), str):
            raise RecipeError(f"{label}: 'model' (a model name) is missing")
        for key, value in stage.items():
            if key in ("name", "model"):
                continue
            if key == "config":
                if not isinstance(value, dict):
                    raise RecipeError(f"{label}: 'config' must be a table of model config fields")
                continue
            check_run_option(key, value, label)
        if stage.get("minutes") is None and not isinstance(stage.get("steps"), int):
            raise RecipeError(f"{label}: 'steps' (the stage's budget in optimiser steps) is missing")
        for key, value in list(stage.get("config", {}).items()) + [("init", stage.get("init"))]:
            if isinstance(value, str) and value.startswith(STAGE_REF) and value[len(STAGE_REF):] not in seen:
                raise RecipeError(f"{label}: {key} = {value!r} names no earlier stage "
                                  f"(earlier: {', '.join(seen) or 'none'})")
        seen.append(name)
    for entry in recipe.get("measured", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("machine"), str):
            raise RecipeError(f"{where}: each [[measured]] entry needs a 'machine'")
    shares = recipe.get("time_shares")
    if shares is not None:
        bad = not isinstance(shares, dict) or set(shares) != set(seen) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in shares.values())
        if bad:
            raise RecipeError(f"{where}: time_shares must give every stage ({', '.join(seen)}) a number > 0, "
                              f"got {shares!r}")


def check_run_option(key: str, value, label: str) -> None:
    if key == "minutes":  # only in a resolved recipe (--minutes)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not ok:
            raise RecipeError(f"{label}: minutes must be a number > 0, got {value!r}")
        return
    if key not in RUN_OPTIONS:
        raise RecipeError(f"{label}: unknown run option {key!r} (model config fields go in [stage.config]; "
                          f"run options: {', '.join(sorted(RUN_OPTIONS))})")
    try:
        coerce_value(value, RUN_HINTS[key], f"{label}: {key}", strict=True)
    except ValueError as e:
        raise RecipeError(str(e)) from None


# ---- overrides ----------------------------------------------------------------------------

def resolve(recipe: dict, seed: int | None = None, sets: dict | None = None, flags: dict | None = None,
            minutes: float | None = None) -> dict:
    """The recipe as it will run. ``seed``: every stage's seed. ``sets``: ``KEY`` or
    ``STAGE:KEY`` -> value, a run option where KEY names one, else a model config field (the
    last stage unless a stage is named). ``flags``: run options given on the command line, for
    the last stage. ``minutes``: a time budget for the whole recipe, shared among the stages in
    proportion to their measured times (else to their steps), replacing their step budgets."""
    out = copy.deepcopy(recipe)
    stages = out["stage"]
    by_name = {s["name"]: s for s in stages}
    if seed is not None:
        for stage in stages:
            stage["seed"] = seed
    for key, value in (flags or {}).items():
        check_run_option(key, value, "command line")
        stages[-1][key] = value
    for key, value in (sets or {}).items():
        target = stages[-1]
        if ":" in key:
            name, key = key.split(":", 1)
            if name not in by_name:
                raise RecipeError(f"--set {name}:{key}: the recipe has no stage {name!r} "
                                  f"(stages: {', '.join(by_name)})")
            target = by_name[name]
        if key in RUN_OPTIONS:
            if isinstance(value, str) and key not in ("data", "preset", "init", "precision", "on_bad_sample"):
                value = coerce_value(value, RUN_HINTS[key], f"--set {key}")  # --set gives text
            check_run_option(key, value, f"--set {key}")
            target[key] = value
        else:
            target.setdefault("config", {})[key] = value
    if minutes is not None:
        if not minutes > 0:
            raise RecipeError(f"--minutes must be > 0, got {minutes}")
        shares = stage_shares(out)
        for stage in stages:
            stage.pop("steps", None)
            stage["minutes"] = round(minutes * shares[stage["name"]], 4)
    check_recipe(out, "the resolved recipe")
    return out


def stage_shares(recipe: dict) -> dict[str, float]:
    """Each stage's share of the recipe's time: from the first measurement that times every
    stage, else from the recipe's ``time_shares`` (its stages' steps times their per-step cost),
    else from the step budgets."""
    names = [s["name"] for s in recipe["stage"]]
    for entry in recipe.get("measured", []):
        times = entry.get("stage_minutes") or {}
        if all(isinstance(times.get(n), (int, float)) and times[n] > 0 for n in names):
            total = sum(times[n] for n in names)
            return {n: times[n] / total for n in names}
    if recipe.get("time_shares"):
        total = sum(recipe["time_shares"].values())
        return {n: recipe["time_shares"][n] / total for n in names}
    steps = {s["name"]: s.get("steps") or 0 for s in recipe["stage"]}
    total = sum(steps.values()) or len(names)
    return {n: (steps[n] or 1) / total for n in names}


# ---- running ------------------------------------------------------------------------------

def stage_dir(out: Path, recipe: dict, name: str) -> Path:
    return out if name == recipe["stage"][-1]["name"] else out / STAGES / name


def stage_finished(run: Path) -> bool:
    """The stage's run ended at its budget (not stopped by a signal) and exported its weights."""
    try:
        summary = json.loads((run / SUMMARY).read_text())
    except (OSError, ValueError):
        return False
    return not summary.get("stopped") and (run / WEIGHTS).is_file()


def stage_args(recipe: dict, stage: dict, out: Path, progress: bool = True) -> RunArgs:
    def ref(value):
        if isinstance(value, str) and value.startswith(STAGE_REF):
            return str(stage_dir(out, recipe, value[len(STAGE_REF):]))
        return value
    options = {k: ref(v) for k, v in stage.items() if k not in ("name", "config")}
    overrides = {k: ref(v) for k, v in stage.get("config", {}).items()}
    return RunArgs(out=str(stage_dir(out, recipe, stage["name"])), overrides=overrides,
                   progress=progress, **options)


def dump_toml(recipe: dict) -> str:
    """TOML text of a recipe (tables of scalars, lists and tables, arrays of tables)."""
    lines = ["# the recipe as run; repeat it with: vlkit train --recipe THIS_FILE --out RUN"]
    scalars = {k: v for k, v in recipe.items() if not isinstance(v, list) or not v or not isinstance(v[0], dict)}
    lines += [f"{_key(k)} = {_value(v)}" for k, v in scalars.items()]
    for key, entries in recipe.items():
        if key in scalars:
            continue
        for entry in entries:
            lines += ["", f"[[{key}]]"]
            lines += [f"{_key(k)} = {_value(v)}" for k, v in entry.items() if not isinstance(v, dict)]
            for sub, table in entry.items():
                if isinstance(table, dict):
                    lines += [f"[{key}.{_key(sub)}]"] + [f"{_key(k)} = {_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _key(k: str) -> str:
    return k if re.match(r"^[A-Za-z0-9_-]+$", k) else json.dumps(k)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, (int, str)):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        raise RecipeError("a recipe value cannot be null (leave the key out instead)")
    raise RecipeError(f"a recipe value of type {type(v).__name__} cannot be written: {v!r}")


def begin(recipe: dict, out: Path, resume: bool) -> dict:
    """Check the run folder for a new run or a resumed one and write (or read back) the
    resolved recipe. On resume, ``recipe`` (when given) must equal the one the run started with."""
    saved_path = out / RESOLVED
    if resume:
        if not saved_path.is_file():
            raise RecipeError(f"--resume: {out} holds no recipe run (no {RESOLVED})")
        saved = tomllib.loads(saved_path.read_text(encoding="utf-8"))
        check_recipe(saved, str(saved_path))
        if recipe is not None and recipe != saved:
            diff = _differences(saved, recipe)
            raise RecipeError(f"--resume: {out} was started with another recipe or other options "
                              f"({'; '.join(diff[:3])}); resume with the run's own: vlkit train --resume --out {out}")
        return saved
    if recipe is None:
        raise RecipeError("give --recipe NAME_OR_FILE (or --resume to continue a recipe run)")
    if out.exists() and (not out.is_dir() or any(p.name != LOCK for p in out.iterdir())):
        what = "a recipe run (continue it with --resume)" if saved_path.is_file() else "files"
        raise RecipeError(f"--out {out} already holds {what}; give a new or empty folder")
    text = dump_toml(recipe)
    assert tomllib.loads(text) == recipe, "the resolved recipe does not read back as written"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / RESOLVED, text.encode("utf-8"))
    return recipe


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y) and all(
                isinstance(i, dict) for i in x + y):
            for i, (p, q) in enumerate(zip(x, y)):
                out += _differences(p, q, f"{prefix}{key}[{p.get('name', i)}].")
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} in the run, {y!r} now")
    return out


def run_recipe(recipe: dict | None, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Run every stage that has not finished (resuming the one that stopped); returns the last
    stage's training result with ``"stages"``: each stage's name, folder and what happened."""
    from .. import collective
    out = Path(out)
    check_output_path(out)
    if resume and not (out / RESOLVED).is_file():
        raise RecipeError(f"--resume: {out} holds no recipe run (no {RESOLVED})")
    if not collective.is_main_env():  # under torchrun: rank 0 checks, locks and writes the folder
        if recipe is None:
            recipe = tomllib.loads((out / RESOLVED).read_text(encoding="utf-8"))
        return _run_stages(recipe, out, progress)
    try:
        with run_lock(out):  # one writer for the whole recipe (each stage's train() takes it again)
            return _run_stages(begin(recipe, out, resume), out, progress)
    finally:
        remove_if_untouched(out)  # a run refused before it wrote anything leaves no folder


def _run_stages(recipe: dict, out: Path, progress: bool) -> dict:
    from .run import train
    stages = recipe["stage"]
    done, result = [], {}
    for i, stage in enumerate(stages):
        args = stage_args(recipe, stage, out, progress)
        run = Path(args.out)
        budget = f"{stage['steps']} steps" if "steps" in stage else f"{stage['minutes']} minutes"
        if stage_finished(run):
            print(f"stage {i + 1}/{len(stages)} {stage['name']}: finished before, kept ({run})", file=sys.stderr)
            done.append({"stage": stage["name"], "run": str(run), "status": "kept"})
            continue
        # a stage stopped after a checkpoint resumes; one stopped before its first starts again
        args.resume = latest_checkpoint(run) is not None
        if args.resume:  # its start (``init``) was applied when it began; the checkpoint holds the rest
            args.init = None
        print(f"stage {i + 1}/{len(stages)} {stage['name']}: {stage['model']}, {budget}"
              f"{' (resumed)' if args.resume else ''} -> {run}", file=sys.stderr)
        result = train(args)
        done.append({"stage": stage["name"], "run": str(run), "status": "resumed" if args.resume else "trained"})
        if result.get("stopped"):
            break
    result = dict(result)
    result["stages"] = done
    return result
