#!/usr/bin/env bash
# BagCert on Fashion-MNIST, certified on the full test set for every shape of the study grid
# (scripts/grid.sh): the receptive-field sweep r = 5 ... 13 (trained with val, bf16 mixed-precision
# training, 2-3x faster on this CPU) and the shipped fp32-trained r = 7 model (the first
# study's headline). Each model is then attacked on the first 500 test images (5x5, 2x12, 12x2).
#
# Those models train on all 60,000 training images, 'val' included, so nothing can be chosen
# among them on 'val'. The choice is made on candidates that train without 'val'
# (--hold-out-val yes, same recipe): receptive fields VAL_RFS (default 5,7,9; the rest of
# the sweep did not fit the session that made the study), certified on 5,000 val images at 5x5
# and chosen by `patchbench select` (most certified 5x5 among those within one point of the
# best clean accuracy); the chosen one is certified on the full test set and attacked.
# Models are trained if no checkpoint for their configuration exists; finished cells and
# attacks are skipped, so the script resumes where it stopped.
set -euo pipefail
source "$(dirname "$0")/grid.sh"
out=${RESULTS:-results}
val=${VALIDATION:-results/validation}/bagcert
rfs=(5 7 9 11 13)
# trained with val (the defaults hold it out: they are this study's val choice)
with_val=(--defense bagcert --hold-out-val no --dataset fashion-mnist)
patchbench run "${with_val[@]}" --rf "$(IFS=,; echo "${rfs[*]}")" --train-precision bf16 \
  --patch "$GRID" --results-dir "$out"
patchbench run "${with_val[@]}" --rf 7 --train-precision fp32 --patch "$GRID" --results-dir "$out"
for rf in "${rfs[@]}"; do
  patchbench attack "${with_val[@]}" --rf "$rf" --train-precision bf16 \
    --patch 5x5,2x12,12x2 --n-images 500 --results-dir "$out"
done
patchbench attack "${with_val[@]}" --rf 7 --train-precision fp32 --patch 5x5,2x12,12x2 \
  --n-images 500 --results-dir "$out"
held_out=(--defense bagcert --train-precision bf16 --hold-out-val yes --dataset fashion-mnist)
patchbench run "${held_out[@]}" --rf "${VAL_RFS:-5,7,9}" --split val --n-images 5000 \
  --patch 5x5 --results-dir "$val"
rf=$(patchbench select --results-dir "$val" --defense bagcert --param rf)
patchbench run "${held_out[@]}" --rf "$rf" --patch "$GRID" --results-dir "$out"
patchbench attack "${held_out[@]}" --rf "$rf" --patch 5x5,2x12,12x2 --n-images 500 \
  --results-dir "$out"
