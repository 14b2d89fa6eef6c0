"""Cluster profiles (`stages/clusters.toml`): who pays, where jobs run, and in which container.

A profile is checked whole before anything is submitted: an unknown cluster, a missing account, an
unknown container runtime or a node shape the parallel layout cannot use is a one-line error here,
not a job that fails after waiting in the queue.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from nano3.errors import UserError

PROFILES_FILE = os.environ.get("NANO3_CLUSTERS", "stages/clusters.toml")
RUNTIMES = ("pyxis", "apptainer", "none")
IMAGE_EXTRAS = ("installed", "install")  # the image has nano3's packages | stages/in_image.sh installs them


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    account: str  # "" for clusters without accounting
    partition: str
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    runtime: str
    time: str = "04:00:00"
    train_time: str | None = None
    mem: str | None = None
    container_image: str | None = None
    mounts: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    sbatch_extra: tuple[str, ...] = ()
    max_requeues: int = 20
    image_extras: str = "installed"  # "install" on a bare NeMo image: nano3's packages installed at job start
    gpu_memory_gib: float = 79.6  # what CUDA reports for one GPU (H100 80GB: 79.6; H200: 139.8); plans must fit it
    host_memory_gib: float | None = None  # a node's RAM for the job; the plan's host memory per rank x ranks must fit
    tp_above_kv_groups: bool | None = None  # the image's megatron-core splits a KV group over TP ranks (>= 0.16);
                                            # null: as the installed one does

    def train_seconds(self) -> int:
        """A training job's time limit (train_time, else time) in seconds."""
        return slurm_seconds(self.train_time or self.time)

    @property
    def shape(self) -> tuple[int, int]:
        return self.nodes, self.gpus_per_node

    def gpu_memory(self) -> tuple[float, str]:
        """(GiB, where the number comes from): the card a training layout must fit."""
        return self.gpu_memory_gib, f"cluster '{self.name}' (gpu_memory_gib)"

    def host_memory(self) -> tuple[float, str] | None:
        """(GiB, where the number comes from): a node's RAM its ranks must fit; None where the profile does not say."""
        return (self.host_memory_gib, f"a node of cluster '{self.name}' (host_memory_gib)") if self.host_memory_gib else None


def slurm_seconds(text: str) -> int:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds."""
    days, _, rest = text.partition("-") if "-" in text else ("0", "", text)
    parts = [int(x) for x in rest.split(":")]
    if "-" in text:
        h, m, sec = (parts + [0, 0])[:3]
    else:
        h, m, sec = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return ((int(days) * 24 + h) * 60 + m) * 60 + sec


def load_profiles(path: str | Path = PROFILES_FILE) -> dict[str, dict]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no cluster profiles file; copy the example profiles of stages/clusters.toml (docs/cluster.md)")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None


def get_profile(name: str, path: str | Path = PROFILES_FILE) -> ClusterProfile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise UserError(f"{path}: unknown cluster '{name}'; known: {', '.join(sorted(profiles)) or 'none'}")
    raw = dict(profiles[name])
    where = f"{path} [{name}]"
    for key in ("account", "partition", "nodes", "gpus_per_node", "cpus_per_task", "runtime"):
        if key not in raw:
            hint = ' (use account = "" if the cluster has no accounting)' if key == "account" else ""
            raise UserError(f"{where}: missing '{key}'{hint}")
    if raw["runtime"] not in RUNTIMES:
        raise UserError(f"{where}: runtime '{raw['runtime']}' is not one of {', '.join(RUNTIMES)}")
    if raw["runtime"] != "none" and not raw.get("container_image"):
        raise UserError(f"{where}: runtime '{raw['runtime']}' needs a container_image")
    if raw.get("image_extras", "installed") not in IMAGE_EXTRAS:
        raise UserError(f"{where}: image_extras '{raw['image_extras']}' is not one of {', '.join(IMAGE_EXTRAS)} "
                        "(install: nano3's packages are installed at job start, for a bare NeMo image)")
    for key in ("nodes", "gpus_per_node", "cpus_per_task"):
        if not isinstance(raw[key], int) or raw[key] < (0 if key == "gpus_per_node" else 1):
            raise UserError(f"{where}: '{key}' must be a positive integer, got {raw[key]!r}")
    for key in ("gpu_memory_gib", "host_memory_gib"):
        if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], (int, float)) or raw[key] <= 0):
            raise UserError(f"{where}: '{key}' must be a positive number of GiB, got {raw[key]!r}")
    if raw.get("tp_above_kv_groups") is not None and not isinstance(raw["tp_above_kv_groups"], bool):
        raise UserError(f"{where}: 'tp_above_kv_groups' must be true or false, got {raw['tp_above_kv_groups']!r}")
    for key in ("time", "train_time"):
        if raw.get(key) is not None:
            try:
                slurm_seconds(str(raw[key]))
            except (ValueError, KeyError):
                raise UserError(f"{where}: '{key}' = {raw[key]!r} is not a Slurm time limit; write it as "
                                f"\"HH:MM:SS\" or \"D-HH:MM:SS\"") from None
    known = set(ClusterProfile.__dataclass_fields__) - {"name"}
    unknown = set(raw) - known
    if unknown:
        raise UserError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    raw["mounts"] = tuple(raw.get("mounts", ()))
    raw["sbatch_extra"] = tuple(raw.get("sbatch_extra", ()))
    if raw["runtime"] == "pyxis":
        raw["container_image"] = enroot_image(raw["container_image"])
    return ClusterProfile(name=name, **raw)


def enroot_image(ref: str) -> str:
    """An image reference as pyxis documents it and enroot 3.x and 4.x both read: `registry#repo:tag`. enroot before
    4.0 reads the docker form `nvcr.io/nvidia/nemo:tag` as a Docker Hub name and fails with 401. A path (a squash file
    imported once per site) and a Docker Hub name (no registry host before the first `/`) stay as written."""
    if "#" in ref or ref.startswith(("/", "./", "../")) or ref.endswith(".sqsh") or "/" not in ref:
        return ref
    host, _, rest = ref.partition("/")
    if "." in host or ":" in host or host == "localhost":
        return f"{host}#{rest}"
    return ref


def local_gpu_memory() -> tuple[float, str] | None:
    """(GiB, description) of this machine's first CUDA GPU, or None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory / 2**30, f"this machine's {props.name}"
    except Exception:
        pass
    return None
