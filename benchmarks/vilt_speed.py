"""ViLT speed side by side: vlkit against Hugging Face ``transformers.ViltModel``, ViLT-B/32 at
384 px with 40 text tokens, the same random weights (HF's state converted by vlkit's rename
table), in one process, alternating, fp32 inference.

Both keep every image patch: HF with ``max_image_length=-1`` (it still draws the patch order at
random, which changes nothing but the order), vlkit with ``max_image_tokens=0``. Before timing,
the pooled outputs are compared, so a row is only printed for models that compute the same thing.

Rows: one per batch size, images/s of each and the ratio vlkit/HF (above 1: vlkit is faster),
on the CPU and, when present, CUDA.

    python benchmarks/vilt_speed.py [--batches 2 8] [--repeats 3] [--devices cpu cuda] [--small]
"""
from __future__ import annotations

import argparse
import time

import torch

from vlkit.convert.common import load_strict, rename, strip_prefix
from vlkit.convert.hf_vilt import IGNORE, RULES, config_from_hf
from vlkit.models.vilt import ViLT

TEXT_LEN = 40


def hf_model(small: bool):
    import transformers
    size = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768) \
        if small else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072)
    cfg = transformers.ViltConfig(**size, image_size=384, patch_size=32, max_position_embeddings=TEXT_LEN,
                                  vocab_size=30522, max_image_length=-1, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.ViltModel(cfg, add_pooling_layer=True).eval()


def vlkit_from_hf(hf) -> ViLT:
    cfg = config_from_hf(hf.config.to_dict() | {"architectures": ["ViltModel"]})
    assert cfg.max_image_tokens == 0  # every patch, as HF with max_image_length=-1
    model = ViLT(cfg)
    load_strict(model, rename(strip_prefix(hf.state_dict(), "vilt."), RULES, IGNORE), "HF ViltModel")
    return model.eval()


def inputs(batch: int, device):
    g = torch.Generator().manual_seed(batch)
    pixels = torch.randn(batch, 3, 384, 384, generator=g)
    ids = torch.randint(1000, 30000, (batch, TEXT_LEN), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)
    return pixels.to(device), ids.to(device), mask.to(device)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def run(device, batches, repeats: int, small: bool) -> None:
    hf = hf_model(small).to(device)
    ours = vlkit_from_hf(hf).to(device)
    pixels, ids, mask = inputs(2, device)
    diff = (ours(pixels, ids, mask).pooled - hf(input_ids=ids, attention_mask=mask,
                                                 pixel_values=pixels).pooler_output).abs().max().item()
    assert diff < 1e-3, f"vlkit and HF disagree: max |pooled difference| {diff:.2e}"
    print(f"\n{device.type}: ViLT-{'tiny' if small else 'B/32'}, 384 px, {TEXT_LEN} tokens, fp32 "
          f"(pooled outputs agree to {diff:.1e}), threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'vlkit img/s':>12} {'HF img/s':>10} {'vlkit/HF':>9}")
    for batch in batches:
        pixels, ids, mask = inputs(batch, device)
        calls = {"vlkit": lambda: ours(pixels, ids, mask),
                 "hf": lambda: hf(input_ids=ids, attention_mask=mask, pixel_values=pixels)}
        for fn in calls.values():  # warm-up
            fn()
        best = {name: float("inf") for name in calls}
        for _ in range(repeats):  # alternating, best of the repeats
            for name, fn in calls.items():
                best[name] = min(best[name], timed(fn, device))
        rate = {name: batch / t for name, t in best.items()}
        print(f"{batch:>5} {rate['vlkit']:>12.2f} {rate['hf']:>10.2f} {rate['vlkit'] / rate['hf']:>9.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    p.add_argument("--small", action="store_true", help="a 4-layer, 192-wide model (a quick check)")
    args = p.parse_args()
    for name in args.devices:
        if name == "cuda" and not torch.cuda.is_available():
            continue
        run(torch.device(name), args.batches, args.repeats, args.small)


if __name__ == "__main__":
    main()
