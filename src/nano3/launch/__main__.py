"""`python -m nano3.launch`: run stages here or on Slurm; what `make` and DVC call.

    run <stage> [args]          DVC's command for every stage: here, or (CLUSTER set) submit and wait
    submit <stage> [args]       submit to --cluster; --wait streams the log and returns the job's code
    all                         submit the whole pipeline as jobs chained with afterok dependencies
    status | cancel | logs      this repository's jobs, last checkpoints and metrics; cancel them; follow a log
    exps                        DVC's experiments: changed params and headline metrics, fitting the terminal
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nano3  # noqa: F401
from nano3.config import load_params
from nano3.config.clusters import PROFILES_FILE, get_profile
from nano3.errors import UserError
from nano3.launch.slurm import (
    CPU_STAGES,
    FROZEN_ROOT,
    GPU_STAGES,
    ONE_GPU_STAGES,
    JobRequest,
    build_request,
    submit,
    submit_and_wait,
    test_only,
    wait_for,
)
from nano3.train import rundir

PIPELINE = ("sample", "tokenizer", "retrieval", "prep", "blend", "pretrain", "lc", "export", "eval")


def params_file() -> str:
    return os.environ.get("NANO3_PARAMS", "params.yaml")


def datasets(params) -> list[str]:
    return list(params.settings.datasets)


def requests_for(stage: str, params, profile, stage_args: list[str]) -> list[JobRequest]:
    """One request per job: prep without a dataset name means one job (or array) per dataset."""
    if stage == "prep" and not [a for a in stage_args if not a.startswith("-") and "=" not in a]:
        return [build_request(stage, params, profile, [name, *stage_args], params_file()) for name in datasets(params)]
    return [build_request(stage, params, profile, stage_args, params_file())]


def after(job: str | None) -> list[str]:
    """sbatch arguments that start a job only once `job` (ids joined by ':') succeeded."""
    return [f"--dependency=afterok:{job}", "--kill-on-invalid-dep=yes"] if job else []


def submit_prep(request: JobRequest, params, wait: bool, dependency: str | None = None) -> tuple[str, int | None]:
    """A dataset's prep: one job, or a job array plus an assembling job after it (prep.array_tasks)."""
    tasks = int(params.settings.prep.array_tasks)
    dep = after(dependency)
    if tasks <= 1:
        if wait:
            return "", submit_and_wait(request, *dep)
        return submit(request, *dep), None
    name = request.stage_args[0]
    # The plan is a job too: it needs the tokenizer, which a chain submitted with it has not made yet.
    plan, assemble = (JobRequest(request.stage, request.name, request.sbatch_args, request.env, [*request.stage_args, step])
                      for step in ("--plan-only", "--assemble"))
    if wait:
        rc = submit_and_wait(plan, *dep)
        if rc:
            return "", rc
        planned = []
    else:
        planned = [submit(plan, *dep)]
    array = submit(request, f"--array=0-{tasks - 1}", *(after(planned[0]) if planned else dep))
    print(f"nano3: prep {name}: {'plan job ' + planned[0] + ', ' if planned else ''}array job {array} ({tasks} "
          f"tasks), then assembly", file=sys.stderr)
    if wait:
        return array, submit_and_wait(assemble, *after(array))
    return submit(assemble, *after(array)), None


def run_here(cmd: list[str]) -> int:
    """Run a stage in a child process. Ctrl-C reaches the child too (the terminal's whole process group): the child
    says its one line (a training stage checkpoints first) and this process only returns its exit status. A
    no-op handler rather than SIG_IGN, which the child would inherit."""
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        return subprocess.call(cmd)
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_run(args) -> int:
    """DVC's entry: run the stage here, or submit it and wait when CLUSTER is set."""
    cluster = os.environ.get("CLUSTER")
    if not cluster or os.environ.get("EXECUTOR", "slurm") == "local":
        rc = run_here([sys.executable, f"stages/{args.stage}.py", "--params", params_file(), *args.rest])
        if rc and os.environ.get("DVC_STAGE"):
            stage = os.environ["DVC_STAGE"]
            print(f"nano3: {stage} ended with exit status {rc}{' (stopped; rerun to resume)' if rc == 3 else ''}; "
                  f"DVC removed its outputs before it ran, so dvc status lists them as deleted: rerun it (dvc repro "
                  f"{stage}) or bring back the last recorded ones (dvc checkout {stage})", file=sys.stderr)
        return rc
    return cmd_submit(argparse.Namespace(stage=args.stage, rest=args.rest, cluster=cluster, wait=True,
                                         test_only=False, print_only=False, dependency=None, only=True))


