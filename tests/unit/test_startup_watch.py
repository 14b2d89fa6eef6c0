"""The launcher's progress lines before the first iteration (issue 34: 8 silent minutes on a fresh H200)."""

from __future__ import annotations

import subprocess
import sys
import time

from nano3.train.backends.megatron import run_forwarding_sigterm
from nano3.train.startup import StartupWatch, startup_caches


def test_a_line_a_minute_names_the_cache_that_grew_until_an_iteration_is_logged(tmp_path):
    caches = {name: tmp_path / name.split()[0] for name in ("Triton kernel cache", "Inductor cache",
                                                            "blend index cache")}
    metrics = tmp_path / "live" / "plots" / "metrics"
    lines: list[str] = []
    now = [time.time() - 1]  # the launcher's clock; the files below are written after its start
    watch = StartupWatch("pretrain: phase1", metrics, caches, every_s=60, log=lines.append, clock=lambda: now[0])

    caches["Triton kernel cache"].mkdir()
    (caches["Triton kernel cache"] / "k.cubin").write_bytes(b"x" * 3 * 2**20)
    watch.tick()
    assert lines == []  # not a minute yet
    now[0] += 61
    watch.tick()
    assert len(lines) == 1
    assert "pretrain: phase1: 61 s since start, no iteration logged yet" in lines[0]
    assert "Triton kernel cache +3 MB in +1 files" in lines[0] and "compiling kernels" in lines[0]
    assert "Inductor" not in lines[0] and "blend index" not in lines[0]

    now[0] += 61
    watch.tick()
    assert "no compile or index cache grew" in lines[1] and "compiling" not in lines[1]

    metrics.mkdir(parents=True)
    (metrics / "loss.tsv").write_text("step\tloss\n1\t10.4\n")
    now[0] += 61
    watch.tick()
    now[0] += 61
    watch.tick()
    assert len(lines) == 2 and watch.done  # the ranks log now


def test_the_caches_are_the_ranks_own(tmp_path):
    env = {"TRITON_CACHE_DIR": str(tmp_path / "t"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "i")}
    caches = startup_caches(env, tmp_path / "blend-cache")
    assert caches == {"Triton kernel cache": tmp_path / "t", "Inductor cache": tmp_path / "i",
                      "blend index cache": tmp_path / "blend-cache"}
    assert startup_caches({}, "b")["Triton kernel cache"].parts[-2:] == (".triton", "cache")  # Triton's default


def test_the_launcher_calls_back_with_torchrun_pid_while_it_waits():
    seen: list[int] = []
    code = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(2.5)"
    proc_out = subprocess.run([sys.executable, "-c",
                               "import sys; from nano3.train.backends.megatron import run_forwarding_sigterm as r\n"
                               "seen = []\n"
                               f"rc = r([sys.executable, '-c', {code!r}], on_wait=seen.append)[0]\n"
                               "print('pids', sorted(set(seen)), len(seen), rc)"],
                              capture_output=True, text=True, check=True)
    child_pid, summary = proc_out.stdout.strip().splitlines()
    assert summary.startswith(f"pids [{child_pid}]")
    assert int(summary.split()[-2]) >= 2  # about once a second over 2.5 s
    assert summary.endswith(" 0")  # its exit status
    assert run_forwarding_sigterm([sys.executable, "-c", "pass"], on_wait=seen.append) == (0, False)
