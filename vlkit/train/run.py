"""``vlkit train``: data, tokenizer and model for a run folder, then the shared trainer."""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.remote import is_shard_spec
from ..data.synthetic import synthetic_world
from ..factory import init_pretrained
from ..models import model_class
from ..models.base import config_from_dict, config_to_dict, merge_config
from ..checkpoint import CONFIG, read_run_config, save_run_config
from .loop import TrainConfig, Trainer

# Per-model defaults for the tiny presets on the synthetic world (a 2-core CPU). A model without
# an entry of its own takes its task's ("fusion": one joint image-text encoder scoring pairs,
# which costs a forward pass per pair, hence the smaller batch), else the "clip" entry.
TRAIN_DEFAULTS = {
    "vit": dict(batch_size=128, lr=1e-3, weight_decay=0.05, warmup_steps=30, min_lr_ratio=0.5),
    "clip": dict(batch_size=128, lr=1e-3, weight_decay=0.1, warmup_steps=50),
    # ALBEF's post-norm BERT layers: at lr 1e-3 ITM stayed at its prior (every pair "no") for 800
    # steps of 64 on the synthetic world; at 3e-4 it reached 0.83 training accuracy
    "fusion": dict(batch_size=64, lr=3e-4, weight_decay=0.01, warmup_steps=50, min_lr_ratio=0.1),
    "vilt": dict(batch_size=64, lr=1e-3, weight_decay=0.01, warmup_steps=50, min_lr_ratio=0.1),
}


@dataclass
class RunArgs:
    model: str
    data: str | None = None         # None: "synthetic" for a new run, the run's own on --resume
    preset: str | None = None       # None: "tiny" for a new run, the run's own on --resume
    out: str = "runs/default"
    minutes: float | None = None
    steps: int | None = None
    seed: int | None = None         # None: 0 for a new run, the run's own on --resume
    resume: bool = False
    init: str | None = None
    batch_size: int | None = None
    lr: float | None = None
    precision: str = "auto"
    hard_negatives: bool = False
    vqa: bool = False               # train VQA on the data's qa pairs (answer vocabulary from them)
    workers: int = 1
    on_bad_sample: str = "error"
    overrides: dict = dataclasses.field(default_factory=dict)
    progress: bool = True
    max_skip_rate: float = 0.1      # --on-bad-sample skip: abort when more samples than this are bad
    ckpt_every: int | None = None   # optimiser steps between checkpoints (None: the default)
    grad_checkpointing: bool = False
    fsdp: bool = False
    groups: int | None = None       # synthetic world: minimal-pair group size (None: 1, or a resumed run's)
    eval_every: int | None = None   # steps between learning-curve points (curve.jsonl)
    eval_size: int = 300            # test records (and single-object images) per curve point
    # with hard_negatives: the data's negative captions drawn per image (None: 2, or a resumed
    # run's), and their draw weighted by kind ({kind: weight}; None: uniform, or a resumed run's)
    negatives: int | None = None
    negative_weights: dict | None = None
    allow_outside_paths: bool = False  # read dataset images outside the dataset folder
    # glob patterns of the parameters this run trains (``train.trainable``); None: all of them
    trainable: list[str] | None = None
    # --data as shard URLs (vlkit.data.remote): seconds to connect and to wait for data, and
    # re-openings of a shard whose read failed (None: that module's defaults)
    connect_timeout: float | None = None
    read_timeout: float | None = None
    retries: int | None = None


# RunArgs fields and the least value each takes (``validate_run_args``)
# (steps=0 from Python exports the initial model untrained; the command line asks for >= 1)
_AT_LEAST_1 = ("batch_size", "ckpt_every", "eval_every", "eval_size", "groups")  # --negatives: in _train
_AT_LEAST_0 = ("steps", "workers", "seed", "retries")
_ABOVE_0 = ("minutes", "lr", "connect_timeout", "read_timeout")
# training settings a resumed run keeps from its config.json (an explicit different value is
# refused: it would change the run's optimisation half way)
_KEPT_ON_RESUME = ("batch_size", "lr")


