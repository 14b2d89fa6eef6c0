"""Stage `pretrain`: both curriculum phases (the phase-1 blend until train.phase2_start, then phase 2) as one
run; the training driver is train.run."""

from __future__ import annotations

from nano3.train.run import add_options, run_from_args

__all__ = ["add_options", "run"]


def run(params, args) -> dict | None:
    return run_from_args("pretrain", params, args)
