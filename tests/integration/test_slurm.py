"""The sbatch path against a real Slurm (tests/slurm/start.sh: one node, fake GPUs, a 2-node `render`
partition for --test-only). Started here when this runs as root and no cluster is up (CI does)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nano3.launch.slurm import job_state
from tests.conftest import ROOT, copy_repo, write_hub_repo
from tests.unit.test_prep import tree_digest

pytestmark = [pytest.mark.slurm]

TWO_NODE_PROFILE = """
[twonode]
account = "proj123"
partition = "render"
nodes = 2
gpus_per_node = 8
cpus_per_task = 16
time = "01:00:00"
train_time = "04:00:00"
runtime = "pyxis"
container_image = "nvcr.io/nvidia/nemo:25.11.nemotron_3_nano"
mounts = ["/lustre:/lustre"]

[local]
account = ""
partition = "debug"
nodes = 1
gpus_per_node = 1
cpus_per_task = 2
time = "00:30:00"
runtime = "none"

[held]                      # jobs queued on hold: the test edits the checkout, then releases them
account = ""
partition = "debug"
nodes = 1
gpus_per_node = 1
cpus_per_task = 2
time = "00:30:00"
runtime = "none"
sbatch_extra = ["--hold"]

[pair]                      # two real slurmds of this host (start.sh REAL_NODES=2)
account = ""
partition = "multi"
nodes = 2
gpus_per_node = 1
cpus_per_task = 1
time = "00:30:00"
runtime = "none"

[timelimit]                 # training jobs of 3 minutes, told to checkpoint 100 s before the end
account = ""
partition = "debug"
nodes = 1
gpus_per_node = 1
cpus_per_task = 2
time = "00:30:00"
train_time = "00:03:00"
runtime = "none"
sbatch_extra = ["--signal=B:USR1@100"]
max_requeues = 50
"""


def slurm_up() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h", "-p", "render"], capture_output=True, text=True).stdout.strip() != ""


@pytest.fixture(scope="session")
def slurm():
    started = False
    if not slurm_up():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("no Slurm test cluster (start one as root: REAL_NODES=2 RENDER_NODES=2 FAKE_GPUS=8 "
                        "tests/slurm/start.sh)")
        env = {**os.environ, "REAL_NODES": "2", "RENDER_NODES": "2", "FAKE_GPUS": "8", "FAKE_CPUS": "64",
               "FAKE_MEM_MB": "500000", "MIN_JOB_AGE": "5", "CRED_EXPIRE": "10"}
        out = subprocess.run(["bash", str(ROOT / "tests/slurm/start.sh")], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"could not start the Slurm test cluster: {out.stderr[-500:]}")
        started = True
    yield
    if started:
        subprocess.run(["bash", str(ROOT / "tests/slurm/stop.sh")], capture_output=True)


def env(**extra) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def launch(repo: Path, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "nano3.launch", *args], cwd=repo, capture_output=True, text=True,
                         env=env(NANO3_CLUSTERS=str(repo / "clusters-test.toml")), timeout=900, **kw)
    if check:
        assert out.returncode == 0, f"{args}: {out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def settled_state(job: str, timeout: float = 30) -> str:
    """The job's state once it has left RUNNING/COMPLETING (GONE once Slurm forgot it)."""
    deadline = time.time() + timeout
    while job_state(job) in ("RUNNING", "COMPLETING", "CONFIGURING") and time.time() < deadline:
        time.sleep(0.3)
    return job_state(job)


@pytest.fixture(scope="module")
def repo(slurm, tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("slurm") / "repo")
    (repo / "clusters-test.toml").write_text(TWO_NODE_PROFILE)
    return repo


TRAIN_AT_SCALE = ["model.preset=nano3", "train.parallel.ep=8", "train.micro_batch_size=1", "train.global_batch_size=64",
                  "train.seq_length=4096", "lc.parallel.cp=8", "lc.parallel.ep=8", "lc.global_batch_size=48",
                  "lc.seq_length=16384", "model.vocab_size=131072"]


