"""Issue 32: a job on the bare recipe image (`image_extras = "install"`) installs nano3's packages at its start, first on
PYTHONPATH. The image's transformers (before 5) requires huggingface-hub before 1.0; nano3's pinned datasets 5.2 brings
huggingface-hub 1.x, which used to land in the install and break the image's transformers at import. On a stand-in of
the image's Python stack (tests/standin/recipe_image.txt, a real venv from PyPI), stages/in_image.sh's install runs for
real: it installs only what the image lacks, shadows nothing, and the tokenizer and prep stages and the training plan
run there with the same bytes as in the project's own environment. Export and eval, which load transformers' NemotronH
(transformers >= 5), get a side folder of their own there, or stop in one line before any work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, copy_repo, make_params

STANDIN = ROOT / "tests" / "standin" / "recipe_image.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """A venv holding the stand-in's packages: the 'image' Python."""
    venv = tmp_path_factory.mktemp("standin") / "image"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-cache-dir", "-r", str(STANDIN)],
                   check=True, capture_output=True, text=True, timeout=900)
    return venv


def in_image(repo: Path, image: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{image / 'bin'}:/usr/bin:/bin", "HOME": str(repo), "NANO3_IMAGE_EXTRAS": "install",
           "PYTHONPATH": str(repo / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", "stages/in_image.sh", *cmd], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=1200)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("standin-repo") / "repo")


def test_the_extras_install_shadows_nothing_of_the_image_and_the_cpu_stages_run_there(image, repo, tmp_path, spm_dir,
                                                                                       sample_dir):
    versions = ("import transformers, huggingface_hub, datasets, dvc, dvclive, sentencepiece, gigatoken; "
                "print(transformers.__version__, huggingface_hub.__version__, datasets.__version__)")
    done = in_image(repo, image, "python", "-c", versions)
    assert done.returncode == 0, done.stderr[-3000:]
    # the image's own versions, with nano3's packages importable beside them
    assert done.stdout.split()[-3:] == ["4.57.6", "0.36.2", "4.4.2"]
    assert "image ok: nano3's packages" in done.stdout
    extras = next((repo / ".nano3-extras").glob("requirements-py*"))
    installed = {canonical(line.split("==")[0]) for line in (extras / "INSTALLED.txt").read_text().split()}
    image_has = {canonical(line.split("==")[0]) for line in subprocess.run(
        [str(image / "bin" / "pip"), "freeze", "--all"], capture_output=True, text=True, check=True).stdout.split()}
    assert {"dvc", "dvclive", "sentencepiece", "gigatoken"} <= installed
    assert not installed & image_has  # nothing the image has is installed again: nothing shadows it
    on_path = {canonical(p.name.split("-")[0]) for p in extras.glob("*.dist-info")}
    assert on_path == {canonical(n) for n in installed}

    # the tokenizer stage, prep and the training plan in the image's Python give what they give in the project's own
    # environment (blend needs the image's torch and megatron-core, which this stand-in does not hold)
    datasets = {name: {"source": str(sample_dir / name)} for name in ("stdlib-docs", "stdlib-code")}
    for where, python, extra_path in (("image", str(image / "bin" / "python"), str(extras)),
                                      ("project", sys.executable, "")):
        home = tmp_path / where
        params = make_params(home, home / "tokenizer", datasets, prep={"workers": 1},
                             tokenizer={"vocab_size": 2048, "max_sentences": 20000})
        home.mkdir(parents=True, exist_ok=True)
        (home / "params.yaml").write_text(yaml.safe_dump(dict(params)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), extra_path]))}
        for stage, *args in (("tokenizer",), ("prep", "stdlib-docs"),
                             ("pretrain", "--dry-run", "--bridge-fields", "train.backend=megatron")):
            run = subprocess.run([python, str(ROOT / "stages" / f"{stage}.py"), "--params", str(home / "params.yaml"),
                                  *args], cwd=home, env=env, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, f"{where} {stage}: {run.stderr[-3000:]}"
        assert "pretrain phase1: Megatron-Bridge fields" in run.stdout, run.stdout[-2000:]
    tokenizers = [(tmp_path / w / "tokenizer" / "tokenizer.model").read_bytes() for w in ("image", "project")]
    assert tokenizers[0] == tokenizers[1]
    manifests = [json.loads((tmp_path / w / "prepared" / "stdlib-docs" / "manifest.json").read_text())
                 for w in ("image", "project")]
    shards = [[(s["sha256_bin"], s["sha256_idx"]) for split in m["splits"].values() for s in split["shards"]]
              for m in manifests]
    assert shards[0] == shards[1] and manifests[0]["tokens"] == manifests[1]["tokens"] > 0
    plans = [(tmp_path / w / "reports" / "plan" / "pretrain.json").read_text().replace(str(tmp_path / w), "HOME")
             for w in ("image", "project")]
    assert plans[0] == plans[1] and json.loads(plans[0])["bridge_fields"]["phase1"]["optimizer.lr"] > 0


def test_export_and_eval_get_transformers_5_in_a_side_folder_and_the_other_stages_keep_the_images(image, repo, tmp_path,
                                                                                                   spm_dir):
    """Run after the test above (its install is this repo's .nano3-extras)."""
    extras = next((repo / ".nano3-extras").glob("requirements-py*"))
    bare = {"PATH": f"{image / 'bin'}:/usr/bin:/bin", "HOME": str(repo), "PYTHONPATH": f"{repo / 'src'}:{extras}"}
    # without image_extras = install: the export stage stops in one line before any work
    refused = subprocess.run([str(image / "bin" / "python"), "stages/export.py", "--params", "params.yaml"], cwd=repo,
                             env=bare, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("error: transformers 4.57.6 has no NemotronH model") and "image_extras" in error, error
    assert not (repo / "models").exists() and not list((repo / ".nano3-extras").glob("nemotron-h*"))

    # with it, through the job's start: the side folder is installed once, and the stage runs on with transformers 5
    probe = tmp_path / "probe.py"
    probe.write_text(f"""
import json, sys
from nano3.extras import ensure_nemotron_h
ensure_nemotron_h()
import huggingface_hub, transformers
from nano3.export.hf import save_hf_tokenizer
from nano3.model.hf import nemotron_h_config
from nano3.model.presets import PRESETS
config = nemotron_h_config(PRESETS["tiny"], 4096, 2, 8192)
save_hf_tokenizer({str(spm_dir)!r}, sys.argv[1])
print(json.dumps({{"transformers": transformers.__version__, "hub": huggingface_hub.__version__,
                  "layers": config.layers_block_type}}))
""")
    runs = [in_image(repo, image, "python", str(probe), str(tmp_path / f"hf{i}")) for i in (1, 2)]
    for done in runs:
        assert done.returncode == 0, done.stderr[-3000:]
    assert "installing nemotron-h.txt" in runs[0].stdout + runs[0].stderr
    assert "installing" not in runs[1].stdout + runs[1].stderr  # the second job reuses it
    seen = json.loads(runs[1].stdout.splitlines()[-1])
    assert (seen["transformers"], seen["hub"]) == ("5.12.1", "1.33.0")
    side = next((repo / ".nano3-extras").glob("nemotron-h-py*"))
    installed = {canonical(line.split("==")[0]) for line in (side / "INSTALLED.txt").read_text().split()}
    assert {"transformers", "huggingface-hub"} <= installed and not installed & {"torch", "numpy", "megatron-core"}

    # the exported tokenizer is the one the project's own environment writes
    from nano3.export.hf import save_hf_tokenizer

    save_hf_tokenizer(spm_dir, tmp_path / "project")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf2" / name).read_bytes() == (tmp_path / "project" / name).read_bytes(), name

    # the export stage itself gets past the check into its own inputs (no checkpoint in this copy)
    stage = in_image(repo, image, "python", "stages/export.py", "--params", "params.yaml")
    assert stage.returncode == 2 and "NemotronH" not in stage.stderr, stage.stderr[-2000:]
    assert "lc manifest (run make lc)" in stage.stderr.strip().splitlines()[-1]
    # and a training-side stage in the same image still sees the image's transformers
    again = in_image(repo, image, "python", "-c", "import transformers; print(transformers.__version__)")
    assert again.stdout.split()[-1] == "4.57.6"
