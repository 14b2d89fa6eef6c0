"""Metrics belong to their run (nano3.train.rundir): the workspace's dvclive/<stage>/ is a copy of the run the params
name, and `make exps` prints DVC's experiments in the width of a terminal (nano3.launch.experiments)."""

from __future__ import annotations

import json
from pathlib import Path

from nano3.launch.experiments import columns, render
from nano3.train import rundir


def logged(run: Path, loss: float, steps: int) -> None:
    """What dvclive leaves in a run's live/: a summary and one TSV per metric."""
    live = rundir.run_live_dir(run)
    (live / "plots" / "metrics" / "train").mkdir(parents=True)
    rows = "".join(f"{i}\t{loss + i}\n" for i in range(1, steps + 1))
    (live / "plots" / "metrics" / "train" / "loss.tsv").write_text("step\tloss\n" + rows)
    summary = {"step": steps, "train": {"loss": loss, "lr": 1e-3}, "valid": {"loss": loss + 1},
               "perf": {"tokens_per_s_per_gpu": 123.0}}
    (live / "metrics.json").write_text(json.dumps(summary))


def test_the_workspace_shows_the_run_it_names_and_going_back_brings_its_metrics_back(tmp_path):
    a, b, workspace = tmp_path / "pretrain" / "aaaa", tmp_path / "pretrain" / "bbbb", tmp_path / "dvclive" / "pretrain"
    logged(a, 5.0, 3)
    logged(b, 7.0, 2)
    for run, loss, steps in ((a, 5.0, 3), (b, 7.0, 2), (a, 5.0, 3)):
        rundir.publish_metrics(run, workspace, "pretrain", print)
        assert json.loads((workspace / "metrics.json").read_text()) == {"pretrain": {"loss": loss, "valid_loss": loss + 1}}
        assert (workspace / "plots/metrics/train/loss.tsv").read_text().count("\n") == steps + 1
    assert rundir.full_metrics(b)["perf"] == {"tokens_per_s_per_gpu": 123.0}  # b's own metrics untouched
    assert sorted(p.name for p in workspace.parent.iterdir()) == ["pretrain"]  # no temporary left beside it


def test_a_run_without_its_own_metrics_takes_the_workspaces_when_they_are_its_own(tmp_path, capsys):
    """Runs trained before runs kept their metrics: the workspace's copy is adopted when its marker names the run;
    otherwise the workspace says in one line that they were not kept."""
    run, other, workspace = tmp_path / "lc" / "cccc", tmp_path / "lc" / "dddd", tmp_path / "dvclive" / "lc"
    logged(tmp_path / "old", 4.0, 2)
    workspace.parent.mkdir()
    (tmp_path / "old" / "live").rename(workspace)
    (workspace / "run.json").write_text(json.dumps({"digest": "cccc"}))
    rundir.adopt_workspace_metrics(other, workspace)
    assert not rundir.run_live_dir(other).exists()
    rundir.adopt_workspace_metrics(run, workspace)
    assert rundir.full_metrics(run)["train"]["loss"] == 4.0 and not (rundir.run_live_dir(run) / "run.json").exists()
    rundir.publish_metrics(other, workspace, "lc", print)
    assert "dddd: this run's metrics were not kept" in capsys.readouterr().out
    assert json.loads((workspace / "metrics.json").read_text()) == {} and (workspace / "plots" / "metrics").is_dir()


def exp_show(values: dict[str, tuple[float, float]]) -> list[dict]:
    """`dvc exp show --json` as DVC 3 writes it: the workspace, the baseline commit and its experiments."""
    def data(lr: float, loss: float) -> dict:
        params = {"train": {"lr": lr, "seed": 1234, "tokens": 49152}, "model": {"preset": "tiny"}}
        metrics = {"dvclive/pretrain/metrics.json": {"data": {"pretrain": {"loss": loss, "valid_loss": loss + 0.1}}},
                   "reports/eval/metrics.json": {"data": {"ppl": {"stdlib-code": loss * 40, "retrieval": loss * 90}}}}
        return {"params": {"params.yaml": {"data": params}}, "metrics": metrics, "deps": {}, "outs": {}}

    names = list(values)
    return [{"rev": "workspace", "name": None, "data": data(*values[names[0]]), "experiments": None},
            {"rev": "2ec0ad2783870c29f0a0", "name": "main", "data": data(*values[names[1]]),
             "experiments": [{"revs": [{"rev": f"{i:07d}abc", "name": name, "data": data(*values[name])}]}
                             for i, name in enumerate(names[2:])] + [{"revs": [{"rev": "fa11ed0", "data": None}]}]}]


def test_the_experiment_table_fits_80_columns_and_lists_only_what_differs():
    runs = {"workspace": (3e-4, 5.1), "main": (1e-3, 4.9), **{f"lr-sweep-{i}": (i * 1e-4, 5 + i / 10) for i in range(6)}}
    table = render(columns(exp_show(runs)), width=80)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert [line.split()[0] for line in lines if line.startswith("train.")] == ["train.lr"] * 2  # seed, tokens: equal
    assert sum(line.startswith("pretrain.valid_loss") for line in lines) == 2  # two blocks of columns
    header = lines[0].split()
    assert header[:2] == ["workspace", "main"] and "lr-sweep-0" in header
    assert "fa11ed0" not in table  # an experiment that failed has no data
    assert next(line for line in lines if line.startswith("ppl.stdlib-code")).split()[1:3] == ["204", "196"]


def test_clean_runs_reads_branches_and_experiments_not_dvcs_apply_stash(tmp_path):
    """`dvc exp apply` keeps the workspace it replaced in refs/exps/apply/stash: counting that as a reference kept
    every run ever applied away from (seen in the loop test: the removed experiment's runs stayed)."""
    import subprocess

    from nano3.train.reclaim import kept_refs

    def git(*args: str) -> str:
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
               "PATH": "/usr/bin:/bin"}
        return subprocess.run(["git", *args], cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout

    git("init", "-q", "-b", "main")
    git("commit", "-q", "--allow-empty", "-m", "c")
    head = git("rev-parse", "HEAD").strip()
    for ref in (f"refs/exps/bb/{head}/lr-low", "refs/exps/apply/stash", "refs/exps/apply/ORIG_HEAD",
                "refs/exps/exec/EXEC_HEAD", "refs/tags/v1", "refs/stash"):
        git("update-ref", ref, head)
    assert sorted(kept_refs(tmp_path)) == sorted(["refs/heads/main", f"refs/exps/bb/{head}/lr-low", "refs/tags/v1",
                                                  "refs/stash"])
