"""The data pipeline under real DVC, in a temporary git repository copied from this checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo


def dvc(repo: Path, *args: str, timeout: int = 900) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    out = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.mark.slow
def test_repro_blend_then_noop_then_one_dataset_experiment(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    first = dvc(repo, "repro", "blend")
    assert ran(first) == {"sample", "retrieval", "tokenizer", "prep@stdlib-code", "prep@stdlib-docs",
                          "prep@stdlib-long", "prep@retrieval", "blend"}
    for phase in ("phase1", "phase2", "lc"):
        assert (repo / "data" / "blend" / f"{phase}.json").exists()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    # Issue 31: DVC tracks each prepared dataset's manifest alone (kilobytes), never its shards
    for name in ("stdlib-code", "stdlib-docs", "stdlib-long", "retrieval"):
        (out,) = lock["stages"][f"prep@{name}"]["outs"]
        assert out["path"] == f"data/prepared/{name}" and out["nfiles"] == 1 and out["size"] < 32 * 1024, out
    shards = sum(f.stat().st_size for f in (repo / "data" / "shards").rglob("*.bin"))
    cached = sum(f.stat().st_size for f in (repo / ".dvc" / "cache").rglob("*") if f.is_file())
    assert shards > 20e6 and cached < shards / 2, (shards, cached)  # the cache holds the sample text, not the shards

    again = dvc(repo, "repro", "blend")
    assert ran(again) == set() and "Data and pipelines are up to date" in again

    exp = dvc(repo, "exp", "run", "-S", "datasets.stdlib-docs.valid_fraction=0.05", "blend")
    # stdlib-docs' split decides which documents the retrieval haystacks may use: retrieval follows it
    assert ran(exp) == {"prep@stdlib-docs", "retrieval", "prep@retrieval", "blend"}
    assert "Stage 'prep@stdlib-code' didn't change, skipping" in exp

    # Back to the first value: DVC restores the first run's manifests from its run cache, and the shards they name
    # are still in prep.shards_dir (each plan writes its own version directory): nothing is prepared again.
    back = dvc(repo, "exp", "run", "-S", "datasets.stdlib-docs.valid_fraction=0.03", "blend")
    assert "prep@stdlib-docs" not in ran(back) and "blend" not in ran(back), back
    assert len(list((repo / "data" / "shards" / "stdlib-docs").iterdir())) == 2
    verify = subprocess.run([sys.executable, "-m", "nano3.data.shards"], cwd=repo, capture_output=True, text=True)
    assert verify.returncode == 0 and "4 datasets" in verify.stdout, verify.stdout + verify.stderr

    # Adding a dataset the README's way: DVC sees the one new prep stage, and retrieval does not follow
    original = (repo / "params.yaml").read_text()
    tree = yaml.safe_load(original)
    tree["datasets"]["pkgdocs"] = {"source": "data/sample/stdlib-docs", "text_field": "text"}
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    make = subprocess.run(["make", "prep", "NANO3_SYSTEM_PYTHON=1"], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert make.returncode != 0 and "missing key 'datasets.pkgdocs.watch'" in make.stderr, make.stderr[-2000:]
    assert "Running stage" not in make.stdout + make.stderr  # refused before DVC read dvc.yaml
    tree["datasets"]["pkgdocs"]["watch"] = "data/sample/stdlib-docs"
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    status = json.loads(dvc(repo, "status", "--json").strip().splitlines()[-1])
    data_stages = {s for s in status if s in ("sample", "retrieval", "tokenizer", "blend") or s.startswith("prep@")}
    assert data_stages == {"prep@pkgdocs"}, status
    (repo / "params.yaml").write_text(original)

    # A training hyperparameter touches no data stage (training needs a GPU: a dry run here; lc follows
    # pretrain through the checkpoint manifest it depends on).
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("  lr: 1.0e-3 ", "  lr: 3.0e-4 ", 1))
    dry = dvc(repo, "repro", "--dry", "pretrain")
    assert ran(dry) == {"pretrain"}, dry
