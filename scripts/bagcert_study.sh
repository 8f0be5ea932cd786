#!/usr/bin/env bash
# BagCert on Fashion-MNIST: the shipped rf 7 model (default recipe; trained if missing),
# certified on the full test set for every shape of the study grid (scripts/grid.sh).
set -euo pipefail
source "$(dirname "$0")/grid.sh"
patchbench run --defense bagcert --rf 7 --dataset fashion-mnist --patch "$GRID" \
  --results-dir "${RESULTS:-results}"
