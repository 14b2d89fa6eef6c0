"""Submitting stages to Slurm: the sbatch request for a stage and profile, submission, waiting.

The job scripts are the committed `stages/<stage>.sbatch` files (so `sbatch stages/pretrain.sbatch`
works by hand); this module only computes their resources from params.yaml and the cluster
profile, passes the container settings as environment variables, and checks everything first.
Waiting mirrors `sbatch --wait`, streams the job's log, returns the job's exit code, and cancels
the job if it is interrupted or its parent (make, dvc) dies: killing `sbatch --wait` alone would
leave the job running.
"""

from __future__ import annotations

import codecs
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nano3.config.clusters import ClusterProfile
from nano3.data.sources import check_gated_access, hub_token
from nano3.errors import UserError
from nano3.files import atomic_dir

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
        exports = " ".join(f"{k}={'<hidden>' if k in SECRETS else shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{exports} {shlex.join(self.command(*extra))}"


# Credentials a job needs and cannot find itself: the container does not mount the home directory, where
# `hf auth login` and `wandb login` leave them. Forwarded in the job's environment, never printed.
SECRETS = ("HF_TOKEN", "WANDB_API_KEY")
FORWARDED = ("HF_HOME", "HF_ENDPOINT", "HF_HUB_OFFLINE", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT")


def credentials(environ=os.environ) -> dict[str, str]:
    """HF_TOKEN (the shell's, else `hf auth login`'s token file), WANDB_API_KEY (the shell's, else `wandb login`'s
    ~/.netrc entry) and the hub/W&B settings the shell has; only those found."""
    out = {k: environ[k] for k in FORWARDED if environ.get(k)}
    token = hub_token(environ)
    if token:
        out["HF_TOKEN"] = token
    key = environ.get("WANDB_API_KEY")
    if not key:
        import netrc

        try:
            entry = netrc.netrc(environ.get("NETRC")).authenticators("api.wandb.ai")
        except (FileNotFoundError, netrc.NetrcParseError):
            entry = None
        key = entry[2] if entry else None
    if key:
        out["WANDB_API_KEY"] = key
    return out


def build_request(stage: str, params, profile: ClusterProfile, stage_args: list[str] | None = None,
                  params_file: str = "params.yaml") -> JobRequest:
    """The sbatch arguments and environment for one stage; layout problems fail here."""
    if stage not in (*CPU_STAGES, *GPU_STAGES, *ONE_GPU_STAGES):
        raise UserError(f"unknown stage '{stage}'; stages: {', '.join([*CPU_STAGES, *GPU_STAGES, *ONE_GPU_STAGES])}")
    stage_args = list(stage_args or [])
    named = [a for a in stage_args if not a.startswith("-") and "=" not in a]
    name = "-".join(["nano3", stage, *named[:1]])
    if stage in ("prep", "tokenizer"):  # before any job of a chain is queued
        reads = named if stage == "prep" else params.settings.tokenizer.train_datasets if \
            params.settings.tokenizer.name == "train" else []
        check_gated_access(params, reads, credentials().get("HF_TOKEN"))
    args = [f"--job-name={name}", f"--partition={profile.partition}"]
    if profile.account:
        args.append(f"--account={profile.account}")
    if profile.mem:
        args.append(f"--mem={profile.mem}")
    if stage in GPU_STAGES:
        from nano3.train.plan import build_plan, check_first_save, resources

        section = GPU_STAGES[stage]
        _, gpus = resources(params, section, profile.shape)
        if gpus > profile.gpus_per_node:  # the hardware first: no layout can fix this
            raise UserError(f"{section}.gpus_per_node={gpus} but cluster '{profile.name}' nodes have "
                            f"{profile.gpus_per_node} GPUs; lower it or set it to null to use the profile's")
        plan = build_plan(params, stages=(section,), cluster_shape=profile.shape, gpu_memory=profile.gpu_memory(),
                          host_memory=profile.host_memory(),
                          tp_above_kv_groups=profile.tp_above_kv_groups).stages[section]
        check_first_save(plan, params.settings.train, profile.train_seconds(),
                         f"cluster '{profile.name}' ({'train_time' if profile.train_time else 'time'})")
        layout = plan.layout
        args += [f"--nodes={layout.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={layout.gpus_per_node}",
                 f"--cpus-per-task={profile.cpus_per_task}", f"--time={profile.train_time or profile.time}"]
    else:
        gpu = ["--gpus-per-node=1"] if stage in ONE_GPU_STAGES and profile.gpus_per_node else []
        if gpu:
            from nano3.export.footprint import check_stage

            check_stage(params, stage, profile.gpu_memory(), profile.host_memory())
        args += ["--nodes=1", "--ntasks=1", *gpu, f"--cpus-per-task={profile.cpus_per_task}", f"--time={profile.time}"]
    args += list(profile.sbatch_extra)
    env = {"NANO3_RUNTIME": profile.runtime, "NANO3_IMAGE": profile.container_image or "",
           "NANO3_MOUNTS": ",".join(profile.mounts), "NANO3_MAX_REQUEUES": str(profile.max_requeues),
           "NANO3_IMAGE_EXTRAS": profile.image_extras,
           "NANO3_PARAMS": params_file, **credentials(), **{k: str(v) for k, v in profile.env.items()}}
    return JobRequest(stage, name, args, env, stage_args)


FROZEN_ROOT = Path("logs") / "frozen"
_frozen: dict[str, Path] = {}


def frozen_checkout(params_file: str) -> Path:
    """What the jobs of this submission run, copied once per submitting process: the package (src/nano3), the
    stage scripts, configs/, containers/ and the params file. A queued or requeued job reads them at every start; from
    this copy, an edit of the checkout after submission (params, code, another branch) reaches only later submissions."""
    if params_file not in _frozen:
        prune_frozen()
        name = Path(params_file).name if Path(params_file).is_absolute() else params_file
        final = FROZEN_ROOT / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        with atomic_dir(final) as tmp:
            junk = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree("src/nano3", tmp / "src" / "nano3", ignore=junk)
            shutil.copytree("stages", tmp / "stages", ignore=junk)
            shutil.copytree("configs", tmp / "configs", ignore=junk)  # deviations.yaml, read beside the package
            shutil.copytree("containers", tmp / "containers", ignore=junk)  # image_extras = install's requirements
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(params_file, tmp / name)
            (tmp / "params_name").write_text(name)
        _frozen[params_file] = final.resolve()
    return _frozen[params_file]


FROZEN_KEEP_DAYS = 14


def prune_frozen(now: float | None = None) -> list[Path]:
    """Remove frozen checkouts older than FROZEN_KEEP_DAYS none of whose jobs Slurm still has queued or running
    (a months-long run's requeued job keeps its copy); one without recorded jobs was never submitted."""
    now = time.time() if now is None else now
    removed = []
    for frozen in sorted(FROZEN_ROOT.glob("*-*")) if FROZEN_ROOT.is_dir() else []:
        if now - frozen.stat().st_mtime < FROZEN_KEEP_DAYS * 86400:
            continue
        jobs = (frozen / "jobs").read_text().split() if (frozen / "jobs").exists() else []
        if any(job_state(job) in STILL_GOING for job in jobs):
            continue
        shutil.rmtree(frozen, ignore_errors=True)
        removed.append(frozen)
    return removed


def freeze(request: JobRequest) -> dict[str, str]:
    """The job's environment with the frozen checkout: the code (NANO3_FROZEN) and params (NANO3_PARAMS) it runs."""
    params_file = request.env.get("NANO3_PARAMS", "params.yaml")
    frozen = frozen_checkout(params_file)
    return {**request.process_env, "NANO3_FROZEN": str(frozen),
            "NANO3_PARAMS": str(frozen / (frozen / "params_name").read_text())}


def record_job(env: dict[str, str], job_id: str) -> None:
    """Which jobs run a frozen checkout (make status compares its params with the checkout's)."""
    with open(Path(env["NANO3_FROZEN"]) / "jobs", "a") as f:
        f.write(f"{job_id}\n")


def submit(request: JobRequest, *extra: str) -> str:
    """Submit and return the job id."""
    Path("logs").mkdir(exist_ok=True)
    env = freeze(request)
    out = subprocess.run(request.command(*extra), env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"sbatch refused {request.script}: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
    job_id = out.stdout.strip().split(";")[0]
    record_job(env, job_id)
    return job_id


def test_only(request: JobRequest) -> str:
    """`sbatch --test-only`: Slurm's own check that the request fits the cluster (nothing is queued)."""
    out = subprocess.run(request.command("--test-only"), env=request.process_env, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"sbatch --test-only refused {request.script}: {out.stderr.strip()}")
    return out.stderr.strip()


def log_path(name: str, job_id: str) -> Path:
    return Path("logs") / f"{name}-{job_id}.out"


def wait_for(job_id: str, log: Path | None, proc: subprocess.Popen | None = None, stream=sys.stdout,
             cancel_on_interrupt: bool = True, offset: int = 0) -> int:
    """Wait for `proc` (sbatch --wait) while streaming the job's log from byte `offset`; cancel the job on
    SIGINT/SIGTERM/SIGHUP or when our parent dies (unless we only follow the log)."""
    parent = os.getppid()

    def cancel(reason: str) -> None:
        subprocess.run(["scancel", job_id], capture_output=True)
        if proc is not None:
            proc.kill()
        print(f"nano3: cancelled job {job_id} ({reason})", file=sys.stderr)
        sys.exit(130)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if cancel_on_interrupt else ()
    handlers = {s: signal.signal(s, lambda signum, _f: cancel(signal.Signals(signum).name)) for s in signals}
    # Ranks and the batch script append to one log, so a character can arrive in two pieces: decode across reads.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while True:
            if log is not None and log.exists():
                if log.stat().st_size < offset:  # a requeued run started the log afresh (no --open-mode=append)
                    offset, decoder = 0, codecs.getincrementaldecoder("utf-8")(errors="replace")
                with open(log, "rb") as f:
                    f.seek(offset)
                    chunk = decoder.decode(f.read())
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
    env = freeze(request)
    proc = subprocess.Popen(request.command("--wait", *extra), env=env, stdout=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    if not job_id:
        proc.wait()
        raise UserError(f"sbatch refused {request.script} (exit {proc.returncode})")
    record_job(env, job_id)
    log = log_path(request.name, job_id)
    print(f"nano3: submitted job {job_id} ({request.name}); log {log}", file=sys.stderr)
    rc = wait_for(job_id, log, proc)
    # sbatch --wait can return while a training job requeues itself (Slurm shows the run it ended as cancelled):
    # wait on while the job is queued or running again, then take its own exit code.
    while job_state(job_id) in STILL_GOING:
        print(f"nano3: job {job_id} was requeued; still waiting", file=sys.stderr)
        until_done = subprocess.Popen(["bash", "-c", f"while squeue -h -j {job_id} -t {','.join(STILL_GOING)} "
                                                     f"2>/dev/null | grep -q .; do sleep 2; done"])
        wait_for(job_id, log, until_done, offset=log.stat().st_size if log.exists() else 0)
        rc = job_exit_code(job_id, rc)
    return rc


STILL_GOING = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED")


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as key=value pairs ({} once Slurm has forgotten the job)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(w.split("=", 1) for w in out.split() if "=" in w)


def job_state(job_id: str) -> str:
    """The job's state as scontrol shows it; GONE once Slurm has forgotten it (MinJobAge after its end)."""
    return job_fields(job_id).get("JobState", "GONE")


def job_exit_code(job_id: str, fallback: int) -> int:
    """The exit status of the job's batch script (ExitCode=status:signal), from scontrol, else sacct."""
    code = job_fields(job_id).get("ExitCode")
    if code is None:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "ExitCode", "-j", job_id], capture_output=True,
                             text=True).stdout.split()
        code = out[0] if out else None
    if code is None:
        return fallback
    status, _, sig = code.partition(":")
    return int(status) or (128 + int(sig) if sig and int(sig) else 0)
