"""dvc.yaml against the code and the params files: deps cover what each stage imports, and every path a
stage writes comes from the params file DVC runs with (so configs/nano3.yaml runs through DVC too)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, copy_repo

SRC = ROOT / "src"


def module_file(name: str) -> Path | None:
    path = SRC / Path(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def nano3_imports(path: Path, package: str) -> set[str]:
    """Every nano3 module `path` imports, at the top or inside functions (lazy imports count too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] == "nano3"}


def import_closure(script: Path) -> set[Path]:
    files: set[Path] = set()
    todo = [(script, "")]
    while todo:
        path, package = todo.pop()
        for module in nano3_imports(path, package):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:i]))
                if found and found not in files:
                    files.add(found)
                    todo.append((found, ".".join(parts[:i] if found.name == "__init__.py" else parts[: i - 1])))
    return files


def stage_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: (spec.get("do", spec))["deps"] for name, spec in stages.items()}


def test_every_stage_depends_on_the_code_it_imports():
    """A change to any module a stage script imports (even lazily) must rerun that stage under DVC."""
    missing = {}
    for stage, deps in stage_deps().items():
        script = ROOT / "stages" / f"{stage}.py"
        covered = [ROOT / d for d in deps if "${" not in d]
        assert script in covered, f"{stage}: dvc.yaml deps lack {script.relative_to(ROOT)}"
        uncovered = [f.relative_to(ROOT) for f in import_closure(script)  # (an empty __init__.py changes nothing)
                     if f.stat().st_size and not any(f == c or c in f.parents for c in covered)]
        if uncovered:
            missing[stage] = sorted(map(str, uncovered))
    assert not missing, f"dvc.yaml deps do not cover these imports: {missing}"


def test_import_closure_sees_lazy_imports(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("def main():\n    from nano3.schedule import build_schedule\n")
    assert SRC / "nano3" / "schedule.py" in import_closure(script)
    assert SRC / "nano3" / "errors.py" in import_closure(script)  # schedule.py imports it


@pytest.mark.parametrize("config", ["params.yaml", "configs/nano3.yaml"])
def test_output_paths_come_from_the_params_file(tmp_path, config):
    from dvc.repo import Repo

    from nano3.config import load_params

    repo = copy_repo(tmp_path / "repo")
    shutil.copy(ROOT / config, repo / "params.yaml")
    params = load_params(repo / "params.yaml")
    g = params.get_key
    with Repo(str(repo)) as dvc:
        outs = {str(o.def_path) for stage in dvc.index.stages for o in stage.outs}
    want = {g("tokenizer.dir"), g("blend.out_dir"), g("export.out_dir"), g("export.report"),
            f"{g('eval.out_dir')}/metrics.json", f"{g('train.checkpoint_dir')}/pretrain.json",
            f"{g('train.checkpoint_dir')}/lc.json", f"{g('train.live_dir')}/pretrain/metrics.json",
            *(f"{g('prep.out_dir')}/{name}" for name in g("datasets"))}
    assert want <= outs, f"{config}: written but not DVC outs: {sorted(want - outs)}"


def test_a_fresh_clone_shows_what_would_run_without_running_it(tmp_path):
    """`dvc repro --dry` fails before the first outputs exist (DVC checks its dependencies; DVC issues 9021,
    9818): README names `dvc status` for that, which lists every stage that would run."""
    repo = copy_repo(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert {"sample:", "blend:", "pretrain:", "lc:", "export:", "eval:"} <= set(out.stdout.split())
    readme = (ROOT / "README.md").read_text()
    assert "dvc status" in readme and "dvc repro --dry" in readme


def test_dvc_plots_output_is_git_ignored_and_documented():
    """`dvc plots show` writes dvc_plots/index.html into the repository: it must not show up as a change."""
    out = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ROOT)
    assert out.returncode == 0, "dvc_plots/ is not git-ignored"
    assert "dvc_plots/index.html" in (ROOT / "README.md").read_text()
