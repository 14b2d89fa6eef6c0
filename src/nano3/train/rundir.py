"""Where a training run lives: the one home of the checkpoint and metrics layout.

    <train.checkpoint_dir>/<stage>.json                        the DVC out: which run and iteration a stage ended at
    <train.checkpoint_dir>/<stage>/<run digest>/iter_0000048/  a checkpoint (Megatron's layout; the reference
    <train.checkpoint_dir>/<stage>/<run digest>/latest_checkpointed_iteration.txt   backend writes the same)
    <train.live_dir>/<stage>/                                  dvclive metrics and plots
"""

from __future__ import annotations

from pathlib import Path

from nano3.config.sections import TrainConfig
from nano3.files import atomic_write_text

TRACKER = "latest_checkpointed_iteration.txt"


def manifest_path(train: TrainConfig, stage: str) -> Path:
    return Path(train.checkpoint_dir) / f"{stage}.json"


def run_dir(train: TrainConfig, stage: str, digest: str) -> Path:
    return Path(train.checkpoint_dir) / stage / digest


def runs(train: TrainConfig, stage: str) -> list[Path]:
    return sorted((Path(train.checkpoint_dir) / stage).glob("*"))


def live_dir(train: TrainConfig, stage: str) -> Path:
    return Path(train.live_dir) / stage


def iteration_dir(run: str | Path, iteration: int) -> Path:
    return Path(run) / f"iter_{iteration:07d}"


def iteration_dirs(run: str | Path) -> list[Path]:
    return sorted(Path(run).glob("iter_[0-9]*"))


def latest_iteration(run: str | Path) -> int:
    """The last saved iteration (0 when none): Megatron's tracker file."""
    tracker = Path(run) / TRACKER
    return int(tracker.read_text().strip()) if tracker.exists() else 0


def mark_latest(run: str | Path, iteration: int) -> None:
    atomic_write_text(Path(run) / TRACKER, f"{iteration}\n")


def failure_path(run: str | Path, phase: str) -> Path:
    """Where rank 0 leaves a one-line reason for refusing to train (read by the stage, then removed)."""
    return Path(run) / f"refused.{phase}.txt"


def exit_if_stopped(run_dir: Path, stage: str, phases: list, log) -> None:
    """Phases that ended before their last iteration were stopped by a signal: exit 3, the next run resumes.
    The message names the phase the last checkpoint belongs to."""
    done = latest_iteration(run_dir)
    stopped = next((p for p in phases if done < p.end_iter), None)
    if stopped is not None:
        log(f"{stage}: {stopped.name} stopped at iteration {done}; rerun to resume")
        raise SystemExit(3)
