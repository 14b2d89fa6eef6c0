"""Progress lines while the training ranks start, before their first logged iteration.

A phase can print nothing for minutes between the ranks' NCCL barrier and its first iteration: Triton compiling (and
autotuning) mamba-ssm's kernels, Inductor compiling, megatron-core building the blend's sample indices. A user cannot
tell that from a hang. The launcher, which waits on torchrun anyway, says once a minute how long it has been, which of
those caches grew and how busy the ranks' processes are; it falls silent at the first metrics row the ranks write.
"""

from __future__ import annotations

import getpass
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nano3.files import tree_size


def startup_caches(env: Mapping[str, str], blend_cache: str | Path) -> dict[str, Path]:
    """Where the ranks write while they start (the defaults are Triton's and Inductor's own)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry and no USER
        user = "user"
    return {
        "Triton kernel cache": Path(env.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache"),
        "Inductor cache": Path(env.get("TORCHINDUCTOR_CACHE_DIR") or Path(tempfile.gettempdir()) / f"torchinductor_{user}"),
        "blend index cache": Path(blend_cache),
    }


def newest_mtime(root: Path) -> float:
    newest = 0.0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def cpu_seconds(pid: int | None) -> float:
    """CPU time of `pid` and its living descendants (0 without psutil or the process)."""
    if pid is None:
        return 0.0
    try:
        import psutil

        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except Exception:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except Exception:
            continue
    return total


@dataclass
class StartupWatch:
    """`tick()` from the launcher's wait loop: a line every `every_s` seconds until `metrics_dir` gets a row."""

    label: str
    metrics_dir: Path
    caches: dict[str, Path]
    every_s: float = 60.0
    log: Callable[[str], None] = print
    clock: Callable[[], float] = time.time
    started: float = field(init=False)
    _last: float = field(init=False)
    _sizes: dict[str, tuple[int, int]] = field(init=False)
    _cpu: float = field(init=False)
    done: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.started = self._last = self.clock()
        self._sizes = {name: tree_size(path) for name, path in self.caches.items()}
        self._cpu = 0.0

    def tick(self, pid: int | None = None) -> None:
        """`pid`: torchrun's, whose process tree (the ranks, their workers, compilers) is the CPU use reported."""
        now = self.clock()
        if self.done or now - self._last < self.every_s:
            return
        if newest_mtime(self.metrics_dir) >= self.started:
            self.done = True  # the ranks logged an iteration: Bridge's own lines take over
            return
        sizes = {name: tree_size(path) for name, path in self.caches.items()}
        grew = [f"{name} +{(b - self._sizes[name][0]) / 2**20:,.0f} MB in {n - self._sizes[name][1]:+,} files"
                for name, (b, n) in sizes.items() if (b, n) != self._sizes[name]]
        cpu = cpu_seconds(pid)
        busy = (cpu - self._cpu) / (now - self._last)
        self.log(f"{self.label}: {now - self.started:,.0f} s since start, no iteration logged yet; last "
                 f"{now - self._last:,.0f} s: " + ("; ".join(grew) if grew else "no compile or index cache grew")
                 + f"; ranks' processes busy on {busy:.1f} cores"
                 + (" (compiling kernels: a start with this cache is faster)"
                    if any(g.startswith(("Triton", "Inductor")) for g in grew) else ""))
        self._last, self._sizes, self._cpu = now, sizes, cpu
