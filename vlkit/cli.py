"""The ``vlkit`` command."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


class UsageError(Exception):
    pass


def _kv(items: list[str]) -> dict:
    """--set key=value pairs for config overrides; the values stay text, which the config
    coerces to each field's declared type (``merge_config``)."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UsageError(f"--set takes key=value, got {item!r}")
        if key in out and out[key] != value:
            raise UsageError(f"--set {key} given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def _count(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _negative_weights(text: str | None) -> dict | None:
    """--negative-weights attribute_swap=3,relation_flip=2 -> {kind: weight}."""
    if not text:
        return None
    from .data.collate import check_negative_weights
    from .data.synthetic import NEGATIVE_KINDS
    out = {}
    for item in text.split(","):
        kind, eq, value = item.strip().partition("=")
        try:
            weight = float(value)
            check_negative_weights({kind: weight})
        except ValueError:
            weight = None
        if not eq or not kind or weight is None:
            raise UsageError(f"--negative-weights takes KIND=W pairs (W a number >= 0), got {item!r}")
        if kind not in NEGATIVE_KINDS:  # a user's data may have kinds of its own: allowed, but said
            print(f"note: --negative-weights kind {kind!r} is not one of the synthetic world's "
                  f"({', '.join(NEGATIVE_KINDS)})", file=sys.stderr)
        out[kind] = weight
    return out


def _writable_output(path: str | Path, option: str, ours, kind: str, inputs=()) -> None:
    """Refuse (one line) an output file that would overwrite an input of the same command or
    an existing file that is not one this command wrote (``ours(path)``: it may be replaced)."""
    from .train.runfolder import check_output_path
    path = Path(path)
    check_output_path(path, option)
    for source in inputs:
        if Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise UsageError(f"{option} {path}: is the command's own input {source}; give another file")
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not ours(path):
        raise UsageError(f"{option} {path}: exists and is not {kind}; it is left as it is (give another file)")


def _is_eval_json(path: Path) -> bool:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and {"model", "metrics"} <= set(obj)


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _run_data(run: str) -> str:
    """The --data a vlkit run was trained on ("synthetic" for other folders)."""
    try:
        data = json.loads((Path(run) / "config.json").read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return "synthetic"
    if not isinstance(data, str) or data == "synthetic":
        return "synthetic"
    if not Path(data).is_dir():
        raise UsageError(f"{run} was trained on {data}, which is not a folder from here; give --data")
    return data


def _is_shard_spec(data: str) -> bool:
    from .data.remote import is_shard_spec
    return data != "synthetic" and is_shard_spec(data)


def cmd_list_models(args) -> int:
    from .models import list_models, model_class
    for name in list_models():
        cls = model_class(name)
        print(f"{name:8s} presets: {', '.join(cls.presets)}")
    return 0


def cmd_shard(args) -> int:
    from .data.shards import shard_folder_strangers, write_shard_splits
    if not Path(args.dataset).is_dir():
        raise UsageError(f"{args.dataset}: no such dataset folder")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    present = [s for s in splits if (Path(args.dataset) / f"{s}.jsonl").is_file()]
    if not present:
        raise UsageError(f"{args.dataset}: none of {', '.join(f'{s}.jsonl' for s in splits)} found")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: is a file, not a folder")
    from .train.runfolder import check_output_path
    check_output_path(args.out)
    strangers = shard_folder_strangers(args.out)
    if strangers:
        raise UsageError(f"--out {args.out}: holds files that are not shards ({', '.join(strangers[:3])}"
                         f"{' ...' if len(strangers) > 3 else ''}); give a new folder or one of shards only")
    results = write_shard_splits(args.dataset, args.out, present, args.shard_size, args.on_bad_sample,
                                 allow_outside=args.allow_outside_paths)
    for split, res in results.items():
        skipped = sum(res["skipped"].values())
        print(f"{split}: {res['samples']} samples in {len(res['shards'])} shards"
              + (f" ({skipped} skipped: {res['skipped']})" if skipped else ""))
    for split in ("val", "test"):  # evaluation reads JSONL: keep the other splits next to the shards
        src = Path(args.dataset) / f"{split}.jsonl"
        if split not in present and src.is_file():
            print(f"{split}: not sharded (add it to --splits to shard it)")
    return 0


def cmd_synth(args) -> int:
    """The world is written to a hidden folder beside --out and renamed into place when whole;
    an existing non-empty --out is refused, or with --overwrite replaced if it is a synthetic
    world vlkit wrote (never another folder)."""
    import os
    import shutil
    from .data.synthetic import is_synthetic_world, write_dataset
    for name in ("num", "image_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.image_size > 1024:  # a typo's 100000 would be 30 GB an image
        raise UsageError(f"--image-size must be at most 1024, got {args.image_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be at least 0, got {args.seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder")
    from .train.runfolder import check_output_path
    check_output_path(out)
    replace = out.is_dir() and any(out.iterdir())
    if replace and not args.overwrite:
        raise UsageError(f"--out {out}: the folder is not empty; give a new folder (or --overwrite to "
                         "replace a synthetic world written there)")
    if replace and not is_synthetic_world(out):
        raise UsageError(f"--overwrite: {out} is not a synthetic world written by vlkit synth (no "
                         "vlkit world.json); it is left as it is")
    out = out.resolve()  # "." or "data/" name their folder too
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.synth-{os.getpid()}"
    try:
        written = write_dataset(stage, num=args.num, seed=args.seed, image_size=args.image_size)
        if out.is_dir():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"wrote the synthetic world to {args.out}" + (f": {written}" if written else ""))
    return 0


# command-line options that differ from their RunArgs field in name or form
_NOT_RUN_ARGS = {"command", "func", "recipe", "set", "no_eval", "no_progress", "negative_weights"}


def _run_options(args) -> dict:
    """The RunArgs fields given on the command line (options left unset are None and dropped,
    so RunArgs' defaults, or a recipe's values, apply)."""
    import dataclasses

    from .train.run import RunArgs
    fields = {f.name for f in dataclasses.fields(RunArgs)}
    given = {k: v for k, v in vars(args).items() if k not in _NOT_RUN_ARGS and v is not None and v is not False}
    unknown = sorted(set(given) - fields)
    assert not unknown, f"train options without a RunArgs field: {unknown}"
    if args.negative_weights:
        given["negative_weights"] = _negative_weights(args.negative_weights)
    if args.trainable:
        given["trainable"] = [p.strip() for p in args.trainable.split(",") if p.strip()]
    return given


def cmd_train(args) -> int:
    if args.eval_size is not None and not args.eval_every:
        raise UsageError("--eval-size sets the size of the learning-curve points: give --eval-every too")
    if args.max_skip_rate is not None and args.on_bad_sample != "skip":
        raise UsageError("--max-skip-rate applies with --on-bad-sample skip")
    from . import collective as vdist
    from .train.run import RunArgs, train
    options = _run_options(args)
    if args.resume and not args.model and not args.recipe and not (Path(args.out) / "recipe.toml").is_file():
        from .train.runfolder import is_vlkit_run
        if is_vlkit_run(args.out):  # a single run: its model is in its config.json
            from .checkpoint import read_run_config
            args.model = options["model"] = read_run_config(args.out)["model"]
    if args.recipe or (args.resume and not args.model):
        if args.model:
            raise UsageError(f"give a model ({args.model}) or --recipe, not both: the recipe names its models")
        result = _train_recipe(args, options)
    else:
        if not args.model:
            raise UsageError("give a model to train (see vlkit list-models) or --recipe NAME (see vlkit recipes)")
        try:
            result = train(RunArgs(overrides=_kv(args.set), progress=not args.no_progress, **options))
        finally:
            vdist.destroy()  # under torchrun; the evaluation below runs on rank 0 alone
    if not vdist.is_main_env():
        return 0
    data = result.get("data") or args.data or "synthetic"  # a resumed run's own data
    print(f"trained {result['step']} steps ({result['samples']} samples) in {result['elapsed']:.0f} s; "
          f"final loss {result.get('loss', float('nan')):.4f}")
    if result.get("stopped") and not args.no_eval:
        print(f"stopped by a signal: evaluation skipped (vlkit eval {args.out}, or continue with --resume)")
    elif not args.no_eval and _is_shard_spec(data):
        print(f"--data is shard URLs: evaluation skipped (vlkit eval {args.out} --data a dataset folder "
              "with a test split)")
    elif not args.no_eval and Path(data).is_file():
        print(f"--data {data} is one JSONL file, with no test split: evaluation skipped (vlkit eval "
              f"{args.out} --data HELD_OUT.jsonl evaluates on records kept out of training)")
    elif not args.no_eval and data != "synthetic" and not (Path(data) / "test.jsonl").is_file():
        print(f"no {Path(data) / 'test.jsonl'}: evaluation skipped (vlkit eval {args.out} --data "
              "a dataset folder with a test split)")
    elif not args.no_eval:
        from .eval.run import ALL_TASKS, evaluate, print_metrics, write_eval
        from .pipeline import load
        from .train.runfolder import run_lock
        with run_lock(args.out):  # eval.json is the run's: one writer
            res = evaluate(load(args.out), data, "test", ALL_TASKS, allow_outside=args.allow_outside_paths)
            write_eval(res, Path(args.out) / "eval.json")
        print_metrics(res)
    return 0


def _train_recipe(args, options: dict) -> dict:
    """``vlkit train --recipe``: command-line options override the recipe's last stage."""
    from . import collective as vdist
    from .train.recipe import load_recipe, resolve, run_recipe
    options.pop("out")
    resume = options.pop("resume", False)
    seed = options.pop("seed", None)
    minutes = options.pop("minutes", None)
    recipe = None
    if args.recipe:
        recipe = resolve(load_recipe(args.recipe), seed=seed, sets=_kv(args.set), flags=options, minutes=minutes)
    elif seed is not None or minutes is not None or args.set or options:
        raise UsageError("--resume without --recipe continues the run as it started: give no other "
                         "options (or the same --recipe and options it was started with)")
    try:
        result = run_recipe(recipe, args.out, resume=resume, progress=not args.no_progress)
    finally:
        vdist.destroy()
    if "step" not in result:  # every stage had finished before: the last one's summary
        result.update(json.loads((Path(args.out) / "train_summary.json").read_text()))
    from .checkpoint import read_run_config
    result["data"] = read_run_config(args.out).get("data", "synthetic")
    return result


_SHORT = {"itm.compositional_acc": "compositional", "itm.attribute_swap_acc": "swap",
          "itm.relation_flip_acc": "flip", "zeroshot.top1": "zero-shot", "zeroshot.top1_heldout": "held-out",
          "classification.top1_seen": "top-1", "vqa.acc": "VQA",
          "retrieval_1000_pairs.t2i_r1": "t2i R@1 (1,000 pairs)", "retrieval_1000_pairs.i2t_r1": "i2t R@1"}


def cmd_recipes(args) -> int:
    from .train.recipe import load_recipe, recipe_names, recipe_path
    if args.action == "show":
        if not args.name:
            raise UsageError("vlkit recipes show NAME")
        print(recipe_path(args.name).read_text(encoding="utf-8"), end="")
        return 0
    if args.action is not None:
        raise UsageError(f"vlkit recipes [show NAME], got {args.action!r}")
    for name in recipe_names():
        recipe = load_recipe(name)
        stages = " -> ".join(f"{s['name']} {s['steps']}" for s in recipe["stage"])
        print(f"{name:15s} {stages + ' steps':26s} {recipe.get('summary', '')}")
        by_machine: dict = {}
        for m in recipe.get("measured", []):
            figures = ", ".join(f"{_SHORT.get(k, k)} {v:.3f}" for k, v in (m.get("results") or {}).items())
            minutes = f"{m['minutes']:g} min, " if "minutes" in m else ""
            by_machine.setdefault(m["machine"], []).append(f"seed {m.get('seed', 0)}: {minutes}{figures}")
        for machine, runs in by_machine.items():
            print(f"{'':15s} {machine}: {'; '.join(runs)}")
    print("\nvlkit train --recipe NAME --out RUN runs one; vlkit recipes show NAME prints its file")
    return 0


def cmd_compare(args) -> int:
    from .compare import DEFAULT_EVAL_SIZE, QUICK_EVAL_SIZE, QUICK_MINUTES, compare
    minutes = args.minutes if args.minutes is not None else (QUICK_MINUTES if args.quick else None)
    eval_size = args.eval_size or (QUICK_EVAL_SIZE if args.quick else DEFAULT_EVAL_SIZE)
    compare([m.strip() for m in args.models.split(",") if m.strip()], args.out, minutes=minutes, steps=args.steps,
            seeds=args.seeds, eval_size=eval_size, progress=not args.no_progress, batch_size=args.batch_size)
    print(f"report: {Path(args.out) / 'report.html'} (and report.md, report.json)")
    return 0


def cmd_eval(args) -> int:
    import contextlib
    from .eval.run import default_tasks, evaluate, print_metrics, write_eval
    from .pipeline import load
    from .train.runfolder import is_vlkit_run, run_lock
    if args.retrieval_size is not None and args.retrieval_size < 2:
        raise UsageError(f"--retrieval-size must be at least 2, got {args.retrieval_size}")
    if args.caption_beams < 1:
        raise UsageError(f"--caption-beams must be at least 1, got {args.caption_beams}")
    if args.caption_rerank is not None and args.caption_rerank < 0:
        raise UsageError(f"--caption-rerank must be at least 0, got {args.caption_rerank}")
    if args.caption_rerank and args.caption_beams > 1:
        raise UsageError("--caption-rerank K draws its own K beams: give it or --caption-beams, not both")
    out = args.out or str(Path(args.run) / "eval.json")
    _writable_output(out, "--out", _is_eval_json, "a vlkit evaluation result", inputs=[args.run])
    into_run = is_vlkit_run(args.run) and Path(out).resolve().parent == Path(args.run).resolve()
    data = args.data
    if data is None:  # the data the run was trained on (a dataset folder's test split), else synthetic
        data = _run_data(args.run)
        if data != "synthetic":
            print(f"evaluating on {data} (the run's training data; --data to choose)", file=sys.stderr)
    with run_lock(args.run) if into_run else contextlib.nullcontext():  # one writer per run folder
        pipe = load(args.run)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else default_tasks(pipe.model)
        res = evaluate(pipe, data, args.split, tasks, retrieval_size=args.retrieval_size,
                       allow_outside=args.allow_outside_paths, caption_beams=args.caption_beams,
                       caption_rerank=args.caption_rerank)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_eval(res, out)
    print_metrics(res)
    print(f"wrote {out}")
    return 0


def cmd_capfilt(args) -> int:
    from .train.capfilt import capfilt
    report = capfilt(args.data, args.captioner, args.filter, args.out, samples=args.samples, top_p=args.top_p,
                     threshold=args.threshold, seed=args.seed)
    print(f"{report['records_kept']} of {report['records']} records kept; original captions kept "
          f"{report['original_kept']}, dropped {report['original_dropped']}; synthetic kept "
          f"{report['synthetic_kept']}, dropped {report['synthetic_dropped']}; wrote {args.out}")
    return 0


def cmd_explain(args) -> int:
    from .explain import explain
    if not Path(args.image).is_file():
        raise UsageError(f"{args.image}: no such image file")
    if not 16 <= args.panel <= 1024:
        raise UsageError(f"--panel must be 16 to 1024 pixels, got {args.panel}")
    _writable_output(args.out, "--out", _is_png, "a PNG image", inputs=[args.image, args.run])
    res = explain(args.run, args.image, args.caption, layer=args.layer, out=args.out, panel=args.panel)
    print(f"wrote {args.out}: {len(res['words'])} words ({' '.join(res['words'])})")
    return 0


def _infer(args, command: str, inputs: list[str], **options) -> int:
    """Runs one inference command (``vlkit.infer``) and prints its table, or its JSON."""
    from .infer import format_table, run
    result = run(command, args.model, inputs, batch_size=args.batch_size, skip_bad=args.skip_bad,
                 progress=not args.no_progress, **options)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def cmd_zero_shot(args) -> int:
    return _infer(args, "zero-shot", args.images, labels=args.labels, templates=args.template, top_k=args.top_k)


def cmd_caption(args) -> int:
    from .infer import generation_options
    opts = generation_options(args.beam, args.top_p, args.temperature, args.seed, args.max_new_tokens,
                              args.rerank)
    return _infer(args, "caption", args.images, prompt=args.prompt, **opts)


def cmd_vqa(args) -> int:
    return _infer(args, "vqa", [args.image], question=args.question, candidates=args.candidates)


def cmd_match(args) -> int:
    return _infer(args, "match", [args.image], captions=args.captions)


def _image_inputs(s: argparse.ArgumentParser) -> None:
    """The options every inference command shares."""
    s.add_argument("model", help="run folder or Hugging Face model folder")
    s.add_argument("--batch-size", type=_count, default=32, help="images per forward pass (default 32)")
    s.add_argument("--skip-bad", action="store_true",
                   help="skip images that cannot be read (counted in the output) instead of stopping")
    s.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (shown for 64 images or more)")


def cmd_import(args) -> int:
    from .data.importers import import_dataset
    files = [args.questions, args.annotations] if args.format == "vqa" else [args.annotations]
    rep = import_dataset(args.format, files, args.images, args.out, split=args.split, split_ratio=args.split_ratio,
                         seed=args.seed, link=args.link, skip_missing=args.skip_missing,
                         captions=getattr(args, "captions", None))
    for note in rep["notes"]:
        print(f"note: {note}", file=sys.stderr)
    for split, n in rep["records"].items():
        print(f"{split}: {n} records")
    placed = ", ".join(f"{n} {how}" for how, n in rep["images"].items())
    skipped = ", ".join(f"{n} {why}" for why, n in rep["skipped"].items())
    print(f"images: {placed}" + (f"; skipped: {skipped}" if skipped else ""))
    print(f"wrote {args.out}")
    return 0


def cmd_convert(args) -> int:
    from .convert.folders import hf_to_run, run_to_hf
    if args.to == "hf":
        from .pipeline import load
        pipe = load(args.source)
        res = run_to_hf(pipe.model, args.out, pipe.tokenizer)
    else:
        res = hf_to_run(args.source, args.out)
    print(f"{res['model']}: {res['tensors']} tensors ({res['parameters']:,} parameters) -> {args.out}"
          f" ({args.to} folder)")
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx
    res = export_onnx(args.model, args.onnx, opset=args.opset)
    for name, part in res["files"].items():
        print(f"{name}: inputs {', '.join(part['inputs'])} -> outputs {', '.join(part['outputs'])}; "
              f"max |onnxruntime - torch| {part['max_abs_diff']:.2e}")
    print(f"wrote {args.onnx} (onnx.json describes the inputs and outputs)")
    return 0


def cmd_index(args) -> int:
    from .index import index_folders, report_lines
    report = index_folders(args.model, args.folders, args.out, batch_size=args.batch_size,
                           progress=not args.no_progress)
    print("\n".join(report_lines(report, args.out)))
    return 0


def cmd_search(args) -> int:
    from .index import print_results, search_command
    res = search_command(args.index, args.query, k=args.k, model=args.model)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_results(res)
    return 0


def cmd_serve(args) -> int:
    from .serve import serve
    serve(args.model, args.index, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
          max_pixels=args.max_pixels)
    return 0


def _allow_outside_paths(s: argparse.ArgumentParser) -> None:
    s.add_argument("--allow-outside-paths", action="store_true",
                   help="read image paths that lead out of the dataset folder (absolute paths, '..', "
                        "symbolic links elsewhere); without it such a line is an error, or is skipped "
                        "with --on-bad-sample skip")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``vlkit train: error: ...``), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vlkit", description="Vision-language models: train, evaluate, convert.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("list-models", help="the models and their presets")
    s.set_defaults(func=cmd_list_models)

    s = sub.add_parser("shard", help="write a JSONL dataset folder as webdataset tar shards")
    s.add_argument("dataset", help="dataset folder (images/ and train.jsonl ...)")
    s.add_argument("--out", required=True, help="output folder for SPLIT-000000.tar ...")
    s.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard")
    s.add_argument("--splits", default="train", help="comma-separated splits to shard")
    s.add_argument("--on-bad-sample", default="error", choices=["error", "skip"])
    _allow_outside_paths(s)
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("synth", help="write the synthetic world to a dataset folder")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--num", type=int, default=1000, help="number of training samples (val/test smaller)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--overwrite", action="store_true",
                   help="replace a synthetic world already in --out (any other non-empty folder is refused)")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("train", help="train a model (or run a recipe) and evaluate it on the test split")
    s.add_argument("model", nargs="?", help="model name (see list-models); not with --recipe")
    s.add_argument("--recipe", metavar="NAME_OR_FILE",
                   help="run a recipe (see vlkit recipes): its stages in RUN/stages/, its model in RUN; "
                        "the options below override its last stage, --set STAGE:KEY=VALUE another stage")
    s.add_argument("--data", help="'synthetic' (the default), a dataset folder (images/, train.jsonl ...), "
                                   "one .jsonl file whose image paths are relative to it, or shard URLs "
                                   "('https://host/train-{000000..000099}.tar', '::' between patterns; docs/remote-data.md)")
    s.add_argument("--preset", help="architecture preset (default tiny)")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--minutes", type=float,
                   help="training time budget (with --recipe: for all its stages, shared as they were measured)")
    s.add_argument("--steps", type=_count, help="optimiser steps")
    s.add_argument("--seed", type=int, help="random seed (default 0; a resumed run keeps its own; with --recipe: every stage's)")
    s.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out, with the run's own config, data, seed, "
                        "batch size, learning rate and budget (a different one is refused); a recipe run "
                        "continues in the stage where it stopped")
    s.add_argument("--init", help="start from the weights of a run or Hugging Face folder")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="default auto")
    s.add_argument("--hard-negatives", action="store_true", help="train with the data's negative captions")
    s.add_argument("--vqa", action="store_true",
                   help="train question answering on the data's 'qa' pairs: a VQA head over the training "
                        "answers (BLIP: its decoder writes the answer), trained alone (--set objectives=... "
                        "to add others); with --init RUN it fine-tunes a pretraining run")
    s.add_argument("--workers", type=int, help="data loader worker processes (default 1)")
    s.add_argument("--on-bad-sample", choices=["error", "skip"], help="default error")
    s.add_argument("--max-skip-rate", type=float, metavar="R",
                   help="with --on-bad-sample skip: stop when more than this fraction of the samples "
                        "is bad (checked after the first 100; default 0.1)")
    s.add_argument("--ckpt-every", type=int, metavar="N", help="optimiser steps between checkpoints")
    s.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each Transformer block in the backward pass (less memory)")
    s.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimiser state (FSDP2) "
                        "instead of replicating them (DDP)")
    s.add_argument("--negatives", type=int, metavar="N",
                   help="with --hard-negatives: the data's negative captions drawn per image (default 2)")
    s.add_argument("--negative-weights", metavar="KIND=W,...",
                   help="with --hard-negatives: draw negatives in proportion to a weight per kind "
                        "(e.g. attribute_swap=3,relation_flip=2; kinds not named weigh 1)")
    s.add_argument("--groups", type=int, metavar="G",
                   help="synthetic world: image-text batches made of minimal-pair groups of G (a scene "
                        "and G-1 one-edit variants of it, each other's hard negatives); 1 turns them off")
    s.add_argument("--trainable", metavar="GLOB,...",
                   help="train only the parameters whose names match one of these patterns (e.g. "
                        "'text_embed.*,blocks.*.mlp.experts.text.*'); the rest stay frozen. A pattern "
                        "starting with ! excludes: '*,!image_embed.patch_embed.*' trains all but those")
    s.add_argument("--eval-every", type=int, metavar="N",
                   help="learning curve: evaluate on the test split every N steps (curve.jsonl; the "
                        "time spent does not count against --minutes)")
    s.add_argument("--eval-size", type=int, metavar="N",
                   help="test records per learning-curve point (default 300)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a model config field (with --recipe also a run option, and STAGE:KEY=VALUE "
                        "for a stage other than the last)")
    s.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--connect-timeout", type=float, metavar="S", help="shard URLs: seconds to connect (default 10)")
    s.add_argument("--read-timeout", type=float, metavar="S",
                   help="shard URLs: seconds to wait for data before the read counts as failed (default 60)")
    s.add_argument("--retries", type=int, metavar="N",
                   help="shard URLs: re-openings of a shard whose read failed, resumed where it stopped "
                        "(default 3); then an error, or with --on-bad-sample skip the shard is skipped")
    _allow_outside_paths(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("recipes", help="the named training recipes; 'recipes show NAME' prints one")
    s.add_argument("action", nargs="?", metavar="show", help="show: print a recipe's file")
    s.add_argument("name", nargs="?", help="recipe name")
    s.set_defaults(func=cmd_recipes)

    s = sub.add_parser("eval", help="evaluate a run (or Hugging Face folder) on a dataset")
    s.add_argument("run", help="run folder")
    s.add_argument("--data", help="'synthetic' or a dataset folder (default: the run's own training "
                                   "data, else synthetic)")
    s.add_argument("--split", default="test")
    s.add_argument("--tasks", help="comma-separated: classification,retrieval,zeroshot,itm,vqa,caption")
    s.add_argument("--out", help="eval JSON (default RUN/eval.json)")
    s.add_argument("--retrieval-size", type=int, metavar="N",
                   help="retrieval among the first N images of the split, each with its first caption "
                        "(default: the whole split for dual encoders, 100 images for fusion models, "
                        "which score every image-text pair)")
    s.add_argument("--caption-beams", type=int, default=1, metavar="N",
                   help="the caption task decodes by beam search over N beams (default 1: greedy, or "
                        "the model's own default)")
    s.add_argument("--caption-rerank", type=int, metavar="K",
                   help="the caption task keeps the best of K beams by the model's matching score "
                        "(0: none; default: the model's config, BLIP's caption_rerank)")
    _allow_outside_paths(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("compare", help="the family side by side: each model's world recipe, one "
                                       "budget, every task evaluated, a report with figures")
    s.add_argument("--models", default="clip,vilt,albef,vlmo,blip", help="comma-separated (default: all five)")
    s.add_argument("--minutes", type=float, help="training minutes per model, shared among its recipe's "
                                                 "stages (default 8; 1 with --quick)")
    s.add_argument("--steps", type=int, help="instead of minutes: this many steps for every stage")
    s.add_argument("--seeds", type=int, default=1, help="runs per model; figures become mean ± spread")
    s.add_argument("--batch-size", type=int, help="every stage's batch size (default: the recipes')")
    s.add_argument("--quick", action="store_true", help="1 minute per model, 200 test records")
    s.add_argument("--eval-size", type=int, metavar="N", help="test records evaluated (default 1000; 200 with --quick)")
    s.add_argument("--out", default="compare", help="report folder (default ./compare); a stopped compare "
                                                   "continues there")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("capfilt", help="BLIP's CapFilt: add sampled captions, keep those an ITM filter "
                                       "judges matched, write a new dataset")
    s.add_argument("data", help="dataset folder (train.jsonl, images/)")
    s.add_argument("--captioner", required=True, help="run that captions (blip)")
    s.add_argument("--filter", required=True, help="run with an ITM head (blip, albef ...)")
    s.add_argument("--out", required=True, help="new dataset folder (with capfilt.json, the report)")
    s.add_argument("--samples", type=int, default=1, help="synthetic captions per image")
    s.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    s.add_argument("--threshold", type=float, default=0.5, help="ITM match probability a caption must exceed")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_capfilt)

    s = sub.add_parser("explain", help="per-word cross-attention over an image, as a heat-map PNG")
    s.add_argument("run", help="run folder of a model with text-to-image cross-attention (albef, blip)")
    s.add_argument("image", help="image file")
    s.add_argument("caption", help="the text whose words are explained")
    s.add_argument("--out", required=True, help="output PNG")
    s.add_argument("--layer", type=int, help="fusion layer (negative counts from the end; default: mean of all)")
    s.add_argument("--panel", type=int, default=128, help="panel size in pixels")
    s.set_defaults(func=cmd_explain)

    images_help = "image files, folders (searched recursively) or glob patterns"
    s = sub.add_parser("zero-shot", help="classify images among labels given as text (dual encoders)")
    _image_inputs(s)
    s.add_argument("images", nargs="+", help=images_help)
    s.add_argument("--labels", required=True, help="comma-separated class names, e.g. 'cat,dog'")
    s.add_argument("--template", action="append", help="prompt with {} for the label (repeat to average "
                                                       "several; default: the built-in templates)")
    s.add_argument("--top-k", type=_count, default=5, help="labels shown per image (default 5)")
    s.set_defaults(func=cmd_zero_shot)

    s = sub.add_parser("caption", help="write a caption for each image (BLIP)")
    _image_inputs(s)
    s.add_argument("images", nargs="+", help=images_help)
    s.add_argument("--beam", type=_count, metavar="N", help="beam search with N beams (default: the model's "
                                                             "own decoding, greedy unless its config ranks beams)")
    s.add_argument("--rerank", type=int, metavar="K", help="draw K captions (beams, or samples with --top-p) and "
                                                         "keep the one the model's matching score ranks first "
                                                         "(0: none)")
    s.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling from the top P of the probability")
    s.add_argument("--temperature", type=float, metavar="T", help="with --top-p: sampling temperature (default 1)")
    s.add_argument("--seed", type=int, help="with --top-p: seed of the sampling")
    s.add_argument("--max-new-tokens", type=_count, metavar="N", help="caption length limit in tokens (default 30)")
    s.add_argument("--prompt", help="text the caption continues (default: the model's own)")
    s.set_defaults(func=cmd_caption)

    s = sub.add_parser("vqa", help="answer a question about each image")
    _image_inputs(s)
    s.add_argument("image", help="an image file, folder or glob pattern")
    s.add_argument("question")
    s.add_argument("--candidates", help="comma-separated answers to choose among (default: the model's own)")
    s.set_defaults(func=cmd_vqa)

    s = sub.add_parser("match", help="how well captions fit an image: ITM probability, or cosine similarity "
                                     "for dual encoders without an ITM head")
    _image_inputs(s)
    s.add_argument("image", help="an image file, folder or glob pattern")
    s.add_argument("captions", nargs="+", help="one or more captions")
    s.set_defaults(func=cmd_match)

    s = sub.add_parser("import", help="import COCO captions, Karpathy splits or VQA v2 into a dataset folder")
    formats = s.add_subparsers(dest="format", metavar="FORMAT", required=True, parser_class=_Parser)
    for name, text in (("coco", "COCO captions (captions_*.json)"),
                       ("karpathy", "Karpathy splits (dataset_coco.json, dataset_flickr30k.json)"),
                       ("vqa", "VQA v2 questions + annotations")):
        f = formats.add_parser(name, help=text)
        if name == "vqa":
            f.add_argument("questions", help="questions JSON (v2_OpenEnded_mscoco_*_questions.json)")
            f.add_argument("annotations", help="annotations JSON (v2_mscoco_*_annotations.json)")
            f.add_argument("--captions", help="COCO captions JSON of the same images (default: each "
                                              "record's caption is its first question)")
        else:
            f.add_argument("annotations", help="annotation JSON file")
        f.add_argument("--images", required=True, help="folder the annotations' image names are relative to")
        f.add_argument("--out", required=True, help="dataset folder: new, or one that lacks the split(s) written")
        if name != "karpathy":
            f.add_argument("--split", choices=["train", "val", "test"], help="write every record to this split "
                                                                             "(default train)")
            f.add_argument("--split-ratio", metavar="TRAIN,VAL,TEST",
                           help="shuffle the images and cut them into train/val/test, e.g. 0.8,0.1,0.1")
            f.add_argument("--seed", type=int, default=0, help="shuffle seed of --split-ratio")
        f.add_argument("--link", default="auto", choices=["auto", "hardlink", "copy", "symlink"],
                       help="how images enter images/: auto (default) hard-links, copying where the file "
                            "system cannot link")
        f.add_argument("--skip-missing", action="store_true",
                       help="leave out (and count) records whose image file is missing, instead of an error")
        f.set_defaults(func=cmd_import, split=None, split_ratio=None, seed=0)

    s = sub.add_parser("convert", help="a Hugging Face folder (ViT, CLIP, ViLT, BLIP) to a vlkit run folder, "
                                       "or a vlkit CLIP / ViT run to a Hugging Face folder (--to hf)")
    s.add_argument("source", help="Hugging Face model folder, or (with --to hf) a vlkit run folder")
    s.add_argument("--out", required=True, help="new output folder")
    s.add_argument("--to", default="run", choices=["run", "hf"], help="output kind (default run)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("export", help="export the image and text towers (CLIP, VLMo, ViT) to ONNX")
    s.add_argument("model", help="vlkit run or Hugging Face folder")
    s.add_argument("--onnx", required=True, metavar="OUT", help="new output folder for image.onnx, text.onnx, onnx.json")
    s.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("index", help="embed the images in folders into a searchable index (adds only new ones)")
    s.add_argument("model", help="run or Hugging Face folder of a dual encoder (clip, albef, vlmo, blip)")
    s.add_argument("folders", nargs="+", metavar="FOLDER", help="folders of images (searched recursively)")
    s.add_argument("--out", required=True, help="index folder: created, or added to (a stopped run continues)")
    s.add_argument("--batch-size", type=_count, default=32, help="images embedded at a time")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="the images of an index nearest to a text")
    s.add_argument("index", help="index folder (vlkit index)")
    s.add_argument("query", help="the text to search for")
    s.add_argument("-k", type=_count, default=10, help="results (default 10)")
    s.add_argument("--model", help="model folder (default: the one that built the index; same weights only)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("serve", help="a local web page: search an index, caption, answer, classify, explain "
                                     "(needs vlkit[serve])")
    s.add_argument("model", help="run or Hugging Face folder")
    s.add_argument("--index", help="index folder built with the same model (vlkit index)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted (default 10 MB)")
    s.add_argument("--max-pixels", type=_count, default=25_000_000,
                   help="largest image accepted, in pixels (default 25,000,000; larger is refused undecoded)")
    s.set_defaults(func=cmd_serve)
    return p


def _one_line(e: BaseException) -> str:
    """The message of an error; one raised in a DataLoader worker arrives wrapped in the
    worker's traceback, whose last line holds the original message."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or type(e).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are a message for the user, not a bug: vlkit's own (bad data, weights,
    configs, options: ValueError subclasses), a model asked for what it cannot do, a training
    run that had to stop, and the operating system's (a missing file, no permission, a full
    disk). Anything else (a TypeError, a KeyError ...) keeps its traceback: it is a bug."""
    from .pipeline import Unsupported
    from .train.loop import TrainingAborted
    return (UsageError, ValueError, OSError, Unsupported, TrainingAborted)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (vlkit recipes | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except _user_errors() as e:
        print(f"vlkit: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
