#!/usr/bin/env bash
# The empirical patch attack (default budget, see patchbench/attack.py) on the first study's
# smoothing models (fp32 training, s = 4, thresholds chosen on `val`), on the first test images.
# The study's other models are attacked by bagcert_study.sh and smoothing_study.sh. Rows
# (metric "empirical") go next to the certification rows in results/, so `patchbench report`
# shows the gap. Exit code 4 from any command means a certified image was broken; finished
# attacks are skipped.
set -euo pipefail
out=${RESULTS:-results}
patchbench attack --defense ds-column --threshold 0.25 \
  --checkpoint checkpoints/fashion-mnist-ds-column-59472159016a.pt --patch 5x5,12x2 \
  --n-images 50 --results-dir "$out"
patchbench attack --defense ds-row --threshold 0.25 \
  --checkpoint checkpoints/fashion-mnist-ds-row-5a848e1838bc.pt --patch 5x5,2x12 \
  --n-images 500 --results-dir "$out"
