"""The GPU ranks' environment (nano3.train.environment): Bridge's Nemotron 3 Nano recipe values on every stack, the
shell's site settings over them, params.yaml's train.env over both; and the launcher hands it to torchrun."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nano3.config import load_params
from nano3.errors import UserError
from nano3.train.backends.megatron import run_forwarding_sigterm
from nano3.train.environment import RECIPE_ENV, expandable_segments, training_environment
from tests.conftest import ROOT


@pytest.fixture
def params():
    return load_params(ROOT / "params.yaml")


def test_the_recipe_values_fill_what_neither_the_shell_nor_params_set(params):
    env = training_environment(params, tp=1, shell={"PATH": "/bin"})
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and env["NCCL_GRAPH_REGISTER"] == "0"
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "32" and env["NVTE_FWD_LAYERNORM_SM_MARGIN"] == "20"
    assert "PATH" not in env and "NVLINK_DOMAIN_SIZE" not in env  # the shell passes through; no HybridEP here
    assert training_environment(params, tp=8, shell={})["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # TP overlap order
    params["train"]["kernels"]["moe_dispatcher"] = "flex"
    assert training_environment(params, tp=1, shell={})["NVLINK_DOMAIN_SIZE"] == "8"


def test_the_shell_wins_over_the_recipe_and_params_win_over_the_shell(params):
    shell = {"NCCL_NVLS_ENABLE": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "8"}
    assert training_environment(params, 1, shell)["NCCL_NVLS_ENABLE"] == "1"  # a site's setting
    params["train"]["env"] = {"CUDA_DEVICE_MAX_CONNECTIONS": 1, "PYTORCH_CUDA_ALLOC_CONF": "", "NCCL_DEBUG": "WARN"}
    env = training_environment(params, 1, shell)
    assert (env["CUDA_DEVICE_MAX_CONNECTIONS"], env["PYTORCH_CUDA_ALLOC_CONF"], env["NCCL_DEBUG"]) == ("1", "", "WARN")
    assert set(RECIPE_ENV) <= set(env)


def test_a_value_that_is_not_plain_text_or_a_number_is_refused(params, tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("  env: {}", "  env: {NCCL_DEBUG: [WARN]}"))
    with pytest.raises(UserError, match=r"train\.env"):
        load_params(bad)


@pytest.mark.parametrize("conf,on", [("expandable_segments:True", True), ("max_split_size_mb:512,expandable_segments:True", True),
                                     ("expandable_segments:False", False), ("", False), (None, False),
                                     ("garbage_collection_threshold:0.8", False)])
def test_which_allocator_settings_turn_expandable_segments_on(conf, on):
    assert expandable_segments(conf) is on


def test_the_launcher_starts_torchrun_with_that_environment(params):
    """run_forwarding_sigterm is what starts torchrun: the child sees the environment it was handed."""
    env = {"PATH": "/usr/bin:/bin", **training_environment(params, 1, {})}
    code = "import os; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'], os.environ['CUDA_DEVICE_MAX_CONNECTIONS'])"
    out = subprocess.run([sys.executable, "-c", f"import subprocess, sys; from nano3.train.backends.megatron import "
                          f"run_forwarding_sigterm as r; sys.exit(r([sys.executable, '-c', {code!r}], {env!r})[0])"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["expandable_segments:True", "32"]
    assert run_forwarding_sigterm([sys.executable, "-c", "import sys; sys.exit(3)"], env) == (3, False)


def test_the_ranks_compile_triton_kernels_into_a_cache_beside_the_checkpoints(params, tmp_path):
    """Triton's own cache manager, in a child the launcher started, writes under train.checkpoint_dir: a cache that
    outlives the job (the pyxis container's home directory does not), so a requeued job skips the compile."""
    params["train"]["checkpoint_dir"] = str(tmp_path / "ckpts")
    env = {"PATH": "/usr/bin:/bin", **training_environment(params, 1, {})}
    code = ("from triton import knobs; from triton.runtime.cache import get_cache_manager; "
            "print(knobs.autotuning.cache); print(get_cache_manager('c0ffee').put(b'kernel', 'k.cubin'))")
    child = (f"import sys; from nano3.train.backends.megatron import run_forwarding_sigterm as r; "
             f"sys.exit(r([sys.executable, '-c', {code!r}], {env!r})[0])")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    autotune_cached, written = out.stdout.split()
    assert autotune_cached == "True"  # the chosen autotune configurations are kept too: no re-timing on a restart
    written = Path(written)
    assert written.read_bytes() == b"kernel" and written.is_relative_to(tmp_path / "ckpts" / ".triton-cache")
    site = {"TRITON_CACHE_DIR": "/scratch/triton"}  # a site's own cache wins, as any shell setting
    assert training_environment(params, 1, site)["TRITON_CACHE_DIR"] == "/scratch/triton"
