"""The container adds exactly the locked versions of what the repository needs on top of NeMo."""

import tomllib

from tests.conftest import ROOT


def test_container_requirements_match_the_lock():
    """nano3's packages, and the side folder of export and eval (transformers 5 where the image has 4.57)."""
    lock = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    for file, least in (("requirements.txt", 10), ("nemotron-h.txt", 3)):
        lines = [line for line in (ROOT / "containers" / file).read_text().splitlines()
                 if line and not line.startswith("#")]
        assert len(lines) >= least, file
        for line in lines:
            name, version = line.split("==")
            key = name.lower().replace("_", "-").replace(".", "-")
            assert lock[key] == version, f"{file}: {name}: {version} vs uv.lock {lock.get(name)}"


def test_every_container_recipe_installs_that_file_from_the_recipe_base_image():
    for recipe in ("Dockerfile", "apptainer.def", "build.sh"):
        text = (ROOT / "containers" / recipe).read_text()
        assert "nvcr.io/nvidia/nemo:25.11.nemotron_3_nano" in text and "requirements.txt" in text
    # one script pins the image's training stack and installs: each recipe and the job-start install call it
    for user in ("containers/Dockerfile", "containers/apptainer.def", "containers/build.sh", "src/nano3/extras.py"):
        assert "install_extras.sh" in (ROOT / user).read_text(), user
    # the job start installs through nano3.extras; each build bakes the side folder of export and eval
    assert "nano3.extras" in (ROOT / "stages" / "in_image.sh").read_text()
    for recipe in ("Dockerfile", "apptainer.def", "build.sh"):
        assert "nano3.extras --bake /opt/nano3/nemotron-h" in (ROOT / "containers" / recipe).read_text(), recipe


def test_every_image_build_ends_with_the_sanity_step_on_the_sources_it_copies():
    """Issue 12: the build imports Bridge's Nano 3 recipe, our entry module and dvclive, and plans the production
    config (containers/sanity.sh); the sources it needs are in the build context (.dockerignore lets them in)."""
    sanity = (ROOT / "containers" / "sanity.sh").read_text()
    for step in ("nemotron_3_nano_pretrain_config", "import nano3.train.entry, dvclive", "nano3.launch.image --full",
                 "stages/pretrain.py --dry-run --params configs/nano3.yaml"):
        assert step in sanity
    for recipe in ("Dockerfile", "apptainer.def", "build.sh"):
        assert "sanity.sh" in (ROOT / "containers" / recipe).read_text(), recipe
    allowed = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    copied = [word for line in (ROOT / "containers" / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY") for word in line.split()[1:-1]]
    assert copied and all(path in allowed and (ROOT / path).exists() for path in copied), copied


def test_the_build_script_points_at_a_readme_that_exists():
    text = (ROOT / "containers" / "build.sh").read_text()
    assert "containers/README.md" in text and (ROOT / "containers" / "README.md").exists()
