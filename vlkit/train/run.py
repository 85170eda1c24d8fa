"""``vlkit train``: data, tokenizer and model for a run folder, then the shared trainer."""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models import build_model, create_model, model_class
from .checkpoint import CONFIG, latest_checkpoint, read_run_config, save_run_config
from .loop import TrainConfig, Trainer

# Per-model defaults for the tiny presets on the synthetic world (a 2-core CPU).
TRAIN_DEFAULTS = {
    "vit": dict(batch_size=128, lr=4e-3, weight_decay=0.05, warmup_steps=30, min_lr_ratio=0.5),
    "clip": dict(batch_size=128, lr=1e-3, weight_decay=0.1, warmup_steps=50),
}
SYNTHETIC_SEED = 0  # the built-in world's default seed: the same world and test split everywhere


@dataclass
class RunArgs:
    model: str
    data: str = "synthetic"
    preset: str = "tiny"
    out: str = "runs/default"
    minutes: float | None = None
    steps: int | None = None
    seed: int = 0
    resume: bool = False
    init: str | None = None
    batch_size: int | None = None
    lr: float | None = None
    precision: str = "auto"
    hard_negatives: bool = False
    workers: int = 1
    on_bad_sample: str = "error"
    overrides: dict = dataclasses.field(default_factory=dict)
    progress: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- data -------------------------------------------------------------------------------------

def synthetic_world(image_size: int):
    from ..data.synthetic import SyntheticWorld
    return SyntheticWorld(seed=SYNTHETIC_SEED, image_size=image_size)


def corpus_texts(records) -> list[str]:
    texts = []
    for rec in records:
        texts.extend(rec.get("captions") or [rec["caption"]])
        texts.extend(n["caption"] for n in rec.get("negatives") or [])
        texts.extend(q["question"] for q in rec.get("qa") or [])
        texts.extend(q["answer"] for q in rec.get("qa") or [])
    return texts


def build_tokenizer(data: str, image_size: int, jsonl=None):
    """A WordPiece vocabulary learned from the training captions (and their negatives and
    questions), so small models need no outside vocabulary file."""
    from ..tokenizers import build_wordpiece_vocab
    if data == "synthetic":
        world = synthetic_world(image_size)
        records = world.records("train", 1500) + world.records("train", 300, single_object=True)
        texts = corpus_texts(records)
    else:
        texts = corpus_texts(jsonl.records if hasattr(jsonl, "records") else
                             [jsonl.record(i) for i in range(len(jsonl))])
    return build_wordpiece_vocab(texts, vocab_size=2000)


def training_source(task: str, data: str, image_size: int, seed: int, on_bad_sample: str):
    from ..data.loader import EpochSource, SyntheticSource
    if data == "synthetic":
        return SyntheticSource(synthetic_world(image_size), "train",
                                     single_object=(task == "classification"), offset=seed * 10_000_000)
    from ..data.jsonl import JsonlDataset
    return EpochSource(JsonlDataset(data, "train", on_bad_sample=on_bad_sample), seed=seed)


def make_collate(model, task: str, tokenizer, negatives: int, train: bool = True,
                 data: str = "synthetic"):
    from ..data.collate import ClassificationCollate, ImageTextCollate
    from ..data.transforms import ImageTransform
    spec = model.image_spec()
    # The synthetic world never repeats a sample, so it needs no crops (a crop can cut an object
    # out of the picture and falsify its caption); a user's dataset gets random resized crops.
    scale = (1.0, 1.0) if data == "synthetic" else (0.7, 1.0)
    transform = ImageTransform(spec["size"], spec["mean"], spec["std"], train=train,
                               scale=scale, hflip=True)
    if task == "classification":
        return ClassificationCollate(transform, model.cfg.class_names)
    return ImageTextCollate(transform, tokenizer, negatives=negatives)


# ---- the run ----------------------------------------------------------------------------------

