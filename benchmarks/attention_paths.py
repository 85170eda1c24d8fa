"""The two attention paths side by side in one process: ``F.scaled_dot_product_attention`` (fused)
against softmax(QKᵀ/√d)V in plain PyTorch ops (``vlkit.layers.plain_attention``), forward alone and
forward + backward, fp32 and bf16, at the sequence lengths the models train with (4 heads of 48, the
tiny presets; 12 of 64, base). The ratio fused/plain > 1 means the plain path is faster; it is what
``vlkit.layers.attention.use_fused`` decides by (bf16 training on the CPU up to
``PLAIN_BF16_CPU_MAX_TOKENS`` tokens takes the plain path).

    python benchmarks/attention_paths.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vlkit.layers.attention import PLAIN_BF16_CPU_MAX_TOKENS, plain_attention

# (batch, heads, tokens, head_dim): the synthetic world's text (17), image (65), VLMo fused
# [text ; image] (85), then longer sequences up to ViT-B/16 at 384 px (577)
SHAPES = ((256, 4, 17, 48), (256, 4, 65, 48), (256, 4, 85, 48), (64, 4, 200, 48),
          (32, 12, 197, 64), (16, 4, 577, 48), (8, 12, 577, 64))


def one_pass(path: str, q, k, v, backward: bool) -> None:
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    if path == "fused":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = plain_attention(q, k, v)[0]
    if backward:
        out.float().sum().backward()


def best_seconds(q, k, v, backward: bool, repeats: int) -> dict:
    """Best time of each path over ``repeats`` rounds in which both run in turn (after a warm-up)."""
    best = {}
    for path in ("fused", "plain"):
        one_pass(path, q, k, v, backward)
    for _ in range(repeats):
        for path in ("fused", "plain"):
            t0 = time.perf_counter()
            one_pass(path, q, k, v, backward)
            best[path] = min(best.get(path, float("inf")), time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"plain path for bf16 CPU training up to {PLAIN_BF16_CPU_MAX_TOKENS} tokens")
    print(f"{'dtype':10s}{'B x heads x N x d':22s}{'pass':>10s}{'fused ms':>10s}{'plain ms':>10s}{'fused/plain':>13s}")
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
            for backward in (False, True):
                secs = best_seconds(q, k, v, backward, args.repeats)
                name = "fwd+bwd" if backward else "fwd"
                print(f"{str(dtype).split('.')[-1]:10s}{' x '.join(map(str, shape)):22s}{name:>10s}"
                      f"{secs['fused'] * 1e3:10.1f}{secs['plain'] * 1e3:10.1f}"
                      f"{secs['fused'] / secs['plain']:13.2f}")


if __name__ == "__main__":
    main()