# config fields ``prepare_model`` derives from the tokenizer or the class names
_TOKENIZER_FIELDS = ("vocab_size", "eot_token_id", "pad_token_id", "special_token_ids", "mask_token_id")
_CLASS_FIELDS = ("num_classes", "class_names")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_run_args(args: RunArgs) -> RunArgs:
    """``args`` with each field coerced to its declared type and checked (a ValueError naming
    the option otherwise): counts at least 1, times and rates above 0, the skip rate in [0, 1],
    the choices among theirs, the model, the data. Called at the start of ``train`` for every
    caller (the command line, recipes, Python)."""
    from ..models.base import _type_hints, coerce_value
    hints = _type_hints(RunArgs)
    changes = {}
    for f in dataclasses.fields(RunArgs):
        value = getattr(args, f.name)
        hint = hints.get(f.name, typing.Any)
        if hint in (dict, typing.Optional[dict]) or f.name == "negative_weights":
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{_option(f.name)}: expected a mapping, got {value!r}")
            continue
        changes[f.name] = coerce_value(value, hint, _option(f.name))
    args = dataclasses.replace(args, **changes)
    for name in _AT_LEAST_1:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"{_option(name)} must be at least 1, got {value}")
    for name in _AT_LEAST_0:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ValueError(f"{_option(name)} must be at least 0, got {value}")
    for name in _ABOVE_0:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"{_option(name)} must be above 0, got {value:g}")
    if not 0.0 <= args.max_skip_rate <= 1.0:
        raise ValueError(f"--max-skip-rate must be between 0 and 1, got {args.max_skip_rate:g}")
    if args.steps is None and args.minutes is None and not args.resume:  # a resumed run: its own
        raise ValueError("give --steps or --minutes")
    if args.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {args.precision!r}")
    if args.on_bad_sample not in ("error", "skip"):
        raise ValueError(f"--on-bad-sample must be error or skip, got {args.on_bad_sample!r}")
    if not args.out or not str(args.out).strip():
        raise ValueError("--out: give a run folder")
    if args.data not in (None, "synthetic") and not (Path(args.data).is_dir() or is_jsonl_file(args.data)) \
            and not is_shard_spec(args.data):
        raise ValueError(f"--data {args.data}: no such folder or .jsonl file (or use 'synthetic', or shard URLs)")
    given = sorted(remote_options(args))
    if given and args.data is not None and not is_shard_spec(args.data):
        raise ValueError(f"{', '.join(map(_option, given))}: for shard URLs in --data, not {args.data}")
    cls = model_class(args.model)
    if args.resume and args.init:
        raise ValueError(f"--init with --resume: a resumed run continues from its own checkpoint in "
                         f"{args.out}; drop --init (or start a new run from {args.init} without --resume)")
    if args.init and args.preset is not None:
        raise ValueError(f"--preset with --init: the architecture comes from {args.init}; drop --preset "
                         "(--set still applies)")
    if args.preset is not None and args.preset not in cls.presets:
        raise ValueError(f"unknown preset {args.preset!r} for {args.model}; presets: {', '.join(cls.presets)}")
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    if args.hard_negatives and "hard_negatives" not in fields:
        raise ValueError(f"--hard-negatives: {args.model} does not train with negative captions")
    if args.groups not in (None, 1) and (args.data not in (None, "synthetic") or cls.task == "classification"):
        raise ValueError(f"--groups: minimal-pair groups are drawn from the synthetic world's image-text "
                         f"data (--data synthetic), not {args.model} on {args.data}")
    derived = sorted(k for k in args.overrides if k.rpartition(".")[2] in
                     (_CLASS_FIELDS if cls.task == "classification" else _TOKENIZER_FIELDS))
    if derived:  # prepare_model sets these from the data: a --set of them would be dropped
        raise ValueError(f"--set {', '.join(derived)}: vlkit train sets "
                         f"{'it' if len(derived) == 1 else 'them'} from the "
                         f"{'class names' if cls.task == 'classification' else 'tokenizer it builds from the data'}")
    if args.overrides and not args.resume and not args.init:  # --set checked before anything is written
        merge_config(cls.make_config(args.preset or "tiny"), args.overrides, cls.model_name)
    return args


def is_jsonl_file(data: str) -> bool:
    """``--data`` names one JSONL file (its image paths relative to the file's folder) rather
    than a dataset folder with ``train.jsonl``."""
    return str(data).endswith(".jsonl") and Path(data).is_file()


