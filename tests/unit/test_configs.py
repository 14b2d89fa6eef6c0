"""configs/nano3.yaml (production) and params.yaml (embedded default) stay the same schema and both plan."""

from nano3.blend.spec import PHASES, phase_weights
from nano3.config import load_params
from nano3.data.sources import DatasetSpec
from nano3.train.plan import build_plan
from tests.conftest import ROOT


def keys(tree, prefix=""):
    out = set()
    for k, v in tree.items():
        path = f"{prefix}{k}"
        out.add(path)
        if isinstance(v, dict) and k not in ("datasets", "phases", "overrides", "bridge_overrides", "parallel"):
            out |= keys(v, f"{path}.")
    return out


def test_production_config_has_every_knob_of_params_yaml():
    embedded, production = load_params(ROOT / "params.yaml"), load_params(ROOT / "configs" / "nano3.yaml")
    assert keys(embedded) == keys(production)


def test_production_blend_is_nvidias_open_datasets_and_plans_at_recipe_scale(tmp_path):
    p = load_params(ROOT / "configs" / "nano3.yaml", [f"tokenizer.dir={tmp_path}"])
    sources = [DatasetSpec.from_params(p, name).source for name in p["datasets"]]
    assert len(sources) == 23 and all(s.startswith("hf://nvidia/Nemotron-") for s in sources)
    assert {s.split("/")[3] for s in sources} == {"Nemotron-CC-Math-v1", "Nemotron-CC-v2", "Nemotron-CC-v2.1",
                                                 "Nemotron-Pretraining-Specialized-v1"}
    for phase in PHASES:
        assert set(phase_weights(p, phase)) == set(p["datasets"])
    plan = build_plan(p)
    assert plan.params_total / 1e9 > 31 and plan.schedule.pretrain_iters == round(25e12 / (8192 * 4096))
    assert plan.stages["lc"].layout.world == 256 and plan.stages["lc"].layout.cp == 8


def test_console_scripts_point_at_callables():
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr, None)), f"console script {name}: {target}"


def test_make_setup_ignores_an_active_foreign_virtualenv(tmp_path):
    """With another 3.12 virtualenv active, `make setup` must hand uv a base interpreter by absolute path: given
    the venv's bare `python3.12`, uv went looking for a managed CPython to download (and failed offline)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    venv = tmp_path / "foreign"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv}/bin:{os.environ['PATH']}"}
    env.pop("NANO3_SYSTEM_PYTHON", None)
    out = subprocess.run(["make", "-n", "-B", "setup"], cwd=ROOT, env=env, capture_output=True, text=True)
    sync = next(line for line in out.stdout.splitlines() if "sync --frozen" in line)
    python = Path(sync.split("--python ")[1].strip('"'))
    assert python.is_absolute() and venv not in python.parents and python.exists(), sync
