#!/usr/bin/env bash
# Set up and run the main job: train CLIP (tiny) on the built-in synthetic world for a few
# minutes on the CPU, then evaluate it on the fixed test split and print the metrics.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT=${OUT:-runs/demo-clip}
rm -rf "$OUT"
.venv/bin/vlkit train clip --data synthetic --preset tiny --minutes "${MINUTES:-7}" --out "$OUT"
