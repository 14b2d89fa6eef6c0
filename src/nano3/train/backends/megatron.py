"""The Megatron backend: each phase of a stage is one torchrun of nano3.train.entry (Megatron-Bridge's pretrain)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from nano3.config import section_name
from nano3.errors import UserError
from nano3.train.backends.training_run import TrainingRun
from nano3.train.environment import training_environment
from nano3.train.rundir import exit_if_stopped, failure_path, latest_iteration
from nano3.train.startup import StartupWatch, startup_caches


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
            "--spec", str(run.specs[phase.name]), "--run-dir", str(run.run_dir), "--live-dir", str(run.live_dir)]
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
