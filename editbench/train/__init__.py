"""The one training pipeline of the editors that learn (docs/training.md).

``python -m editbench.train editor=<name> model=<m> data=<d>`` trains (or finds the cached
checkpoint) and prints its path; the runner calls :func:`ensure_trained` for every editor
that declares ``training = "pipeline"``. The loop, settings, cache key and checkpoints are
:mod:`editbench.train.loop`; the training record is :mod:`editbench.train.history`.
"""
from editbench.train.loop import (FINAL, PARTIAL, TRAIN_DEFAULTS, TrainSettings, batch_indices, ensure_trained,
                                  train, train_key, train_settings, trained_dir)

__all__ = ["FINAL", "PARTIAL", "TRAIN_DEFAULTS", "TrainSettings", "batch_indices", "ensure_trained", "train",
           "train_key", "train_settings", "trained_dir"]
