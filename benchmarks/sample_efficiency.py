"""Sample efficiency of tiny ViT and CLIP settings on the synthetic world: every setting trains on
the same pre-generated batches (fp32) and is evaluated (BatchNorm statistics recomputed, as the
trainer does) after a number of training images, so settings compare per image, whatever each
costs per image. Meant for a GPU (a few minutes); on a CPU it runs a smoke-sized version.

    python benchmarks/sample_efficiency.py            # the first sweep
    SWEEP=2 python benchmarks/sample_efficiency.py    # the second (learning rate x pooling)
    SWEEP=3 python benchmarks/sample_efficiency.py    # minimal-pair group sizes (CLIP, ALBEF)
    SWEEP=4 python benchmarks/sample_efficiency.py    # ALBEF learning rate; CLIP to 256k pairs
    SWEEP=5 python benchmarks/sample_efficiency.py    # CLIP text pooling and causality

Results are printed as JSON lines and appended to $OUT/sweep.jsonl (default /tmp).
"""
import copy, json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
from vlkit import create_model
from vlkit.data.synthetic import class_names
from vlkit.data.loader import SyntheticSource, batch_loader
from vlkit.data.synthetic import synthetic_world
from vlkit.train.run import build_tokenizer, make_collate
from vlkit.train.optim import make_optimizer, lr_at
from vlkit.pipeline import Pipeline, image_transform
from vlkit.eval.run import eval_itm, eval_retrieval, eval_zeroshot, load_records

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = DEV == "cpu"
OUT = os.environ.get("OUT", "/tmp")
WORKERS = 14 if not SMALL else 1
log = open(os.path.join(OUT, "sweep.jsonl"), "a")

def emit(rec):
    print(json.dumps(rec), flush=True); log.write(json.dumps(rec) + "\n"); log.flush()

def gen(source, collate, n, bs=128):
    out = []
    for b in batch_loader(source, collate, bs, start=0, seed=0, num_workers=WORKERS):
        out.append({k: v for k, v in b.items()})
        if len(out) == n: break
    return out

def micro(batches, split):
    for b in batches:
        if split == 1: yield b; continue
        n = b["pixel_values"].shape[0] // split
        for i in range(split):
            yield {k: (v[i*n:(i+1)*n] if torch.is_tensor(v) and v.ndim and v.shape[0] == 128 else v) for k, v in b.items()}

@torch.no_grad()
def recal(model, batches):
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms: m.reset_running_stats(); m.momentum = None
    model.train()
    for b in batches[:8]: model.training_losses({k: v.to(DEV) for k, v in b.items()})
    model.eval()

def train(name, model, batches, steps, lr, wd, warmup, min_ratio, split, evals, evalfn, extra):
    torch.manual_seed(0)
    model.to(DEV).train()
    opt = make_optimizer(model, lr, wd)
    it = micro(batches, split)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups: g["lr"] = lr_at(step, lr, steps, warmup, min_ratio)
        b = {k: v.to(DEV, non_blocking=True) for k, v in next(it).items()}
        out = model.training_losses(b); loss = out["loss"]
        loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        if hasattr(model, "after_step"): model.after_step(step)
        if step + 1 in evals:
            m = copy.deepcopy(model); recal(m, batches)
            r = evalfn(m); r.update(name=name, step=step + 1, samples=(step + 1) * b["pixel_values"].shape[0], loss=round(loss.item(), 4), t=round(time.time() - t0, 1), **extra)
            r.update({k: round(float(v), 4) for k, v in out.items() if k.endswith(("_loss", "_acc"))})
            emit(r)

# ---------------- ViT ----------------
SWEEP = os.environ.get("SWEEP", "1")
names = class_names(include_heldout=True)
def vit(**ov):
    return create_model("vit", "tiny", num_classes=len(names), class_names=names, **ov)
probe = vit()
world = synthetic_world(64)
t = time.time()
vb = gen(SyntheticSource(world, "train", single_object=True), make_collate(probe, "classification", None, 0), 2 if SMALL or SWEEP in ("3", "4", "5") else 750)
test = [r for r in world.records("test", 1000, single_object=True) if not r.get("heldout")]
tb = make_collate(probe, "classification", None, 0, train=False)(test)
tb = {k: v.to(DEV) for k, v in tb.items()}
emit({"gen_vit_s": round(time.time() - t, 1)})

def vit_eval(m):
    with torch.no_grad():
        return {"acc": round((m(tb["pixel_values"]).logits.argmax(-1) == tb["labels"]).float().mean().item(), 4)}

