"""CLIP speed side by side: vlkit against Hugging Face transformers (and open_clip when it is
importable), the same ViT-B/32 configuration, random weights, in one process, alternating.

Rows: training step (forward + backward + AdamW) in pairs/s and image embedding in images/s, for
fp32 and bf16 autocast, batch 16 and 64, on the CPU (and CUDA when present). Printed: each
implementation's rate, the ratios vlkit/HF and vlkit/open_clip, and the MFU of vlkit and of the
faster other (model FLOPs counted on the full input, over the best matrix-product rate of the
row's dtype, measured in the same process on a 2048³ product and ViT-B's MLP shapes).

Captions: ``--text-tokens 8-40`` (the default) draws each caption's length uniformly from 8 to
40 tokens, start and end tokens included, and pads it with zeros to the full context (77), as
open_clip's tokenizer always does and Hugging Face's does with ``padding="max_length"``; every
implementation gets the same ids and mask. vlkit's text tower runs only the positions up to the
batch's last end-of-text token (rounded up to a multiple of 8) and its towers' last blocks only
for the pooled token, which gives the same embeddings. ``--text-tokens full`` makes every
caption fill the context, so nothing is skipped.

open_clip needs torchvision, which does not import beside torch 2.13; to include it, use a
separate environment, e.g. ``python -m venv /tmp/oc && /tmp/oc/bin/pip install torch==2.14.1
torchvision==0.29.1 open_clip_torch transformers && /tmp/oc/bin/pip install -e .`` and run this
script with that interpreter. open_clip is never a dependency of vlkit.

    python benchmarks/clip_speed.py [--batches 16 64] [--precisions fp32 bf16] [--repeats 3]
        [--text-tokens 8-40|full] [--small] [--compile [--compile-mode MODE]]

``--compile`` adds two columns of vlkit's faster settings, with their ratios to the faster of
the others:
- ``compiled``: the row's precision, the towers under ``torch.compile`` (mode
  ``--compile-mode``, e.g. ``reduce-overhead`` for CUDA graphs; on the CPU with inductor's
  freezing, which takes the weights of inference graphs as constants and prepacks them),
  training with the optimizer ``vlkit train`` builds (fused AdamW), and in the bf16 rows image
  embedding on a bf16 copy of the weights (what ``Pipeline.to(dtype=torch.bfloat16)`` gives)
  instead of autocast, which casts every weight on every call;
- ``fastest``: the fastest settings vlkit has, the same in every row: training is the compiled
  model under bf16 autocast (``vlkit train --precision bf16``), embedding runs the compiled image
  tower on bf16 weights with int8 linear layers (``Pipeline.to(dtype=torch.bfloat16).quantize()``,
  ``vlkit.layers.quantize_int8``; the int8 product runs at twice bf16's rate on CPUs with
  VNNI). Its embeddings approximate the fp32 model's: the script prints their cosine to it.
Every other column, the plain vlkit one included, steps the same unfused ``torch.optim.AdamW``
and runs bf16 as autocast over fp32 weights.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

import vlkit
from vlkit.layers import quantize_int8


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


def model_flops(cfg, text_tokens: int) -> tuple[float, float]:
    """(image forward, text forward) FLOPs of one example, counting every matrix product
    (2 FLOPs a multiply-add; attention as full N×N, the causal text half included) on the
    full input: the same count for every implementation, whatever work it skips."""
    def tower(d, mlp, depth, n):
        return depth * (2 * n * (4 * d * d + 2 * d * mlp) + 4 * n * n * d)
    v, t = cfg.vision, cfg.text
    patches = (v.image_size // v.patch_size) ** 2
    image = 2 * patches * 3 * v.patch_size ** 2 * v.dim + tower(v.dim, v.mlp_dim, v.depth, patches + 1) \
        + 2 * v.dim * cfg.embed_dim
    text = tower(t.dim, t.mlp_dim, t.depth, text_tokens) + 2 * t.dim * cfg.embed_dim
    return image, text


def matmul_peak(device, dtype, repeats: int = 5) -> float:
    """Best FLOP/s of a matrix product in ``dtype`` over a square 2048³ one and ViT-B's MLP
    shapes at batch 16 and 64: the MFU denominator."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (800, 768, 3072), (3200, 768, 3072), (3200, 3072, 768)):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0))
    return best


