#!/usr/bin/env bash
# Set up and run the main job on the CPU: the clip-world recipe (a ViT stage learns the synthetic
# world's labelled single-object images, then CLIP starts its image tower from it and trains on
# the image-caption pairs; 10 minutes on a 2-core AVX-512-bf16 CPU, about 20 on an AVX2 one),
# evaluated on the fixed test split, then on the 1,000-pair retrieval protocol.
# FROM_SCRATCH=1 trains CLIP alone, from random weights, for 10 minutes instead.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT=${OUT:-runs/demo}
rm -rf "$OUT"
if [ -n "${FROM_SCRATCH:-}" ]; then
  .venv/bin/vlkit train clip --data synthetic --preset tiny --minutes 10 --out "$OUT"
else
  .venv/bin/vlkit train --recipe clip-world --out "$OUT"
fi
# the 1,000-pair protocol: the first 1,000 test images, each with its first caption
.venv/bin/vlkit eval "$OUT" --data synthetic --tasks retrieval --retrieval-size 1000 \
  --out "$OUT/eval-1000-pairs.json"
echo "the run: $OUT (vlkit eval $OUT, or vlkit.load(\"$OUT\") in Python)"
