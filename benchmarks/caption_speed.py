"""BLIP captioning speed side by side: vlkit's decoding loop against transformers'
``BlipForConditionalGeneration.generate`` on the same weights, in one process, alternating.

The model is a random BLIP at BLIP-base sizes (ViT-B/16 at 384 px, BERT-base decoder, vocabulary
30,524), built in transformers, written with ``save_pretrained`` and loaded into vlkit with
``vlkit.load`` (``hf_compat``). Both decode a batch of images greedily and with beam search
(3 beams), ``--new-tokens`` tokens each (``min_new_tokens`` = ``max_new_tokens``, so both do the
same work whatever the random weights say); the script checks that the tokens are identical and
prints each side's captions per second and the ratio vlkit / transformers.

    python benchmarks/caption_speed.py [--batch 8] [--new-tokens 20] [--repeats 3] [--threads N] [--small]

``--small`` uses a 2-layer, 256-wide model at 96 px (a quick check of the script).

Before the table the script prints the multiply-accumulates each side does per image (from the
config): the image encoder, the decoder's cross-attention keys and values (vlkit: once per image;
transformers 4.54 and later: once per beam; 4.53 and earlier: at every step, for every beam; the
script counts the passes with a hook rather than assume), and the decoding steps; their ratio is
the most vlkit can gain at the same arithmetic rate.

transformers 4.x in an environment of its own (the project's test extra, ``transformers>=4.45``,
takes the newest):

    python -m venv /tmp/hf4 && /tmp/hf4/bin/pip install torch==2.13.0 transformers==4.46.3 safetensors numpy pillow
    /tmp/hf4/bin/pip install --no-deps -e . && /tmp/hf4/bin/python benchmarks/caption_speed.py
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def hf_model(small: bool):
    import transformers as T
    if small:
        text = dict(vocab_size=30524, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=1024)
        vision = dict(image_size=96, patch_size=16, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=1024)
    else:  # BLIP base (Salesforce/blip-image-captioning-base sizes)
        text = dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072)
        vision = dict(image_size=384, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072)
    text.update(bos_token_id=30522, pad_token_id=0, sep_token_id=102, eos_token_id=2, layer_norm_eps=1e-12)
    vision.update(layer_norm_eps=1e-5)
    torch.manual_seed(0)
    model = T.BlipForConditionalGeneration(T.BlipConfig(text_config=text, vision_config=vision)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # spread the random weights so that images and beams differ
        for name, p in model.named_parameters():
            if "vision_model" in name and p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def cross_kv_passes(model, pixels, new_tokens: int) -> int:
    """How many times transformers' ``generate`` computes the first decoder layer's cross-attention
    keys over ``new_tokens`` greedy steps: 1 where it caches them (5.x), ``new_tokens`` where it
    recomputes them at every step (4.x)."""
    layer = model.text_decoder.bert.encoder.layer[0].crossattention.self
    key = getattr(layer, "key", None) or getattr(layer, "k_proj")
    calls = []
    hook = key.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            model.generate(pixel_values=pixels[:1], max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    finally:
        hook.remove()
    return len(calls)


def macs(cfg, new_tokens: int, beams: int, hf_kv_passes: int = 1) -> dict:
    """Multiply-accumulates per image: image encoder, cross-attention keys/values, decoding.
    ``hf_kv_passes``: how many times per beam transformers computes the keys and values."""
    v, t = cfg.vision_config, cfg.text_config
    n = (v.image_size // v.patch_size) ** 2 + 1  # image tokens
    dv, dt = v.hidden_size, t.hidden_size
    vit = v.num_hidden_layers * n * (4 * dv * dv + 2 * dv * v.intermediate_size + 2 * n * dv)
    cross_kv = t.num_hidden_layers * 2 * dv * dt * n
    per_token = (t.num_hidden_layers * (6 * dt * dt + 2 * dt * t.intermediate_size + 2 * n * dt)
                 + t.vocab_size * dt)
    decode = beams * new_tokens * per_token
    return {"ours": vit + cross_kv + decode, "hf": vit + hf_kv_passes * beams * cross_kv + decode, "image": vit}


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--small", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import vlkit
    hf = hf_model(args.small)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = vlkit.load(folder).model
    size = hf.config.vision_config.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    n = args.new_tokens
    import transformers
    passes = cross_kv_passes(hf, pixels, n)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, {n} new tokens, {'small' if args.small else 'BLIP base'} model, median of "
          f"{args.repeats}; transformers computes the cross-attention keys and values {passes} time(s) per "
          f"caption of {n} tokens")
    for label, beams in (("greedy", 1), ("beam 3", 3)):
        m = macs(hf.config, n, beams, passes)
        print(f"{label}: {m['hf'] / 1e9:.1f} GMAC per image (transformers), {m['ours'] / 1e9:.1f} (vlkit), image "
              f"encoder {m['image'] / m['ours']:.0%} of vlkit's: at the same arithmetic rate vlkit / transformers "
              f"<= {m['hf'] / m['ours']:.2f}")
    print("| decoding | transformers (captions/s) | vlkit (captions/s) | vlkit / transformers | same tokens |")
    print("|---|---|---|---|---|")
    for label, opts in (("greedy", {}), ("beam 3", {"num_beams": 3})):
        opts = dict(max_new_tokens=n, min_new_tokens=n, **opts)
        with torch.no_grad():
            ref, hf_times, our_times = None, [], []
            for _ in range(args.repeats):  # alternating, so that both see the same machine
                ref, t_hf = timed(lambda: hf.generate(pixel_values=pixels, **opts), 1)
                got, t_ours = timed(lambda: ours.generate(pixels, prompt_ids=[[]] * args.batch, **opts), 1)
                hf_times.append(t_hf)
                our_times.append(t_ours)
        same = ref[:, 1:1 + n].tolist() == got[:, :n].tolist()
        t_hf, t_ours = statistics.median(hf_times), statistics.median(our_times)
        print(f"| {label} | {args.batch / t_hf:.2f} | {args.batch / t_ours:.2f} | {t_hf / t_ours:.2f} | "
              f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
