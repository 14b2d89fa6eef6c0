"""Issue 12: a job on an image that lacks nano3's packages stops at its start, in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nano3.launch import image
from tests.conftest import ROOT


def test_this_environment_has_every_package_a_stage_needs():
    assert image.missing(image.EXTRAS) == []


def test_a_missing_package_is_named_with_the_two_fixes(monkeypatch, capsys):
    monkeypatch.setitem(image.EXTRAS, "dvclive_not_here", "dvclive")
    monkeypatch.setitem(image.EXTRAS, "no_such_pkg.sub", "no-such-pkg")
    with pytest.raises(SystemExit) as exit_:
        image.main([])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert err.startswith("error: this image lacks nano3's packages dvclive, no-such-pkg")
    assert "make container" in err and 'image_extras = "install"' in err


def test_every_job_checks_the_image_before_its_stage_runs():
    """stages/in_image.sh (run by slurm.sh's in_container on every task) checks, then runs the stage."""
    out = subprocess.run(["bash", "stages/in_image.sh", sys.executable, "-c", "print('stage ran')"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "PATH": f"{ROOT}/.venv/bin:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["image ok: nano3's packages", "stage ran"]


def test_the_full_check_says_what_is_missing_without_the_training_stack(capsys):
    """This CPU machine has no Bridge nor Transformer Engine: the image build's check names them."""
    with pytest.raises(SystemExit):
        image.main(["--full"])
    err = capsys.readouterr().err
    assert "lacks the training stack (megatron-bridge, transformer-engine)" in err
