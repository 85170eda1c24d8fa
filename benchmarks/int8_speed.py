"""Int8 inference against bf16, side by side in one process: the matrix products alone
(``torch._int_mm`` against bf16 and fp32 products of ViT-B's shapes), then CLIP image embedding
with int8 linear layers (``vlkit.layers.quantize_int8``, ``Pipeline.quantize()``) against bf16
autocast and bf16 weights, eager and under ``torch.compile``, with the embeddings' cosine to the
fp32 model's.

    python benchmarks/int8_speed.py [--preset b32] [--batch 16] [--repeats 3] [--no-compile]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import vlkit
from vlkit.layers import quantize_int8


def best_seconds(calls: dict, repeats: int) -> dict:
    """{name: fn} -> {name: best seconds}: two warm-up calls each, then rounds in which every
    function runs once in turn."""
    for fn in calls.values():
        fn()
        fn()
    best = {k: float("inf") for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def products(repeats: int) -> None:
    print(f"{'product (M x K x N)':24s}{'int8 GOP/s':>12s}{'bf16 GFLOP/s':>14s}{'fp32 GFLOP/s':>14s}{'int8/bf16':>11s}")
    for m, k, n in ((800, 768, 3072), (800, 3072, 768), (800, 768, 2304), (3200, 768, 3072)):
        a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        a, w = torch.randn(m, k), torch.randn(n, k)
        ah, wh = a.bfloat16(), w.bfloat16()
        secs = best_seconds({"int8": lambda: torch._int_mm(a8, w8.t()),
                             "bf16": lambda: torch.nn.functional.linear(ah, wh),
                             "fp32": lambda: torch.nn.functional.linear(a, w)}, repeats * 3)
        rate = {key: 2 * m * k * n / s / 1e9 for key, s in secs.items()}
        print(f"{f'{m} x {k} x {n}':24s}{rate['int8']:12.0f}{rate['bf16']:14.0f}{rate['fp32']:14.0f}"
              f"{rate['int8'] / rate['bf16']:11.2f}")


def embedding(preset: str, batch: int, repeats: int, compile_: bool) -> None:
    torch.manual_seed(0)
    model = vlkit.create_model("clip", preset).eval()
    size = model.cfg.vision.image_size
    px = torch.randn(batch, 3, size, size)
    half = copy.deepcopy(model).to(torch.bfloat16)
    int8 = copy.deepcopy(half)
    quantize_int8(int8)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.encode_image(px)
    calls = {"bf16 autocast": autocast,
             "bf16 weights": lambda: half.encode_image(px.bfloat16()),
             "int8 (bf16 rest)": lambda: int8.encode_image(px.bfloat16())}
    if compile_:
        from torch._inductor import config as inductor_config
        with inductor_config.patch(freezing=True):
            c_half = torch.compile(copy.deepcopy(half).encode_image, dynamic=False)
            with torch.no_grad():
                c_half(px.bfloat16())
        c_int8 = torch.compile(copy.deepcopy(int8).encode_image, dynamic=False)  # without freezing (see clip_speed.py)
        calls["compiled bf16 weights"] = lambda: c_half(px.bfloat16())
        calls["compiled int8"] = lambda: c_int8(px.bfloat16())
    with torch.no_grad():
        ref = model.encode_image(px)
        cos = {k: torch.nn.functional.cosine_similarity(fn().float(), ref).min().item() for k, fn in calls.items()}
        secs = best_seconds(calls, repeats)
    print(f"\nCLIP {preset} image embedding, batch {batch}, {torch.get_num_threads()} threads")
    print(f"{'setting':24s}{'images/s':>10s}{'/ autocast':>12s}{'min cosine to fp32':>20s}")
    for k, s in secs.items():
        print(f"{k:24s}{batch / s:10.1f}{secs['bf16 autocast'] / s:12.2f}{cos[k]:20.5f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="b32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    products(args.repeats)
    embedding(args.preset, args.batch, args.repeats, not args.no_compile)


if __name__ == "__main__":
    main()
