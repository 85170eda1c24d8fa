"""CLIP speed side by side: vlkit against Hugging Face transformers (and open_clip when it is
importable), the same ViT-B/32 configuration, random weights, in one process, alternating.

Rows: training step (forward + backward + AdamW) in pairs/s and image embedding in images/s, for
fp32 and bf16 autocast, batch 16 and 64, on the CPU (and CUDA when present). Printed: each
implementation's rate and the ratios vlkit/HF and vlkit/open_clip.

open_clip needs torchvision, which does not import beside torch 2.13; to include it, use a
separate environment, e.g. ``python -m venv /tmp/oc && /tmp/oc/bin/pip install torch==2.14.1
torchvision==0.29.1 open_clip_torch transformers && /tmp/oc/bin/pip install -e .`` and run this
script with that interpreter. open_clip is never a dependency of vlkit.

    python benchmarks/clip_speed.py [--batches 16 64] [--precisions fp32 bf16] [--repeats 3] [--small] [--compile]

``--compile`` adds a column of vlkit's fastest settings and its ratio to the faster of the
others: the towers under ``torch.compile`` (mode ``--compile-mode``, e.g. ``reduce-overhead`` for
CUDA graphs; on the CPU with inductor's freezing, which takes the weights of inference graphs as
constants and prepacks them), training with the optimizer ``vlkit train`` builds (fused AdamW),
and in the bf16 rows image embedding on a bf16 copy of the weights (what
``Pipeline.to(dtype=torch.bfloat16)`` gives) instead of autocast, which casts every weight on
every call. Every other column, the plain vlkit one included, steps the same unfused
``torch.optim.AdamW`` and runs bf16 as autocast over fp32 weights.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

import vlkit


def vlkit_model(small: bool):
    if small:  # the tiny preset's sizes with a plain patch projection, as HF and open_clip have
        return vlkit.create_model("clip", "tiny", **{"vision.stem": "patch", "vision.patch_bias": False,
                                                     "vision.act": "quick_gelu", "text.act": "quick_gelu"})
    return vlkit.create_model("clip", "b32")


def hf_model(model):
    import transformers
    v, t = model.cfg.vision, model.cfg.text
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu"}[v.act]
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=t.dim, num_hidden_layers=t.depth, num_attention_heads=t.heads,
                         intermediate_size=t.mlp_dim, vocab_size=t.vocab_size,
                         max_position_embeddings=t.context_length, hidden_act=act),
        vision_config=dict(hidden_size=v.dim, num_hidden_layers=v.depth, num_attention_heads=v.heads,
                           intermediate_size=v.mlp_dim, image_size=v.image_size, patch_size=v.patch_size,
                           hidden_act=act),
        projection_dim=model.cfg.embed_dim)
    return transformers.CLIPModel(cfg)


def open_clip_model():
    try:
        import open_clip
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return None
    # OpenAI's ViT-B/32 layout, QuickGELU as vlkit's b32 preset (random weights, nothing downloaded)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32-quickgelu")
    return model


def contrastive(img, txt, scale):
    logits = scale.exp() * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


def step_fns(kind, model, opt=None):
    """(train step, image embedding) callables for one implementation."""
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-5)
    if kind == "vlkit":
        def train(px, ids, mask):
            loss = contrastive(model.encode_image(px), model.encode_text(ids, mask), model.logit_scale)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

        def embed(px):
            return model.encode_image(px)
    elif kind == "hf":
        def train(px, ids, mask):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px, return_loss=True)
            out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

        def embed(px):
            return model.get_image_features(pixel_values=px)
    else:
        def train(px, ids, mask):
            img, txt = model.encode_image(px, normalize=True), model.encode_text(ids, normalize=True)
            loss = contrastive(img, txt, model.logit_scale)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

        def embed(px):
            return model.encode_image(px)
    return train, embed


def timed_rounds(calls: dict, repeats: int = 3) -> dict:
    """{name: (fn, args)} -> {name: best seconds}: one warm-up call each, then ``repeats`` rounds
    in which every implementation runs once in turn, so a slow spell of a shared machine falls
    on all of them alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn, args in calls.values():
        fn(*args)
        fn(*args)  # a second warm-up: CUDA graphs are recorded on the second call
    best = {k: float("inf") for k in calls}
    for _ in range(repeats):
        for k, (fn, args) in calls.items():
            sync()
            t0 = time.perf_counter()
            fn(*args)
            sync()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="the tiny preset instead of ViT-B/32 (a quick check)")
    ap.add_argument("--compile", action="store_true",
                    help="add a column: vlkit under torch.compile (same weights as the vlkit column)")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode of that column (default, reduce-overhead, max-autotune)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours = vlkit_model(args.small).to(device)
    impls = {"vlkit": ours, "hf": hf_model(ours).to(device)}
    oc = None if args.small else open_clip_model()
    if oc is not None:
        impls["open_clip"] = oc.to(device)
    fns = {k: step_fns(k, m) for k, m in impls.items()}
    if args.compile:
        import copy
        twin = copy.deepcopy(ours)
        from vlkit.train.optim import make_optimizer
        # one graph per (precision, batch, grad mode): eight per function here
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        if device.type == "cpu":  # inference graphs take the weights as constants (prepacked)
            from torch._inductor import config as inductor_config
            inductor_config.freezing = True
        twin.encode_image = torch.compile(twin.encode_image, dynamic=False, mode=args.compile_mode)
        twin.encode_text = torch.compile(twin.encode_text, dynamic=False, mode=args.compile_mode)
        impls["vlkit+compile"] = twin
        train_fn, embed_fn = step_fns("vlkit", twin, make_optimizer(twin, 1e-5))
        # bf16 rows: inference on a bf16 copy of the weights (Pipeline.to(dtype=torch.bfloat16))
        half = copy.deepcopy(ours).to(torch.bfloat16).eval()
        half_embed = torch.compile(half.encode_image, dynamic=False, mode=args.compile_mode)

        def fastest_embed(px):
            if not torch.is_autocast_enabled(device.type):
                return embed_fn(px)
            with torch.autocast(device.type, enabled=False):
                return half_embed(px.to(torch.bfloat16))
        fns["vlkit+compile"] = (train_fn, fastest_embed)
    v, t = ours.cfg.vision, ours.cfg.text
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"open_clip: {'yes' if oc is not None else 'not importable (see the docstring)'}"
          + (f"; compile mode {args.compile_mode}" if args.compile else ""))
    header = f"{'row':28s}" + "".join(f"{k:>14s}" for k in impls) + f"{'vlkit/hf':>10s}" + \
        (f"{'vlkit/oc':>10s}" if oc is not None else "") + \
        (f"{'compiled/best':>14s}" if args.compile else "")
    print(header)
    for precision in args.precisions:
        ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
            else (lambda: torch.autocast(device.type, enabled=False))
        for b in args.batches:
            px = torch.randn(b, 3, v.image_size, v.image_size, device=device)
            # the full context (77 for b32), as open_clip always takes; every implementation alike
            length = t.context_length if oc is not None else min(t.context_length, 20)
            ids = torch.randint(1, t.vocab_size - 1, (b, length), device=device)
            ids[:, -1] = t.vocab_size - 1
            mask = torch.ones_like(ids)
            for row, make in (("train pairs/s", lambda f: (f[0], (px, ids, mask))),
                              ("embed images/s", lambda f: (f[1], (px,)))):
                calls = {k: make(f) for k, f in fns.items()}
                grad = torch.no_grad() if row.startswith("embed") else contextlib.nullcontext()
                with ctx(), grad:  # implementations alternate within a row
                    secs = timed_rounds(calls, args.repeats)
                rates = {k: b / sec for k, sec in secs.items()}
                line = f"{f'{row} {precision} b{b}':28s}" + "".join(f"{rates[k]:14.1f}" for k in impls)
                line += f"{rates['vlkit'] / rates['hf']:10.2f}"
                if oc is not None:
                    line += f"{rates['vlkit'] / rates['open_clip']:10.2f}"
                if args.compile:
                    others = max(rates[k] for k in impls if k not in ("vlkit", "vlkit+compile"))
                    line += f"{rates['vlkit+compile'] / others:14.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
