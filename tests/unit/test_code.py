"""Which code ran: the logic digest, and a training run's record of the code that trained each stretch of it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from nano3.code import code_digest, logic_digest
from nano3.train.rundir import CODE_RECORD, TRAINING_CODE, record_code
from tests.conftest import ROOT


def test_the_digest_ignores_comments_and_docstrings_but_not_logic():
    base = 'def f(x):\n    """Why."""\n    return x + 1\n'
    assert logic_digest([base]) == logic_digest(['def f(x):  # note\n    """Why, reworded."""\n\n    return x + 1\n'])
    assert logic_digest([base]) != logic_digest([base.replace("x + 1", "x + 2")])
    assert logic_digest([base]) != logic_digest([base, "Y = 1\n"])


def test_training_code_is_what_dvc_reruns_training_for():
    """The modules whose digest a run records are the training stages' package deps in dvc.yaml (less the generic
    helpers: cli, errors, files, code), so the record and DVC agree on what "the training code" is."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    generic = {"__init__.py", "cli.py", "errors.py", "files.py", "code.py"}
    for stage in ("pretrain", "lc"):
        deps = {d.removeprefix("src/nano3/") for d in stages[stage]["deps"] if d.startswith("src/nano3/")}
        assert deps - generic == set(TRAINING_CODE), stage
    assert len(code_digest(TRAINING_CODE)) == 16


def record(run: Path, done: int, end: int = 10) -> tuple[list[dict], list[str]]:
    said: list[str] = []
    return record_code(run, "pretrain", done, end, said.append), said


def test_a_run_records_the_code_of_each_stretch_it_trained(tmp_path):
    now = code_digest(TRAINING_CODE)
    run = tmp_path / "run"
    assert record(run, 0) == ([{"code": now, "from_iteration": 1}], [])  # a fresh run
    assert record(run, 4) == ([{"code": now, "from_iteration": 1}], [])  # resumed by the same code: one stretch
    (run / CODE_RECORD).write_text(json.dumps([{"code": "older", "from_iteration": 1}]))  # killed under older code
    segments, said = record(run, 4)
    assert segments == [{"code": "older", "from_iteration": 1}, {"code": now, "from_iteration": 5}] and not said
    assert json.loads((run / CODE_RECORD).read_text()) == segments
    (run / CODE_RECORD).write_text(json.dumps(segments[:1] + [{"code": "tried", "from_iteration": 5}]))
    assert record(run, 4)[0] == segments  # a start at 5 that trained nothing is forgotten


def test_a_finished_run_trained_by_other_code_is_reused_and_said_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CODE_RECORD).write_text(json.dumps([{"code": "older", "from_iteration": 1}]))
    segments, said = record(run, 10)
    assert segments == [{"code": "older", "from_iteration": 1}] and len(said) == 1
    assert "finished at iteration 10 with other training code (older; now" in said[0] and str(run) in said[0]
    assert json.loads((run / CODE_RECORD).read_text()) == segments  # the record stays the truth
    other = tmp_path / "before-records"  # a run from before records: its code is unknown, not claimed
    (other / "iter_0000010").mkdir(parents=True)
    segments, said = record(other, 10)
    assert segments == [{"code": None, "from_iteration": 1}] and "(unrecorded; now" in said[0]
    assert not (other / CODE_RECORD).exists()
