"""A training stage and its torchrun (nano3.train.backends.megatron, nano3.train.rundir.hold_run). A stage that dies
without a word (SIGKILL, the OOM killer) takes its ranks down instead of leaving them training, orphaned, beside
the rerun; the rerun is refused while they stop. Real torchrun on this CPU; the rank stands in for Bridge's: it
sleeps and, on SIGTERM, "saves a checkpoint" for 3 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nano3.errors import UserError
from nano3.train.rundir import hold_run
from tests.gpu.conftest import gone, kill_tree, wait_gone

RANK = """
import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def on_term(*_):
    time.sleep(3)
    (out / "stopped").write_text("SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
(out / "rank.pid").write_text(str(os.getpid()))
time.sleep(600)
"""

STAGE = """
import sys
from nano3.train.backends.megatron import run_forwarding_sigterm
from nano3.train.rundir import hold_run
with hold_run(sys.argv[1]) as lock_fd:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    sys.exit(run_forwarding_sigterm(torchrun + sys.argv[2:], keep_fds=(lock_fd,))[0])
"""


# A rank reading batches through a DataLoader with 2 workers, as Bridge's ranks do (train.num_workers: 2): on SIGTERM
# it reads the next batch (the step in flight), then "saves" and exits.
RANK_WITH_WORKERS = """
import os, pathlib, signal, sys, time
from torch.utils.data import DataLoader, Dataset
out = pathlib.Path(sys.argv[1])
class Slow(Dataset):
    def __len__(self): return 10**6
    def __getitem__(self, i): time.sleep(0.05); return i
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
loader = iter(DataLoader(Slow(), batch_size=None, num_workers=2))
next(loader)
(out / "rank.pid").write_text(str(os.getpid()))
while not stop:
    next(loader)
next(loader)
(out / "stopped").write_text("saved")
"""


def wait_for(path: Path, seconds: float) -> str:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} did not appear in {seconds} s")


def test_a_second_training_of_a_run_is_refused_while_the_first_holds_it(tmp_path):
    run = tmp_path / "checkpoints" / "lc" / "0123abcd"
    with hold_run(run) as fd:
        assert fd is not None
        with pytest.raises(UserError, match=r"lc/0123abcd: another training of this run is going on \(started by "
                                            r"pid \d+ on .+; train.lock\); wait until it ends"):
            with hold_run(run):
                pass
        with hold_run(run.parent / "4567ef01"):  # a run of other hyperparameters is not held up
            pass
    with hold_run(run):  # released with the stage
        pass


@pytest.fixture
def stage_with_rank(tmp_path):
    """A stage holding its run's lock, under it torchrun and one rank: (stage, rank, run directory); every process
    left is killed afterwards."""
    (tmp_path / "rank.py").write_text(RANK)
    run = tmp_path / "checkpoints" / "lc" / "0123abcd"
    stage = subprocess.Popen([sys.executable, "-c", STAGE, str(run), str(tmp_path / "rank.py"), str(tmp_path)],
                             start_new_session=True)
    try:
        yield stage, psutil.Process(int(wait_for(tmp_path / "rank.pid", 120))), run
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()


def test_a_stage_killed_without_a_word_stops_its_ranks_and_holds_the_lock_until_they_have(stage_with_rank, tmp_path):
    stage, rank, run = stage_with_rank
    torchrun = psutil.Process(stage.pid).children()[0]
    stage.kill()  # the stage alone, as `kill -9` or the OOM killer would
    stage.wait()
    with pytest.raises(UserError, match="another training of this run is going on"):
        with hold_run(run):
            pass  # the rank is still saving: a rerun now would train beside it
    assert wait_gone([rank], 60) == []
    assert (tmp_path / "stopped").read_text() == "SIGTERM"  # stopped as Slurm stops it: Bridge saves first
    assert wait_gone([torchrun], 60) == []
    with hold_run(run):
        pass


def test_the_gpu_tests_kill_reaches_torchrun_and_the_ranks(stage_with_rank, tmp_path):
    """tests/gpu's kill/resume tests stand for a node failure: every process of the stage dies at once, no rank
    gets to save, and the run is free for the resume (their earlier os.killpg reached the stage alone)."""
    stage, rank, run = stage_with_rank
    kill_tree(stage)
    assert gone(rank)
    with hold_run(run):
        pass
    assert not (tmp_path / "stopped").exists()


@pytest.mark.parametrize("ask", ["the job's stop file", "SIGTERM to the stage"])
def test_a_stop_reaches_the_ranks_and_spares_their_dataloader_workers(tmp_path, ask):
    """Issue 30: the time-limit save used to SIGTERM every process under torchrun, DataLoader workers too, and the
    rank died on "DataLoader worker ... killed by signal" (exit 1: no save, no requeue). The stop goes to the
    ranks only, whether the job asks by its stop file or by signalling the stage."""
    (tmp_path / "rank.py").write_text(RANK_WITH_WORKERS)
    stop_file = tmp_path / "stop-request"
    run = tmp_path / "checkpoints" / "pretrain" / "0123abcd"
    stage = subprocess.Popen([sys.executable, "-c", STAGE, str(run), str(tmp_path / "rank.py"), str(tmp_path)],
                             env={**os.environ, "NANO3_STOP_FILE": str(stop_file)}, start_new_session=True,
                             stderr=subprocess.PIPE, text=True)
    try:
        rank = psutil.Process(int(wait_for(tmp_path / "rank.pid", 120)))
        workers = rank.children()
        assert len(workers) == 2
        if ask == "SIGTERM to the stage":
            stage.send_signal(signal.SIGTERM)
        else:
            stop_file.touch()
        assert stage.wait(timeout=60) == 0, stage.stderr.read()[-2000:]
        assert (tmp_path / "stopped").read_text() == "saved"
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
