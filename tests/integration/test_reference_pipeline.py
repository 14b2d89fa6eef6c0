"""The whole pipeline on the CPU reference backend, under real DVC in a temporary git repository:
`make smoke`'s command, resume after a kill, eval's errors, and the experiment loop (`dvc exp run -S train.lr=...`
back and forth, apply, the table, reclaiming checkpoints, Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nano3.code import code_digest
from nano3.train.metrics import read_metric
from nano3.train.rundir import TRAINING_CODE
from tests.conftest import copy_repo
from tests.integration.test_dvc_data import dvc, ran

pytestmark = pytest.mark.slow


def env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def run(repo: Path, *cmd: str, check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), cwd=repo, env=env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def start_until_checkpoint(repo: Path, cmd: list[str], root: Path, at_least: int, log: Path | None = None):
    """Start a training command in its own process group; return it and its tracker file once it has saved a
    checkpoint at iteration >= at_least."""
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=repo, env=env(), stdout=out, stderr=subprocess.STDOUT if log else out,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        trackers = list(root.glob("*/latest_checkpointed_iteration.txt"))
        if trackers and int(trackers[0].read_text()) >= at_least:
            return proc, trackers[0]
        time.sleep(0.2)
    raise AssertionError(f"{' '.join(cmd)}: no checkpoint at iteration >= {at_least} under {root}")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("cpu") / "repo")
    out = run(repo, sys.executable, "-m", "nano3.launch.smoke")
    return repo, out.stdout + out.stderr


def test_smoke_trains_every_stage_on_the_cpu_and_the_loss_falls(smoke):
    repo, log = smoke
    assert ran(log) == {"sample", "retrieval", "tokenizer", "prep@stdlib-code", "prep@stdlib-docs", "prep@stdlib-long",
                        "prep@retrieval", "blend", "pretrain", "lc", "export", "eval"}
    assert "trained with the reference backend" in log
    pre = json.loads((repo / "checkpoints" / "pretrain.json").read_text())
    lc = json.loads((repo / "checkpoints" / "lc.json").read_text())
    assert pre["backend"] == lc["backend"] == "reference" and pre["format"] == "hf"
    assert [p["name"] for p in pre["phases"]] == ["phase1", "phase2"] and pre["iteration"] == 48
    loss = read_metric(repo / "dvclive" / "pretrain", "train/loss")
    assert loss[-1][1] < 0.8 * loss[0][1], loss
    lr = dict(read_metric(repo / "dvclive" / "pretrain", "train/lr"))
    assert max(lr.values()) == pytest.approx(1e-3) and lr[48] == pytest.approx(1e-4)  # WSD down to min_lr
    lc_loss = read_metric(repo / "dvclive" / "lc", "train/loss")
    assert lc_loss and lc_loss[0][1] < loss[0][1] - 1.0  # lc starts from the pretrained weights
    export = json.loads((repo / "models" / "hf" / "nano3_export.json").read_text())
    assert export["source"] == "lc" and export["format"] == "hf"
    assert export["training_code"] == [{"code": code_digest(TRAINING_CODE), "from_iteration": 1}]  # the weights' code
    metrics = json.loads((repo / "reports" / "eval" / "results.json").read_text())
    assert set(metrics["test"]) == {"stdlib-code", "stdlib-docs", "stdlib-long", "retrieval"}
    for name, r in metrics["test"].items():
        assert r["tokens"] > 1000 and 1 < r["perplexity"] < 8192, (name, r)  # better than uniform over the vocab
    samples = json.loads((repo / "reports" / "eval" / "continuations.json").read_text())
    assert len(samples) == 3 and all(s["continuation"] for s in samples)


def test_long_context_is_measured_before_and_after_lc(smoke):
    """Issue 13, part 5 on the CPU: the lc blend draws on the retrieval documents; eval scores the pretrain and the
    lc exports on the same pass-key prompts and long test documents. The tiny CPU model retrieves nothing yet (its
    lc is 8 steps), but lc, trained at 4x pretrain's length, must lower the loss at the positions pretrain never
    trained on."""
    repo, _ = smoke
    blend = json.loads((repo / "data" / "blend" / "lc.json").read_text())
    assert any("/retrieval/" in str(entry) for entry in blend["train"])
    assert json.loads((repo / "models" / "hf-pretrain" / "nano3_export.json").read_text())["source"] == "pretrain"
    result = json.loads((repo / "reports" / "eval" / "results.json").read_text())["long_context"]
    assert result["lengths"] == [256, 512, 1024] and result["documents"] >= 1
    for name in ("pretrain", "lc"):
        by_length = result["retrieval"][name]
        assert set(by_length) == {"256", "512", "1024"}
        assert all(0 <= r["accuracy"] <= 1 and r["prompts"] == 12 and r["answer_loss"] > 0 for r in by_length.values())
        assert [(b["from"], b["to"]) for b in result["loss_by_position"][name]][-1] == (896, 1024)
    beyond = [b for b in range(8) if result["loss_by_position"]["pretrain"][b]["from"] >= 256]
    pre, lc = ([result["loss_by_position"][n][b]["loss"] for b in beyond] for n in ("pretrain", "lc"))
    assert sum(lc) < sum(pre), (pre, lc)
    assert (repo / "reports" / "eval" / "long_context.png").stat().st_size > 10_000
    assert "## Long context (before and after lc)" in (repo / "reports" / "eval" / "report.md").read_text()


def test_eval_holds_one_model_at_a_time(smoke, tmp_path, monkeypatch):
    """Issue 33: eval loaded pretrain's export while the lc export was still resident (2 x 63 GB at the real size).
    Now each model is gone (garbage, its GPU memory given back) before the next one loads."""
    import weakref

    from nano3.config import load_params
    from nano3.eval import eval as stage

    repo, _ = smoke
    monkeypatch.chdir(repo)
    params = load_params("params.yaml", [f"eval.out_dir={tmp_path / 'eval'}", "eval.max_tokens=512",
                                         "eval.long_context.prompts=2", "eval.long_context.documents=1",
                                         "eval.max_new_tokens=2"])
    loaded, real = [], stage.load_exported

    def tracked(path):
        assert all(ref() is None for _, ref in loaded), f"{[p for p, r in loaded if r()]} still alive as {path} loads"
        model, tokenizer = real(path)
        loaded.append((path, weakref.ref(model)))
        return model, tokenizer

    monkeypatch.setattr(stage, "load_exported", tracked)
    result = stage.eval_stage(params, log=lambda line: None)
    assert [Path(p).name for p, _ in loaded] == ["hf", "hf-pretrain"]
    assert list(result["long_context"]["retrieval"]) == ["pretrain", "lc"]  # the report's columns, as before


def test_eval_on_a_missing_or_broken_model_fails_in_one_line(smoke, tmp_path):
    repo, _ = smoke
    missing = run(repo, sys.executable, "stages/eval.py", f"export.out_dir={tmp_path / 'nothing'}", check=False)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error:")
    assert "no exported model here" in missing.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (repo / "models" / "hf").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    out = run(repo, sys.executable, "stages/eval.py", f"export.out_dir={broken}", check=False)
    assert out.returncode == 2 and "does not load" in out.stderr and "rerun the export stage" in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.startswith("error:")]) == 1


def test_killed_reference_training_resumes_to_the_same_loss(smoke, tmp_path):
    """SIGKILL after a checkpoint, rerun: it resumes there and ends exactly where an uninterrupted run ends
    (the CPU run is deterministic, so exactly equal)."""
    repo, _ = smoke
    budget = ["train.reference.tokens=10240", "train.save_interval=2", "train.log_interval=1"]
    run(repo, sys.executable, "stages/pretrain.py", *budget, f"train.checkpoint_dir={tmp_path / 'ck_whole'}",
        f"train.live_dir={tmp_path / 'live_whole'}")
    cmd = [sys.executable, "stages/pretrain.py", *budget, f"train.checkpoint_dir={tmp_path / 'ck_killed'}",
           f"train.live_dir={tmp_path / 'live_killed'}"]
    proc, tracker = start_until_checkpoint(repo, cmd, tmp_path / "ck_killed" / "pretrain", 4)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(tracker.read_text())
    assert 4 <= killed_at < 10
    run(repo, *cmd)
    whole = json.loads((tmp_path / "ck_whole" / "pretrain.json").read_text())
    resumed = json.loads((tmp_path / "ck_killed" / "pretrain.json").read_text())
    assert resumed["iteration"] == whole["iteration"] == 10
    assert resumed["metrics"]["train"]["loss"] == whole["metrics"]["train"]["loss"]
    steps = [s for s, _ in read_metric(tmp_path / "live_killed" / "pretrain", "train/loss")]
    assert steps == list(range(1, 11))  # rows the killed run logged after its checkpoint were replaced, not doubled
    assert resumed["code"] == whole["code"] == [{"code": code_digest(TRAINING_CODE), "from_iteration": 1}]


def test_an_lc_run_again_writes_the_same_checkpoint_bytes(smoke, tmp_path):
    """The run's checkpoint, optimizer and RNG state included (a resume restores that RNG), is a function of the
    inputs: lc from the same pretrain checkpoint twice gives the same files (the RNG once differed run to run)."""
    repo, _ = smoke
    (tmp_path / "ck_again").mkdir()
    (tmp_path / "ck_again" / "pretrain.json").write_bytes((repo / "checkpoints" / "pretrain.json").read_bytes())
    run(repo, sys.executable, "stages/lc.py", f"train.checkpoint_dir={tmp_path / 'ck_again'}",
        f"train.live_dir={tmp_path / 'live_again'}")
    first = Path(json.loads((repo / "checkpoints" / "lc.json").read_text())["run_dir"])
    again = Path(json.loads((tmp_path / "ck_again" / "lc.json").read_text())["run_dir"])
    assert first.name == again.name  # the same run, by its hyperparameters and inputs
    files = sorted(p.relative_to(repo / first) for p in (repo / first).glob("iter_*/*"))
    assert any(f.name == "optimizer.pt" for f in files) and any(f.name == "model.safetensors" for f in files)
    assert [f for f in files if (repo / first / f).read_bytes() != (repo / again / f).read_bytes()] == []


def test_a_second_start_of_a_run_in_training_is_refused_and_leaves_the_first_alone(smoke, tmp_path):
    """Two trainings of one run would write one run directory and one metrics directory (a kill/resume GPU test
    once did, its first ranks orphaned): the second is refused in one line."""
    repo, _ = smoke
    cmd = [sys.executable, "stages/pretrain.py", "train.reference.tokens=409600", "train.save_interval=2",
           f"train.checkpoint_dir={tmp_path / 'ck_twice'}", f"train.live_dir={tmp_path / 'live_twice'}"]
    first, tracker = start_until_checkpoint(repo, cmd, tmp_path / "ck_twice" / "pretrain", 2)
    try:
        second = run(repo, *cmd, check=False)
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-2000:]
        assert f"{tracker.parent}: another training of this run is going on (started by pid" in errors[0]
        assert first.poll() is None  # still training, undisturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_reference_runs_write_effective_configs_that_conform(smoke):
    """Issue 11 on the CPU backend: each phase's effective configuration comes from the reference's own objects,
    weight decay 0.1 at the first and last step, and `make conform` passes (its deviations listed)."""
    repo, _ = smoke
    for stage, phases in (("pretrain", ("phase1", "phase2")), ("lc", ("lc",))):
        manifest = json.loads((repo / "checkpoints" / f"{stage}.json").read_text())
        for phase in phases:
            doc = json.loads((repo / manifest["run_dir"] / f"effective_config.{phase}.json").read_text())
            assert doc["backend"] == "reference" and doc["weight_decay_applied"]["first_step"] == 0.1
            assert doc["weight_decay_applied"]["last_step"] == 0.1
            assert {g["weight_decay"] for g in doc["optimizer"]["groups"]} == {0.1, 0.0}
    wd = read_metric(repo / "dvclive" / "pretrain", "optim/weight_decay")
    assert wd[0][0] == 1 and wd[-1][0] == 48 and {v for _, v in wd} == {0.1}
    out = run(repo, sys.executable, "-m", "nano3.train.conform")
    assert "conform: every difference is an intended, listed deviation" in out.stdout
    assert "ok  precision: running 'float32', params 'bf16' (intended: FP32 on CPU" in out.stdout


def test_checkpoint_root_retention_and_the_stopped_phase(smoke, tmp_path):
    """`train.checkpoint_dir=/path` moves the checkpoint root and a rerun resumes there;
    train.keep_checkpoints keeps the newest N; a SIGTERM names the phase that was running."""
    repo, _ = smoke
    budget = ["train.reference.tokens=10240", "train.save_interval=2", "train.log_interval=1"]  # 10 steps, switch at 9
    root = tmp_path / "ck"
    run(repo, sys.executable, "stages/pretrain.py", *budget, f"train.checkpoint_dir={root}", "train.keep_checkpoints=2",
        f"train.live_dir={tmp_path / 'live_ck'}")
    manifest = json.loads((root / "pretrain.json").read_text())
    run_dir = Path(manifest["run_dir"])
    assert run_dir.parent == root / "pretrain" and manifest["iteration"] == 10
    assert sorted(p.name for p in run_dir.glob("iter_*")) == ["iter_0000009", "iter_0000010"]  # 9: phase 1's end
    again = run(repo, sys.executable, "stages/pretrain.py", *budget, f"train.checkpoint_dir={root}",
                "train.keep_checkpoints=2", f"train.live_dir={tmp_path / 'live_ck'}")
    assert "pretrain phase1" not in again.stderr and json.loads((root / "pretrain.json").read_text())["iteration"] == 10
    (run_dir / "code.json").write_text(json.dumps([{"code": "older", "from_iteration": 1}]))  # trained by other code
    again = run(repo, sys.executable, "stages/pretrain.py", *budget, f"train.checkpoint_dir={root}",
                "train.keep_checkpoints=2", f"train.live_dir={tmp_path / 'live_ck'}")
    assert "finished at iteration 10 with other training code (older; now" in again.stdout, again.stdout[-2000:]
    assert json.loads((root / "pretrain.json").read_text())["code"] == [{"code": "older", "from_iteration": 1}]

    cmd = [sys.executable, "stages/pretrain.py", *budget, f"train.checkpoint_dir={tmp_path / 'ck2'}",
           f"train.live_dir={tmp_path / 'live2'}"]
    proc, tracker = start_until_checkpoint(repo, cmd, tmp_path / "ck2" / "pretrain", 2, log=tmp_path / "term.log")
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    log, stopped = (tmp_path / "term.log").read_text(), int(tracker.read_text())
    assert proc.returncode == 3 and stopped < 9, log[-2000:]
    assert f"pretrain: phase1 stopped at iteration {stopped}; rerun to resume" in log


def manifest(repo: Path, stage: str) -> dict:
    return json.loads((repo / "checkpoints" / f"{stage}.json").read_text())


def model_bytes(repo: Path) -> bytes:
    return (repo / "models" / "hf" / "model.safetensors").read_bytes()


def exp_run(repo: Path, name: str, *sets: str) -> str:
    return dvc(repo, "exp", "run", "-n", name, *[a for s in sets for a in ("-S", s)], "eval", timeout=1800)


def make(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *args], cwd=repo, env={**env(), "NANO3_SYSTEM_PYTHON": "1"}, capture_output=True,
                          text=True, timeout=1800)


def test_the_experiment_loop_goes_back_and_forth(smoke):
    """Issue 36: exp run A, exp run B (here: the smoke's own values, trained already), exp run A again, exp apply,
    the table, removing experiments and their checkpoints. Going back to a trained configuration reuses its run and
    brings its metrics back; the workspace ends consistent (dvc status clean, the model the applied one's). Last but
    one: it changes the copy's workspace."""
    repo, _ = smoke
    # dvc exp run stashes untracked files: 540 MB of scratch checkpoints there made each exp run 242 s instead of 35
    untracked = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True,
                               text=True).stdout
    assert not [line for line in untracked.splitlines() if line.startswith("??")], untracked[:2000]
    base = {s: manifest(repo, s)["digest"] for s in ("pretrain", "lc")}
    base_loss = read_metric(repo / "dvclive" / "pretrain", "train/loss")
    base_model = model_bytes(repo)

    out = exp_run(repo, "low", "train.lr=3e-4")
    assert ran(out) == {"pretrain", "lc", "export", "eval"}, out[-2000:]
    low_loss = read_metric(repo / "dvclive" / "pretrain", "train/loss")
    assert [s for s, _ in low_loss] == [s for s, _ in base_loss] and low_loss != base_loss
    assert max(dict(read_metric(repo / "dvclive" / "pretrain", "train/lr")).values()) == pytest.approx(3e-4)
    low = {s: manifest(repo, s)["digest"] for s in ("pretrain", "lc")}
    low_model = model_bytes(repo)
    assert low["pretrain"] != base["pretrain"] and low["lc"] != base["lc"]

    out = exp_run(repo, "back", "train.lr=1e-3")  # the smoke's value: back to a run trained before
    assert ran(out) - {"eval"} == {"pretrain", "lc", "export"}, out[-2000:]  # eval: may come from DVC's run cache
    for stage in ("pretrain", "lc"):
        assert f"{stage}: run {base[stage]} finished at iteration" in out and "reused, not retrained" in out
    assert read_metric(repo / "dvclive" / "pretrain", "train/loss") == base_loss  # its own metrics, back
    assert "Traceback" not in out

    out = exp_run(repo, "low-again", "train.lr=3e-4")
    assert f"pretrain: run {low['pretrain']} finished at iteration" in out, out[-2000:]
    assert read_metric(repo / "dvclive" / "pretrain", "train/loss") == low_loss and model_bytes(repo) == low_model

    table = make(repo, "exps")
    assert table.returncode == 0, table.stderr[-2000:]
    lines = table.stdout.splitlines()
    print(table.stdout)  # what a user sees (pytest -s)
    assert max(len(line) for line in lines) <= 80, table.stdout
    assert "train.lr" in table.stdout and "0.0003" in table.stdout and "low-again" in table.stdout

    dvc(repo, "exp", "apply", "back")  # the model in models/ (not in DVC's cache) is still low's ...
    assert model_bytes(repo) == low_model and "models/hf" in dvc(repo, "status")
    for name, model, runs in (("back", base_model, base), ("low", low_model, low), ("back", base_model, base)):
        applied = make(repo, "apply", f"EXP={name}")  # ... so `make apply` re-exports the applied run's
        assert applied.returncode == 0, applied.stderr[-2000:]
        assert ran(applied.stdout + applied.stderr) == {"export"}, applied.stdout[-2000:]
        assert model_bytes(repo) == model and manifest(repo, "pretrain")["digest"] == runs["pretrain"]
        assert "Data and pipelines are up to date." in dvc(repo, "status")

    dvc(repo, "exp", "remove", "low", "low-again")
    runs = {s: repo / "checkpoints" / s / low[s] for s in ("pretrain", "lc")}
    listed = make(repo, "clean-runs", "DRY=1")
    assert all(f"would remove checkpoints/{s}/{low[s]}" in listed.stdout for s in runs), listed.stdout
    assert all(path.is_dir() for path in runs.values())
    freed = make(repo, "clean-runs")
    assert freed.returncode == 0 and "clean-runs: 2 run(s)" in freed.stdout, freed.stdout + freed.stderr
    assert not any(path.exists() for path in runs.values())
    assert all((repo / "checkpoints" / s / base[s]).is_dir() for s in base)  # the workspace's and "back"'s runs
    assert "Data and pipelines are up to date." in dvc(repo, "status")


def test_ctrl_c_in_pretrain_checkpoints_and_the_rerun_resumes(smoke):
    """Issue 36: Ctrl-C (SIGINT to the terminal's process group: dvc, the launcher and the stage) saves a checkpoint
    as SIGTERM does; each process says one line, no traceback; `dvc repro` resumes there. Last: it edits params."""
    repo, _ = smoke
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 5e-4
    params["train"]["reference"]["tokens"] = 10240  # 10 iterations
    params["train"]["log_interval"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = repo / "interrupted.log"
    before = {p.name for p in (repo / "checkpoints" / "pretrain").iterdir()}
    proc = subprocess.Popen(["dvc", "repro", "pretrain"], cwd=repo, env=env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while not (logged := [p for p in (repo / "checkpoints" / "pretrain").glob("*/live/plots/metrics/train/loss.tsv")
                          if p.parents[4].name not in before and len(p.read_text().splitlines()) > 3]):
        assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does, after iteration 3
    proc.wait(timeout=300)
    text = log.read_text()
    tracker = logged[0].parents[4] / "latest_checkpointed_iteration.txt"
    stopped = int(tracker.read_text())
    assert proc.returncode != 0 and stopped < 10, text[-3000:]
    assert f"pretrain: stopped by Ctrl-C at iteration {stopped} (checkpoint saved)" in text, text[-3000:]
    assert "nano3: pretrain ended with exit status 3 (stopped; rerun to resume)" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    saved = (tracker.parent / f"iter_{stopped:07d}").stat().st_ino
    out = dvc(repo, "repro", "pretrain")
    assert (tracker.parent / f"iter_{stopped:07d}").stat().st_ino == saved  # resumed after it, not redone
    assert int(tracker.read_text()) == 10 and manifest(repo, "pretrain")["iteration"] == 10, out[-2000:]
    steps = [s for s, _ in read_metric(repo / "dvclive" / "pretrain", "train/loss")]
    assert steps == list(range(1, 11))
