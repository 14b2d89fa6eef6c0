"""What a training backend is given (`TrainingRun`) and which backend runs (`resolve_backend`, `for_backend`).

Apart from the backends' dispatch (`nano3.train.backends.train_on`) so that the backends, conform and the stage driver
can import it without importing each other.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from nano3.schedule import PhasePlan

BACKENDS = ("megatron", "reference")


@dataclass(frozen=True)
class TrainingRun:
    """One training stage's work, as the stage planned it."""
    stage: str                # pretrain | lc
    params: object            # Params as the backend runs them (for_backend)
    plan: object              # nano3.train.plan.Plan
    phases: list[PhasePlan]   # the stage's phases, in order
    run_dir: Path             # nano3.train.rundir.run_dir
    live_dir: Path            # dvclive metrics
    pretrained: str | None    # lc: the pretrain checkpoint it starts from
    specs: dict[str, Path]    # phase -> its spec in the run directory (train.spec): what the ranks apply
    lock_fd: int | None = None  # the run's lock (rundir.hold_run), kept open in torchrun


def resolve_backend(params) -> str:
    """`auto` means Megatron wherever this machine has a CUDA GPU, the CPU reference elsewhere."""
    from nano3.train.plan import local_gpus

    backend = params.settings.train.backend
    if backend == "auto":
        return "megatron" if local_gpus() > 0 else "reference"
    return backend


def for_backend(params, backend: str):
    """Params as the backend runs them: the reference replaces train.* / lc.* with their `reference`
    budgets and runs on one device."""
    if backend != "reference":
        return params
    out = copy.deepcopy(params)
    out.source = params.source
    for section in ("train", "lc"):
        out[section].update(params[section].get("reference") or {})  # the raw tree: run digests hash it
        out[section].update({"nodes": 1, "gpus_per_node": 1,
                             "parallel": {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": 1, "sequence_parallel": False}})
    return out
