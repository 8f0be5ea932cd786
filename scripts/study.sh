#!/usr/bin/env bash
# The whole Fashion-MNIST study, from a clean clone: train (or load the shipped checkpoints),
# certify every model on the 18 patch shapes of scripts/grid.sh over the full test set, choose
# the smoothing and PatchCleanser settings on `val`, attack on 500 test images, then write reports/ and README's
# headline block. Resumable: trained models, finished cells and finished attacks are reused, so
# a re-run after an interruption continues where it stopped. Runs on the GPU where there is one
# (`--device auto`), else on the CPU. Exit code 4 means an attack broke a certified image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bagcert_study.sh
bash scripts/smoothing_study.sh
bash scripts/patchcleanser_study.sh
bash scripts/attack_study.sh
patchbench report --results-dir "${RESULTS:-results}" --out "${REPORTS:-reports}" --readme README.md