def s1(m, c1=16):
    from torch import nn
    pe = [x for x in m.modules() if x.__class__.__name__ == "PatchEmbed"][0]
    seq = pe.proj; first = seq[0]
    seq[0] = nn.Conv2d(c1, first.out_channels, 3, stride=2, padding=1, bias=False)
    pe.proj = nn.Sequential(nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True), *seq)
    return m

VSTEPS = 3 if SMALL else 750
EV = (3,) if SMALL else (200, 300, 400, 500, 600, 750)
base = dict(lr=4e-3, wd=0.05, warmup=30, min_ratio=0.5, split=1)
VIT = [
    ("base", {}, {}),
    ("lr2e-3", {}, {"lr": 2e-3}),
    ("lr8e-3", {}, {"lr": 8e-3}),
    ("bs64", {}, {"split": 2}),
    ("cls", {"pool": "cls"}, {}),
    ("depth2", {"depth": 2}, {}),
    ("patch8", {"patch_size": 8}, {}),
    ("s1", "s1", {}),
    ("dim192", {"dim": 192, "heads": 3, "mlp_dim": 768}, {}),
    ("wd0", {}, {"wd": 0.0}),
    ("cos0", {}, {"min_ratio": 0.0}),
    ("patch8lin", {"patch_size": 8, "stem": "patch"}, {}),
]
if os.environ.get("SWEEP") == "2":
    VIT = [
        ("p16-lr1e-3", {}, {"lr": 1e-3}),
        ("p16-lr1.5e-3-cls", {"pool": "cls"}, {"lr": 1.5e-3}),
        ("p8-lr2e-3", {"patch_size": 8}, {"lr": 2e-3}),
        ("p8-lr1e-3", {"patch_size": 8}, {"lr": 1e-3}),
        ("p8-lr2e-3-cls", {"patch_size": 8, "pool": "cls"}, {"lr": 2e-3}),
    ]
if SWEEP in ("3", "4", "5"): VIT = []
if SMALL: VIT = VIT[:1]
for name, ov, tr in VIT:
    m = s1(vit()) if ov == "s1" else vit(**ov)
    a = {**base, **tr}
    steps = VSTEPS * a["split"]
    evals = tuple(e * a["split"] for e in EV)
    train("vit-" + name, m, vb, steps, a["lr"], a["wd"], a["warmup"], a["min_ratio"], a["split"], evals, vit_eval, {})
del vb

# ---------------- CLIP ----------------
tok = build_tokenizer("synthetic", 64)
def clip(**ov):
    return create_model("clip", "tiny", **{"text.vocab_size": tok.vocab_size, "text.eot_token_id": tok.eos_token_id, **ov})
probe = clip()
t = time.time()
cb = gen(SyntheticSource(world, "train"), make_collate(probe, "image_text", tok, 0), 8 if SMALL or SWEEP in ("4", "5") else 625)
records, singles = load_records("synthetic", "test", 64)
if SMALL: records, singles = records[:50], singles[:50]
emit({"gen_clip_s": round(time.time() - t, 1)})

def clip_eval(m):
    pipe = Pipeline(m, tok, image_transform(m))
    r = {}
    r.update(eval_retrieval(pipe, records)); r.update(eval_zeroshot(pipe, singles))
    return {k.split(".")[1]: round(float(v), 4) for k, v in r.items() if k.endswith(("t2i_r1", "i2t_r1", "top1", "top1_seen", "top1_heldout"))}

CSTEPS = 3 if SMALL else 625
CEV = (3,) if SMALL else (300, 450, 625)
cbase = dict(lr=1e-3, wd=0.1, warmup=50, min_ratio=0.0, split=1)
CLIP = [
    ("base", {}, {}),
    ("lr3e-3", {}, {"lr": 3e-3}),
    ("patch8", {"vision.patch_size": 8}, {}),
    ("patch8-lr3e-3", {"vision.patch_size": 8}, {"lr": 3e-3}),
    ("bs64", {}, {"split": 2}),
    ("cal-patch8lin-d4", {"vision.patch_size": 8, "vision.stem": "patch", "vision.depth": 4, "text.depth": 4}, {}),
    ("vd1-td2-lr3e-3", {"vision.depth": 1, "text.depth": 2}, {"lr": 3e-3}),
    ("lr6e-3", {}, {"lr": 6e-3}),
]
import math
if os.environ.get("SWEEP") == "2":
    CLIP = [
        ("lr5e-4", {}, {"lr": 5e-4}),
        ("scale50", {"logit_scale_init": math.log(50)}, {}),
        ("scale50-lr5e-4", {"logit_scale_init": math.log(50)}, {"lr": 5e-4}),
        ("lin-p16", {"vision.stem": "patch"}, {}),
        ("lr2e-3-warm200", {}, {"lr": 2e-3, "warmup": 200}),
        ("wd0-clip0", {}, {"wd": 0.0}),
    ]
