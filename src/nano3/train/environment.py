"""The training ranks' process environment: Megatron-Bridge's Nemotron 3 Nano recipe's, on every stack.

Bridge 0.6's recipes carry it as `cfg.env_vars` and fill it in inside `pretrain()`, where it is unset; the recipe's
own image (Bridge 0.3) has no such field, and Slurm jobs used to export other values first. Some of these are read
once, at CUDA, allocator or NCCL start-up, so the launcher sets them before torchrun starts the ranks, the same on
every stack. Precedence: the recipe's value < the shell's (site settings, as Bridge does) < params.yaml's
`train.env`. The effective configuration records what each rank had, and whether the allocator took it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# Bridge 0.6's Nemotron 3 Nano recipes (recipes/nemotronh/h100/nemotron_3_nano.py with COMMON_RECIPE_ENV_VARS):
# the expandable-segment allocator (its graph registration off), no NVLS, NCCL on its high-priority stream,
# cuDNN layer norms with 20 SMs left to overlapping communication.
RECIPE_ENV = {
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "NCCL_GRAPH_REGISTER": "0",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "TORCH_NCCL_HIGH_PRIORITY": "1",
    "NVTE_FWD_LAYERNORM_SM_MARGIN": "20",
    "NVTE_BWD_LAYERNORM_SM_MARGIN": "20",
    "NVTE_NORM_FWD_USE_CUDNN": "1",
    "NVTE_NORM_BWD_USE_CUDNN": "1",
}
# The recipe (TP 1) lets CUDA run 32 streams at once; Bridge's TP 8 + sequence-parallel recipes keep 1, the
# ordering megatron-core's tensor-parallel overlap relies on (tensor_parallel/layers.py).
MAX_CONNECTIONS = {"tp1": "32", "tp>1": "1"}
# The `flex` dispatcher's HybridEP, within one NVLink domain of 8 GPUs (the recipe's H100 values).
HYBRID_EP_ENV = {"NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN": "8", "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API": "128",
                 "NVLINK_DOMAIN_SIZE": "8", "USE_MNNVL": "0"}

# Triton compiles mamba-ssm's Mamba-2 kernels in a rank's first iteration: 118 s of it against 24 s with its cache
# warm (tiny at 64k on an H200, docs/benchmarks.md). Its default cache, ~/.triton, is gone with the container of a
# pyxis job (slurm.sh does not mount the home directory), so every requeue and resume paid it again. Beside the
# checkpoints (shared storage, kept between jobs) it is paid once per kernel version; Triton writes each cache entry
# by an atomic rename, so ranks and nodes share it safely. Even warm, ~60 s of a start went to re-timing every
# autotuned kernel's configurations (one H200, 2026-12-03): TRITON_CACHE_AUTOTUNING keeps the chosen configuration in
# the same cache, so a requeue or resume starts without it.
TRITON_CACHE = ".triton-cache"


def triton_cache_dir(params) -> str:
    return str((Path(params.settings.train.checkpoint_dir) / TRITON_CACHE).resolve())


def recipe_environment(params, tp: int) -> dict[str, str]:
    """The recipe's values for a layout with this tensor-parallel size and params' kernels."""
    env = {**RECIPE_ENV, "CUDA_DEVICE_MAX_CONNECTIONS": MAX_CONNECTIONS["tp1" if tp == 1 else "tp>1"]}
    if params.settings.train.kernels.moe_dispatcher == "flex":
        env.update(HYBRID_EP_ENV)
    return env


def training_environment(params, tp: int, shell: Mapping[str, str]) -> dict[str, str]:
    """The variables this repository decides for the ranks (the rest of `shell` passes through unchanged)."""
    env = {**recipe_environment(params, tp), "TRITON_CACHE_DIR": triton_cache_dir(params), "TRITON_CACHE_AUTOTUNING": "1"}
    env.update({k: shell[k] for k in env if k in shell})
    env.update({str(k): str(v) for k, v in (params.settings.train.env or {}).items()})
    return env


def expandable_segments(conf: str | None) -> bool:
    """Whether a PYTORCH_CUDA_ALLOC_CONF value turns the expandable-segment allocator on (torch reads it so)."""
    options = dict(item.split(":", 1) for item in (conf or "").replace(" ", "").split(",") if ":" in item)
    return options.get("expandable_segments", "False").lower() == "true"
