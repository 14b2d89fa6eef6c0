"""The container adds exactly the locked versions of what the repository needs on top of NeMo."""

import tomllib

from tests.conftest import ROOT


def test_container_requirements_match_the_lock():
    lock = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    lines = [line for line in (ROOT / "containers" / "requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert len(lines) >= 10
    for line in lines:
        name, version = line.split("==")
        key = name.lower().replace("_", "-").replace(".", "-")
        assert lock[key] == version, f"{name}: {version} vs uv.lock {lock.get(name)}"


def test_every_container_recipe_installs_that_file_from_the_recipe_base_image():
    for recipe in ("Dockerfile", "apptainer.def", "build.sh"):
        text = (ROOT / "containers" / recipe).read_text()
        assert "nvcr.io/nvidia/nemo:25.11.nemotron_3_nano" in text and "requirements.txt" in text