def stale_upstream(stage: str) -> list[str]:
    """Pipeline stages before `stage` that DVC reports as not up to date (what `dvc repro <stage>` would run first)."""
    if stage not in PIPELINE or shutil.which("dvc") is None:
        return []
    out = subprocess.run(["dvc", "status", "--with-deps", "--json", stage], capture_output=True, text=True)
    if out.returncode != 0:
        return []
    changed = {name.split("@")[0] for name in json.loads(out.stdout or "{}")}
    return [s for s in PIPELINE[: PIPELINE.index(stage)] if s in changed]


def chain_requests(stages: list[str], params, profile, stage_args: list[str]) -> list[tuple[str, list[JobRequest]]]:
    """Every job request of `stages` (`stage_args` go to the last), all checked before any is submitted."""
    return [(stage, requests_for(stage, params, profile, stage_args if stage == stages[-1] else [])) for stage in stages]


def submit_chain(chain: list[tuple[str, list[JobRequest]]], params, wait: bool, print_only: bool = False,
                 test: bool = False, dependency: str | None = None) -> int:
    """Submit the stages in order, each job starting only once the previous stage's jobs succeeded (afterok).
    With `wait`, each stage's jobs are waited for before the next."""
    last = dependency
    for stage, requests in chain:
        ids = []
        for request in requests:
            if print_only or test:
                print(request.shell_line())
                if test:
                    print(test_only(request))
                continue
            if request.stage == "prep":
                job, rc = submit_prep(request, params, wait, last)
                if rc:
                    return rc
            elif wait:
                job, rc = "", submit_and_wait(request, *after(last))
                if rc:
                    return rc
            else:
                job = submit(request, *after(last))
            if job:
                ids.append(job)
                print(f"{stage:9s} {job}  ({request.name})")
        last = ":".join(ids) or last
    return 0


def cmd_submit(args) -> int:
    """One stage, after the upstream stages DVC says are not up to date (chained with afterok), as
    `make <stage>` without CLUSTER runs what the stage needs."""
    params = load_params(params_file(), [a for a in args.rest if "=" in a and not a.startswith("-")])
    profile = get_profile(args.cluster)
    upstream = [] if args.only else stale_upstream(args.stage)
    chain = chain_requests([*upstream, args.stage], params, profile, args.rest)
    if upstream:
        print(f"nano3: {args.stage} needs {', '.join(upstream)} first (dvc status): submitting them chained with "
              f"afterok (--only submits {args.stage} alone)", file=sys.stderr)
    return submit_chain(chain, params, args.wait, args.print_only, args.test_only, args.dependency)


def cmd_all(args) -> int:
    """The whole pipeline as chained jobs (detached); record it afterwards with `dvc commit`."""
    params = load_params(params_file())
    rc = submit_chain(chain_requests(list(PIPELINE), params, get_profile(args.cluster), []), params, wait=False)
    print("when the last job is done: dvc commit -f  (records the outputs in dvc.lock)")
    return rc


def our_jobs() -> list[list[str]]:
    """This repository's nano3-* jobs in the queue: the user's, submitted from this directory (another clone's
    jobs have the same names); none where Slurm is not installed."""
    if shutil.which("squeue") is None:
        return []
    out = subprocess.run(["squeue", "-h", "--me", "-o", "%i|%j|%T|%M|%R|%Z"], capture_output=True, text=True)
    here = Path.cwd().resolve()
    jobs = [line.split("|") for line in out.stdout.splitlines() if "|nano3-" in line]
    return [job[:5] for job in jobs if Path(job[5]).resolve() == here]


