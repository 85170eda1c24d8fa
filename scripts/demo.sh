#!/usr/bin/env bash
# Set up and run the main job on the CPU, 10 minutes of training in all: a ViT (tiny) learns the
# synthetic world's labelled single-object images for 3 minutes, then CLIP (tiny) starts its
# image tower from that ViT and trains for 7 minutes on the image-caption pairs (LiT-style), is
# evaluated on the fixed test split, and the metrics are printed. FROM_SCRATCH=1 trains CLIP
# alone, from random weights, for the whole 10 minutes instead.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT=${OUT:-runs/demo}
rm -rf "$OUT"
if [ -n "${FROM_SCRATCH:-}" ]; then
  .venv/bin/vlkit train clip --data synthetic --preset tiny --minutes 10 --out "$OUT/clip"
else
  .venv/bin/vlkit train vit --data synthetic --preset tiny --minutes 3 --out "$OUT/vit"
  .venv/bin/vlkit train clip --data synthetic --preset tiny --minutes 7 --batch-size 256 --lr 1.4e-3 \
    --set vision_init="$OUT/vit" \
    --out "$OUT/clip"
fi
# the issue's 1,000-pair protocol as well: the first 1,000 test images, each with its first caption
.venv/bin/vlkit eval "$OUT/clip" --data synthetic --tasks retrieval --retrieval-size 1000 \
  --out "$OUT/clip/eval-1000-pairs.json"
