"""A run's life: the runner, run folders, checkpoints, interrupts, progress, plugins,
benchmarks, offline merges and studies."""
