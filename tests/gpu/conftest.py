"""The GPU tests' shared pieces: one `make smoke` copy per session (NANO3_GPU_SMOKE_DIR keeps it between calls)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import copy_repo


def gpus() -> int:
    import torch

    return torch.cuda.device_count()


def env() -> dict:
    return {**os.environ, "NANO3_SYSTEM_PYTHON": "1", "PYTHONUNBUFFERED": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def edit_params(repo: Path, values: dict) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()
    path = repo / "params.yaml"
    tree = yaml.load(path.read_text())
    for dotted, value in values.items():
        *parents, last = dotted.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[last] = value
    with open(path, "w") as f:
        yaml.dump(tree, f)


def run(repo: Path, cmd: list[str], timeout: int = 1200) -> str:
    out = subprocess.run(cmd, cwd=repo, env=env(), capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    (repo / "logs").mkdir(exist_ok=True)
    with open(repo / "logs" / "gpu-tests.log", "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n{log}")
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-6000:]}"
    return log


def after_the_kill(run_dir: Path, save_every: int) -> tuple[int, int, str | None]:
    """A killed run's tracked iteration, the one its rerun resumes from, and why the tracked checkpoint is unfinished
    (None: whole). A kill as the tracker appears can land before Bridge has written the checkpoint's run_config.yaml
    (seen on an H200); the stage then resumes from the checkpoint before (backends.megatron.set_aside_unfinished_save)."""
    from nano3.train.rundir import iteration_dir, latest_iteration
    from nano3.train.rundir.repair import unfinished_save

    killed_at = latest_iteration(run_dir)
    cut_short = unfinished_save(iteration_dir(run_dir, killed_at))
    print(f"killed with checkpoint {killed_at} {'cut short: ' + cut_short if cut_short else 'whole'}")
    return killed_at, killed_at - save_every if cut_short else killed_at, cut_short


def cut_as_on_the_h200(checkpoint: Path) -> int:
    """Cut a whole checkpoint's run_config.yaml where the kill on the H200 cut one (Bridge writes its trackers before
    that file; there it stopped at 16,385 of 27,782 bytes), at a line end, so that the set-aside path runs for sure.
    Returns the iteration of the newest checkpoint before it: where the stage must resume."""
    from nano3.train.rundir import iteration_dirs, iteration_of

    config = checkpoint / "run_config.yaml"
    text = config.read_text()
    config.write_text(text[:text.rindex("\n", 0, len(text) * 16385 // 27782) + 1])
    return max(iteration_of(d) for d in iteration_dirs(checkpoint.parent) if d != checkpoint)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a stage and every process under it at once, as a node failure would: its torchrun and the ranks run
    in sessions of their own, which killing the stage's process group does not reach (until 2026-11-29 the
    kill/resume tests left them training beside the resume). Returns once all are gone (`gone`: a zombie counts, as an
    init that does not reap would keep it)."""
    import signal

    import psutil

    stage = psutil.Process(proc.pid)
    tree = [*reversed(stage.children(recursive=True)), stage]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    alive = wait_gone(tree, 60)
    assert not alive, f"still running after SIGKILL: {alive}"


def wait_gone(processes: list, seconds: float) -> list:
    """Wait until every process is `gone`, at most `seconds`; return those that are not."""
    deadline = time.time() + seconds
    while time.time() < deadline and not all(map(gone, processes)):
        time.sleep(0.1)
    return [p for p in processes if not gone(p)]


def gone(process) -> bool:
    """Exited: no such process, or a zombie whose threads have all exited too (until the last one has, the
    process's files, the run's lock among them, are still open)."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE and len(os.listdir(f"/proc/{process.pid}/task")) <= 1
    except (psutil.NoSuchProcess, FileNotFoundError):
        return True


def blended_copy(repo: Path) -> Path:
    """A fresh copy of the repository (its params set for the machine's GPUs) with its data made: `dvc repro blend`
    (sample -> tokenizer -> retrieval -> prep -> blend; CPU only). The smoke's first half, and all that the
    long-context tests need besides a checkpoint of their own."""
    if not (repo / "dvc.yaml").exists():  # a kept copy that was interrupted is resumed, never deleted
        copy_repo(repo)
        if gpus() >= 2:  # the same smoke on two GPUs: pretrain with EP=2, lc with CP=2
            edit_params(repo, {"train.gpus_per_node": 2, "train.parallel.ep": 2, "lc.gpus_per_node": 2,
                               "lc.parallel.cp": 2})
    run(repo, ["dvc", "repro", "blend"], timeout=1800)
    return repo


def kept_or_new(tmp_path_factory) -> Path:
    keep = os.environ.get("NANO3_GPU_SMOKE_DIR")
    return Path(keep) if keep else tmp_path_factory.mktemp("gpu") / "repo"


@pytest.fixture(scope="session")
def blended(tmp_path_factory) -> Path:
    """The copy whose data is made (the smoke's copy when NANO3_GPU_SMOKE_DIR names one)."""
    return blended_copy(kept_or_new(tmp_path_factory))


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """`make smoke` in a fresh copy of the repository: sample -> ... -> pretrain (2 phases) -> lc.

    NANO3_GPU_SMOKE_DIR keeps the copy so a later pytest call on the same machine reuses the run.
    """
    repo = kept_or_new(tmp_path_factory)
    log_file = repo / "logs" / "smoke.log"
    if (repo / "checkpoints" / "lc.json").exists() and log_file.exists():
        return repo, log_file.read_text()
    blended_copy(repo)
    partial = repo / "logs" / "smoke.partial.log"  # attempts that failed: a retry resumes where they stopped
    try:
        log = run(repo, ["make", "smoke"], timeout=1800)
    except AssertionError:
        tried = (repo / "logs" / "gpu-tests.log").read_text()
        with open(partial, "a") as f:
            f.write(tried[tried.rindex("\n$ make smoke\n"):])
        raise
    log_file.parent.mkdir(exist_ok=True)
    with open(log_file, "a") as f:  # a failed or interrupted attempt's lines come first: they trained what it resumed
        f.write((partial.read_text() if partial.exists() else "") + log)
    log = log_file.read_text()
    print(log[-3000:])
    return repo, log
