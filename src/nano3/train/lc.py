"""Stage `lc`: long-context extension from the final pretrain checkpoint (its own blend, longer sequences); the training driver is train.run."""

from __future__ import annotations

from nano3.train.run import add_options, run_from_args

__all__ = ["add_options", "run"]


def run(params, args) -> dict | None:
    return run_from_args("lc", params, args)
