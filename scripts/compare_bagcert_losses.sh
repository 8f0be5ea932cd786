#!/usr/bin/env bash
# Margin loss vs plain per-cell cross-entropy for BagCert (rf 7) on the same reduced budget
# (2 epochs on 20,000 Fashion-MNIST training images), both certified on the full test set.
# Rows land in ${RESULTS:-results/loss-comparison}.
set -euo pipefail
results=${RESULTS:-results/loss-comparison}
budget=(--epochs 2 --max-train-images 20000)
patchbench run --defense bagcert --patch 5x5,2x12,12x2 --results-dir "$results" "${budget[@]}"
patchbench run --defense bagcert --patch 5x5,2x12,12x2 --results-dir "$results" "${budget[@]}" \
  --margin-weight 0 --cell-loss ce --vote-threshold 0.2