def test_every_stage_renders_for_two_nodes_of_eight_gpus_and_passes_test_only(repo):
    for stage, args in (("sample", []), ("tokenizer", []), ("prep", ["stdlib-code"]), ("blend", []),
                        ("pretrain", TRAIN_AT_SCALE), ("lc", TRAIN_AT_SCALE)):
        out = launch(repo, "submit", stage, "--cluster", "twonode", "--test-only", *args)
        line, verdict = out.stdout.strip().splitlines()[-2:]
        assert f"stages/{stage}.sbatch" in line and "--account=proj123" in line and "NANO3_RUNTIME=pyxis" in line
        assert "NANO3_IMAGE='nvcr.io#nvidia/nemo:25.11.nemotron_3_nano'" in line  # quoted for the shell and "--partition=render" in line
        if stage in ("pretrain", "lc"):
            assert "--nodes=2" in line and "--gpus-per-node=8" in line and "--ntasks-per-node=1" in line
            assert "on nodes vm,vm-r2" in verdict or "nodes" in verdict
        assert verdict.startswith("sbatch: Job") and "to start at" in verdict
    script = (repo / "stages" / "pretrain.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@" in script
    assert subprocess.run(["squeue", "-h", "-n", "nano3-pretrain"], capture_output=True, text=True).stdout == ""


def test_bad_layouts_and_profiles_fail_before_submission(repo):
    out = launch(repo, "submit", "pretrain", "--cluster", "twonode", "--test-only", *TRAIN_AT_SCALE,
                 "train.parallel.tp=3", check=False)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: train.parallel: TP x PP x CP = 3x1x1")
    out = launch(repo, "submit", "sample", "--cluster", "nope", "--test-only", check=False)
    assert out.returncode == 2 and "unknown cluster 'nope'; known: held, local, pair, timelimit, twonode" in out.stderr


def test_cpu_stages_through_sbatch_give_the_same_outputs_as_local_runs(repo, tmp_path):
    local = copy_repo(tmp_path / "local")
    dvc_env = env(CLUSTER="local", NANO3_CLUSTERS=str(repo / "clusters-test.toml"))
    out = subprocess.run(["dvc", "repro", "blend"], cwd=repo, env=dvc_env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stderr.count("nano3: submitted job") == 8  # sample, tokenizer, retrieval, 4 x prep, blend: each a job
    for stage in ("sample", "retrieval", "tokenizer", "prep-stdlib-code", "prep-retrieval", "blend"):
        assert list((repo / "logs").glob(f"nano3-{stage}-*.out")), f"no job log for {stage}"
    here = subprocess.run(["dvc", "repro", "blend"], cwd=local, env=env(), capture_output=True, text=True, timeout=1800)
    assert here.returncode == 0, here.stderr[-3000:]

    def outs(path: Path) -> dict:
        import yaml

        lock = yaml.safe_load((path / "dvc.lock").read_text())["stages"]
        return {o["path"]: o.get("md5") for s in lock.values() for o in s.get("outs", [])}

    assert outs(repo) == outs(local) and len(outs(repo)) >= 7


def test_prep_job_array_then_assembly_equals_one_process(repo):
    if not (repo / "data" / "tokenizer" / "info.json").exists():
        pytest.skip("needs the data stages of the previous test")
    common = ["prep.unit_mb=1", "prep.workers=1"]
    launch(repo, "submit", "prep", "stdlib-code", "--cluster", "local", "--wait", "prep.array_tasks=3",
           "prep.out_dir=data/prep-array", "prep.work_dir=data/work-array", *common)
    logs = [p.read_text() for p in (repo / "logs").glob("nano3-prep-stdlib-code-*.out")]
    assert sum("prep stdlib-code: units step done" in text for text in logs) == 3  # three array tasks ...
    assert any("prep stdlib-code: train" in text for text in logs)  # ... then the assembling job
    single = subprocess.run([sys.executable, "stages/prep.py", "stdlib-code", "prep.out_dir=data/prep-single",
                             "prep.work_dir=data/work-single", *common], cwd=repo, env=env(), capture_output=True,
                            text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    manifest = json.loads((repo / "data/prep-array/stdlib-code/manifest.json").read_text())
    assert manifest["source"]["units"] >= 6  # enough units for three tasks
    assert tree_digest(repo / "data/prep-array/stdlib-code") == tree_digest(repo / "data/prep-single/stdlib-code")


def start_requeued_jobs(name: str, pending_since: dict[str, float]) -> None:
    """A requeued job may start once its credential has expired (10 s on the test cluster; sooner, slurmd refuses
    the revoked credential and ends the job): then start it instead of waiting for the scheduler's next pass."""
    pending = subprocess.run(["squeue", "-h", "-n", name, "-t", "PD", "-o", "%i"], capture_output=True,
                             text=True).stdout.split()
    for job in set(pending_since) - set(pending):  # started (or gone): a later requeue waits its 15 s again
        del pending_since[job]
    for job in pending:
        pending_since.setdefault(job, time.time())
        if time.time() - pending_since[job] > 15:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)


def test_a_prep_job_at_its_time_limit_requeues_and_resumes_from_its_finished_units(repo):
    """Issue 30: data jobs were not time-limit safe (an overrun cancelled the whole chain). Slurm's pre-limit signal
    (here sent by hand: `scancel --batch --signal=USR1`, what `--signal=B:USR1@300` delivers) requeues the prep job;
    its next start resumes from the units already written, and the dataset is the single process's, byte for byte."""
    if not (repo / "data" / "prep-single" / "stdlib-code" / "manifest.json").exists():
        pytest.skip("needs test_prep_job_array_then_assembly_equals_one_process's single-process output")
    proc = subprocess.Popen([sys.executable, "-m", "nano3.launch", "submit", "prep", "stdlib-code", "--cluster", "local",
                             "--wait", "--only", "prep.unit_mb=1", "prep.workers=1", "prep.out_dir=data/prep-restart",
                             # sentencepiece itself, not gigatoken (the same ids, ~4x slower): with gigatoken the prep
                             # of a quiet machine finished all its units before the signal reached the job
                             "prep.encoder=reference", "prep.work_dir=data/work-restart"], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(NANO3_CLUSTERS=str(repo / "clusters-test.toml")))
    deadline, signalled, pending_since = time.time() + 900, None, {}
    while proc.poll() is None and time.time() < deadline:
        if signalled is None and list((repo / "data" / "work-restart").rglob("unit_*.json")):
            signalled = subprocess.run(["squeue", "-h", "-n", "nano3-prep-stdlib-code", "-t", "R", "-o", "%i"],
                                       capture_output=True, text=True).stdout.split()[0]
            subprocess.run(["scancel", "--batch", "--signal=USR1", signalled], check=True)
        start_requeued_jobs("nano3-prep-stdlib-code", pending_since)
        time.sleep(0.5)
    out, err = proc.communicate(timeout=60)
    assert signalled, "no unit was written before the job ended"
    log = (repo / "logs" / f"nano3-prep-stdlib-code-{signalled}.out").read_text(errors="replace")
    assert proc.returncode == 0, log[-3000:] + err[-2000:]
    assert f"time limit near: requeueing job {signalled}" in log and "restart 1," in log, log[-3000:]
    assert "prep stdlib-code: resuming, " in log, log[-3000:]
    assert tree_digest(repo / "data/prep-restart/stdlib-code") == tree_digest(repo / "data/prep-single/stdlib-code")


def test_a_training_job_at_its_time_limit_checkpoints_requeues_and_finishes(repo):
    """Issue 30's rehearsal of the cluster week: a real pretrain job (the CPU reference backend reading through 2
    DataLoader workers, as production's ranks do) with a 3-minute time limit. Slurm signals the batch script 100 s
    before the end (80 to 110 s after the start: it looks every 30 s); the job asks the training to checkpoint, it
    exits 3, the job requeues itself and resumes, until the run is done, its metrics single-valued. (Signalling the step instead reached the workers: the rank died on
    "DataLoader worker ... killed by signal" and the job failed.)"""
    if not (repo / "data" / "blend" / "phase1.json").exists():
        pytest.skip("needs the data stages of test_cpu_stages_through_sbatch_give_the_same_outputs_as_local_runs")
    iterations = 40  # of 4 x 256 tokens: 2 minutes of training on a quiet 2-core machine, so 2 jobs
    budget = [f"train.reference.tokens={iterations * 1024}", "train.num_workers=2", "train.log_interval=1",
              "train.checkpoint_dir=ck-timelimit", "train.live_dir=live-timelimit"]
    proc = subprocess.Popen([sys.executable, "-m", "nano3.launch", "submit", "pretrain", "--cluster", "timelimit",
                             "--wait", "--only", *budget], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(NANO3_CLUSTERS=str(repo / "clusters-test.toml")))
    deadline = time.time() + 1800  # a quiet 2-core machine needs 2 jobs, about 4 minutes
    pending_since: dict[str, float] = {}
    while proc.poll() is None and time.time() < deadline:
        start_requeued_jobs("nano3-pretrain", pending_since)
        time.sleep(1)
    out, err = proc.communicate(timeout=60)
    job = err.split("nano3: submitted job ")[1].split()[0]
    # tqdm's partial writes and the batch script's lines share the log: a character may be split (as in production)
    text = (repo / "logs" / f"nano3-pretrain-{job}.out").read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:] + err[-2000:]
    assert "data loader: 2 worker processes" in text and "time limit near: asking the training to checkpoint" in text
    assert "pretrain: stopped by the job's stop request (NANO3_STOP_FILE) at iteration" in text
    assert f"requeueing job {job}" in text and "restart 1," in text
    assert "Traceback" not in text and "DataLoader worker" not in text, text[-4000:]
    manifest = json.loads((repo / "ck-timelimit" / "pretrain.json").read_text())
    assert manifest["iteration"] == iterations
    from nano3.train.metrics import read_metric

    steps = [s for s, _ in read_metric(repo / "live-timelimit" / "pretrain", "train/loss")]
    assert steps == list(range(1, iterations + 1))


def test_a_two_node_training_job_on_two_real_slurmds_trains_once(repo):
    """Issue 30: one pretrain job on two nodes, each a real slurmd of this host (start.sh REAL_NODES=2), the stage
    started on both by one srun step. Before, both nodes trained the CPU reference run into the same directory at
    once (two checkpoints written, two progress bars); node 0 trains, node 1 stands by, and the run is whole."""
    if not (repo / "data" / "blend" / "phase1.json").exists():
        pytest.skip("needs the data stages of test_cpu_stages_through_sbatch_give_the_same_outputs_as_local_runs")
    if subprocess.run(["sinfo", "-h", "-p", "multi", "-o", "%D"], capture_output=True, text=True).stdout.strip() != "2":
        pytest.skip("no `multi` partition of two slurmds (start the cluster with REAL_NODES=2)")
    iterations = 6
    out = launch(repo, "submit", "pretrain", "--cluster", "pair", "--wait", "--only",
                 f"train.reference.tokens={iterations * 1024}", "train.num_workers=2", "train.log_interval=1",
                 "train.checkpoint_dir=ck-pair", "train.live_dir=live-pair")
    job = out.stderr.split("nano3: submitted job ")[1].split()[0]
    text = (repo / "logs" / f"nano3-pretrain-{job}.out").read_text(errors="replace")
    nodes = subprocess.run(["sinfo", "-h", "-N", "-p", "multi", "-o", "%N"], capture_output=True, text=True).stdout.split()
    assert text.count(f"pretrain: node 1 ({nodes[1]}) of job {job} stands by") == 1, text[-3000:]  # the second slurmd
    assert text.count("Writing model shards: 100%") == 1 and text.count("data loader: 2 worker processes") == 1
    assert "Traceback" not in text, text[-3000:]
    manifest = json.loads((repo / "ck-pair" / "pretrain.json").read_text())
    assert manifest["iteration"] == iterations
    from nano3.train.metrics import read_metric

    steps = [s for s, _ in read_metric(repo / "live-pair" / "pretrain", "train/loss")]
    assert steps == list(range(1, iterations + 1))


def test_a_queued_job_runs_the_params_and_code_it_was_submitted_with(repo):
    """Issue 30: a queued (or requeued) job re-read params.yaml and src/ at its start, so an edit made while it
    waited changed what it ran (a training run would restart from iteration 0 under a new digest). Jobs run the
    checkout frozen at submission; `make status` says which queued job keeps which params."""
    params = (repo / "params.yaml").read_text()
    try:
        (repo / "params.yaml").write_text(params.replace("out_dir: data/sample", "out_dir: data/sample-submitted"))
        out = launch(repo, "submit", "sample", "--cluster", "held", "--only")
        job = out.stdout.split()[1]
        (repo / "params.yaml").write_text(params.replace("out_dir: data/sample", "out_dir: data/sample-edited"))
        (repo / "src" / "nano3" / "data" / "sample.py").write_text("raise SystemExit('edited code ran')\n")
        status = launch(repo, "status").stdout
        assert f"warning: params.yaml changed after job(s) {job} were submitted; they keep" in status, status
        frozen = next(f for f in (repo / "logs" / "frozen").iterdir() if job in (f / "jobs").read_text().split())
        # what a job-start install reads is frozen too (image_extras = install)
        assert (frozen / "containers" / "requirements.txt").read_bytes() == (repo / "containers" / "requirements.txt").read_bytes()
        month_old = time.time() - 30 * 86400
        os.utime(frozen, (month_old, month_old))
        prune = [sys.executable, "-c", "from nano3.launch.slurm import prune_frozen; print(len(prune_frozen()))"]
        assert subprocess.run(prune, cwd=repo, env=env(), capture_output=True, text=True).stdout.strip() == "0"
        assert frozen.is_dir()  # a month old, but its job still waits in the queue
        subprocess.run(["scontrol", "release", job], check=True)
        wait_done(job, timeout=300)
        log = (repo / "logs" / f"nano3-sample-{job}.out").read_text()
        assert "code and params frozen at submission: " in log and "edited code ran" not in log, log[-2000:]
        assert (repo / "data" / "sample-submitted" / "manifest.json").exists()
        assert not (repo / "data" / "sample-edited").exists()
        subprocess.run(prune, cwd=repo, env=env(), check=True, capture_output=True)
        assert not frozen.exists()  # its job is done: the next submission's pruning removes it
    finally:
        (repo / "params.yaml").write_text(params)
        subprocess.run(["git", "checkout", "--", "src/nano3/data/sample.py"], cwd=repo, capture_output=True)


def test_wait_returns_the_jobs_exit_code(repo):
    out = launch(repo, "submit", "prep", "missing", "--cluster", "local", "--wait",
                 "datasets.missing={source: /no/such/dir, watch: params.yaml}", check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    # The job's own log, streamed while waiting, ends with the stage's one-line error.
    assert "nano3: job" in out.stdout and "\nerror: " in out.stdout and "Exited with exit code 2" in out.stdout


def start_waiting(repo: Path, parent_shell: bool = False) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "nano3.launch", "submit", "sample", "--cluster", "local", "--wait",
           "sample.out_dir=data/sample-cancel"]
    if parent_shell:  # a parent that dies without a word, as make or dvc killed with SIGKILL
        cmd = ["bash", "-c", " ".join(cmd) + " & sleep 600"]
    proc = subprocess.Popen(cmd, cwd=repo, env=env(NANO3_CLUSTERS=str(repo / "clusters-test.toml")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        jobs = subprocess.run(["squeue", "-h", "-n", "nano3-sample", "-o", "%i %T"], capture_output=True,
                              text=True).stdout.split()
        if len(jobs) == 2 and jobs[1] == "RUNNING":
            return proc, jobs[0]
        time.sleep(0.2)
    raise AssertionError("the job did not start")


def test_wait_cancels_the_job_when_interrupted(repo):
    proc, job = start_waiting(repo)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and f"cancelled job {job} (SIGINT)" in err
    assert settled_state(job) in ("CANCELLED", "GONE")


def test_wait_cancels_the_job_when_its_parent_dies(repo):
    shell, job = start_waiting(repo, parent_shell=True)
    shell.kill()  # SIGKILL the parent shell only; the waiting launcher is orphaned
    assert settled_state(job) in ("CANCELLED", "GONE")
    os.killpg(shell.pid, signal.SIGKILL)


PAYLOAD = """
import pathlib, sys, time, os
from nano3.train.stopping import stop_requested
marker = pathlib.Path(sys.argv[1]) / "checkpoint"
behaviour = sys.argv[2]
if marker.exists():
    print(f"resumed from checkpoint {marker.read_text()} (restart {os.environ.get('SLURM_RESTART_COUNT')})", flush=True)
    sys.exit(0)
print("started fresh", flush=True)
for _ in range(1200):
    if stop_requested():
        if behaviour == "crash":
            print("crashing on the request", flush=True); sys.exit(1)
        marker.write_text("iteration 42"); print("checkpoint saved; stopping early", flush=True); sys.exit(3)
    time.sleep(0.1)
sys.exit(1)
"""


def requeue_job(repo: Path, tmp: Path, behaviour: str, max_requeues: int = 5) -> tuple[str, Path]:
    (tmp / "payload.py").write_text(PAYLOAD)
    log = tmp / "job.out"
    script = tmp / "job.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=nano3-requeue-test --output={log} --open-mode=append --requeue -c 1 --mem=200M
source stages/slurm.sh
run_requeueable in_container {sys.executable} {tmp / 'payload.py'} {tmp} {behaviour}
""")
    job = subprocess.run(["sbatch", "--parsable", str(script)], cwd=repo, capture_output=True, text=True, check=True,
                         env=env(NANO3_MAX_REQUEUES=str(max_requeues))).stdout.strip()
    deadline = time.time() + 60
    while not (log.exists() and "started fresh" in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    # What Slurm does at `--signal=B:USR1@<lead>` before the time limit:
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    return job, log


def wait_done(job: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job)
        if state in ("COMPLETED", "FAILED", "GONE"):
            return
        if state == "PENDING":  # requeued: eligible after CRED_EXPIRE; let it start now
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {job_state(job)}")


def test_pre_time_limit_signal_checkpoints_requeues_and_resumes(repo, tmp_path):
    job, log = requeue_job(repo, tmp_path, "checkpoint")
    wait_done(job)
    text = log.read_text()
    assert "time limit near: asking the training to checkpoint" in text and "checkpoint saved; stopping early" in text
    assert f"requeueing job {job}" in text and "restart 1," in text
    assert "resumed from checkpoint iteration 42 (restart 1)" in text
    assert job_state(job) in ("COMPLETED", "GONE")


def test_a_failing_job_is_not_requeued(repo, tmp_path):
    job, log = requeue_job(repo, tmp_path, "crash")
    wait_done(job)
    text = log.read_text()
    assert "crashing on the request" in text and "requeueing" not in text and "restart 1," not in text


def test_requeues_are_capped(repo, tmp_path):
    job, log = requeue_job(repo, tmp_path, "checkpoint", max_requeues=0)
    wait_done(job)
    text = log.read_text()
    assert "not requeued: the job already restarted 0 times" in text and "resumed" not in text


def test_cancel_and_status_touch_only_this_repositorys_jobs(repo, tmp_path):
    """Another clone's jobs carry the same nano3-* names: `make cancel` must leave them alone."""
    other = tmp_path / "other-clone"
    other.mkdir()

    def hold(cwd: Path) -> str:
        return subprocess.run(["sbatch", "--parsable", "--job-name=nano3-pretrain", "-p", "debug", "-c", "1",
                               "--mem=100M", "-o", "/dev/null", "--wrap", "sleep 120"], cwd=cwd, capture_output=True,
                              text=True, check=True).stdout.strip().split(";")[0]

    mine, theirs = hold(repo), hold(other)
    try:
        status = launch(repo, "status").stdout
        listed = [line.split()[0] for line in status.splitlines() if "nano3-" in line]
        assert listed == [mine], status
        out = launch(repo, "cancel").stdout
        assert out.strip() == f"cancelled 1 job(s): {mine}"
        assert settled_state(mine) in ("CANCELLED", "GONE")
        assert job_state(theirs) in ("PENDING", "RUNNING")
    finally:
        subprocess.run(["scancel", mine, theirs], capture_output=True)


def test_submitting_a_stage_chains_the_upstream_stages_dvc_has_not_run(slurm, tmp_path):
    """`make blend CLUSTER=x` on a fresh clone means what `make blend` means here: the stages it needs first."""
    fresh = copy_repo(tmp_path / "fresh")
    (fresh / "clusters-test.toml").write_text(TWO_NODE_PROFILE)
    out = launch(fresh, "submit", "blend", "--cluster", "local")
    jobs = [line.split()[:2] for line in out.stdout.splitlines()]
    try:
        assert [stage for stage, _ in jobs] == ["sample", "tokenizer", "retrieval", "prep", "prep", "prep", "prep", "blend"], out.stdout
        assert "blend needs sample, tokenizer, retrieval, prep first (dvc status)" in out.stderr
        ids = {stage: [j for s, j in jobs if s == stage] for stage, _ in jobs}

        def dependency(job: str) -> str:
            text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
            return next(w for w in text.split() if w.startswith("Dependency="))

        assert all(f"afterok:{p}" in dependency(ids["blend"][0]) for p in ids["prep"])
        assert f"afterok:{ids['sample'][0]}" in dependency(ids["tokenizer"][0])
        only = launch(fresh, "submit", "blend", "--cluster", "local", "--only", "--print").stdout
        assert only.count("sbatch ") == 1 and "stages/blend.sbatch" in only
    finally:
        subprocess.run(["scancel", *[j for _, j in jobs]], capture_output=True)


def hub_mirror_of_the_stdlib(root: Path) -> Path:
    """A hub dataset repo as `prep.hf_mirror` reads it (README configs + Parquet per subset), holding this Python's
    own standard-library modules (real text, as the sample corpus)."""
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    write_hub_repo(root / "nvidia" / "Nemotron-Stdlib", {"Modules": ("Modules", [
        {"text": [f.read_text(errors="replace") for f in files[i::2]]} for i in range(2)])})
    return root


def test_the_whole_chain_with_prep_job_arrays_and_a_gated_hub_dataset_completes_from_a_fresh_clone(slurm, tmp_path):
    """Issue 30: with prep.array_tasks > 1, `make all CLUSTER=...` planned each dataset on the login node before the
    chained tokenizer job had run, and stopped (`data/tokenizer/info.json ... not found`) with jobs already queued.
    The plan is a job of the chain now. Production-shaped: job arrays, and a gated hub dataset read from a hub-layout
    mirror (without the mirror and without a token, the submission is one line and queues nothing). Every job of
    the chain (sample to eval, 28 jobs) completes; nothing runs on the login node."""
    import yaml

    fresh = copy_repo(tmp_path / "fresh")
    (fresh / "clusters-test.toml").write_text(TWO_NODE_PROFILE)
    params = yaml.safe_load((fresh / "params.yaml").read_text())
    params["prep"]["array_tasks"] = 2
    params["datasets"]["hub-modules"] = {"source": "hf://nvidia/Nemotron-Stdlib/Modules", "gated": True,
                                         "watch": "src/nano3/data/sources.py", "text_field": "text",
                                         "test_fraction": 0.1}  # 164 modules: eval needs a few held out
    params["blend"]["phases"]["phase1"] = {"stdlib-code": 0.6, "stdlib-docs": 0.3, "hub-modules": 0.1}
    params["train"]["reference"]["tokens"] = 8 * 1024  # the chain's mechanics, not the model: 8 iterations
    params["lc"]["reference"]["tokens"] = 2 * 1024
    params["eval"].update({"max_tokens": 1024, "max_new_tokens": 4})
    params["eval"]["long_context"].update({"prompts": 2, "documents": 1})
    (fresh / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (fresh / "reports" / "eval" / "metrics.json").unlink()  # committed: what the test finds must be the chain's
    no_token = {"NANO3_CLUSTERS": str(fresh / "clusters-test.toml"), "HF_HOME": str(tmp_path / "no-login")}
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    refused = subprocess.run([sys.executable, "-m", "nano3.launch", "all", "--cluster", "local"], cwd=fresh,
                             capture_output=True, text=True, env={k: v for k, v in env(**no_token).items()
                                                                  if k != "HF_TOKEN"}, timeout=300)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and errors == [
        "error: params.yaml: datasets.hub-modules is gated on the Hugging Face Hub "
        "(hf://nvidia/Nemotron-Stdlib/Modules) and no token is set: accept its terms on the dataset page, then run "
        "`hf auth login` or export HF_TOKEN (or set prep.hf_mirror to a local copy)"], refused.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split() == before
    params["prep"]["hf_mirror"] = str(hub_mirror_of_the_stdlib(tmp_path / "mirror"))
    (fresh / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = launch(fresh, "all", "--cluster", "local")
        stages = [line.split()[0] for line in out.stdout.splitlines() if "(nano3-" in line]
        assert stages == ["sample", "tokenizer", "retrieval", "prep", "prep", "prep", "prep", "prep", "blend",
                          "pretrain", "lc", "export", "eval"], out.stdout
        assert out.stderr.count(": plan job ") == 5 and "(2 tasks), then assembly" in out.stderr, out.stderr
        assert not (fresh / "data" / "tokenizer").exists()  # no stage ran here
        deadline = time.time() + 1800  # a quiet 2-core machine: about 8 minutes
        while subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split() != before \
                and time.time() < deadline:
            time.sleep(5)
        logs = {p.name: p.read_text(errors="replace") for p in (fresh / "logs").glob("nano3-*.out")}
        failed = {n: t[-1500:] for n, t in logs.items() if "Traceback" in t or "error:" in t}
        assert not failed, failed
        assert (fresh / "reports" / "eval" / "metrics.json").exists(), sorted(logs)
        manifest = json.loads((fresh / "data" / "prepared" / "hub-modules" / "manifest.json").read_text())
        assert manifest["source"]["units"] >= 2 and manifest["splits"]["train"]["documents"] > 50
        assert "hub-modules" in json.loads((fresh / "reports" / "eval" / "metrics.json").read_text())["ppl"]
        assert json.loads((fresh / "checkpoints" / "lc.json").read_text())["iteration"] >= 1
    finally:
        launch(fresh, "cancel", check=False)
