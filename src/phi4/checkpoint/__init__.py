"""Checkpoints, one package for every reader and writer: the format and its pointer files
(`pointers`), weights-only loading and the weights' fingerprint (`weights`), RNG states (`rng`),
a training run's save and restore (`run`), and the check that a checkpoint from elsewhere runs no
code (`safe_load`). `train`, `convert`, `eval` and `posttrain` all come here."""