if SWEEP in ("3", "4", "5"): CLIP = []
if SMALL: CLIP = CLIP[:2]
for name, ov, tr in CLIP:
    m = clip(**ov)
    a = {**cbase, **tr}
    train("clip-" + name, m, cb, CSTEPS * a["split"], a["lr"], a["wd"], a["warmup"], a["min_ratio"], a["split"],
          tuple(e * a["split"] for e in CEV), clip_eval, {})

# ---------------- minimal-pair groups (SWEEP=3) ----------------
def kinds_eval(m):
    pipe = Pipeline(m, tok, image_transform(m))
    r = eval_itm(pipe, records[:300] if not SMALL else records)
    return {k.split(".", 1)[1]: round(float(v), 4) for k, v in r.items()}

def clip_eval3(m):
    r = clip_eval(m); r.update(kinds_eval(m)); return r

def albef_eval(m):
    from vlkit.eval.run import eval_vqa
    return kinds_eval(m)

if SWEEP == "3":
    from vlkit.data.synthetic import SyntheticWorld
    for G in ((1, 4) if SMALL else (1, 2, 4, 8)):
        w = SyntheticWorld(0, 64, group_size=G)
        t = time.time()
        gb = gen(SyntheticSource(w, "train"), make_collate(probe, "image_text", tok, 2), 8 if SMALL else 625)
        emit({"gen_s": round(time.time() - t, 1), "groups": G})
        for name, hard in (("", False), ("-hn", True)):
            if hard and G not in (1, 4): continue
            m = clip(hard_negatives=hard)
            train(f"clip-g{G}{name}", m, gb, CSTEPS, 1e-3, 0.1, 50, 0.0, 1, CEV, clip_eval3, {"groups": G})
        del gb
    for G in (1, 4):
        w = SyntheticWorld(0, 64, group_size=G)
        from vlkit.models import model_class
        from vlkit.train.run import _text_overrides
        a = create_model("albef", "tiny", **_text_overrides(model_class("albef"), model_class("albef").make_config("tiny"), tok))
        ab = gen(SyntheticSource(w, "train"), make_collate(a, "fusion", tok, 0), 8 if SMALL else 800, bs=64)
        steps = 8 if SMALL else 800
        train(f"albef-g{G}", a, ab, steps, 1e-3, 0.01, 50, 0.1, 1, (steps // 2, steps) if not SMALL else (steps,),
              albef_eval, {"groups": G})
        del ab

if SWEEP == "4":
    from vlkit.models import model_class
    from vlkit.train.run import _text_overrides
    a = create_model("albef", "tiny", **_text_overrides(model_class("albef"), model_class("albef").make_config("tiny"), tok))
    ab = gen(SyntheticSource(world, "train"), make_collate(a, "fusion", tok, 0), 8 if SMALL else 800, bs=64)
    steps = 8 if SMALL else 800
    for lr in (3e-4,):
        a = create_model("albef", "tiny", **_text_overrides(model_class("albef"), model_class("albef").make_config("tiny"), tok))
        train(f"albef-lr{lr}", a, ab, steps, lr, 0.01, 50, 0.1, 1, (steps // 2, steps) if not SMALL else (steps,),
              albef_eval, {})
    del ab
    n = 8 if SMALL else 2000
    cb = gen(SyntheticSource(world, "train"), make_collate(probe, "image_text", tok, 0), n)
    ev = (n,) if SMALL else (625, 1000, 1500, 2000)
    small = {"vision.dim": 128, "vision.depth": 1, "vision.heads": 2, "vision.mlp_dim": 512,
             "text.dim": 128, "text.depth": 2, "text.heads": 2, "text.mlp_dim": 512}
    for name, ov in (("base", {}), ("small", small)):
        train(f"clip-{name}-long", clip(**ov), cb, n, 1e-3, 0.1, 50, 0.0, 1, ev, clip_eval3, {})

if SWEEP == "5":
    n = 8 if SMALL else 1500
    cb = gen(SyntheticSource(world, "train"), make_collate(probe, "image_text", tok, 0), n)
    ev = (n,) if SMALL else (625, 1000, 1500)
    for name, ov in (("mean", {"text.pool": "mean"}), ("mean-bidir", {"text.pool": "mean", "text.causal": False}),
                     ("eot-bidir", {"text.causal": False})):
        train(f"clip-{name}", clip(**ov), cb, n, 1e-3, 0.1, 50, 0.0, 1, ev, clip_eval, {})
emit({"done": True})
