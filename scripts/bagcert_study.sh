#!/usr/bin/env bash
# BagCert on Fashion-MNIST, certified on the full test set for every shape of the study grid
# (scripts/grid.sh): the receptive-field sweep r = 5 ... 13 (default recipe, bf16 mixed-precision
# training, 2-3x faster on this CPU) and the shipped fp32-trained r = 7 model (the README's
# first command). Each model is then attacked on the first 500 test images (5x5, 2x12, 12x2).
# Models are trained if no checkpoint for their configuration exists; finished cells and
# attacks are skipped, so the script resumes where it stopped.
set -euo pipefail
source "$(dirname "$0")/grid.sh"
out=${RESULTS:-results}
rfs=(5 7 9 11 13)
patchbench run --defense bagcert --rf "$(IFS=,; echo "${rfs[*]}")" --train-precision bf16 \
  --dataset fashion-mnist --patch "$GRID" --results-dir "$out"
patchbench run --defense bagcert --rf 7 --dataset fashion-mnist --patch "$GRID" --results-dir "$out"
for rf in "${rfs[@]}"; do
  patchbench attack --defense bagcert --rf "$rf" --train-precision bf16 --dataset fashion-mnist \
    --patch 5x5,2x12,12x2 --n-images 500 --results-dir "$out"
done
patchbench attack --defense bagcert --rf 7 --dataset fashion-mnist --patch 5x5,2x12,12x2 \
  --n-images 500 --results-dir "$out"
