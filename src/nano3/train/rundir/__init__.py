"""Where a training run lives: the one home of the checkpoint and metrics layout.

    <train.checkpoint_dir>/<stage>.json                        the DVC out: which run and iteration a stage ended at
    <train.checkpoint_dir>/<stage>/<run digest>/iter_0000048/  a checkpoint (Megatron's layout; the reference
    <train.checkpoint_dir>/<stage>/<run digest>/latest_checkpointed_iteration.txt   backend writes the same)
    <train.checkpoint_dir>/<stage>/<run digest>/code.json      which training code trained which iterations
    <train.checkpoint_dir>/<stage>/<run digest>/train.lock     held while a stage trains the run (hold_run)
    <train.checkpoint_dir>/<stage>/<run digest>/live/          the run's own dvclive metrics and plots
    <train.live_dir>/<stage>/                                  the DVC outs: a copy of the run the params name

Metrics belong to their run: the backends log into the run's `live/`, and the stage copies it to
`<train.live_dir>/<stage>/` when it ends (publish_metrics), finished or stopped. Going back to a configuration
trained before (a params edit, `dvc exp run -S`, `git checkout`) brings that run's metrics back with it;
nothing ever deletes another run's metrics.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nano3.code import code_digest
from nano3.config.sections import TrainConfig
from nano3.errors import UserError
from nano3.files import atomic_write_json, atomic_write_text, read_json

TRACKER = "latest_checkpointed_iteration.txt"
CODE_RECORD = "code.json"
LOCK = "train.lock"
LIVE = "live"
# What `dvc exp show` lists of a training stage (its metrics.json, keyed by the stage so the table's columns read
# pretrain.loss, lc.valid_loss): the loss curves' last values. The rest (throughput, MoE load, host memory, LR)
# stays in the plots, the run's live/metrics.json and the stage manifest.
HEADLINE_METRICS = {"loss": ("train", "loss"), "valid_loss": ("valid", "loss")}
# The package code a training run's weights depend on: the pretrain stage's code deps in dvc.yaml
TRAINING_CODE = ("train", "model", "data/megatron.py", "data/lc_mix.py", "data/tokenizers.py", "data/binidx.py",
                 "schedule.py", "config", "megatron_compat.py")


def manifest_path(train: TrainConfig, stage: str) -> Path:
    return Path(train.checkpoint_dir) / f"{stage}.json"


@contextmanager
def hold_run(run: str | Path) -> Iterator[int | None]:
    """One training of a run at a time: two would write one run directory (and its stage's metrics). The lock's
    descriptor is handed to torchrun, so a stage killed mid-run still holds it until its ranks have stopped, and a
    rerun meanwhile is refused in one line. Runs of other hyperparameters (other directories) are not held up.
    Yields the descriptor (None where the file system has no flock, e.g. some Lustre mounts: nothing is guarded)."""
    path = Path(run) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "unknown"
            raise UserError(f"{run}: another training of this run is going on ({holder}; {LOCK}); wait until it "
                            f"ends (a killed stage's ranks stop within a minute) or stop it, then rerun") from None
        except OSError:
            yield None
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"started by pid {os.getpid()} on {socket.gethostname()} at {time.strftime('%F %T')}\n".encode())
        yield fd
    finally:
        os.close(fd)


def node0_ready(run: str | Path) -> Path | None:
    """The marker node 0 of a Slurm job leaves once it has the run in order (an unfinished save set aside), before
    any node reads the run's iteration; None outside a job. Named per job and restart, so a requeue waits anew."""
    job = os.environ.get("SLURM_JOB_ID")
    return Path(run) / f"ready.{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


def wait_for_node0(run: str | Path, timeout: float = 1800, poll: float = 1.0) -> None:
    """Other nodes read the run only once node 0 has repaired it: else node 0 could restart a phase from the
    checkpoint before a cut save while node 1 launches the next phase into the same rendezvous."""
    marker = node0_ready(run)
    deadline = time.time() + timeout
    while marker is not None and not marker.exists():
        if time.time() > deadline:
            raise UserError(f"{run}: node 0 of job {os.environ.get('SLURM_JOB_ID')} has not readied the run in "
                            f"{timeout:.0f} s ({marker.name} missing); see node 0's lines in the job log")
        time.sleep(poll)


def run_dir(train: TrainConfig, stage: str, digest: str) -> Path:
    return Path(train.checkpoint_dir) / stage / digest


def runs(train: TrainConfig, stage: str) -> list[Path]:
    return sorted((Path(train.checkpoint_dir) / stage).glob("*"))


def live_dir(train: TrainConfig, stage: str) -> Path:
    return Path(train.live_dir) / stage


def run_live_dir(run: str | Path) -> Path:
    """The run's own dvclive directory: what its backends log into."""
    return Path(run) / LIVE


def adopt_workspace_metrics(run: str | Path, live: Path) -> None:
    """A run trained before runs kept their own metrics: take them from the workspace's copy when its marker
    (run.json, written by those versions) names this run."""
    marker, own = live / "run.json", run_live_dir(run)
    if own.exists() or not marker.exists() or json.loads(marker.read_text()).get("digest") != Path(run).name:
        return
    shutil.copytree(live, own, ignore=shutil.ignore_patterns("run.json"))


def headline(summary: dict, stage: str) -> dict:
    """dvclive's summary cut to HEADLINE_METRICS, under the stage's name."""
    values = {name: summary[section][key] for name, (section, key) in HEADLINE_METRICS.items()
              if key in summary.get(section, {})}
    return {stage: values} if values else {}


def full_metrics(run: str | Path) -> dict:
    """The run's last logged value of every metric (dvclive's summary), {} before its first log."""
    summary = run_live_dir(run) / "metrics.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def publish_metrics(run: str | Path, live: Path, stage: str, log) -> None:
    """Replace the workspace's `live` (a DVC out) with a copy of the run's own metrics, its metrics.json cut to the
    headline: the copy is built beside `live` and renamed into place, so DVC never sees half of two runs."""
    own = run_live_dir(run)
    if not own.exists():
        log(f"warning: {run}: this run's metrics were not kept (it trained before runs kept their own, and the "
            f"workspace's {live} is another run's); remove {run} to retrain it with metrics")
    tmp = live.with_name(f".{live.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if own.exists():
        shutil.copytree(own, tmp)
    (tmp / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
    atomic_write_json(tmp / "metrics.json", headline(full_metrics(run), stage))
    old = live.with_name(f".{live.name}.{os.getpid()}.old")
    if live.exists():
        os.replace(live, old)
    os.replace(tmp, live)
    shutil.rmtree(old, ignore_errors=True)


def iteration_dir(run: str | Path, iteration: int) -> Path:
    return Path(run) / f"iter_{iteration:07d}"


def iteration_dirs(run: str | Path) -> list[Path]:
    return sorted(Path(run).glob("iter_[0-9]*"))


def iteration_of(checkpoint: Path) -> int:
    """The iteration a checkpoint directory (iteration_dir's name) holds."""
    return int(checkpoint.name.removeprefix("iter_"))


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


def record_code(run: str | Path, stage: str, done: int, end: int, log) -> list[dict]:
    """Which training code trained which iterations of this run: `[{code, from_iteration}, ...]` (code null: trained
    before runs recorded it). The run's identity is its hyperparameters, so a run killed under one version of the
    code resumes under the next (a fix mid-run must not cost the run); the record keeps that visible. A finished
    run that DVC reruns for a code change is reused, and said so: its weights came from the code recorded."""
    path = Path(run) / CODE_RECORD
    segments = read_json(path, "code record") if path.exists() else [{"code": None, "from_iteration": 1}] if done else []
    now = code_digest(TRAINING_CODE)
    if done >= end:
        if segments and segments[-1]["code"] != now:
            log(f"{stage}: run {Path(run).name} finished at iteration {done} with other training code "
                f"({segments[-1]['code'] or 'unrecorded'}; now {now}): reused as recorded in {stage}.json; to "
                f"retrain with this code, remove {run}")
        return segments
    segments = [s for s in segments if s["from_iteration"] <= done]  # a start that trained nothing is forgotten
    if not segments or segments[-1]["code"] != now:
        segments.append({"code": now, "from_iteration": done + 1})
    atomic_write_json(path, segments)
    return segments
