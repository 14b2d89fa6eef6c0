"""Submitting stages to Slurm: the sbatch request for a stage and profile, submission, waiting.

The job scripts are the committed `stages/<stage>.sbatch` files (so `sbatch stages/pretrain.sbatch`
works by hand); this module only computes their resources from params.yaml and the cluster
profile, passes the container settings as environment variables, and checks everything first.
Waiting mirrors `sbatch --wait`, streams the job's log, returns the job's exit code, and cancels
the job if it is interrupted or its parent (make, dvc) dies: killing `sbatch --wait` alone would
leave the job running.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nano3.config.clusters import ClusterProfile
from nano3.errors import UserError

CPU_STAGES = ("sample", "tokenizer", "retrieval", "prep", "blend")
GPU_STAGES = {"pretrain": "train", "lc": "lc"}  # stage -> params section
ONE_GPU_STAGES = ("export", "eval")  # one process on one GPU


@dataclass
class JobRequest:
    stage: str
    name: str
    sbatch_args: list[str]
    env: dict[str, str]
    stage_args: list[str] = field(default_factory=list)

    @property
    def script(self) -> str:
        return f"stages/{self.stage}.sbatch"

    @property
    def process_env(self) -> dict[str, str]:
        """sbatch exports the submitting environment: ours plus the container settings."""
        return {**os.environ, **self.env}

    def command(self, *extra: str) -> list[str]:
        return ["sbatch", "--parsable", *self.sbatch_args, *extra, self.script, *self.stage_args]

    def shell_line(self, *extra: str) -> str:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{exports} {shlex.join(self.command(*extra))}"


def build_request(stage: str, params, profile: ClusterProfile, stage_args: list[str] | None = None,
                  params_file: str = "params.yaml") -> JobRequest:
    """The sbatch arguments and environment for one stage; layout problems fail here."""
    if stage not in (*CPU_STAGES, *GPU_STAGES, *ONE_GPU_STAGES):
        raise UserError(f"unknown stage '{stage}'; stages: {', '.join([*CPU_STAGES, *GPU_STAGES, *ONE_GPU_STAGES])}")
    stage_args = list(stage_args or [])
    name = "-".join(["nano3", stage, *[a for a in stage_args if not a.startswith("-") and "=" not in a][:1]])
    args = [f"--job-name={name}", f"--partition={profile.partition}"]
    if profile.account:
        args.append(f"--account={profile.account}")
    if profile.mem:
        args.append(f"--mem={profile.mem}")
    if stage in GPU_STAGES:
        from nano3.train.plan import build_plan, resources

        section = GPU_STAGES[stage]
        _, gpus = resources(params, section, profile.shape)
        if gpus > profile.gpus_per_node:  # the hardware first: no layout can fix this
            raise UserError(f"{section}.gpus_per_node={gpus} but cluster '{profile.name}' nodes have "
                            f"{profile.gpus_per_node} GPUs; lower it or set it to null to use the profile's")
        layout = build_plan(params, stages=(section,), cluster_shape=profile.shape, gpu_memory=profile.gpu_memory(),
                            host_memory=profile.host_memory()).stages[section].layout
        args += [f"--nodes={layout.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={layout.gpus_per_node}",
                 f"--cpus-per-task={profile.cpus_per_task}", f"--time={profile.train_time or profile.time}"]
    else:
        gpu = ["--gpus-per-node=1"] if stage in ONE_GPU_STAGES and profile.gpus_per_node else []
        args += ["--nodes=1", "--ntasks=1", *gpu, f"--cpus-per-task={profile.cpus_per_task}", f"--time={profile.time}"]
    args += list(profile.sbatch_extra)
    env = {"NANO3_RUNTIME": profile.runtime, "NANO3_IMAGE": profile.container_image or "",
           "NANO3_MOUNTS": ",".join(profile.mounts), "NANO3_MAX_REQUEUES": str(profile.max_requeues),
           "NANO3_IMAGE_EXTRAS": profile.image_extras,
           "NANO3_PARAMS": params_file, **{k: str(v) for k, v in profile.env.items()}}
    return JobRequest(stage, name, args, env, stage_args)


def submit(request: JobRequest, *extra: str) -> str:
    """Submit and return the job id."""
    Path("logs").mkdir(exist_ok=True)
    out = subprocess.run(request.command(*extra), env=request.process_env, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"sbatch refused {request.script}: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
    return out.stdout.strip().split(";")[0]


def test_only(request: JobRequest) -> str:
    """`sbatch --test-only`: Slurm's own check that the request fits the cluster (nothing is queued)."""
    out = subprocess.run(request.command("--test-only"), env=request.process_env, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"sbatch --test-only refused {request.script}: {out.stderr.strip()}")
    return out.stderr.strip()


def log_path(name: str, job_id: str) -> Path:
    return Path("logs") / f"{name}-{job_id}.out"


def wait_for(job_id: str, log: Path | None, proc: subprocess.Popen | None = None, stream=sys.stdout,
             cancel_on_interrupt: bool = True) -> int:
    """Wait for `proc` (sbatch --wait) while streaming the job's log; cancel the job on SIGINT/SIGTERM/
    SIGHUP or when our parent dies (unless we only follow the log)."""
    parent = os.getppid()

    def cancel(reason: str) -> None:
        subprocess.run(["scancel", job_id], capture_output=True)
        if proc is not None:
            proc.kill()
        print(f"nano3: cancelled job {job_id} ({reason})", file=sys.stderr)
        sys.exit(130)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if cancel_on_interrupt else ()
    handlers = {s: signal.signal(s, lambda signum, _f: cancel(signal.Signals(signum).name)) for s in signals}
    offset = 0
    try:
        while True:
            if log is not None and log.exists():
                with open(log, errors="replace") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
                if chunk:
                    try:
                        stream.write(chunk)
                        stream.flush()
                    except (BrokenPipeError, OSError):  # whoever read our output is gone; keep waiting
                        pass
            if proc is not None and proc.poll() is not None:
                if log is None or not log.exists() or log.stat().st_size == offset:
                    return proc.returncode
            if cancel_on_interrupt and os.getppid() != parent:
                cancel(f"parent {parent} died")
            time.sleep(1)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def submit_and_wait(request: JobRequest, *extra: str) -> int:
    """`sbatch --wait` with log streaming and cancel-on-interrupt; returns the job's exit code."""
    Path("logs").mkdir(exist_ok=True)
    proc = subprocess.Popen(request.command("--wait", *extra), env=request.process_env,
                            stdout=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    if not job_id:
        proc.wait()
        raise UserError(f"sbatch refused {request.script} (exit {proc.returncode})")
    print(f"nano3: submitted job {job_id} ({request.name}); log {log_path(request.name, job_id)}", file=sys.stderr)
    return wait_for(job_id, log_path(request.name, job_id), proc)
