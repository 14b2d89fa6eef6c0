"""Training backends, side by side behind one call, `train_on(backend, TrainingRun, log)`:

- `megatron`: Megatron-Bridge under torchrun, one process group per phase (GPUs; nano3.train.entry is the rank's
  entry point);
- `reference`: transformers' NemotronH trained in this process (CPU, tiny presets), the same schedule, data and
  metrics, for machines without a GPU and for CI.

Both leave Megatron's run-directory layout (nano3.train.rundir), so resume, lc and export read either.
"""

from __future__ import annotations

from nano3.train.backends.training_run import BACKENDS, TrainingRun, for_backend, resolve_backend

__all__ = ["BACKENDS", "TrainingRun", "for_backend", "resolve_backend", "train_on"]


def train_on(backend: str, run: TrainingRun, log=print) -> None:
    if backend == "reference":
        from nano3.train.backends.reference import train
    else:
        from nano3.train.backends.megatron import train
    train(run, log)