def prepare_model(args: RunArgs, run: Path):
    """(model, tokenizer): rebuilt from the run folder on --resume, else created anew."""
    from ..tokenizers import load_tokenizer
    if args.resume and (run / CONFIG).is_file():
        saved = read_run_config(run)
        if saved["model"] != args.model:
            raise ValueError(f"{run} holds a {saved['model']} run, not {args.model}")
        model = build_model(saved["model"], saved["config"])
        tok = load_tokenizer(run / "tokenizer") if (run / "tokenizer").is_dir() else None
        return model, tok
    cls = model_class(args.model)
    overrides = dict(args.overrides)
    probe = cls.make_config(args.preset, **overrides)
    image_size = (probe.vision if hasattr(probe, "vision") else probe).image_size
    tok = None
    if cls.task == "classification":
        from ..data.synthetic import class_names
        if args.data != "synthetic":
            raise ValueError("vit trains on --data synthetic (labelled single-object images); "
                             "for a folder of your own, give records a 'label' field")
        names = class_names(include_heldout=True)
        overrides.update(num_classes=len(names), class_names=names)
    else:
        jsonl = None
        if args.data != "synthetic":
            from ..data.jsonl import JsonlDataset
            jsonl = JsonlDataset(args.data, "train", on_bad_sample=args.on_bad_sample)
        tok = build_tokenizer(args.data, image_size, jsonl)
        overrides.update(_text_overrides(cls, probe, tok))
    if args.hard_negatives:
        overrides["hard_negatives"] = True
    model = create_model(args.model, args.preset, **overrides)
    if args.init:
        init_weights(model, args.init)
    return model, tok


def _text_overrides(cls, probe, tok) -> dict:
    """Vocabulary size and end-token id of the learned tokenizer, wherever the config keeps them."""
    if hasattr(probe, "text"):
        text = dataclasses.replace(probe.text, vocab_size=tok.vocab_size, eot_token_id=tok.eos_token_id)
        return {"text": text}
    return {"vocab_size": tok.vocab_size}


def init_weights(model, path: str) -> None:
    """Start from the weights of another run or a Hugging Face folder of the same architecture."""
    from ..convert.common import load_strict
    from ..pipeline import load
    src = load(path).model
    if src.model_name != model.model_name:
        raise ValueError(f"--init {path}: a {src.model_name} checkpoint cannot initialise {model.model_name}")
    load_strict(model, src.state_dict(), path)


def train(args: RunArgs) -> dict:
    run = Path(args.out)
    if args.steps is None and args.minutes is None:
        raise ValueError("give --steps or --minutes")
    if not args.resume and latest_checkpoint(run) is not None:
        raise ValueError(f"{run} already holds a run; use --resume to continue it or another --out")
    seed_everything(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = prepare_model(args, run)
    run.mkdir(parents=True, exist_ok=True)
    defaults = TRAIN_DEFAULTS.get(args.model, TRAIN_DEFAULTS["clip"])
    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, seed=args.seed, precision=args.precision,
                      progress=args.progress, **defaults)
    if args.batch_size:
        cfg.batch_size = args.batch_size
    if args.lr:
        cfg.lr = args.lr
    if not (args.resume and (run / CONFIG).is_file()):
        save_run_config(run, args.model, model.config_dict(),
                        {"data": args.data, "preset": args.preset, "train": dataclasses.asdict(cfg)})
        if tok is not None:
            tok.save(run / "tokenizer")
    task = model.task
    negatives = 2 if getattr(model.cfg, "hard_negatives", False) else 0
    source = training_source(task, args.data, model.image_spec()["size"], args.seed, args.on_bad_sample)
    collate = make_collate(model, task, tok, negatives, data=args.data)
    from ..data.loader import batch_loader

    def batches(start: int):
        return batch_loader(source, collate, cfg.batch_size, start=start, seed=args.seed,
                            num_workers=args.workers)

    trainer = Trainer(model, batches, cfg, run)
    print(f"training {args.model} ({args.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters) on {args.data}, precision {trainer.precision}, batch {cfg.batch_size}",
          file=sys.stderr)
    result = trainer.fit(resume=args.resume)
    (run / "train_summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
