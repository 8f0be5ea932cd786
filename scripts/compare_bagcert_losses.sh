#!/usr/bin/env bash
# Margin loss vs plain per-cell cross-entropy for BagCert (rf 7) on the same budget, both
# certified on the full Fashion-MNIST test set. Extra arguments set the budget for both,
# e.g. `--epochs 2 --max-train-images 20000`; none means the default recipe (8 epochs).
# Rows land in ${RESULTS:-results/loss-comparison}.
set -euo pipefail
results=${RESULTS:-results/loss-comparison}
patches=5x5,2x12,12x2
model=(--defense bagcert --rf 7 --hold-out-val no --train-precision fp32)  # the first study's
patchbench run "${model[@]}" --patch "$patches" --results-dir "$results" "$@"
patchbench run "${model[@]}" --patch "$patches" --results-dir "$results" "$@" \
  --margin-weight 0 --cell-loss ce --vote-threshold 0.2