def resolve_resume(args: RunArgs, saved: dict) -> RunArgs:
    """``args`` for continuing the run whose config.json is ``saved``: the run's own preset and
    seed where none was given; a --preset, --set, --seed, --hard-negatives, --vqa, --batch-size
    or --lr that would change the run is refused with one line (a resumed run keeps its
    architecture and optimisation; a new run can start from its weights with --init)."""
    run = args.out
    if saved.get("model") != args.model:
        raise ValueError(f"--resume: {run} holds a {saved.get('model')} run, not {args.model}")
    if args.preset is not None and args.preset != saved.get("preset"):
        raise ValueError(f"--preset {args.preset} with --resume: {run} is a "
                         f"{saved.get('preset') or '--init'} run and keeps its architecture; drop "
                         f"--preset (or train a new run with --init {run})")
    cls = model_class(args.model)
    if args.overrides:
        current = config_from_dict(cls.config_class, saved["config"])
        merged = config_to_dict(merge_config(current, args.overrides, cls.model_name))
        changed = _changed_fields(config_to_dict(current), merged)  # fields newer than the run: their defaults
        if changed:
            raise ValueError(f"--set {', '.join(changed)} with --resume: {run} keeps its config "
                             f"({CONFIG}); drop --set (or train a new run with --init {run} --set ...)")
    if args.hard_negatives and not saved["config"].get("hard_negatives", False):
        raise ValueError(f"--hard-negatives with --resume: {run} was trained without them; train a new "
                         f"run with --init {run} --hard-negatives")
    if args.vqa and not saved.get("vqa"):
        raise ValueError(f"--vqa with --resume: {run} was trained without VQA; fine-tune it as a new "
                         f"run with --init {run} --vqa")
    train_saved = saved.get("train") or {}
    changes = {"preset": saved.get("preset")}
    saved_seed = train_saved.get("seed")
    if args.seed is not None and saved_seed is not None and args.seed != saved_seed:
        raise ValueError(f"--seed {args.seed} with --resume: {run} was trained with --seed {saved_seed} "
                         "(its data order); drop --seed")
    changes["seed"] = saved_seed if args.seed is None else args.seed
    if args.steps is None and args.minutes is None:  # the run's own budget
        changes["steps"], changes["minutes"] = train_saved.get("steps"), train_saved.get("minutes")
        if changes["steps"] is None and changes["minutes"] is None:
            raise ValueError("give --steps or --minutes")
    for name in _KEPT_ON_RESUME:
        given, kept = getattr(args, name), train_saved.get(name)
        if given is not None and kept is not None and given != kept:
            raise ValueError(f"{_option(name)} {given:g} with --resume: {run} trains with "
                             f"{_option(name)} {kept:g}; drop {_option(name)} (or start a new run "
                             f"with --init {run})")
    if args.trainable is None:  # a resumed run keeps its frozen parameters
        changes["trainable"] = saved.get("trainable")
    elif args.trainable != saved.get("trainable"):
        raise ValueError(f"--trainable with --resume: {run} trains {saved.get('trainable') or 'every parameter'}; "
                         f"drop --trainable (or start a new run with --init {run})")
    for name in ("groups", "negatives", "negative_weights"):  # the run's data draw
        given, kept = getattr(args, name), saved.get(name)
        if given is not None and kept is not None and given != kept:
            raise ValueError(f"{_option(name)} {given} with --resume: {run} draws with {_option(name)} "
                             f"{kept}; drop {_option(name)} (or start a new run with --init {run})")
    changes["data"] = args.data or saved.get("data") or "synthetic"
    if args.data is not None and saved.get("data") not in (None, args.data):
        print(f"note: {run} was trained on {saved['data']}; it continues on {args.data}", file=sys.stderr)
    if args.groups not in (None, 1) and changes["data"] != "synthetic":
        raise ValueError(f"--groups: minimal-pair groups are drawn from the synthetic world, and {run} "
                         f"trains on {changes['data']}")
    return dataclasses.replace(args, **changes)


def _changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            out += _changed_fields(before, value, f"{prefix}{key}.")
        elif before != value:
            out.append(f"{prefix}{key}")
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- data -------------------------------------------------------------------------------------

STREAM_VOCABULARY_SAMPLES = 5_000  # records streamed shards teach the tokenizer from


def corpus_texts(records) -> list[str]:
    texts = []
    for rec in records:
        texts.extend(rec.get("captions") or [rec["caption"]])
        texts.extend(n["caption"] for n in rec.get("negatives") or [])
        texts.extend(q["question"] for q in rec.get("qa") or [])
        texts.extend(q["answer"] for q in rec.get("qa") or [])
    return texts


def unknown_word_share(tok, texts: list[str]) -> float:
    """The share of the words (by count) of ``texts`` that ``tok`` reads as its unknown token
    (0 for a tokenizer without one, e.g. byte-level BPE)."""
    from collections import Counter
    unk = tok.token_to_id("[UNK]")
    words = Counter(w for t in texts for w in t.split())
    if unk is None or not words:
        return 0.0
    bad = sum(n for w, n in words.items() if unk in tok.encode(w))
    return bad / sum(words.values())


def vocabulary_records(data: str, image_size: int, jsonl=None) -> list[dict]:
    """The training records the text and answer vocabularies are learned from."""
    if data == "synthetic":
        world = synthetic_world(image_size)
        return world.records("train", 1500) + world.records("train", 300, single_object=True)
    if hasattr(jsonl, "head_records"):  # streamed shards: the first samples' records
        return jsonl.head_records(STREAM_VOCABULARY_SAMPLES)
    return jsonl.records if hasattr(jsonl, "records") else [jsonl.record(i) for i in range(len(jsonl))]


def build_tokenizer(data: str, image_size: int, jsonl=None, records: list[dict] | None = None,
                    extra_special_tokens=()):
    """A WordPiece vocabulary learned from the training captions (and their negatives and
    questions), so small models need no outside vocabulary file; ``extra_special_tokens`` (a
    model's own, e.g. BLIP's [DEC] and [ENC]) follow the core special tokens."""
    from ..tokenizers import build_wordpiece_vocab
    if records is None:
        records = vocabulary_records(data, image_size, jsonl)
    return build_wordpiece_vocab(corpus_texts(records), vocab_size=2000,
                                 extra_special_tokens=tuple(extra_special_tokens))


