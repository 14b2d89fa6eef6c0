"""How a Slurm job asks its training to checkpoint and stop before the time limit, without killing it.

Slurm delivers a step's signal to every process of the step (proctrack): `scancel --signal=TERM <step>` reaches
the stage, torchrun, the ranks and their DataLoader workers alike. A worker killed by someone other than its
parent makes the rank raise ("DataLoader worker (pid N) is killed by signal: Terminated") before it can save, and
torchrun, signalled, kills the ranks after 30 s, which a large checkpoint outlasts. So the job script asks by file
instead: at the pre-time-limit signal it creates `$NANO3_STOP_FILE` (on the shared file system: every node's stage
sees it), and each node's stage, which polls for it, sends SIGTERM to its training ranks only (Bridge's handler:
save, exit) or, on the CPU reference backend, stops after the step with a checkpoint.

What Slurm itself still signals to all (preemption, `scancel --signal=TERM`) is survived the same way: DataLoader
workers keep running through SIGTERM (`ignore_stop_signals`, Bridge's `exit_signal_handler_for_dataloader`) and the
stage treats a stop that ends torchrun with an error as a stop at the last checkpoint.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

STOP_FILE_ENV = "NANO3_STOP_FILE"


def stop_requested() -> bool:
    """Has this job asked its training to stop (`$NANO3_STOP_FILE` exists)?"""
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and Path(path).exists()


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """A DataLoader worker_init_fn: SIGTERM meant for the job, or the terminal's Ctrl-C (it reaches the whole
    process group), does not end the worker under its rank; the rank stops after its step and ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
