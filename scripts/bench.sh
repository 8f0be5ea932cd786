#!/usr/bin/env bash
# The performance figures of README's "Benchmark" section: certification against the bare
# forward passes, for the configurations of the shipped Fashion-MNIST models (random weights:
# timing does not depend on training), the CIFAR input shape, and the ImageNet memory bound.
# Each command measures its own ratios in one run (BagCert: 15 repeats, its batches take
# milliseconds); rows go to results/bench/rows/.
set -euo pipefail
out=${RESULTS:-results/bench}
patchbench bench --defense bagcert --rf 7 --shape fashion-mnist --repeats 15 --results-dir "$out"
patchbench bench --defense bagcert --rf 7 --shape cifar --repeats 15 --results-dir "$out"
patchbench bench --defense ds-column --ablation-size 4 --width 48 --shape fashion-mnist \
  --results-dir "$out"
# block smoothing runs H*W = 784 ablations per image
patchbench bench --defense ds-block --ablation-size 10 --width 16 --shape fashion-mnist \
  --batch-size 4,16 --repeats 3 --results-dir "$out"
# peak memory: 64 ImageNet-size images, a BagNet-17-like map (stride 8), 1000 classes, 20 shapes
patchbench bench --defense bagcert --rf 17 --stride 8 --shape imagenet --batch-size 64 \
  --n-shapes 20 --repeats 1 --warmup 0 --results-dir "$out"
# PatchCleanser: k^2 (k^2 + 1) / 2 = 666 two-mask passes per image and 5x5-like shape at k = 6
# (the study's chosen width), against its bare passes and the published-style reference
patchbench bench --defense patchcleanser --width 48 --shape fashion-mnist --batch-size 16 \
  --n-shapes 1,3 --repeats 1 --results-dir "$out"