def answer_vocabulary(records: list[dict]) -> list[str]:
    """The answers of the records' ``qa`` entries (``answer``, or each of ``answers``), most
    frequent first."""
    from ..data.answers import build_answer_vocab
    answers = []
    for rec in records:
        for qa in rec.get("qa") or []:
            given = qa.get("answers") or [qa.get("answer")]
            answers.extend(a for a in given if isinstance(a, str) and a.strip())
    return build_answer_vocab(answers)


def training_source(task: str, data: str, image_size: int, seed: int, on_bad_sample: str,
                    max_skip_rate: float | None = None, groups: int = 1,
                    single_object: bool | float | None = None, allow_outside: bool = False,
                    remote: dict | None = None, questions: bool = True):
    """``single_object`` (synthetic world): True for labelled single-object images, a share in
    (0, 1) for a mix with images of several objects; default: True for classification.
    ``questions=False`` (synthetic world): records without their questions (no VQA trained).
    ``remote``: `RemoteShardStream` options for shard URLs."""
    from ..data.loader import EpochSource, SyntheticSource
    if data == "synthetic":
        world = synthetic_world(image_size, groups if task != "classification" else 1)
        single = (task == "classification") if single_object is None else single_object
        return SyntheticSource(world, "train", single_object=single, offset=seed * 10_000_000,
                               image_only=task == "classification",  # a classifier reads no text
                               questions=questions)
    dataset = open_dataset(data, "train", on_bad_sample, max_skip_rate, allow_outside, remote)
    if hasattr(dataset, "head_records"):  # streamed shards: batches come from stream_batch_loader
        return dataset
    if hasattr(dataset, "shard_ranges"):  # shards: shuffled shard order, then within each shard
        from ..data.shards import ShardSource
        return ShardSource(dataset, seed=seed)
    return EpochSource(dataset, seed=seed)


def open_dataset(data: str, split: str, on_bad_sample: str = "error",
                 max_skip_rate: float | None = None, allow_outside: bool = False, remote: dict | None = None):
    """A folder of webdataset shards (``{split}-000000.tar`` ...), a JSONL dataset folder
    (whose image paths must stay inside it unless ``allow_outside``), or shard URLs streamed
    endlessly (`RemoteShardStream`, with the ``remote`` options; ``split`` unused)."""
    from ..data.shards import ShardDataset, is_shard_folder
    if is_shard_spec(data):
        from ..data.remote import RemoteShardStream
        return RemoteShardStream(data, epochs=None, on_bad_sample=on_bad_sample,
                                 max_skip_rate=max_skip_rate, **(remote or {}))
    if is_shard_folder(data, split):
        return ShardDataset(data, split, on_bad_sample=on_bad_sample, max_skip_rate=max_skip_rate)
    from ..data.jsonl import JsonlDataset
    return JsonlDataset(data, split, on_bad_sample=on_bad_sample, max_skip_rate=max_skip_rate,
                        allow_outside=allow_outside)


def remote_options(args: RunArgs) -> dict:
    """The shard-URL reading options the run gives (`RemoteShardStream` keywords)."""
    names = ("connect_timeout", "read_timeout", "retries")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def make_collate(model, task: str, tokenizer, negatives: int, train: bool = True,
                 data: str = "synthetic", negative_weights: dict | None = None,
                 fused_rows: tuple[int, int] = (1, 0)):
    """``fused_rows``: `ImageTextCollate`'s (training: `fused_rows_of`)."""
    from ..data.collate import ClassificationCollate, ImageTextCollate, max_text_length
    from ..data.transforms import ImageTransform
    spec = model.image_spec()
    # The synthetic world never repeats a sample, so it needs no crops (a crop can cut an object
    # out of the picture and falsify its caption); a user's dataset gets random resized crops.
    grounding_grid = getattr(model, "grounding_grid", None) if task != "classification" else None
    # Grounding boxes are fractions of the whole image: no crops for them either.
    scale = (1.0, 1.0) if data == "synthetic" or grounding_grid else (0.7, 1.0)
    transform = ImageTransform(spec["size"], spec["mean"], spec["std"], train=train,
                               scale=scale, hflip=True)
    if task == "classification":
        return ClassificationCollate(transform, model.cfg.class_names,
                                     patch_grid=getattr(model, "patch_grid", 0) if train else 0)
    cfg = model.cfg
    return ImageTextCollate(transform, tokenizer, max_length=max_text_length(cfg), negatives=negatives,
                            word_ids=bool(getattr(cfg, "whole_word_mask", False)),
                            answers=vqa_answers(cfg), grounding_grid=grounding_grid if train else None,
                            negative_weights=negative_weights, fused_rows=fused_rows,
                            answer_tokens=bool(getattr(model, "decodes_answers", False)),
                            false_words=train and getattr(cfg, "false_word_weight", 0) > 0)


