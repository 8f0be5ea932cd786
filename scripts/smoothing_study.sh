#!/usr/bin/env bash
# (De)Randomized Smoothing on Fashion-MNIST: column, row and block ablation.
# Each model trains without the 'val' split (--hold-out-val yes); its vote threshold is then
# chosen on 'val' (`patchbench select`: most certified 5x5 among thresholds within one point
# of the best clean accuracy) and only the chosen threshold is certified on the test set.
# Models already trained (shipped in checkpoints/ or cached) are reused, finished cells skipped.
set -euo pipefail
source "$(dirname "$0")/grid.sh"
thresholds=0.15,0.2,0.25,0.3,0.35,0.4,0.5
val=${VALIDATION:-results/validation}
test=${RESULTS:-results}
recipe=(--dataset fashion-mnist --hold-out-val yes)
# name, its parameters and epochs, validation images (block smoothing runs H*W ablations per image)
studies=(
  "ds-column|--ablation-size 4 --width 48 --epochs 28|5000"
  "ds-row|--ablation-size 4 --width 32 --epochs 24|5000"
  "ds-block|--ablation-size 10 --width 16 --epochs 24|1000"
)
for study in "${studies[@]}"; do
  IFS='|' read -r defense params n_val <<<"$study"
  read -ra params <<<"$params"
  patchbench run --defense "$defense" "${params[@]}" "${recipe[@]}" --split val \
    --n-images "$n_val" --threshold "$thresholds" --patch 5x5 --results-dir "$val/$defense"
  threshold=$(patchbench select --results-dir "$val/$defense" --defense "$defense" --param threshold)
  patchbench run --defense "$defense" "${params[@]}" "${recipe[@]}" --threshold "$threshold" \
    --patch "$GRID" --results-dir "$test"
done
