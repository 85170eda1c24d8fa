#!/usr/bin/env bash
# Set up and run the main job on the CPU: `vlkit compare --quick`, the family side by side on the
# synthetic world — each model's world recipe (CLIP, ViLT, ALBEF, VLMo, BLIP) for one minute,
# evaluated on the same 200 test records — and a report with its figures (report.html,
# report.md, report.json). About 10 minutes on a 2-core CPU.
# FULL=1 runs the default budget instead (8 minutes a model, 1,000 test records; under an hour).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT=${OUT:-runs/demo}
if [ -n "${FULL:-}" ]; then
  .venv/bin/vlkit compare --out "$OUT"
else
  .venv/bin/vlkit compare --quick --out "$OUT"
fi
echo "the report: $OUT/report.html (and $OUT/report.md); the runs: $OUT/runs/ (vlkit eval RUN, or vlkit.load(RUN) in Python)"