def fused_rows_of(model, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """(n, offset) for `ImageTextCollate`: a model that fuses every n-th row of the global batch
    (``fusion_every``), this process's rows starting at global row ``offset``."""
    from ..data.loader import rank_slice
    every = int(getattr(model.cfg, "fusion_every", 1) or 1)
    return every, rank_slice(0, batch_size, rank, world).start % every


def vqa_answers(cfg) -> list[str] | None:
    """The answer vocabulary when the model trains VQA (a VQA head, or for a model that decodes
    its answers the training answers, and "vqa" among the config's ``objectives`` where it has
    that field), else None."""
    if "vqa" not in getattr(cfg, "objectives", ("vqa",)):
        return None
    names = list(getattr(cfg, "answer_names", None) or [])
    if not hasattr(cfg, "num_answers"):  # answers decoded (BLIP): no head to fit
        return names or None
    if not cfg.num_answers:
        return None
    if len(names) != cfg.num_answers:
        raise ValueError(f"answer_names: {len(names)} names for num_answers={cfg.num_answers} "
                         "(VQA training needs the answer vocabulary)")
    return names


# ---- the run ----------------------------------------------------------------------------------

def prepare_model(args: RunArgs, run: Path):
    """(model, tokenizer): rebuilt from the run folder on --resume, else created anew. With
    --init the architecture (config) and tokenizer come from that run or Hugging Face folder
    (--preset is not used; --set still applies), then its weights are loaded."""
    from ..tokenizers import load_tokenizer
    if args.resume and (run / CONFIG).is_file():
        saved = read_run_config(run)
        if saved["model"] != args.model:
            raise ValueError(f"--resume: {run} holds a {saved['model']} run, not {args.model}")
        from ..pipeline import build_saved_model
        model = build_saved_model(run, saved)
        tok = load_tokenizer(run / "tokenizer") if (run / "tokenizer").is_dir() else None
        return model, tok
    cls = model_class(args.model)
    overrides = dict(args.overrides)
    source = init_source(args.init, args.model) if args.init else None
    if source is not None:
        base = config_from_dict(cls.config_class, source.model.config_dict())
        print(f"--init {args.init}: architecture and tokenizer from it (--preset not used)", file=sys.stderr)
    else:
        base = cls.make_config(args.preset)
    probe = merge_config(base, overrides, cls.model_name)
    image_size = (probe.vision if hasattr(probe, "vision") else probe).image_size
    tok = None
    if cls.task == "classification":
        from ..data.synthetic import class_names
        if args.data != "synthetic":
            raise ValueError("vit trains on --data synthetic (labelled single-object images); "
                             "for a folder of your own, give records a 'label' field")
        if args.vqa:
            raise ValueError(f"--vqa: {args.model} is an image classifier, it cannot answer questions")
        names = class_names(include_heldout=True)
        overrides.update(num_classes=len(names), class_names=names)
    else:
        jsonl = None
        if args.data != "synthetic":
            jsonl = open_dataset(args.data, "train", args.on_bad_sample, args.max_skip_rate,
                                 args.allow_outside_paths, remote_options(args))
        records = vocabulary_records(args.data, image_size, jsonl)
        if source is not None and source.tokenizer is not None:
            tok = source.tokenizer
            unknown = unknown_word_share(tok, corpus_texts(records))
            if unknown > 0:
                print(f"note: {unknown:.0%} of the words of the training texts are unknown to the "
                      f"tokenizer of --init {args.init} (they read as [UNK]); training from scratch "
                      "learns a vocabulary from them", file=sys.stderr)
        elif getattr(probe, "text_init", ""):  # a pretrained text tower brings its vocabulary
            from ..convert.hf_bert import bert_tokenizer
            tok = bert_tokenizer(probe.text_init)
        else:
            tok = build_tokenizer(args.data, image_size, records=records,
                                  extra_special_tokens=getattr(cls, "special_tokens", {}).values())
        overrides.update(_text_overrides(cls, probe, tok))
        if args.vqa:
            overrides.update(_vqa_overrides(probe, records, args.model, set(args.overrides), cls.objective_fields))
    if args.hard_negatives:
        overrides["hard_negatives"] = True
    cfg = merge_config(base, overrides, cls.model_name)
    if source is None and getattr(cfg, "vision_init", ""):  # the image tower comes with its architecture
        tower = vision_tower_config(cfg.vision_init)
        cfg = cls.with_vision_tower(cfg, tower) if hasattr(cls, "with_vision_tower") else \
            dataclasses.replace(cfg, vision=tower)
    model = cls(cfg)
    if source is not None:
        init_weights(model, source, args.init)
    else:  # what the config names: vision_init, text_init
        init_pretrained(model)
    return model, tok


def curve_evaluator(model, tok, data: str, size: int, allow_outside: bool = False):
    """evaluator(model) -> metrics on the first ``size`` test records (and single-object
    images), for learning curves: every task the model supports but captioning, and retrieval
    only for dual encoders, by embeddings alone (a fusion model's forward pass per pair, or
    ITM re-ranking, would cost more than the training between two points)."""
    from ..eval.run import _is_dual, default_tasks, evaluate, load_records
    from ..pipeline import Pipeline, image_transform
    if data != "synthetic" and not (Path(data) / "test.jsonl").is_file():
        raise ValueError(f"--eval-every: {data} has no test.jsonl to evaluate on")
    records, singles = load_records(data, "test", model.image_spec()["size"], allow_outside)
    records, singles = records[:size], singles[:size]
    tasks = [t for t in default_tasks(model) if t != "caption" and (t != "retrieval" or _is_dual(model))]

    def evaluator(m) -> dict:
        return evaluate(Pipeline(m, tok, image_transform(m)), data, "test", tasks,
                        records=(records, singles), rerank_k=0)["metrics"]
    return evaluator


def vision_tower_config(path: str):
    """The ViT config of the image tower of a run or Hugging Face folder (a ViT's own config,
    without its classifier head, or a CLIP's ``vision``), for ``vision_init``."""
    from ..factory import source_vision_tower
    return dataclasses.replace(source_vision_tower(path).cfg, num_classes=0, class_names=[])


def _text_overrides(cls, probe, tok) -> dict:
    """The tokenizer's vocabulary size and special-token ids (end, padding, mask, all specials),
    in whichever of these fields the config, or its nested ``text`` config, has."""
    specials = set(tok.special_token_ids) | {tok.pad_token_id}
    values = {"vocab_size": tok.vocab_size, "eot_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id, "special_token_ids": tuple(sorted(specials))}
    mask = tok.token_to_id("[MASK]")
    if mask is not None:
        values["mask_token_id"] = mask
    for name, token in getattr(cls, "special_tokens", {}).items():  # a model's own tokens
        if tok.token_to_id(token) is None:
            raise ValueError(f"{cls.model_name} needs the token {token} in its vocabulary")
        values[name] = tok.token_to_id(token)
    if isinstance(getattr(probe, "prompt", None), str):  # a prompt the model reads as tokens
        values["prompt_ids"] = tuple(tok.encode(probe.prompt)[1:-1])

    def present(cfg) -> dict:
        names = {f.name for f in dataclasses.fields(cfg)}
        return {k: v for k, v in values.items() if k in names}
    out = present(probe)
    if dataclasses.is_dataclass(getattr(probe, "text", None)):
        out["text"] = dataclasses.replace(probe.text, **present(probe.text))
    return out


def _vqa_overrides(probe, records: list[dict], model_name: str, given: set[str],
                   objective_fields: tuple[str, ...] = ()) -> dict:
    """A VQA head over the training answers (kept as they are when the config already names
    them, e.g. a VQA run continued on other data), trained alone unless ``objectives`` was set
    (``given``: the keys the user set). Trained alone, the auxiliary objectives (grounding,
    relations, replaced-word correction, attention forcing: ``vlkit.objectives``), which read the
    ITM and MLM passes VQA does not run, are turned off unless set (with the model's
    ``objective_fields``, e.g. BLIP's ``decoder_grounding``), so ``--init`` from a run that
    trained them needs no ``--set`` to undo them. A model that decodes its answers (a config
    with ``answer_names`` but no ``num_answers``: BLIP) keeps the training answers to rank them
    in evaluation."""
    names = {f.name for f in dataclasses.fields(probe)}
    if "answer_names" not in names:
        raise ValueError(f"--vqa: {model_name} has no VQA head (its config has no num_answers/answer_names)")
    answers = list(probe.answer_names) or answer_vocabulary(records)
    if not answers:
        raise ValueError("--vqa: the training records have no 'qa' entries with an 'answer'")
    out = {"answer_names": answers}
    if "num_answers" in names:
        out["num_answers"] = len(answers)
    if "objectives" in names and "objectives" not in given:
        out["objectives"] = ("vqa",)
        from ..objectives import registered_objectives
        defaults = {f.name: f.default for cls in registered_objectives() for f in dataclasses.fields(cls.options)}
        defaults.update({f.name: f.default for f in dataclasses.fields(probe) if f.name in objective_fields})
        out.update({name: value for name, value in defaults.items() if name in names and name not in given})
    return out


def init_source(path: str, model_name: str):
    """The pipeline of --init's run or Hugging Face folder, which must hold a ``model_name``."""
    from ..pipeline import load
    src = load(path)
    if src.model.model_name != model_name:
        raise ValueError(f"--init {path}: a {src.model.model_name} checkpoint cannot initialise {model_name}")
    return src


def init_weights(model, source, label: str | None = None) -> list[str]:
    """Start from the weights of another run or a Hugging Face folder (a path, or its loaded
    pipeline) of the same architecture. Task heads (``model.optional_heads``) that the source
    lacks keep their fresh initialisation, and heads the model lacks are not used, each named in
    a note; any other missing or unexpected key or any shape mismatch is an error. Returns the
    freshly initialised keys."""
    from ..convert.common import load_strict
    if isinstance(source, (str, Path)):
        label, source = label or str(source), init_source(str(source), model.model_name)
    elif source.model.model_name != model.model_name:
        raise ValueError(f"--init {label}: a {source.model.model_name} checkpoint cannot initialise "
                         f"{model.model_name}")
    state, own = dict(source.model.state_dict()), model.state_dict()
    heads = set(getattr(model, "optional_heads", ()))

    def head_of(key: str) -> str:
        return key.split(".", 1)[0]
    in_source, in_model = {head_of(k) for k in state}, {head_of(k) for k in own}
    fresh = sorted(k for k in own if head_of(k) in heads - in_source)
    unused = sorted(k for k in state if head_of(k) in heads - in_model)
    state.update({k: own[k] for k in fresh})
    for k in unused:
        del state[k]
    load_strict(model, state, f"--init {label}")
    if fresh:
        print(f"--init {label}: not in the checkpoint, freshly initialised: {', '.join(fresh)}",
              file=sys.stderr)
    if unused:
        print(f"--init {label}: heads this model does not have, not used: {', '.join(unused)}",
              file=sys.stderr)
    return fresh


def train(args: RunArgs) -> dict:
    """Train a run folder: the options checked (``validate_run_args``), the folder checked
    (``runfolder.check_out_folder``: a new run never writes over files that are not a fresh
    vlkit run's) and locked for the whole run (rank 0 holds ``RUN/.vlkit.lock``), then the
    trainer. Every problem found before the first write is a ValueError and leaves the folder
    as it was."""
    from .. import collective as vdist
    from .runfolder import acquire, check_out_folder, clear_progress, release, remove_if_untouched
    args = validate_run_args(args)
    run = Path(args.out)
    vdist.init_from_env()  # under torchrun: join the process group (gloo on CPU, NCCL on CUDA)
    if args.fsdp and vdist.world_size() < 2:
        raise ValueError("--fsdp shards the model over processes: run under torchrun with more than one")
    problem, locked, created = None, False, not run.exists()
    if vdist.rank() == 0:
        try:
            check_out_folder(run, args.resume)  # a refusal here writes nothing, not even the lock
            acquire(run)
            locked = True
            if check_out_folder(run, args.resume):  # again, now that no other process writes it
                clear_progress(run)  # a run stopped before its first checkpoint starts again
        except ValueError as e:
            problem = str(e)
    problem = vdist.broadcast_object(problem)  # every rank stops alike
    try:
        if problem:
            raise ValueError(problem)
        if args.resume:
            args = resolve_resume(args, read_run_config(run))
        else:
            args = dataclasses.replace(args, preset=None if args.init else (args.preset or "tiny"),
                                       seed=0 if args.seed is None else args.seed,
                                       data=args.data or "synthetic")
        result = _train(args, run)
        result["data"] = args.data
        return result
    finally:
        if locked:
            release(run)
            if created:
                remove_if_untouched(run)  # a run that failed before writing leaves no folder


def _train(args: RunArgs, run: Path) -> dict:
    from .. import collective as vdist
    rank, world = vdist.rank(), vdist.world_size()
    if args.data != "synthetic" and is_shard_spec(args.data):  # before anything is read or written
        from ..data.remote import check_readers
        check_readers(args.data, world, args.workers)
    seed_everything(args.seed)  # the same initial weights on every rank
    torch.set_num_threads(max(1, torch.get_num_threads()))
    fresh = not (args.resume and (run / CONFIG).is_file())
    vdist.barrier()  # every rank has decided before rank 0 writes the run folder
    model, tok = prepare_model(args, run)
    from .trainable import apply_trainable
    apply_trainable(model, args.trainable)  # before the optimiser: frozen parameters stay out of it
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
    defaults = TRAIN_DEFAULTS.get(args.model) or TRAIN_DEFAULTS.get(model.task) or TRAIN_DEFAULTS["clip"]
    if not fresh:  # a resumed run keeps its optimisation settings (resolve_resume refused changes)
        kept = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps", "minutes", "seed", "progress",
                                                                    "precision", "eval_every"}
        defaults = {**defaults, **{k: v for k, v in (read_run_config(run).get("train") or {}).items()
                                   if k in kept}}
    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, seed=args.seed, precision=args.precision,
                      progress=args.progress, **defaults)
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    if args.lr is not None:
        cfg.lr = args.lr
    if args.ckpt_every is not None:
        cfg.ckpt_every = args.ckpt_every
    cfg.grad_checkpointing, cfg.fsdp = args.grad_checkpointing, args.fsdp
    # fusion models may carry heads a run does not train (a VQA-only run, pair or rank heads):
    # DDP must then look for parameters without gradients
    cfg.find_unused_parameters = model.task == "fusion"
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) is not a multiple of "
                         f"the {world} processes")
    saved = {} if fresh else read_run_config(run)  # a resumed run keeps its data settings
    groups = args.groups
    if groups is None:
        groups = saved.get("groups")
    if groups is None:  # off by default: groups did not speed up learning (benchmarks/sample_efficiency.py)
        groups = 1
    groups = int(groups) if args.data == "synthetic" and model.task != "classification" else 1
    if groups < 1 or (cfg.batch_size // world) % groups:
        raise ValueError(f"--groups {groups}: each process's batch ({cfg.batch_size // world}) must "
                         "be a multiple of the group size")
    hard = bool(getattr(model.cfg, "hard_negatives", False))
    from ..data.collate import check_negative_weights
    negatives = saved.get("negatives") if args.negatives is None else args.negatives
    # checked before the run folder is written (the collate checks them again for its own callers)
    weights = check_negative_weights(saved.get("negative_weights") if args.negative_weights is None
                                     else args.negative_weights)
    if (args.negatives is not None or args.negative_weights) and not hard:
        raise ValueError("--negatives / --negative-weights choose among the data's negative captions: "
                         "they need --hard-negatives")
    negatives = (2 if negatives is None else int(negatives)) if hard else 0
    if hard and negatives < 1:
        raise ValueError(f"--negatives {negatives}: with --hard-negatives at least 1 per image")
    if fresh and rank == 0:
        save_run_config(run, args.model, model.config_dict(),
                        {"data": args.data, "preset": args.preset, "init": args.init, "vqa": args.vqa,
                         "groups": groups, "negatives": negatives, "negative_weights": weights,
                         "trainable": args.trainable, "train": dataclasses.asdict(cfg)})
        if tok is not None:
            tok.save(run / "tokenizer")
    task = model.task
    # a ViT with a per-patch head also sees images of several objects (half of its images)
    single = 0.5 if getattr(model, "patch_grid", 0) else None
    source = training_source(task, args.data, model.image_spec()["size"], args.seed, args.on_bad_sample,
                             args.max_skip_rate, groups, single_object=single,
                             allow_outside=args.allow_outside_paths,
                             remote=dict(remote_options(args), seed=args.seed, rank=rank, world=world),
                             questions=vqa_answers(model.cfg) is not None)
    collate = make_collate(model, task, tok, negatives, data=args.data, negative_weights=weights,
                           fused_rows=fused_rows_of(model, cfg.batch_size, rank, world))
    from ..data.loader import batch_loader
    # augmentation draws from an RNG seeded by (seed, global sample position), so every sample
    # is augmented alike whichever rank or worker reads it
    if world > 1:
        torch.manual_seed(args.seed + 1_000_003 * rank)  # per-rank stream for dropout and the like

    def batches(start: int):
        if hasattr(source, "head_records"):  # shard URLs: this rank streams its share of the shards
            from ..data.remote import stream_batch_loader
            return stream_batch_loader(source, collate, cfg.batch_size, start, args.seed, args.workers)
        return batch_loader(source, collate, cfg.batch_size, start=start, seed=args.seed,
                            num_workers=args.workers, rank=rank, world=world)

    vdist.barrier()
    evaluator = None
    if args.eval_every:
        cfg.eval_every = args.eval_every
        evaluator = curve_evaluator(model, tok, args.data, args.eval_size, args.allow_outside_paths)
    trainer = Trainer(model, batches, cfg, run, evaluator=evaluator)
    if rank == 0:
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        start = args.preset or (f"from {args.init}" if args.init else "its own architecture")
        print(f"training {args.model} ({start}, {millions:.1f}M "
              f"parameters) on {args.data}, precision {trainer.precision}, batch {cfg.batch_size}"
              + (f" over {world} processes" if world > 1 else ""), file=sys.stderr)
    result = trainer.fit(resume=args.resume)
    bad = getattr(getattr(source, "dataset", source), "skipped_at_start", None)
    if bad is not None:  # lines dropped when the dataset was read, plus images found bad in training
        counts = dict(bad)
        for reason, n in trainer.bad_sample_counts().items():
            counts[reason] = counts.get(reason, 0) + n
        result["bad_samples"] = dict(sorted(counts.items()))
        if counts and rank == 0:
            print(f"skipped bad samples: {', '.join(f'{n} {r}' for r, n in sorted(counts.items()))}",
                  file=sys.stderr)
    if rank == 0:
        (run / "train_summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
