"""Running benchmarks: data, training, checkpoints, sweeps of cells, attacks, timing and studies."""
