"""Cluster profiles and job requests: every bad profile fails in one line before anything is submitted."""

from __future__ import annotations

import subprocess

import pytest

from nano3.config import load_params
from nano3.config.clusters import get_profile
from nano3.errors import UserError
from nano3.launch import slurm
from nano3.launch.slurm import build_request
from tests.conftest import ROOT

GOOD = """
[big]
account = "acct"
partition = "batch"
nodes = 2
gpus_per_node = 8
cpus_per_task = 64
time = "02:00:00"
train_time = "12:00:00"
runtime = "pyxis"
container_image = "nvcr.io/nvidia/nemo:25.11.nemotron_3_nano"
mounts = ["/lustre:/lustre", "/scratch:/scratch"]
max_requeues = 7
"""


def profile_file(tmp_path, text: str):
    path = tmp_path / "clusters.toml"
    path.write_text(text)
    return path


def test_shipped_profiles_are_valid():
    for name in ("example-pyxis", "example-apptainer", "local"):
        assert get_profile(name, ROOT / "stages" / "clusters.toml").name == name


@pytest.mark.parametrize("edit,message", [
    (lambda t: t, "unknown cluster 'small'; known: big"),
    (lambda t: t.replace('account = "acct"\n', ""), "[big]: missing 'account' (use account = \"\" if the cluster has no accounting)"),
    (lambda t: t.replace('runtime = "pyxis"', 'runtime = "docker"'), "[big]: runtime 'docker' is not one of pyxis, apptainer, none"),
    (lambda t: t.replace('container_image = "nvcr.io/nvidia/nemo:25.11.nemotron_3_nano"\n', ""), "runtime 'pyxis' needs a container_image"),
    (lambda t: t.replace("nodes = 2", 'nodes = "two"'), "'nodes' must be a positive integer, got 'two'"),
    (lambda t: t + "gpu_per_node = 4\n", "unknown keys ['gpu_per_node']"),
    (lambda t: t + 'image_extras = "pip"\n', "[big]: image_extras 'pip' is not one of installed, install"),
    (lambda t: t + 'host_memory_gib = "2T"\n', "[big]: 'host_memory_gib' must be a positive number of GiB, got '2T'"),
    (lambda t: t.replace('train_time = "12:00:00"', 'train_time = "12h"'), "[big]: 'train_time' = '12h' is not a Slurm time limit"),
])
def test_bad_profiles(tmp_path, edit, message):
    path = profile_file(tmp_path, edit(GOOD))
    with pytest.raises(UserError) as err:
        get_profile("small" if "unknown cluster" in message else "big", path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_profile_says_whether_the_image_has_nanos_packages(tmp_path):
    """The bare recipe image lacks dvc/dvclive: its example profile installs them at job start; a job's
    environment carries the setting to stages/in_image.sh."""
    shipped = ROOT / "stages" / "clusters.toml"
    assert get_profile("example-pyxis", shipped).image_extras == "install"
    assert get_profile("example-apptainer", shipped).image_extras == "installed"
    params = load_params(ROOT / "params.yaml")
    path = profile_file(tmp_path, GOOD + 'image_extras = "install"\n')
    request = build_request("blend", params, get_profile("big", path), [])
    assert request.env["NANO3_IMAGE_EXTRAS"] == "install"
    plain = build_request("blend", params, get_profile("big", profile_file(tmp_path, GOOD)), [])
    assert plain.env["NANO3_IMAGE_EXTRAS"] == "installed"


def test_training_request_takes_its_shape_from_params_or_the_profile(tmp_path):
    profile = get_profile("big", profile_file(tmp_path, GOOD))
    params = load_params(ROOT / "params.yaml", ["train.micro_batch_size=1"])  # tiny: GBS 16 over 16 GPUs
    req = build_request("pretrain", params, profile)
    assert {"--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1", "--cpus-per-task=64", "--time=12:00:00",
            "--account=acct", "--partition=batch", "--job-name=nano3-pretrain"} <= set(req.sbatch_args)
    assert req.env["NANO3_RUNTIME"] == "pyxis" and req.env["NANO3_MOUNTS"] == "/lustre:/lustre,/scratch:/scratch"
    assert req.env["NANO3_MAX_REQUEUES"] == "7" and req.script == "stages/pretrain.sbatch"
    one = build_request("pretrain", load_params(ROOT / "params.yaml", ["train.nodes=1", "train.gpus_per_node=4"]), profile)
    assert "--nodes=1" in one.sbatch_args and "--gpus-per-node=4" in one.sbatch_args
    data = build_request("prep", params, profile, ["stdlib-code"])
    assert "--nodes=1" in data.sbatch_args and "--time=02:00:00" in data.sbatch_args
    assert data.name == "nano3-prep-stdlib-code" and data.stage_args == ["stdlib-code"]
    assert not any(a.startswith("--gpus") for a in data.sbatch_args)
    for stage in ("export", "eval"):  # one process on one GPU
        req = build_request(stage, params, profile)
        assert {"--nodes=1", "--ntasks=1", "--gpus-per-node=1"} <= set(req.sbatch_args)
        assert req.script == f"stages/{stage}.sbatch" and (ROOT / req.script).exists()


@pytest.mark.parametrize("overrides,message", [
    ([], "train.global_batch_size=16 is not a multiple of micro_batch_size x DP = 4x16"),
    (["train.micro_batch_size=1", "train.parallel.tp=3"], "TP x PP x CP = 3x1x1 = 3 does not divide the 16 GPUs"),
    (["train.micro_batch_size=1", "train.gpus_per_node=16"], "train.gpus_per_node=16 but cluster 'big' nodes have 8 GPUs"),
])
def test_layouts_the_cluster_cannot_run_fail_before_submission(tmp_path, overrides, message):
    profile = get_profile("big", profile_file(tmp_path, GOOD))
    with pytest.raises(UserError) as err:
        build_request("pretrain", load_params(ROOT / "params.yaml", overrides), profile)
    assert message in str(err.value)


def test_a_node_without_the_host_memory_for_its_ranks_is_refused_before_submission(tmp_path):
    """Issue 13's ranks were SIGKILLed mid-run when a node ran out of host memory. With the node's memory in the
    profile, the plan's host estimate for all ranks of a node must fit it, or nothing is submitted."""
    production = load_params(ROOT / "configs" / "nano3.yaml")
    small = get_profile("big", profile_file(tmp_path, GOOD + "host_memory_gib = 256\n"))
    with pytest.raises(UserError) as err:
        build_request("pretrain", production, small)
    message = str(err.value)
    assert message.startswith("train: the plan estimates 56.6 GiB of host memory per rank") and "\n" not in message
    assert "453 GiB for the 8 ranks of a node, but a node of cluster 'big' (host_memory_gib) has 256 GiB" in message
    assert "lower train.num_workers" in message
    large = get_profile("big", profile_file(tmp_path, GOOD + "host_memory_gib = 2000\n"))
    assert "--nodes=2" in build_request("pretrain", production, large).sbatch_args
    assert "--nodes=2" in build_request("pretrain", production, get_profile("big", profile_file(tmp_path, GOOD))).sbatch_args


def test_jobs_get_the_hub_and_wandb_credentials_and_printing_hides_them(tmp_path, monkeypatch):
    """Issue 30: the container does not mount the home directory, where `hf auth login` and `wandb login` keep
    them: the request forwards them (the shell's, else the files'), and `--print` shows neither."""
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    (hf_home / "token").write_text("hf_from_login\n")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password wandb_from_login\n")
    for key in ("HF_TOKEN", "WANDB_API_KEY", "HF_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    import huggingface_hub.constants  # it reads HF_HOME once, when first imported

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    profile = get_profile("big", profile_file(tmp_path, GOOD))
    request = build_request("prep", load_params(ROOT / "params.yaml"), profile, ["stdlib-code"])
    assert request.env["HF_TOKEN"] == "hf_from_login" and request.env["WANDB_API_KEY"] == "wandb_from_login"
    assert request.env["HF_HOME"] == str(hf_home)
    line = request.shell_line()
    assert "hf_from_login" not in line and "wandb_from_login" not in line and "HF_TOKEN=<hidden>" in line
    monkeypatch.setenv("HF_TOKEN", "hf_from_shell")
    assert build_request("prep", load_params(ROOT / "params.yaml"), profile, ["x"]).env["HF_TOKEN"] == "hf_from_shell"


def test_following_a_log_joins_a_character_written_in_two_pieces(tmp_path):
    """Ranks and the batch script append to one job log, so tqdm's bar can land in it a byte at a time: the
    follower prints the character whole, not two replacement marks (CI's time-limit log had '\\xe2\\x96' then '\\x88')."""
    import io
    import threading

    log = tmp_path / "job.out"
    log.write_bytes("loss 5.9 ".encode() + "█".encode()[:2])
    later = threading.Timer(1.5, lambda: log.open("ab").write("█".encode()[2:] + b" done\n"))
    later.start()
    job = subprocess.Popen(["sleep", "3"])
    shown = io.StringIO()
    assert slurm.wait_for("0", log, job, stream=shown, cancel_on_interrupt=False) == 0
    later.join()
    assert shown.getvalue() == "loss 5.9 █ done\n"


def test_slurm_time_limits_read_as_slurm_reads_them():
    from nano3.config.clusters import slurm_seconds

    assert [slurm_seconds(t) for t in ("30", "10:30", "04:00:00", "1-00:00:00", "2-12", "1-2:30")] == \
        [1800, 630, 14400, 86400, 216000, 95400]


def test_saves_are_sized_by_wall_clock_and_checked_against_the_job_time_limit(tmp_path):
    """Issue 30: save_interval 500 is ~35 h on the production layout (the plan's 248 s per iteration) against 4 h
    jobs, so no periodic save ever came. A profile whose jobs end before the plan's first save is one line at
    submission; train.save_minutes turns minutes into iterations (what Bridge gets)."""
    from nano3.train.mapping import save_interval
    from nano3.train.plan import build_plan

    text = GOOD.replace("nodes = 2", "nodes = 64").replace('train_time = "12:00:00"', 'train_time = "04:00:00"')
    profile = get_profile("big", profile_file(tmp_path, text))
    saving_rarely = load_params(ROOT / "configs" / "nano3.yaml", ["train.save_minutes=null"])
    seconds = build_plan(saving_rarely, stages=("train",), cluster_shape=profile.shape).stages["train"].seconds_per_iteration
    assert 200 < seconds < 400  # 25T tokens at the measured TFLOP/s: 329 s at 138 (248 s at the earlier 183)
    with pytest.raises(UserError) as err:
        build_request("pretrain", saving_rarely, profile)
    assert str(err.value).startswith(f"train: the plan's first checkpoint comes {500 * seconds / 3600:.1f} h into a "
                                     f"job (500 iterations x {seconds:.0f} s")
    assert "cluster 'big' (train_time) ends jobs after 4.0 h; set train.save_minutes" in str(err.value)
    assert "\n" not in str(err.value)
    hourly = load_params(ROOT / "configs" / "nano3.yaml")  # save_minutes: 60
    build_request("pretrain", hourly, profile)
    per_iteration = build_plan(hourly, stages=("train",), cluster_shape=profile.shape).stages["train"].seconds_per_iteration
    assert save_interval(hourly, "train") == int(3600 // per_iteration) == 10
    assert save_interval(load_params(ROOT / "params.yaml"), "train") == 50  # null: the iterations as written


def test_a_gated_hub_dataset_without_a_token_is_one_line_before_any_job(tmp_path, monkeypatch):
    """Issue 30: Nemotron's pretraining datasets are gated; a prep job without a token failed with 401 hours later in
    the queue. The submission refuses in one line; a token (HF_TOKEN or `hf auth login`'s file) or a local mirror
    lets it through."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    login_file = tmp_path / "hf-home" / "token"  # where `hf auth login` writes: nothing there yet
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(login_file))
    profile = get_profile("local", ROOT / "stages" / "clusters.toml")
    params = load_params(ROOT / "configs" / "nano3.yaml")
    with pytest.raises(UserError) as err:
        build_request("prep", params, profile, ["cc-v2-high-quality"], "configs/nano3.yaml")
    assert str(err.value) == (f"{params.source}: datasets.cc-v2-high-quality is gated on the Hugging Face Hub "
                              "(hf://nvidia/Nemotron-CC-v2/High-Quality) and no token is set: accept its terms on the "
                              "dataset page, then run `hf auth login` or export HF_TOKEN (or set prep.hf_mirror to a "
                              "local copy)")
    login_file.parent.mkdir()
    login_file.write_text("hf_from_login")
    assert build_request("prep", params, profile, ["cc-v2-high-quality"]).env["HF_TOKEN"] == "hf_from_login"
    login_file.unlink()
    mirrored = load_params(ROOT / "configs" / "nano3.yaml", [f"prep.hf_mirror={tmp_path}"])
    build_request("prep", mirrored, profile, ["cc-v2-high-quality"])


def test_following_a_log_that_a_requeued_run_started_afresh_reads_it_from_the_top(tmp_path):
    """A requeued job without --open-mode=append truncates its log; the follower, past the old end, waited for the
    new log to grow back to that size (CI's prep-restart rehearsal hung there)."""
    import io
    import threading

    log = tmp_path / "job.out"
    log.write_text("first run\n" * 20)
    later = threading.Timer(1.5, lambda: log.write_text("second run done\n"))
    later.start()
    job = subprocess.Popen(["sleep", "3"])
    shown = io.StringIO()
    assert slurm.wait_for("0", log, job, stream=shown, cancel_on_interrupt=False, offset=log.stat().st_size) == 0
    later.join()
    assert shown.getvalue() == "second run done\n"


@pytest.mark.parametrize("written,used", [
    ("nvcr.io/nvidia/nemo:25.11.nemotron_3_nano", "nvcr.io#nvidia/nemo:25.11.nemotron_3_nano"),  # docker-style
    ("nvcr.io#nvidia/nemo:25.11.nemotron_3_nano", "nvcr.io#nvidia/nemo:25.11.nemotron_3_nano"),  # enroot's own
    ("registry.local:5000/team/nemo:26.02", "registry.local:5000#team/nemo:26.02"),
    ("/lustre/images/nemo-25.11.sqsh", "/lustre/images/nemo-25.11.sqsh"),  # a squash file, imported once per site
    ("ubuntu:24.04", "ubuntu:24.04"),  # Docker Hub: no registry host
])
def test_pyxis_gets_the_image_in_the_form_enroot_3_and_4_both_read(tmp_path, written, used):
    """Issue 32: pyxis documents `nvcr.io#nvidia/nemo:tag`; enroot before 4.0 reads `nvcr.io/nvidia/...` as a Docker
    Hub name (401). A registry host before the first `/` becomes enroot's `#` form; paths and Hub names stay."""
    text = GOOD.replace("nvcr.io/nvidia/nemo:25.11.nemotron_3_nano", written)
    profile = get_profile("big", profile_file(tmp_path, text))
    assert profile.container_image == used
    request = build_request("sample", load_params(ROOT / "params.yaml"), profile)
    assert request.env["NANO3_IMAGE"] == used
    apptainer = text.replace('runtime = "pyxis"', 'runtime = "apptainer"')
    assert get_profile("big", profile_file(tmp_path, apptainer)).container_image == written  # apptainer's own forms


def test_a_job_imports_the_image_once_and_every_step_reuses_it(tmp_path):
    """Each srun step of a pyxis job names its container after the job: pyxis imports the image at the first step
    and reuses the container for the others. Pyxis is not installed here, so srun is a stand-in that prints the
    arguments slurm.sh's real in_container gives it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "NANO3_RUNTIME": "pyxis", "SLURM_JOB_ID": "4242",
           "NANO3_IMAGE": "nvcr.io#nvidia/nemo:25.11.nemotron_3_nano", "SLURM_SUBMIT_DIR": str(tmp_path)}
    out = subprocess.run(["bash", "-c", f"source {ROOT / 'stages' / 'slurm.sh'} && in_container python3 -V"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert "--container-image=nvcr.io#nvidia/nemo:25.11.nemotron_3_nano" in out
    assert "--container-name=nano3-4242" in out  # one container per job, whatever its steps
    assert out[-3:] == [f"{tmp_path}/stages/in_image.sh", "python3", "-V"]
