#!/usr/bin/env bash
# BagCert on Fashion-MNIST, certified on the full test set for every shape of the study grid
# (scripts/grid.sh): the receptive-field sweep r = 5 ... 13 (default recipe, bf16 mixed-precision
# training, 2-3x faster on this CPU) and the shipped fp32-trained r = 7 model. Models are trained
# if no checkpoint for their configuration exists; finished cells are skipped.
set -euo pipefail
source "$(dirname "$0")/grid.sh"
out=${RESULTS:-results}
patchbench run --defense bagcert --rf 5,7,9,11,13 --train-precision bf16 --dataset fashion-mnist \
  --patch "$GRID" --results-dir "$out"
patchbench run --defense bagcert --rf 7 --dataset fashion-mnist --patch "$GRID" --results-dir "$out"