def cmd_status(_args) -> int:
    jobs = our_jobs()
    print("jobs:" if jobs else "jobs: none of this repository's (nano3-*) in the queue")
    for job in jobs:
        print(f"  {job[0]:>10}  {job[1]:28s} {job[2]:10s} {job[3]:>10}  {job[4]}")
    for line in frozen_params_changed({job[0] for job in jobs}):
        print(line)
    params = load_params(params_file())
    train = params.settings.train
    for stage in GPU_STAGES:
        for run_dir in rundir.runs(train, stage):
            m = rundir.full_metrics(run_dir)  # the run's own metrics, as far as it logged
            loss, tflops = m.get("train", {}).get("loss"), m.get("perf", {}).get("tflops_per_gpu_true")
            if rundir.latest_iteration(run_dir) or m:
                print(f"{stage}: run {run_dir.name}: last checkpoint at iteration {rundir.latest_iteration(run_dir)}"
                      + (f"; step {m.get('step')}, loss {loss:.4f}" if loss is not None else "")
                      + (f", {tflops:.1f} TFLOP/s/GPU" if tflops else ""))
    return 0


def frozen_params_changed(queued: set[str]) -> list[str]:
    """A warning per queued job whose params (frozen at submission) differ from the checkout's params file now."""
    out = []
    for jobs in sorted(FROZEN_ROOT.glob("*/jobs")):
        frozen = jobs.parent
        name = (frozen / "params_name").read_text()
        waiting = [j for j in jobs.read_text().split() if j in queued]
        if waiting and Path(name).exists() and (frozen / name).read_bytes() != Path(name).read_bytes():
            out.append(f"warning: {name} changed after job(s) {', '.join(waiting)} were submitted; they keep the params "
                       f"and code of {frozen} (diff {frozen / name} {name}); put {name} back before dvc commit records "
                       f"their outputs, or it records today's params beside them")
    return out


def cmd_cancel(_args) -> int:
    ids = [job[0] for job in our_jobs()]
    if ids:
        subprocess.run(["scancel", *ids], check=True)
    print(f"cancelled {len(ids)} job(s)" + (f": {' '.join(ids)}" if ids else ""))
    return 0


def cmd_logs(args) -> int:
    logs = sorted(Path("logs").glob("nano3-*.out"), key=lambda p: p.stat().st_mtime)
    if args.job:
        logs = [p for p in logs if p.stem.endswith(f"-{args.job}")]
    if not logs:
        raise UserError("no job logs in logs/ (nano3-*.out)" + (f" for job {args.job}" if args.job else ""))
    log = logs[-1]
    job_id = log.stem.rsplit("-", 1)[1]
    running = any(j[0] == job_id for j in our_jobs())
    if not running:
        sys.stdout.write(log.read_text(errors="replace"))
        return 0
    print(f"following {log} (Ctrl-C stops following; the job keeps running)", file=sys.stderr)
    until_done = subprocess.Popen(["bash", "-c", f"while squeue -h -j {job_id} | grep -q .; do sleep 2; done"])
    try:
        return wait_for(job_id, log, until_done, cancel_on_interrupt=False)
    except KeyboardInterrupt:
        return 0


def cmd_exps(_args) -> int:
    from nano3.launch.experiments import show

    print(show())
    return 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nano3.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("stage", choices=[*CPU_STAGES, *GPU_STAGES, *ONE_GPU_STAGES])
    p = sub.add_parser("submit", help="other arguments (dataset, key=value, --force) go to the stage")
    p.add_argument("stage", choices=[*CPU_STAGES, *GPU_STAGES, *ONE_GPU_STAGES])
    p.add_argument("--cluster", default=os.environ.get("CLUSTER"), required=not os.environ.get("CLUSTER"),
                   help=f"profile in {PROFILES_FILE}")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--test-only", action="store_true", help="sbatch --test-only: check, queue nothing")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the sbatch command only")
    p.add_argument("--dependency", help="job id(s) that must succeed first")
    p.add_argument("--only", action="store_true", help="submit this stage alone, not the upstream stages it needs")
    p = sub.add_parser("all")
    p.add_argument("--cluster", default=os.environ.get("CLUSTER"), required=not os.environ.get("CLUSTER"))
    sub.add_parser("status")
    sub.add_parser("cancel")
    sub.add_parser("exps")
    p = sub.add_parser("logs")
    p.add_argument("job", nargs="?")
    args, rest = ap.parse_known_args(argv)
    if rest and args.command not in ("run", "submit"):
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    handler = {"run": cmd_run, "submit": cmd_submit, "all": cmd_all, "status": cmd_status, "cancel": cmd_cancel,
               "logs": cmd_logs, "exps": cmd_exps}[args.command]
    try:
        sys.exit(handler(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
