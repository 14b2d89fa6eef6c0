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


def test_export_and_eval_on_an_image_without_nemotron_h_stop_in_one_line_before_any_work(monkeypatch):
    """Issue 32: the recipe image's transformers 4.57 has no NemotronH; without image_extras = install (nor a side
    folder baked by `make container`) the stage says what to set, before it loads anything."""
    from nano3 import extras
    from nano3.errors import UserError

    monkeypatch.setattr(extras, "has_nemotron_h", lambda: False)
    monkeypatch.delenv("NANO3_IMAGE_EXTRAS", raising=False)
    monkeypatch.delenv("NANO3_NEMOTRON_H_SIDE", raising=False)
    monkeypatch.setenv("NANO3_NEMOTRON_H_DIR", "/nonexistent/side")
    with pytest.raises(UserError) as refused:
        extras.ensure_nemotron_h()
    message = str(refused.value)
    assert "\n" not in message and "has no NemotronH model" in message
    assert 'image_extras = "install"' in message and "containers/nemotron-h.txt" in message
    # a side folder that still does not give NemotronH is named, not installed over and over
    monkeypatch.setenv("NANO3_NEMOTRON_H_SIDE", "/x/.nano3-extras/nemotron-h-py312-a-b")
    monkeypatch.setenv("NANO3_IMAGE_EXTRAS", "install")
    with pytest.raises(UserError, match="^/x/.nano3-extras/nemotron-h-py312-a-b: the side folder gave transformers"):
        extras.ensure_nemotron_h()


def test_an_image_with_nemotron_h_runs_export_as_it_is_and_bakes_no_side_folder(tmp_path, monkeypatch, capsys):
    from nano3 import extras

    monkeypatch.setenv("NANO3_IMAGE_EXTRAS", "install")
    monkeypatch.setattr(extras, "install_once", lambda *a, **k: pytest.fail("installed on an image that has NemotronH"))
    extras.ensure_nemotron_h()  # this environment's transformers 5 has it: returns, nothing installed
    extras.bake(tmp_path / "side")
    assert not (tmp_path / "side").exists() and "has NemotronH: no side folder" in capsys.readouterr().out


def test_the_extras_folder_is_named_after_the_requirements_and_the_image(tmp_path, monkeypatch):
    """Another container_image in the profile installs afresh instead of reusing a resolution made for the old one."""
    from nano3 import extras

    reqs = tmp_path / "requirements.txt"
    reqs.write_text("dvc==3.67.1\n")
    monkeypatch.setattr(extras, "image_digest", lambda: "image-a")
    first = extras.folder_for(reqs, tmp_path)
    monkeypatch.setattr(extras, "image_digest", lambda: "image-b")
    assert extras.folder_for(reqs, tmp_path) != first
    reqs.write_text("dvc==3.67.2\n")
    assert extras.folder_for(reqs, tmp_path) not in (first, first.with_name(first.name.replace("image-a", "image-b")))
    assert first.parent == tmp_path and first.name.startswith("requirements-py")


def test_the_job_start_install_uses_this_pythons_pip_not_the_one_on_path(tmp_path, monkeypatch):
    """On an H200 machine `pip` on PATH was another Python's (/usr/local/bin/pip beside the stage's venv python): the
    side folder's resolution then looked at the wrong packages. install_extras.sh runs `$PYTHON -m pip`."""
    from nano3 import extras

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pip").write_text(f"#!/bin/sh\ntouch {tmp_path}/wrong-pip-ran\nexit 1\n")
    (fake / "pip").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("pyyaml==6.0.4\n")  # this environment has it: nothing to install
    folder = extras.install_once(reqs, base=tmp_path / "extras", log=lambda m: None)
    assert (folder / ".complete").exists() and (folder / "INSTALLED.txt").read_text() == ""
    assert not (tmp_path / "wrong-pip-ran").exists()
