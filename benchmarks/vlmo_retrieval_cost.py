"""Text->image retrieval over a 10k-image x 10k-caption collection, the cost per query, side by
side in one process: VLMo in dual mode (every image encoded once, each caption encoded, one row
of similarities, top k), VLMo dual + fusion re-ranking of the top 16, VLMo fusion mode scoring
every (caption, image) pair, CLIP at VLMo's width and depth, and ALBEF's ITC + re-ranking of the
top 16 by its fusion layers over cached encoder outputs (``vlkit.eval.rerank``).

Each part is timed on a slice (``--slice`` images, captions or pairs per batch, best of
``--repeats``) and extrapolated linearly: per query, one image encoding (the 10k images over 10k
queries), one caption encoding, one 10k-long similarity row with its top k, and 16 (re-ranking)
or 10k (fusion everything) fusion passes.

    python benchmarks/vlmo_retrieval_cost.py [--sizes tiny,base] [--slice 32] [--repeats 2]
"""
from __future__ import annotations

import argparse

import torch

import vlkit
from int8_speed import best_seconds  # this folder's: rounds in which every function runs once in turn

N, K, TEXT_LEN = 10_000, 16, 16


def models(size: str):
    """VLMo of ``size``, CLIP with VLMo's image tower shape and a text tower of VLMo's width and
    depth, ALBEF of the same width split into half text and half fusion layers."""
    torch.manual_seed(0)
    vlmo = vlkit.create_model("vlmo", size).eval()
    c = vlmo.cfg
    vision = dict(image_size=c.image_size, patch_size=c.patch_size, stem=c.stem, dim=c.dim, depth=c.depth,
                  heads=c.heads, mlp_dim=c.mlp_dim)
    clip = vlkit.create_model("clip", "tiny", vision=vision, embed_dim=c.embed_dim,
                              text=dict(vocab_size=c.vocab_size, context_length=c.max_text_len, dim=c.dim,
                                        depth=c.depth, heads=c.heads, mlp_dim=c.mlp_dim)).eval()
    albef = vlkit.create_model("albef", "tiny", vision=vision, dim=c.dim, heads=c.heads, mlp_dim=c.mlp_dim,
                               text_layers=c.depth // 2, fusion_layers=c.depth - c.depth // 2,
                               vocab_size=c.vocab_size, embed_dim=c.embed_dim).eval()
    return vlmo, clip, albef


@torch.no_grad()
def costs(size: str, slice_: int, repeats: int) -> dict:
    """Seconds per query of each way of retrieving, from per-item times measured on slices."""
    vlmo, clip, albef = models(size)
    s = vlmo.cfg.image_size
    px = torch.randn(slice_, 3, s, s)
    ids = torch.randint(5, vlmo.cfg.vocab_size, (slice_, TEXT_LEN))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    index = torch.nn.functional.normalize(torch.randn(N, vlmo.cfg.embed_dim), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(slice_, vlmo.cfg.embed_dim), dim=-1)
    tokens, hidden = albef.forward_features(px), albef.text_features(ids, mask)
    calls = {
        "sim": lambda: (queries @ index.T).topk(K, dim=1),  # 10k-long similarity rows and their top k
        "vlmo_image": lambda: vlmo.encode_image(px), "vlmo_text": lambda: vlmo.encode_text(ids, mask),
        "vlmo_pair": lambda: vlmo.match(px, ids, mask),
        "clip_image": lambda: clip.encode_image(px), "clip_text": lambda: clip.encode_text(ids, mask),
        "albef_image": lambda: albef.encode_image(px), "albef_text": lambda: albef.encode_text(ids, mask),
        "albef_pair": lambda: albef.match_tokens(tokens, hidden, mask),  # fusion layers on cached outputs
    }
    t = {k: v / slice_ for k, v in best_seconds(calls, repeats).items()}
    sim = t["sim"]
    dual = t["vlmo_image"] + t["vlmo_text"] + sim
    return {"VLMo dual": dual, f"VLMo dual + fusion re-rank of {K}": dual + K * t["vlmo_pair"],
            f"VLMo fusion, all {N:,} pairs": N * t["vlmo_pair"],
            "CLIP (same width and depth)": t["clip_image"] + t["clip_text"] + sim,
            f"ALBEF ITC + re-rank of {K}": t["albef_image"] + t["albef_text"] + sim + K * t["albef_pair"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,base")
    ap.add_argument("--slice", type=int, default=32, help="images, captions or pairs per timed batch")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"text->image retrieval, {N:,} images x {N:,} captions of {TEXT_LEN} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32")
    for size in args.sizes.split(","):
        c = costs(size, args.slice, args.repeats)
        clip = c["CLIP (same width and depth)"]
        print(f"\n{size}: {'way of retrieving':38s}{'ms / query':>12s}{'x CLIP':>9s}{'10k queries':>14s}")
        for name, sec in c.items():
            total = sec * N
            when = f"{total / 3600:.1f} h" if total > 3600 else f"{total / 60:.1f} min" if total > 60 else f"{total:.1f} s"
            print(f"{'':{len(size) + 2}s}{name:38s}{sec * 1e3:12.2f}{sec / clip:9.2f}{when:>14s}")


if __name__ == "__main__":
    main()
