"""The Megatron backend: each phase of a stage is one torchrun of nano3.train.entry (Megatron-Bridge's pretrain)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from nano3.config import section_name
from nano3.errors import UserError
from nano3.files import atomic_copy
from nano3.train import rundir
from nano3.train.backends.training_run import TrainingRun
from nano3.train.environment import training_environment
from nano3.train.rundir import exit_if_stopped, failure_path, latest_iteration
from nano3.train.startup import StartupWatch, startup_caches

# Bridge's files in a run directory beside Megatron's tracker (rundir.TRACKER), and in each checkpoint
BRIDGE_TRACKER = "latest_train_state.pt"
TRAIN_STATE = "train_state.pt"
RUN_CONFIG = "run_config.yaml"
# What Bridge reads from a checkpoint's run_config.yaml when it loads it (resume: the TP/PP check, RNG and optimizer
# state; export: the model section), and the sections every Bridge ConfigContainer writes
LOADED_KEYS = {"model": ("tensor_model_parallel_size", "pipeline_model_parallel_size"),
               "checkpoint": ("save_rng", "save_optim", "fully_parallel_save")}
SECTIONS = ("checkpoint", "dataset", "logger", "model", "optimizer", "scheduler", "tokenizer", "train")


def train(run: TrainingRun, log=print) -> None:
    """Run each phase not yet done; a rank's one-line refusal (failure_path) becomes this stage's UserError."""
    layout = run.plan.stages[section_name(run.stage)].layout
    for phase in run.phases:
        done = latest_iteration(run.run_dir)
        if done >= phase.end_iter:
            log(f"{run.stage}: {phase.name} already done (checkpoint at iteration {done})")
            continue
        log(f"{run.stage}: {phase.name} iterations {max(done, phase.start_iter) + 1}..{phase.end_iter} "
            f"(blend {phase.blend}, seq {phase.seq_length}, run {run.run_dir.name})")
        cmd = torchrun_command(layout.gpus_per_node) + [
            "--params", run.params_file, "--phase", phase.name, "--run-dir", str(run.run_dir),
            "--live-dir", str(run.live_dir)]
        cmd += [f"--override={o}" for o in run.overrides] + [f"--bridge={b}" for b in run.bridge]
        if run.pretrained:
            cmd += ["--pretrained", run.pretrained]
        env = {**os.environ, **training_environment(run.params, layout.tp, os.environ)}
        watch = StartupWatch(f"{run.stage}: {phase.name}", run.live_dir / "plots" / "metrics",
                             startup_caches(env, run.params.settings.blend.cache_dir), log=log)
        rc, stopped = run_forwarding_sigterm(cmd, env, keep_fds=() if run.lock_fd is None else (run.lock_fd,),
                                             on_wait=watch.tick)
        refused = failure_path(run.run_dir, phase.name)
        if rc != 0 and refused.exists():
            reason = refused.read_text().strip()
            refused.unlink()
            raise UserError(reason)
        if rc != 0 and not stopped:
            raise SystemExit(rc)
        if rc != 0:  # stopped, and torchrun signalled too (Slurm signals every process): at the last checkpoint
            log(f"{run.stage}: torchrun ended with exit status {rc} after the stop; resuming from the last checkpoint")
        exit_if_stopped(run.run_dir, run.stage, [phase], log)
        if phase.exit_interval:
            log(f"{run.stage}: {phase.name} stopped at iteration {phase.end_iter} as planned (Bridge reports its "
                f"exit_interval stop as 'SystemExit: 0' with a traceback; not an error)")


def unfinished_save(checkpoint: Path) -> str | None:
    """Why Bridge could not load this checkpoint, or None. Bridge points its trackers at a new checkpoint before it
    writes the checkpoint's run_config.yaml (save_checkpoint's finalize, in every release from 0.2 to 0.6 and the
    recipe's nano-v3 branch), so a node lost in between leaves the trackers on a checkpoint whose config is missing
    or cut short, and every resume dies loading it (seen on an H200: a KeyError on `tensor_model_parallel_size`,
    the file cut at 16 of its 27 KB). SECTIONS are the ConfigContainer fields without a default in all of those."""
    config = checkpoint / RUN_CONFIG
    if not (checkpoint / TRAIN_STATE).is_file():
        return f"has no {TRAIN_STATE}"
    if not config.is_file():
        return f"has no {RUN_CONFIG}"
    try:
        written = yaml.safe_load(config.read_text())
    except yaml.YAMLError:
        return f"{RUN_CONFIG} is cut short (not valid YAML)"
    if not isinstance(written, dict):
        return f"{RUN_CONFIG} is empty"
    missing = [s for s in SECTIONS if not isinstance(written.get(s), dict)]
    missing += [f"{s}.{k}" for s, keys in LOADED_KEYS.items() if isinstance(written.get(s), dict)
                for k in keys if k not in written[s]]
    return f"{RUN_CONFIG} is cut short (no {', '.join(missing)})" if missing else None


def set_aside_unfinished_save(run_dir: Path, log) -> None:
    """A run whose last save was cut short resumes from its newest whole checkpoint (from the start, or lc's
    pretrained model, when there is none); the unfinished one is renamed, not deleted: its tensors were written
    whole (Bridge's barrier precedes the trackers), only its config is not. Idempotent: the rename comes first,
    and a tracker on a missing directory is handled the same way, so a stage killed midway redoes it.

    A save cut before its trackers (a SIGTERM to every process of a preempted job kills Bridge's checkpoint
    writer processes: seen on an H200, BrokenPipeError mid-save) leaves a directory past the tracked iteration,
    which the next save of that iteration would write into: it is set aside the same way."""
    done = latest_iteration(run_dir)
    for later in (d for d in rundir.iteration_dirs(run_dir) if rundir.iteration_of(d) > done):
        aside = run_dir / f"unfinished_{later.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(later, aside)
        log(f"warning: {later}: written after the last tracked checkpoint ({done}) and never finished (the stage "
            f"was stopped while Bridge saved it); kept as {aside.name} (remove it to free its space)")
    if not done:
        return
    checkpoint = rundir.iteration_dir(run_dir, done)
    reason = unfinished_save(checkpoint) if checkpoint.is_dir() else "is missing"
    if reason is None:
        return
    aside = run_dir / f"unfinished_{checkpoint.name}"
    if checkpoint.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(checkpoint, aside)
    whole = next((d for d in reversed(rundir.iteration_dirs(run_dir)) if unfinished_save(d) is None), None)
    if whole:
        back = rundir.iteration_of(whole)
        atomic_copy(whole / TRAIN_STATE, run_dir / BRIDGE_TRACKER)
        rundir.mark_latest(run_dir, back)
    else:
        back = 0
        for tracker in (BRIDGE_TRACKER, rundir.TRACKER):
            (run_dir / tracker).unlink(missing_ok=True)
    kept = f"; kept as {aside.name} (remove it to free its space)" if aside.exists() else ""
    log(f"warning: {checkpoint}: {reason}: the stage was stopped while Bridge saved it; resuming from "
        f"{f'iteration {back}' if back else 'the start'}{kept}")


def torchrun_command(nproc: int) -> list[str]:
    """torchrun for this node: standalone here, or one node of a Slurm allocation (rendezvous on node 0)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    nnodes = int(os.environ.get("SLURM_NNODES", "1"))
    if nnodes > 1:
        master = os.environ.get("MASTER_ADDR")
        if not master:
            raise UserError("multi-node run without MASTER_ADDR; launch through stages/<stage>.sbatch")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={os.environ['SLURM_NODEID']}",
                f"--master_addr={master}", f"--master_port={os.environ.get('MASTER_PORT', '29500')}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "nano3.train.entry"]


def run_forwarding_sigterm(cmd: list[str], env: dict[str, str] | None = None, keep_fds: tuple[int, ...] = (),
                           on_wait: Callable[[int], None] | None = None) -> tuple[int, bool]:
    """Run torchrun in its own session and return (its exit status, whether a stop was asked for). A stop is asked
    for by SIGTERM (passed on by a job script or Slurm), Ctrl-C, or the job's stop file (nano3.train.stopping); it
    goes to the training ranks alone, torchrun's direct children, as SIGTERM: Bridge's handler saves a checkpoint
    and exits. Not to their DataLoader workers (a worker killed under a rank fails the rank before it saves) and not
    to torchrun (its own SIGTERM handling kills the ranks after 30 s, which a large checkpoint outlasts).

    If this process dies without a word (SIGKILL, the OOM killer), torchrun gets SIGTERM from the kernel and stops
    its ranks (SIGTERM, then SIGKILL after 30 s) instead of training on, orphaned, beside the rerun. `keep_fds` (the
    run's lock, rundir.hold_run) stay open in torchrun, so the lock is held until its ranks have stopped.
    `on_wait(torchrun's pid)` runs about once a second while it waits (nano3.train.startup's progress lines)."""
    import signal

    import psutil

    from nano3.train.stopping import stop_requested

    proc = subprocess.Popen(cmd, start_new_session=True, env=env, pass_fds=keep_fds,
                            preexec_fn=stop_when_parent_dies(signal.SIGTERM))
    asked = {"stop": False}

    def forward(*_):
        asked["stop"] = True
        for rank in psutil.Process(proc.pid).children(recursive=False):
            rank.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait(timeout=1), asked["stop"]
            except subprocess.TimeoutExpired:
                if stop_requested() and not asked["stop"]:
                    forward()
                if on_wait is not None:
                    on_wait(proc.pid)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_when_parent_dies(signum: int):
    """A Popen preexec_fn: the child gets `signum` when this process dies (Linux's PR_SET_PDEATHSIG); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()
    pr_set_pdeathsig = 1

    def in_child() -> None:
        prctl(pr_set_pdeathsig, int(signum), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signum)

    return in_child