def captions(batch: int, context: int, vocab: int, tokens: str, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask as a CLIP tokenizer gives them: start token, words, end token (the
    largest id), zeros to the full context. ``tokens``: "full" (every caption fills the context)
    or "LO-HI" (lengths drawn uniformly, start and end tokens included)."""
    if tokens == "full":
        lengths = torch.full((batch,), context)
    else:
        lo, hi = (int(x) for x in tokens.split("-"))
        if not 2 <= lo <= hi:
            raise SystemExit(f"--text-tokens {tokens}: need 2 <= LO <= HI")
        lo, hi = min(lo, context), min(hi, context)
        lengths = torch.randint(lo, hi + 1, (batch,), generator=generator)
    ids = torch.zeros(batch, context, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 1:n - 1] = torch.randint(1, vocab - 2, (n - 2,), generator=generator)
        ids[i, 0], ids[i, n - 1] = vocab - 2, vocab - 1
        mask[i, :n] = 1
    return ids, mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="the tiny preset instead of ViT-B/32 (a quick check)")
    ap.add_argument("--text-tokens", default="8-40",
                    help="caption lengths in tokens, padded to the full context as open_clip's "
                         "tokenizer pads: LO-HI drawn uniformly (default 8-40, mean 24), or 'full'")
    ap.add_argument("--compile", action="store_true",
                    help="add the columns of vlkit's faster settings (same weights as the vlkit column)")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode of those columns (default, reduce-overhead, max-autotune)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours = vlkit_model(args.small).to(device)
    impls = {"vlkit": ours, "hf": hf_model(ours).to(device)}
    oc = None if args.small else open_clip_model()
    if oc is not None:
        impls["open_clip"] = oc.to(device)
    fns = {k: step_fns(k, m) for k, m in impls.items()}
    references = list(fns)[1:]
    if args.compile:
        import copy
        twin = copy.deepcopy(ours)
        from vlkit.train.optim import make_optimizer
        # one graph per (precision, batch, grad mode, text length): many per function here
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        from torch._inductor import config as inductor_config
        if device.type == "cpu":  # inference graphs take the weights as constants (prepacked)
            inductor_config.freezing = True
        # the towers (the text one breaks its graph where it reads how many positions to run)
        twin.vision = torch.compile(twin.vision, dynamic=False, mode=args.compile_mode)
        twin.text = torch.compile(twin.text, dynamic=False, mode=args.compile_mode)
        train_fn, embed_fn = step_fns("vlkit", twin, make_optimizer(twin, 1e-5))
        # inference on a bf16 copy of the weights (Pipeline.to(dtype=torch.bfloat16))
        half = copy.deepcopy(ours).to(torch.bfloat16).eval()
        half_embed = torch.compile(half.encode_image, dynamic=False, mode=args.compile_mode)
        # and with int8 linear layers over it (Pipeline.quantize()); inductor's freezing is left
        # off for this graph: with it, compiling did not finish in 15 minutes here
        int8 = copy.deepcopy(half)
        quantize_int8(int8)
        int8_embed = torch.compile(int8.encode_image, dynamic=False, mode=args.compile_mode)

        def bf16_embed(px):
            with torch.autocast(device.type, enabled=False):
                return half_embed(px.to(torch.bfloat16))

        def fastest_embed(px):
            with torch.autocast(device.type, enabled=False), inductor_config.patch(freezing=False):
                return int8_embed(px.to(torch.bfloat16))

        def fastest_train(px, ids, mask):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                train_fn(px, ids, mask)

        def compiled_embed(px):  # in the bf16 rows, the bf16 weights rather than autocast
            return bf16_embed(px) if torch.is_autocast_enabled(device.type) else embed_fn(px)
        fns["compiled"] = (train_fn, compiled_embed)
        fns["fastest"] = (fastest_train, fastest_embed)
        with torch.no_grad():
            probe = torch.randn(8, 3, ours.cfg.vision.image_size, ours.cfg.vision.image_size, device=device)
            cosine = torch.nn.functional.cosine_similarity(fastest_embed(probe).float(), ours.encode_image(probe))
    v, t = ours.cfg.vision, ours.cfg.text
    text_tokens = t.context_length if oc is not None else min(t.context_length, 20)
    flops = model_flops(ours.cfg, text_tokens)
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"open_clip: {'yes' if oc is not None else 'not importable (see the docstring)'}"
          + (f"; compile mode {args.compile_mode}" if args.compile else "")
          + f"; captions {args.text_tokens} tokens padded to {text_tokens}")
    peaks = {p: matmul_peak(device, torch.float32 if p == "fp32" else torch.bfloat16) for p in args.precisions}
    print("matmul peak: " + ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s" for p in args.precisions))
    if args.compile:
        print(f"fastest embedding (int8 over bf16) against fp32: cosine min {cosine.min():.5f}, "
              f"mean {cosine.mean():.5f} (8 random images)")
    columns = list(fns)
    header = f"{'row':28s}" + "".join(f"{k:>12s}" for k in columns) + f"{'vlkit/hf':>10s}" + \
        (f"{'vlkit/oc':>10s}" if oc is not None else "") + \
        (f"{'compiled/best':>14s}{'fastest/best':>13s}" if args.compile else "") + f"{'MFU vlkit':>10s}{'MFU best':>9s}"
    print(header)
    generator = torch.Generator().manual_seed(0)
    for precision in args.precisions:
        ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
            else (lambda: torch.autocast(device.type, enabled=False))
        for b in args.batches:
            px = torch.randn(b, 3, v.image_size, v.image_size, device=device)
            ids, mask = captions(b, text_tokens, t.vocab_size, args.text_tokens, generator)
            ids, mask = ids.to(device), mask.to(device)
            for row, make, per_item in (("train pairs/s", lambda f: (f[0], (px, ids, mask)), 3 * sum(flops)),
                                        ("embed images/s", lambda f: (f[1], (px,)), flops[0])):
                calls = {k: make(f) for k, f in fns.items()}
                grad = torch.no_grad() if row.startswith("embed") else contextlib.nullcontext()
                with ctx(), grad:  # implementations alternate within a row
                    secs = timed_rounds(calls, args.repeats)
                rates = {k: b / sec for k, sec in secs.items()}
                best = max(rates[k] for k in references)
                line = f"{f'{row} {precision} b{b}':28s}" + "".join(f"{rates[k]:12.1f}" for k in columns)
                line += f"{rates['vlkit'] / rates['hf']:10.2f}"
                if oc is not None:
                    line += f"{rates['vlkit'] / rates['open_clip']:10.2f}"
                if args.compile:
                    line += f"{rates['compiled'] / best:14.2f}{rates['fastest'] / best:13.2f}"
                line += f"{rates['vlkit'] * per_item / peaks[precision]:10.1%}{best * per_item / peaks[precision]:9.1%}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
